#!/usr/bin/env bash
# Prepare a large corpus on a Slurm cluster. Run it on the login node (not under sbatch): it trains the tokenizer
# here, on a sample of the corpus, then submits the tokenization as a Slurm array job (data.executor=slurm) and
# returns at once. The arguments are Hydra overrides, passed through unchanged; data.cache_dir must be on storage
# that every node shares:
#
#   launch/prepare_slurm.sh data=files 'data.paths=[/shared/corpus/**/*.jsonl]' data.vocab_size=32768 \
#       data.cache_dir=/shared/data data.tasks=256 data.slurm.partition=cpu data.slurm.time=02:00:00
#
# Then either run the same command again once the job ended (it finishes the corpus: writes its manifest; while
# the job still runs it says how far it is and submits nothing), or submit the training job right away with the
# same data.* overrides, to start when the array succeeded (its prepare finishes the corpus):
#
#   sbatch --dependency=afterok:<job id> launch/slurm.sbatch <the same data.* overrides> model=... train....
#
# Units that failed are reported by the next command, units that a task did not finish are submitted again.
# See docs/prepare.md ("A terabyte on a cluster").
#
# Environment: PYTHON (default: python), the interpreter with this package installed; the array's tasks run the
# same one (data.slurm.env_command adds shell lines before each task, e.g. `module load ...`).

# Stop at the first failing command, unset variable or failing pipe stage.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."  # the repository root: relative data paths start here, as for training
if [[ -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
  echo "error: launch/prepare_slurm.sh runs on the login node, not inside an array task; it submits the array" >&2
  exit 2
fi

output=$(mktemp)
trap 'rm -f "$output"' EXIT
status=0
"${PYTHON:-python}" -m pretrain stage=prepare data.executor=slurm "$@" | tee "$output" || status=$?
if ((status != 0)); then exit "$status"; fi

# The line pretrain printed names the job to wait for; print the two ways on.
job=$(grep -o 'afterok:[0-9:]*' "$output" | tail -n 1 | cut -d: -f2- || true)
if [[ -n $job ]]; then
  echo "next: once job $job ends, run this command again to finish the corpus; or chain the training now:"
  echo "  sbatch --dependency=afterok:$job launch/slurm.sbatch $(printf '%q ' "$@")model=... train...."
fi
