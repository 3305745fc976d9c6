#!/usr/bin/env bash
# Next lease for issue #4 (nvidia-h200-x2, or one GPU with GPUS="0"), ~12 minutes, without the 11-minute
# block-wise run: the default SmolLM2 block-wise results of the fourth session (the kept work dir,
# carried as .gpu/work/smollm2-blockwise-r4.tgz) are unpacked, the base artifact re-exported from
# them, then
#   1. the compiled-vs-eager speed of one block's training step (benchmarks/train_step.py) and of one
#      end-to-end variant (convert --compile),
#   2. the end-to-end variants, all at once, spread over GPUS (the stage is launch-bound: several per
#      GPU cost little more than one), with --compile,
#   3. 7B cost with --compile: one block of the block-wise recipe (eager: 80.6 s/block, BENCHMARKS.md) and
#      the end-to-end stage over 4 samples, extrapolated (benchmarks/calibration.py --e2e-samples),
#   4. one perplexity table;
#   LEARNED=1 adds, on the last GPU after the 7B runs, a fresh block-wise run with --rounding learned
#   (decisions per block: no whole-model offsets, so it would fit 7B's memory) followed by the stage
#   without offsets, and its own table row (~10-15 more minutes).
# Results in RESULTS (default /root/a); timeline in RESULTS/timeline.txt. Dry run on CPU: WORK_TGZ (a
# tarred .wkvquant.wkvq-work), CONVERT_FLAGS (model and recipe it was made with), SKIP_7B=1, GPUS="".
#
#   bash benchmarks/h200x2_round5.sh "EPOCHS:LR[:FLAGS] ..."     (after the setup of BENCHMARKS.md;
#   run with carry [".gpu/p2", ".gpu/whl", ".gpu/work"])
set -uo pipefail
variants=${1:?usage: h200x2_round5.sh "EPOCHS:LR[:FLAGS] ..."}
r=${RESULTS:-/root/a}
gpus=${GPUS-0 1}
read -r -a extra <<< "${CONVERT_FLAGS:-}"
mkdir -p "$r/e2e/logs" "$r/speed"
t0=$(date +%s)
mark() { echo "[$(( $(date +%s) - t0 ))s] $*" >> "$r/timeline.txt"; }

tar xzf "${WORK_TGZ:-.gpu/work/smollm2-blockwise-r4.tgz}" -C "$r/e2e"
python3 -m cli -v convert --out "$r/e2e/wkvquant" --overwrite --resume --keep-work "${extra[@]}" \
  > "$r/e2e/logs/convert-wkvquant.log" 2>&1
mark "base re-exported rc=$?"

last=${gpus##* }
[ -n "${SKIP_7B:-}" ] || (
  CUDA_VISIBLE_DEVICES=$last timeout 300 python3 benchmarks/calibration.py --shape llama2-7b --blocks 1 --compile \
    --no-progress --json "$r/speed/calib_7b_compiled.json" > "$r/speed/calib_7b_compiled.log" 2>&1
  mark "7B block-wise --compile done rc=$?"
  CUDA_VISIBLE_DEVICES=$last timeout 300 python3 benchmarks/calibration.py --shape llama2-7b --e2e-samples 4 \
    --e2e-epochs 2 --compile --no-progress --json "$r/speed/e2e_7b_compiled.json" > "$r/speed/e2e_7b_compiled.log" 2>&1
  mark "7B end-to-end stage --compile done rc=$?"
) &
bench7b=$!
first=${gpus%% *}
on_first() { if [ -n "$first" ]; then CUDA_VISIBLE_DEVICES=$first "$@"; else "$@"; fi; }
on_first timeout 240 python3 -m pytest -q tests/test_compile_calib.py > "$r/speed/compile_tests.log" 2>&1
mark "compile tests (CPU and CUDA) rc=$?"
on_first timeout 200 python3 benchmarks/train_step.py --json "$r/speed/train_step.json" > "$r/speed/train_step.log" 2>&1
mark "one-block training step eager/compiled rc=$?"
# 1. the same variant eager and compiled, alone on the first GPU (steps/s in their logs)
for mode in eager compiled; do
  flag=; [ "$mode" = compiled ] && flag=--compile
  rm -rf "$r/e2e/.speed-$mode.wkvq-work"; cp -r "$r/e2e/.wkvquant.wkvq-work" "$r/e2e/.speed-$mode.wkvq-work"
  on_first timeout 150 python3 -m cli -v convert --out "$r/e2e/speed-$mode" --overwrite --resume \
    --e2e-epochs 1 $flag "${extra[@]}" > "$r/e2e/logs/speed-$mode.log" 2>&1
  mark "e2e speed $mode rc=$?"
done
learned=
if [ -n "${LEARNED:-}" ]; then
  (
    wait "$bench7b" 2>/dev/null
    CUDA_VISIBLE_DEVICES=$last python3 -m cli -v convert --out "$r/e2e/learned-e2e" --overwrite --rounding learned \
      --e2e-epochs 2 --compile "${extra[@]}" > "$r/e2e/logs/convert-learned-e2e.log" 2>&1
    mark "learned rounding + stage rc=$?"
  ) &
  learned=$!
fi
wait "$bench7b" 2>/dev/null
# 2. + 4.
SKIP_BASE=1 SKIP_LEARNED=1 GPUS="$gpus" bash benchmarks/smollm2_e2e.sh "$r/e2e" "$variants" --compile "${extra[@]}" > "$r/e2e.log" 2>&1
mark "e2e variants and table done rc=$?"
if [ -n "$learned" ]; then
  wait "$learned"
  python3 -m cli eval "${MODEL:-${WKVQ_CACHE:-$HOME/.cache/wkvquant}/SmolLM2-135M-Instruct.Q4_1.gguf}" --table --no-progress \
    --rows learned-e2e --artifact learned-e2e="$r/e2e/learned-e2e" --json "$r/e2e/table-learned.json" ${EVAL_FLAGS:-} \
    > "$r/e2e/logs/eval-learned.log" 2>&1
  mark "learned table rc=$?"
fi
