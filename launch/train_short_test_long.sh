#!/usr/bin/env bash
# The ALiBi paper's headline in one command (Press et al. 2022, "Train Short, Test Long"): ALiBi trained at L
# against sinusoidal and RoPE trained at L and at 2L, 4L, ... with equal tokens (a kL run takes the same STEPS
# steps with micro-batch MICRO_BATCH / k), all evaluated on the same validation windows at L, 2L, 4L, ...; then one
# table, one plot and the answer: does ALiBi trained at L match or beat the baselines trained at kL at kL, while
# training faster with less memory? Trains with launch/extrapolation.sh, answers with
# `python -m pretrain.bench train_short_test_long`. Defaults: model=tiny on data=stdlib, L=128, 500 steps of
# 2,048 tokens, baselines also at 256 and 512 (7 models; roughly half an hour on an idle 2-core CPU, estimated).
# Measured (docs/benchmarks.md): SEQ_LEN=64 STEPS=300 MULTIPLES=2 took 32 minutes on 2 cores shared with other
# work, 6.7 minutes of CPU time. Run it with OMP_NUM_THREADS=1 on a shared machine.
# Extra arguments go to every pretrain command, e.g. data.cache_dir=/tmp/cache. Environment:
#   OUT (default runs/train_short_test_long), SEQ_LEN (L, default 128), STEPS (default 500),
#   MICRO_BATCH (default 16; divisible by every multiple), BASELINES (default "sinusoidal rope"),
#   MULTIPLES (longer training lengths for the baselines, as multiples of L; default "2 4"),
#   EVAL_MULTIPLES (evaluation lengths, multiples of L; default "1 2 4 8 16"), EVAL_ARGS, TRAIN_ARGS (extra
#   overrides for the evaluation / the training commands), TOLERANCE (ALiBi "matches" at a perplexity ratio up
#   to 1 + TOLERANCE; default 0.02).
# Writes OUT/<run>/ for each model, OUT/compare/eval/ (results.json, plots) and OUT/headline/ (headline.md,
# headline.json, headline.png). Trained runs are reused when the script runs again.
set -euo pipefail

started=$EPOCHREALTIME
OUT=${OUT:-runs/train_short_test_long}
SEQ_LEN=${SEQ_LEN:-128}
BASELINES=${BASELINES:-sinusoidal rope}
MULTIPLES=${MULTIPLES:-2 4}
EVAL_MULTIPLES=${EVAL_MULTIPLES:-1 2 4 8 16}
TOLERANCE=${TOLERANCE:-0.02}

runs="alibi:1"
for encoding in $BASELINES; do
  for multiple in 1 $MULTIPLES; do
    runs+=" $encoding:$multiple"
  done
done
lengths=$(for k in $EVAL_MULTIPLES; do printf '%s,' $(( SEQ_LEN * k )); done)
# Passkey retrieval answers another question (and tiny models score chance): off unless EVAL_ARGS turns it on.
export OUT SEQ_LEN RUNS="$runs" EVAL_ARGS="eval.lengths=[${lengths%,}] eval.passkey=false ${EVAL_ARGS:-}"

"$(dirname "$0")/extrapolation.sh" "$@"

python -m pretrain.bench train_short_test_long --results "$OUT/compare/eval/results.json" \
  --timings "$OUT/timings.tsv" --out "$OUT/headline" --tolerance "$TOLERANCE" \
  --script-seconds "$(awk -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')"
awk -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN { s = b - a; printf "=== done in %d min %02d s\n", s / 60, s % 60 }'
