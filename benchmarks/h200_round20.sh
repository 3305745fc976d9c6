#!/usr/bin/env bash
# Twentieth session, one H200 (device tool, carry .gpu/whl): the next projection asked of the L2 before a GEMV's
# PDL wait (WKVQ_NEXT_PF, w4_mma NEXT) and the attention's cache copies evict_first (WKVQ_ATTN_EVICT_FIRST).
# Results in $OUT. Parts: tests e2e probe final, e.g. bash benchmarks/h200_round20.sh tests e2e. The parts tests,
# e2e and probe ran on commit 40c40be (the prefetch and benchmarks/next_probe.py; reverted after, being slower).
source "$(dirname "$0")/h200_lib.sh"
for part in "$@"; do case $part in
tests)  # the prefetch changes no result: the GEMV's tests, the decode step's with the prefetch on
  timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_w4_mma.py -k "next or 7b_shapes" \
    > "$o/tests_next.txt" 2>&1; mark "mma next tests: $(tail -1 "$o/tests_next.txt")"
  WKVQ_NEXT_PF=64,last WKVQ_ATTN_EVICT_FIRST=1 timeout 200 python3 -m pytest -q -x -p no:cacheprovider \
    tests/test_kernels.py tests/test_kv4_mma.py -k "fast_decode or decode_graph or mma_attention" \
    > "$o/tests_decode_next.txt" 2>&1; mark "decode tests (prefetch on): $(tail -1 "$o/tests_decode_next.txt")" ;;
e2e)  # the step with the prefetch at several sizes, with and without evict_first cache copies, and the default
  for i in 1; do
    bench --batches 1 --prompts 2048,32768 --json "$o/b1_default_$i.json"; mark "default $i"
    WKVQ_NEXT_PF=64 bench --batches 1 --prompts 2048,32768 --json "$o/b1_pf64_$i.json"; mark "pf64 $i"
    WKVQ_NEXT_PF=24 bench --batches 1 --prompts 2048,32768 --json "$o/b1_pf24_$i.json"; mark "pf24 $i"
    WKVQ_NEXT_PF=64,last WKVQ_ATTN_EVICT_FIRST=1 bench --batches 1 --prompts 2048,32768 \
      --json "$o/b1_pf64_last_ef_$i.json"; mark "pf64 last ef $i"
    WKVQ_NEXT_PF=16,no_o bench --batches 1 --prompts 2048,32768 --json "$o/b1_pf16_no_o_$i.json"; mark "pf16 no_o $i"
  done ;;
probe)  # the prefetch in a chain of GEMVs alone (o -> gate_up -> down -> qkv, no attention, no norms)
  timeout 200 python3 benchmarks/next_probe.py --mb 0,8,16,32,64,16l,64l --json "$o/next_probe.json" 2>&1 \
    | grep -v Warn; mark "probe" ;;
final)
  record ;;
esac; done
