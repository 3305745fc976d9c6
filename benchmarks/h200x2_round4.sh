#!/usr/bin/env bash
# One nvidia-h200-x2 lease for both open issues at once (fourth session), ~24 minutes:
#   GPU 1: the GemLite probe (tests, per-projection microbench, wkvq vs wkvq-gemlite bench), then the
#          fp16-compiled and tinygemm anchors at 7B batch 1 (issue #6);
#   GPU 0: the default SmolLM2 calibration with its block results kept (issue #4); once both are done,
#          the end-to-end variants spread over both GPUs and one perplexity table.
# Everything lands in RESULTS (default /root/a); `pack` tars what the lease must bring back into $OUT.
#
#   bash benchmarks/h200x2_round4.sh "EPOCHS:LR[:FLAGS] ..."      (after the setup of BENCHMARKS.md)
#
# The variants (smollm2_e2e.sh's syntax) may be replaced until the block-wise run ends by writing
# them into RESULTS/variants.txt.
set -uo pipefail
variants=${1:?usage: h200x2_round4.sh "EPOCHS:LR[:FLAGS] ..."}
r=${RESULTS:-/root/a}
mkdir -p "$r/speed" "$r/e2e/logs"
t0=$(date +%s)
mark() { echo "[$(( $(date +%s) - t0 ))s] $*" >> "$r/timeline.txt"; }

mark "start"
(
  CUDA_VISIBLE_DEVICES=1 OUT="$r/speed" bash benchmarks/gemlite_probe.sh > "$r/speed/probe.log" 2>&1
  mark "gemlite probe done"
  CUDA_VISIBLE_DEVICES=1 timeout 420 python3 cli.py bench --shapes 7b --paths fp16_compiled,int4_tinygemm,wkvq \
    --batches 1 --prompts 2048,32768 --steps 20 --json "$r/speed/anchors.json" > "$r/speed/anchors.log" 2>&1
  mark "anchors done rc=$?"
) &
speed=$!
CUDA_VISIBLE_DEVICES=0 python3 -m cli -v convert --out "$r/e2e/wkvquant" --overwrite --keep-work \
  > "$r/e2e/logs/convert-wkvquant.log" 2>&1
mark "block-wise done rc=$?"
wait "$speed"
[ ! -s "$r/variants.txt" ] || variants=$(cat "$r/variants.txt")  # a later call may choose them meanwhile
mark "variants: $variants"
SKIP_BASE=1 SKIP_LEARNED=1 GPUS="0 1" bash benchmarks/smollm2_e2e.sh "$r/e2e" "$variants" > "$r/e2e.log" 2>&1
mark "e2e variants and table done rc=$?"
