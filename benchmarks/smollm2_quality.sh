#!/usr/bin/env bash
# SmolLM2 quality experiment: the default WKVQuant calibration and its three calibration ablations
# (run in parallel: SmolLM2 leaves one GPU mostly idle), then the comparison table on the held-back
# Wikipedia articles at 2048 and 8192 tokens, every row in one run on the same windows.
#
#   bash benchmarks/smollm2_quality.sh OUTDIR [extra convert flags...]
#
# MODEL (env, default: the embedded SmolLM2 GGUF in $WKVQ_CACHE) is the source model; SOURCE (env) overrides
# what is converted (default: the embedded default model, i.e. the same GGUF).
# EVAL_FLAGS (env) is passed to `wkvq eval --table` (e.g. --max-windows 2 for a dry run).
set -euo pipefail
out=${1:?usage: smollm2_quality.sh OUTDIR [convert flags]}
shift
model=${MODEL:-${WKVQ_CACHE:-$HOME/.cache/wkvquant}/SmolLM2-135M-Instruct.Q4_1.gguf}
mkdir -p "$out/logs"
declare -A ablation=([wkvquant]="" [no-crr]="--crr-k 0" [no-lwc]="--no-lwc" [no-smooth]="--no-smooth")
pids=()
for name in "${!ablation[@]}"; do
  # shellcheck disable=SC2086
  python3 -m cli -v convert ${SOURCE:-} --out "$out/$name" --overwrite ${ablation[$name]} "$@" \
    > "$out/logs/convert-$name.log" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
tail -n 3 "$out"/logs/convert-*.log
[ "$status" = 0 ] || { echo "a conversion failed"; exit 1; }
# shellcheck disable=SC2086
python3 -m cli eval "$model" --table --no-progress \
  --artifact wkvquant="$out/wkvquant" --artifact no-crr="$out/no-crr" \
  --artifact no-lwc="$out/no-lwc" --artifact no-smooth="$out/no-smooth" \
  --long-seqlen 8192 --json "$out/table.json" --markdown "$out/table.md" --plots "$out" ${EVAL_FLAGS:-} \
  2>&1 | tee "$out/logs/eval.log"
