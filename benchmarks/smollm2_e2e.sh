#!/usr/bin/env bash
# SmolLM2 experiment for the end-to-end stage: the default block-wise calibration once (its block
# results kept), then end-to-end variants resumed from those blocks (only the stage differs), and
# learned rounding (full recipe) alongside; then one table on the held-back articles (2048 tokens).
#
#   bash benchmarks/smollm2_e2e.sh OUTDIR "EPOCHS:LR EPOCHS:LR ..." [extra convert flags...]
#
# Variant NAME e2e-EPOCHS-LR. MODEL (env) is the table's source model (default: the embedded GGUF).
# SKIP_LEARNED=1 leaves out the learned-rounding run. EVAL_FLAGS (env) goes to `wkvq eval --table`.
set -euo pipefail
out=${1:?usage: smollm2_e2e.sh OUTDIR "EPOCHS:LR ..." [convert flags]}
variants=${2:?usage: smollm2_e2e.sh OUTDIR "EPOCHS:LR ..." [convert flags]}
shift 2
model=${MODEL:-${WKVQ_CACHE:-$HOME/.cache/wkvquant}/SmolLM2-135M-Instruct.Q4_1.gguf}
mkdir -p "$out/logs"
work() { echo "$(dirname "$1")/.$(basename "$1").wkvq-work"; }
learned_pid=
if [ -z "${SKIP_LEARNED:-}" ]; then
  python3 -m cli -v convert --out "$out/learned" --overwrite --rounding learned "$@" \
    > "$out/logs/convert-learned.log" 2>&1 &
  learned_pid=$!
fi
python3 -m cli -v convert --out "$out/wkvquant" --overwrite --keep-work "$@" > "$out/logs/convert-wkvquant.log" 2>&1
pids=()
artifacts=(--artifact wkvquant="$out/wkvquant")
rows=fp16,w4kv4-rtn,wkvquant
for v in $variants; do
  name="e2e-${v%%:*}-${v##*:}"
  rm -rf "$(work "$out/$name")"
  cp -r "$(work "$out/wkvquant")" "$(work "$out/$name")"
  python3 -m cli -v convert --out "$out/$name" --overwrite --resume --e2e-epochs "${v%%:*}" --e2e-lr "${v##*:}" "$@" \
    > "$out/logs/convert-$name.log" 2>&1 &
  pids+=($!)
  artifacts+=(--artifact "$name=$out/$name")
  rows="$rows,$name"
done
status=0
for p in "${pids[@]}" $learned_pid; do wait "$p" || status=1; done
if [ -n "$learned_pid" ]; then artifacts+=(--artifact learned="$out/learned"); rows="$rows,learned"; fi
tail -n 2 "$out"/logs/convert-*.log
[ "$status" = 0 ] || { echo "a conversion failed"; exit 1; }
# shellcheck disable=SC2086
python3 -m cli eval "$model" --table --no-progress --rows "$rows" "${artifacts[@]}" \
  --json "$out/table.json" --markdown "$out/table.md" ${EVAL_FLAGS:-} 2>&1 | tee "$out/logs/eval.log"
