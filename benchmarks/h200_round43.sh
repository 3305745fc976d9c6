#!/usr/bin/env bash
# Thirty-ninth session (one H200), prepared in the thirty-eighth: what that session changed without device time left.
#   tests     GemvW4 at 33-64 rows (two launches), w4_linear from 17 rows (dequantization), the real-shape tests
#   rows64    benchmarks/rows_probe.py at 17-64 rows, 7B: before (split-K / tiled), dequantization + cuBLAS, GemvW4
#   batch     cli.py bench 7B p2048 at batches 40, 48 and 64: WKVQ_MMA_ROWS=8 (dequantization from 17 rows) against
#             the default (two launches of 32), alternated; then b32 against fp16 compiled once more
# Usage: OUT=$OUT bash benchmarks/h200_round43.sh PART...  (carry .gpu/whl; .gpu/xdist for tests)
source benchmarks/h200_lib.sh
for part in "$@"; do case $part in
tests)
  python3 -m pytest -q -p no:cacheprovider -n 12 tests/test_w4_mma.py tests/test_real_shapes.py tests/test_kernels.py \
    -k "not test_kernels or w4_linear or dequantize or prefill_write or kv_stats or fast_decode" \
    > "$o/tests.txt" 2>&1; echo "pytest rc=$?"
  grep -E "^(FAILED|ERROR)" "$o/tests.txt" | head -30; tail -2 "$o/tests.txt"; mark tests;;
rows64)
  python3 benchmarks/rows_probe.py --shapes 7b --rows 17,24,33,48,64 --json "$o/rows64.json" 2>&1 \
    | grep -v Warning; mark rows64;;
batch)
  for r in 1 2; do
    WKVQ_MMA_ROWS=8 bbench "b_dq_$r" --shapes 7b --batches 40,48,64 --prompts 2048; mark "dequant $r"
    bbench "b_two_$r" --shapes 7b --batches 40,48,64 --prompts 2048; mark "two launches $r"
  done
  side b32_side 32 2048; mark "b32 side by side";;
*) echo "unknown part $part";;
esac; done
