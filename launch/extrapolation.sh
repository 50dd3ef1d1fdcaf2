#!/usr/bin/env bash
# Train short, test long: tiny ALiBi, sinusoidal and RoPE models at seq_len 128 on the embedded stdlib corpus,
# then one evaluation of all three on the same windows (lengths 128 .. 4096), one curve each.
# About 15 minutes on a 2-core CPU (docs/benchmarks.md). Extra arguments go to every command, e.g.
#   launch/extrapolation.sh data.cache_dir=/tmp/cache
# Environment: OUT (default runs/extrapolation), ENCODINGS (default "alibi sinusoidal rope"; also learned,
# none), STEPS (default 500). Trained runs are reused when the script runs again.
set -euo pipefail

OUT=${OUT:-runs/extrapolation}
ENCODINGS=${ENCODINGS:-alibi sinusoidal rope}
STEPS=${STEPS:-500}

runs=()
for encoding in $ENCODINGS; do
  echo "=== train: model.pos_encoding=$encoding ($STEPS steps) -> $OUT/$encoding"
  pretrain stage=train run_dir="$OUT/$encoding" model.pos_encoding="$encoding" train.max_steps="$STEPS" "$@"
  runs+=("$OUT/$encoding")
done

echo "=== eval: ${runs[*]} -> $OUT/compare/eval"
pretrain stage=eval run_dir="$OUT/compare" "eval.compare=[$(IFS=,; echo "${runs[*]}")]" "$@"
