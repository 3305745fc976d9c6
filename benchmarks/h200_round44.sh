#!/usr/bin/env bash
# Thirty-ninth session (one H200): what a 32768-token prefill holds at its peak; launches of 32 rows above 64.
#   mem       benchmarks/prefill_bench.py --memory, 7B p32768, W4KV4 and fp16: the blocks live at each one's peak by
#             the line that allocated them (the W4KV4 prefill held ~2 GB more than fp16's, thirty-seventh session)
#   rows128   benchmarks/rows_probe.py at 80-128 rows, 7B: launches of 32 against the dequantization + cuBLAS
#   order     benchmarks/order_probe.py, 7B b16 p32768 and b1 p32768: each step waited for and queued, alternated
#             (the thirty-eighth session's b16 p32768 read 20.96 ms waited, 22.35 queued)
#   record    the record cells (7B and 13B, b1 and b8, p2048 and p32768) and 7B b1 against fp16 compiled, both clocks
# Usage: OUT=$OUT bash benchmarks/h200_round44.sh PART...  (carry .gpu/whl)
source benchmarks/h200_lib.sh
for part in "$@"; do case $part in
mem)
  python3 benchmarks/prefill_bench.py --shapes 7b --prompts 32768 --paths wkvq,fp16 --repeats 1 --memory \
    --json "$o/prefill_mem.json" 2>&1 | grep -v Warning; mark mem;;
rows128)
  python3 benchmarks/rows_probe.py --shapes 7b --rows 80,96,112,128 --json "$o/rows128.json" 2>&1 \
    | grep -v Warning; mark rows128;;
order)
  python3 benchmarks/order_probe.py --batch 16 --json "$o/order_b16.json" 2>&1 | grep -v Warning; mark "order b16"
  python3 benchmarks/order_probe.py --batch 1 --json "$o/order_b1.json" 2>&1 | grep -v Warning; mark "order b1";;
record)
  record
  side b1_side 1 2048,32768; mark "b1 side by side";;
*) echo "unknown part $part";;
esac; done
