#!/usr/bin/env bash
# One nvidia-h200-x2 lease for issues #4 and #6, ~22 minutes, both GPUs busy from the start.
#
# GPU 0 (#4, quality): the default SmolLM2 block-wise results of the fourth session (the kept work dir,
#   carried as .gpu/work/smollm2-blockwise-r4.tgz) are unpacked and the base artifact re-exported, then the
#   end-to-end VARIANTS resume from those blocks, all at once (the stage is launch-bound), plus, alongside,
#   one fresh block-wise run with --rounding learned followed by the stage without whole-model offsets
#   (LEARNED_EPOCHS, default 2; skipped with LEARNED_EPOCHS=0); one table of the variants as soon as they
#   are done, then the learned row on its own (if it finishes within LEARNED_DEADLINE s of the start).
# GPU 1, in order, each step capped:
#   1. 7B cost of one block-wise block with --compile (eager: 80.6 s/block, BENCHMARKS.md),
#   2. #6: graph-timed GemLite config search at the 7B projections (benchmarks/gemlite_tune.py, writes
#      runtime/kernels/gemlite_h200.json into this copy), then `cli.py bench` of wkvq / wkvq-gemlite,
#   3. 7B cost of the end-to-end stage over 4 samples with --compile (extrapolated by the script),
#   4. the compile tests on CUDA, the one-block training step eager vs compiled (benchmarks/train_step.py).
# Results in RESULTS (default /root/a); timeline in RESULTS/timeline.txt.
#
#   bash benchmarks/h200x2_round6.sh "EPOCHS:LR[:FLAGS] ..."    (after the setup in BENCHMARKS.md;
#   run with carry [".gpu/p2", ".gpu/whl", ".gpu/work", ".gpu/whl-gemlite"])
# Dry run on CPU: WORK_TGZ (a tarred .wkvquant.wkvq-work), CONVERT_FLAGS (model and recipe it was made
# with), GPUS="" (everything on the CPU, one after the other), SKIP_GPU1=1.
set -uo pipefail
variants=${1:?usage: h200x2_round6.sh "EPOCHS:LR[:FLAGS] ..."}
r=${RESULTS:-/root/a}
read -r -a extra <<< "${CONVERT_FLAGS:-}"
read -r -a gpus <<< "${GPUS-0 1}"
g0=${gpus[0]:-}
g1=${gpus[1]:-$g0}
mkdir -p "$r/e2e/logs" "$r/speed"
t0=$(date +%s)
mark() { echo "[$(( $(date +%s) - t0 ))s] $*" >> "$r/timeline.txt"; }
on() { local g=$1; shift; if [ -n "$g" ]; then CUDA_VISIBLE_DEVICES=$g "$@"; else "$@"; fi; }
model=${MODEL:-${WKVQ_CACHE:-$HOME/.cache/wkvquant}/SmolLM2-135M-Instruct.Q4_1.gguf}

gpu1() {
  on "$g1" timeout 240 python3 benchmarks/calibration.py --shape llama2-7b --blocks 1 --compile --no-progress \
    --json "$r/speed/calib_7b_compiled.json" > "$r/speed/calib_7b_compiled.log" 2>&1
  mark "GPU1 7B block-wise --compile rc=$?"
  if python3 -c "import gemlite" 2>/dev/null; then
    on "$g1" timeout 420 python3 benchmarks/gemlite_tune.py --table runtime/kernels/gemlite_h200.json \
      --json "$r/speed/gemlite_tune.json" > "$r/speed/gemlite_tune.log" 2>&1
    mark "GPU1 gemlite tune rc=$?"
    cp runtime/kernels/gemlite_h200.json "$r/speed/" 2>/dev/null
    on "$g1" timeout 200 python3 cli.py bench --shapes 7b --paths wkvq,wkvq-gemlite --batches 1,8 \
      --prompts 2048,32768 --steps 20 --json "$r/speed/bench.json" > "$r/speed/bench.log" 2>&1
    mark "GPU1 bench rc=$?"
  fi
  on "$g1" timeout 240 python3 benchmarks/calibration.py --shape llama2-7b --e2e-samples 4 --e2e-epochs 2 --compile \
    --no-progress --json "$r/speed/e2e_7b_compiled.json" > "$r/speed/e2e_7b_compiled.log" 2>&1
  mark "GPU1 7B end-to-end --compile rc=$?"
  on "$g1" timeout 150 python3 -m pytest -q tests/test_compile_calib.py tests/test_gemlite.py \
    > "$r/speed/gpu_tests.log" 2>&1
  mark "GPU1 compile + gemlite tests rc=$?"
  on "$g1" timeout 150 python3 benchmarks/train_step.py --json "$r/speed/train_step.json" > "$r/speed/train_step.log" 2>&1
  mark "GPU1 train step eager/compiled rc=$?"
}
gpu1_pid=
[ -n "${SKIP_GPU1:-}" ] || { gpu1 & gpu1_pid=$!; }

# GPU 0
learned_pid=
if [ "${LEARNED_EPOCHS:-2}" != 0 ]; then
  on "$g0" python3 -m cli -v convert --out "$r/e2e/learned-e2e" --overwrite --rounding learned \
    --e2e-epochs "${LEARNED_EPOCHS:-2}" "${extra[@]}" > "$r/e2e/logs/convert-learned-e2e.log" 2>&1 &
  learned_pid=$!
fi
tar xzf "${WORK_TGZ:-.gpu/work/smollm2-blockwise-r4.tgz}" -C "$r/e2e"
on "$g0" python3 -m cli -v convert --out "$r/e2e/wkvquant" --overwrite --resume --keep-work "${extra[@]}" \
  > "$r/e2e/logs/convert-wkvquant.log" 2>&1
mark "GPU0 base re-exported rc=$?"
SKIP_BASE=1 SKIP_LEARNED=1 GPUS="$g0" bash benchmarks/smollm2_e2e.sh "$r/e2e" "$variants" "${extra[@]}" \
  > "$r/e2e.log" 2>&1
mark "GPU0 e2e variants and table rc=$?"
if [ -n "$learned_pid" ]; then
  deadline=$(( t0 + ${LEARNED_DEADLINE:-1500} ))
  while kill -0 "$learned_pid" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 5; done
  if kill -0 "$learned_pid" 2>/dev/null; then
    kill "$learned_pid"; mark "GPU0 learned rounding + stage stopped at the deadline"
  else
    wait "$learned_pid"; mark "GPU0 learned rounding + stage rc=$?"
    on "$g0" python3 -m cli eval "$model" --table --no-progress --rows learned-e2e \
      --artifact learned-e2e="$r/e2e/learned-e2e" --json "$r/e2e/table-learned.json" ${EVAL_FLAGS:-} \
      > "$r/e2e/logs/eval-learned.log" 2>&1
    mark "GPU0 learned table rc=$?"
  fi
fi
[ -z "$gpu1_pid" ] || wait "$gpu1_pid"
mark "all done"
