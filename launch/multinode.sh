#!/usr/bin/env bash
# Train on several machines listed in a hostfile: the DeepSpeed launcher on this machine (the first host)
# starts one launcher per host over ssh, through pdsh. The arguments are Hydra overrides:
#
#   HOSTFILE=launch/hostfile launch/multinode.sh model=1.3b train=zero2_bf16 run_dir=runs/1.3b
#
# Needs: passwordless ssh from this machine to every host (and to itself), pdsh, and the repository and the
# same Python environment at the same path on every host (a shared filesystem). The run directory and
# data.cache_dir must be on the shared filesystem too. See docs/cluster.md.
#
# Environment: HOSTFILE (default launch/hostfile; see launch/hostfile.example), NUM_NODES, NUM_GPUS (use
# fewer than the hostfile offers), MASTER_ADDR (default: this host's first address from `hostname -I`),
# MASTER_PORT (default 29500). Only NCCL_*, PYTHON*, UCX_*, MV2_* and MLFLOW* variables reach the other
# hosts: put the rest (WANDB_API_KEY, OMP_NUM_THREADS, HF_HOME, ...) in a .deepspeed_env file, one KEY=VALUE
# a line, in this directory or your home directory.
#
# Stopping: Ctrl-C or SIGTERM here makes the launcher kill every rank (pdsh + pkill), without a checkpoint.
# For a clean stop use train.time_limit=HH:MM or train.stop_at_step=K, or send SIGTERM to any one rank
# (a `python -u -m pretrain` process on any host): the ranks stop together after that step, with a checkpoint.

# Stop at the first failing command, unset variable or failing pipe stage.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."  # pdsh starts each host's launcher in this same directory
HOSTFILE=${HOSTFILE:-launch/hostfile}
if [[ ! -f $HOSTFILE ]]; then
  echo "error: hostfile $HOSTFILE not found: copy launch/hostfile.example to launch/hostfile and list your hosts" >&2
  exit 2
fi

launcher_args=(--hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}")
if [[ -n ${MASTER_ADDR:-} ]]; then launcher_args+=(--master_addr "$MASTER_ADDR"); fi
if [[ -n ${NUM_NODES:-} ]]; then launcher_args+=(--num_nodes "$NUM_NODES"); fi
if [[ -n ${NUM_GPUS:-} ]]; then launcher_args+=(--num_gpus "$NUM_GPUS"); fi
# exec: the launcher handles signals itself in this mode (it tears the run down on every host).
exec deepspeed "${launcher_args[@]}" --module pretrain "$@"
