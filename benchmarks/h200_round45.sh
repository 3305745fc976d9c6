#!/usr/bin/env bash
# Fortieth session (one H200): GemvW4 in launches of 32 up to 80 rows (three launches from 65), and the record.
#   rows80    benchmarks/rows_probe.py at 65, 72 and 80 rows, 7B: dequantization + cuBLAS against GemvW4's launches
#   batch     cli.py bench 7B p2048 at batches 72 and 80: WKVQ_MMA_ROWS=8 (the dequantization, what these batches ran
#             before) against the default (three launches), alternated twice
#   side      the record cells: 7B b1 at p2048 and p32768, W4KV4 beside fp16 compiled in one run
#   full7b    `wkvq bench` as a user runs it (every default path: fp16 eager, fp16 compiled, int4 tinygemm, wkvq;
#   full13b   batches 1 and 8, prompts 2048 and 32768), one shape a part; the JSON is written after every row
# Usage: OUT=$OUT bash benchmarks/h200_round45.sh PART...  (carry .gpu/whl)
# The test suite on this tree: benchmarks/gpu_suite.sh (its header says how).
source benchmarks/h200_lib.sh
for part in "$@"; do case $part in
rows80)
  python3 benchmarks/rows_probe.py --shapes 7b --rows 65,72,80 --json "$o/rows80.json" 2>&1 | grep -v Warning
  mark rows80;;
batch)
  for r in 1 2; do
    WKVQ_MMA_ROWS=8 bbench "b_dq_$r" --shapes 7b --batches 72,80 --prompts 2048; mark "dequant $r"
    bbench "b_three_$r" --shapes 7b --batches 72,80 --prompts 2048; mark "three launches $r"
  done;;
side)
  side b1_side 1 2048,32768; mark "b1 side by side";;
full7b|full13b)
  python3 cli.py bench --shapes "${part#full}" --json "$o/$part.json" 2>&1 | grep -v Warning | tail -22; mark "$part";;
*) echo "unknown part $part";;
esac; done
