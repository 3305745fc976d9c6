#!/usr/bin/env bash
# Thirty-eighth session (one H200): the decode step's projections at batches 9-32 (GemvW4 above 8 rows: the
# split-K / tiled kernels before, now the tensor-core GEMV on 2-4 blocks of 8 rows; WKVQ_MMA_ROWS=8 the old path).
#   rows      benchmarks/rows_probe.py: the 7B and 13B projections at 8-32 rows: before, launches of 8, one launch
#   batch     cli.py bench 7B at batches 9, 16, 24, 32 (p2048) and 16 (p32768): before, now, before, now
#   prof16    the b16 p2048 step's kernels, chunks off and on
#   tests     the GEMV and real-shape GPU tests
# Usage: OUT=$OUT bash benchmarks/h200_round42.sh PART...  (carry .gpu/whl; .gpu/xdist for tests)
source benchmarks/h200_lib.sh
for part in "$@"; do case $part in
rows)
  python3 benchmarks/rows_probe.py --shapes 7b,13b --rows 8,9,16,24,32 --json "$o/rows.json" 2>&1 \
    | grep -v Warning; mark rows;;
batch)
  for r in 1 2; do
    WKVQ_MMA_ROWS=8 bbench "b_off_$r" --shapes 7b --batches 9,16,24,32 --prompts 2048; mark "off $r"
    bbench "b_on_$r" --shapes 7b --batches 9,16,24,32 --prompts 2048; mark "on $r"
  done
  WKVQ_MMA_ROWS=8 bbench b16_off_32k --shapes 7b --batches 16 --prompts 32768; mark "off 32k"
  bbench b16_on_32k --shapes 7b --batches 16 --prompts 32768; mark "on 32k";;
prof16)
  WKVQ_MMA_ROWS=8 python3 benchmarks/decode_profile.py --shape 7b --batch 16 --prompt 2048 \
    --json "$o/prof_b16_off.json" 2>&1 | grep -v Warning | head -30; mark "prof off"
  python3 benchmarks/decode_profile.py --shape 7b --batch 16 --prompt 2048 \
    --json "$o/prof_b16_on.json" 2>&1 | grep -v Warning | head -30; mark "prof on";;
tests)
  python3 -m pytest -q -p no:cacheprovider -n 12 tests/test_w4_mma.py tests/test_real_shapes.py tests/test_kernels.py \
    -k "not test_kernels or prefill_write or kv_stats or fast_decode" \
    > "$o/tests.txt" 2>&1; echo "pytest rc=$?"
  grep -E "^(FAILED|ERROR)" "$o/tests.txt" | head -30; tail -2 "$o/tests.txt"; mark tests;;
*) echo "unknown part $part";;
esac; done
