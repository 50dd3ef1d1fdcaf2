#!/usr/bin/env bash
# Train short, test long: tiny ALiBi, sinusoidal and RoPE models at seq_len 128 on the embedded stdlib corpus,
# then one evaluation of all of them on the same windows (lengths 128 .. 4096), one curve each.
# About 15 minutes on a 2-core CPU (docs/benchmarks.md). Extra arguments go to every command, e.g.
#   launch/extrapolation.sh data.cache_dir=/tmp/cache
# Environment:
#   OUT          default runs/extrapolation
#   ENCODINGS    default "alibi sinusoidal rope" (also learned, none): each trained at SEQ_LEN
#   RUNS         instead of ENCODINGS, "ENCODING:K ..." trains ENCODING at K x SEQ_LEN with equal tokens: the
#                micro-batch is MICRO_BATCH / K, so every run takes STEPS steps of MICRO_BATCH x SEQ_LEN tokens
#                (launch/train_short_test_long.sh uses it). Run directories: OUT/ENCODING (K = 1), OUT/ENCODING-LEN.
#   SEQ_LEN      default 128 (model=tiny's); MICRO_BATCH default 16 (train.micro_batch_size's); STEPS default 500
#   TRAIN_ARGS, EVAL_ARGS   extra overrides for the training commands / the evaluation only (space-separated)
# Trained runs are reused when the script runs again. OUT/timings.tsv gets "run_dir<TAB>wall s<TAB>CPU s" for each
# run this script trained (the whole training command: wall-clock, and the CPU time it used, which other work on
# the machine changes far less).
set -euo pipefail

OUT=${OUT:-runs/extrapolation}
ENCODINGS=${ENCODINGS:-alibi sinusoidal rope}
SEQ_LEN=${SEQ_LEN:-128}
MICRO_BATCH=${MICRO_BATCH:-16}
STEPS=${STEPS:-500}
RUNS=${RUNS:-$(for encoding in $ENCODINGS; do printf '%s:1 ' "$encoding"; done)}
read -r -a train_args <<< "${TRAIN_ARGS:-}"
read -r -a eval_args <<< "${EVAL_ARGS:-}"

mkdir -p "$OUT"
# CPU seconds (user + system) used so far by this shell's finished children: `times` must run in this shell (in a
# $(...) subshell it would count the subshell's children), so it writes to a file that awk reads.
children_cpu() {
  awk 'NR == 2 { split($1, u, "m"); split($2, s, "m"); print u[1] * 60 + u[2] + s[1] * 60 + s[2] }' "$OUT/.times"
}
runs=()
for spec in $RUNS; do
  encoding=${spec%%:*}
  multiple=${spec#*:}
  [[ $spec == *:* ]] || multiple=1
  if (( MICRO_BATCH % multiple )); then
    echo "error: RUNS entry $spec: MICRO_BATCH=$MICRO_BATCH is not divisible by $multiple (equal tokens per step)" >&2
    exit 2
  fi
  seq_len=$(( SEQ_LEN * multiple ))
  batch=$(( MICRO_BATCH / multiple ))
  run_dir="$OUT/$encoding"
  (( multiple == 1 )) || run_dir="$OUT/$encoding-$seq_len"
  echo "=== train: model.pos_encoding=$encoding seq_len $seq_len x micro-batch $batch ($STEPS steps) -> $run_dir"
  fresh=true
  [[ -f $run_dir/checkpoints/model.safetensors ]] && fresh=false
  started=$EPOCHREALTIME
  times > "$OUT/.times"
  cpu_before=$(children_cpu)
  pretrain stage=train run_dir="$run_dir" model.pos_encoding="$encoding" model.seq_len="$seq_len" \
    train.micro_batch_size="$batch" train.max_steps="$STEPS" ${train_args[@]+"${train_args[@]}"} "$@"
  if $fresh; then
    times > "$OUT/.times"
    awk -v run="$run_dir" -v a="$started" -v b="$EPOCHREALTIME" -v c0="$cpu_before" -v c1="$(children_cpu)" \
      'BEGIN { printf "%s\t%.1f\t%.1f\n", run, b - a, c1 - c0 }' >> "$OUT/timings.tsv"
  fi
  runs+=("$run_dir")
done

echo "=== eval: ${runs[*]} -> $OUT/compare/eval"
pretrain stage=eval run_dir="$OUT/compare" "eval.compare=[$(IFS=,; echo "${runs[*]}")]" \
  ${eval_args[@]+"${eval_args[@]}"} "$@"
