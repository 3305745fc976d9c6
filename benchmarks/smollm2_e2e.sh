#!/usr/bin/env bash
# SmolLM2 experiment for the end-to-end stage: the default block-wise calibration once (its block
# results kept), then end-to-end variants resumed from those blocks (only the stage differs), and
# learned rounding (full recipe) alongside; then one table on the held-back articles (2048 tokens).
#
#   bash benchmarks/smollm2_e2e.sh OUTDIR "EPOCHS:LR[:FLAGS] ..." [extra convert flags...]
#
# A variant's FLAGS are extra convert flags of that variant alone, comma-separated
# (e.g. 2:1e-2:--e2e-rounding,--round-lr=2e-3); it is named e2e-EPOCHS-LR[-FLAGS, dashes and '=' dropped].
# MODEL (env) is the table's source model (default: the embedded GGUF). SKIP_LEARNED=1 leaves out the
# learned-rounding run. GPUS (env, e.g. "0 1") spreads the variants over those devices, round robin.
# SKIP_BASE=1 reuses OUTDIR/wkvquant and its kept work dir. EVAL_FLAGS (env) goes to `wkvq eval --table`.
# BASE (env, default wkvquant): the base run's name under OUTDIR (made with the same extra convert flags).
# SKIP_TABLE=1: no table (the caller makes one). NAME_PREFIX (env): prepended to every variant's name (stages
# from two bases in one OUTDIR).
set -euo pipefail
out=${1:?usage: smollm2_e2e.sh OUTDIR "EPOCHS:LR ..." [convert flags]}
variants=${2:?usage: smollm2_e2e.sh OUTDIR "EPOCHS:LR ..." [convert flags]}
shift 2
base=${BASE:-wkvquant}
model=${MODEL:-${WKVQ_CACHE:-$HOME/.cache/wkvquant}/SmolLM2-135M-Instruct.Q4_1.gguf}
mkdir -p "$out/logs"
work() { echo "$(dirname "$1")/.$(basename "$1").wkvq-work"; }
read -r -a gpus <<< "${GPUS:-}"
# shellcheck source=benchmarks/lease_lib.sh
source "$(dirname "$0")/lease_lib.sh"
learned_pid=
if [ -z "${SKIP_LEARNED:-}" ]; then
  on_gpu 1 python3 -m cli -v convert --out "$out/learned" --overwrite --rounding learned "$@" \
    > "$out/logs/convert-learned.log" 2>&1 &
  learned_pid=$!
fi
[ -n "${SKIP_BASE:-}" ] || on_gpu 0 python3 -m cli -v convert --out "$out/$base" --overwrite --keep-work "$@" \
  > "$out/logs/convert-$base.log" 2>&1
pids=()
artifacts=(--artifact "$base=$out/$base")
rows=fp16,w4kv4-rtn,$base
i=0
for v in $variants; do
  IFS=: read -r epochs lr flags <<< "$v"
  IFS=, read -r -a extra <<< "${flags:-}"
  name="${NAME_PREFIX:-}e2e-$epochs-$lr"
  [ -z "${flags:-}" ] || name="$name-$(echo "$flags" | sed -e 's/--e2e-//g; s/--//g; s/[,=]/-/g')"
  rm -rf "$(work "$out/$name")"
  cp -r "$(work "$out/$base")" "$(work "$out/$name")"
  on_gpu $i python3 -m cli -v convert --out "$out/$name" --overwrite --resume --e2e-epochs "$epochs" --e2e-lr "$lr" \
    "${extra[@]}" "$@" > "$out/logs/convert-$name.log" 2>&1 &
  i=$((i + 1))
  pids+=($!)
  artifacts+=(--artifact "$name=$out/$name")
  rows="$rows,$name"
done
status=0
for p in "${pids[@]}" $learned_pid; do wait "$p" || status=1; done
if [ -n "$learned_pid" ]; then artifacts+=(--artifact learned="$out/learned"); rows="$rows,learned"; fi
tail -n 2 "$out"/logs/convert-*.log
[ "$status" = 0 ] || { echo "a conversion failed"; exit 1; }
[ -z "${SKIP_TABLE:-}" ] || exit 0
# shellcheck disable=SC2086
python3 -m cli eval "$model" --table --no-progress --rows "$rows" "${artifacts[@]}" \
  --json "$out/table.json" --markdown "$out/table.md" ${EVAL_FLAGS:-} 2>&1 | tee "$out/logs/eval.log"
