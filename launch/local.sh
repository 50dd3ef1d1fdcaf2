#!/usr/bin/env bash
# Train on one machine with all of its GPUs (or NUM_GPUS of them) under the DeepSpeed launcher. The arguments
# are Hydra overrides, passed through unchanged:
#
#   launch/local.sh model=350m train=zero1_bf16 run_dir=runs/350m
#   NUM_GPUS=4 launch/local.sh model=125m parallel=ulysses4 model.seq_len=16384
#
# Run it again to resume (train.resume=auto continues from <run_dir>/checkpoints/latest). SIGTERM or Ctrl-C
# asks the ranks to stop after the current step with a checkpoint; a second one aborts. See docs/cluster.md.
#
# Environment: NUM_GPUS (default: every GPU the launcher sees), MASTER_PORT (default 29500; set another one
# to run two jobs on one machine), OMP_NUM_THREADS, WANDB_API_KEY and the other WANDB_* variables.

# Stop at the first failing command, unset variable or failing pipe stage.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."  # the repository root: relative run_dir and data paths start here
# shellcheck source=launch/slurm_env.sh
source launch/slurm_env.sh  # run_launcher: passes SIGTERM on to the ranks so that they can save a checkpoint

launcher_args=(--master_port "${MASTER_PORT:-29500}")
if [[ -n ${NUM_GPUS:-} ]]; then launcher_args+=(--num_gpus "$NUM_GPUS"); fi
run_launcher deepspeed "${launcher_args[@]}" --module pretrain "$@"
