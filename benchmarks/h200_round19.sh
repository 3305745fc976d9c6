#!/usr/bin/env bash
# Nineteenth session, one H200 (device tool, carry .gpu/whl): the GEMVs' weight preload before the PDL wait
# (w4_mma PRE, WKVQ_MMA_PRE) against waiting first; what a dependent step costs; fewer GEMV programs; the bulk
# ring (MmaConfig.bulk); the projections' reads against a read-only kernel. Results in $OUT. Parts:
#   tests e2e e2e8 boundary grids bulk pattern verify final, e.g. bash benchmarks/h200_round19.sh tests e2e
source "$(dirname "$0")/h200_lib.sh"
for part in "$@"; do case $part in
tests)  # the tensor-core GEMV with the preload (PDL on: the default) and without, and the decode step
  timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_w4_mma.py > "$o/tests_mma.txt" 2>&1
  mark "mma tests (preload): $(tail -1 "$o/tests_mma.txt")"
  WKVQ_MMA_PRE=0 timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_w4_mma.py -k "reference and None" \
    > "$o/tests_mma_pre0.txt" 2>&1; mark "mma tests (no preload): $(tail -1 "$o/tests_mma_pre0.txt")"
  timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "fast_decode or decode_graph" \
    > "$o/tests_decode.txt" 2>&1; mark "decode tests: $(tail -1 "$o/tests_decode.txt")" ;;
e2e)  # the step with and without the preload, alternated
  for i in 1 2; do
    WKVQ_MMA_PRE=1 bench --batches 1 --prompts 2048,32768 --json "$o/b1_pre1_$i.json"; mark "b1 pre1 $i"
    WKVQ_MMA_PRE=0 bench --batches 1 --prompts 2048,32768 --json "$o/b1_pre0_$i.json"; mark "b1 pre0 $i"
  done ;;
e2e8)
  WKVQ_MMA_PRE=1 bench --batches 8 --prompts 2048,32768 --json "$o/b8_pre1.json"; mark "b8 pre1"
  WKVQ_MMA_PRE=0 bench --batches 8 --prompts 2048,32768 --json "$o/b8_pre0.json"; mark "b8 pre0" ;;
boundary)  # what a dependent step costs: a launch, a PDL launch, a grid barrier, by program count
  timeout 300 python3 benchmarks/boundary_bench.py --programs 132,528,1056,2112 --steps 64 \
    --json "$o/boundary.json" 2>&1 | grep -v Warn; mark "boundary" ;;
grids)  # the 7B one-row GEMVs on fewer, larger programs (fewer to launch and retire a boundary), alternated
  V=benchmarks/variants
  for i in 1 2; do
    bench --batches 1 --prompts 2048,32768 --json "$o/b1_grid_default_$i.json"; mark "default $i"
    for g in w4p4_qkv_gu w2p8_qkv_gu w4p4_all; do
      WKVQ_MMA_TABLE=$V/mma_7b_m1_$g.json bench --batches 1 --prompts 2048,32768 --json "$o/b1_grid_${g}_$i.json"
      mark "$g $i"
    done
  done ;;
bulk)  # the bulk ring (MmaConfig.bulk): GPU tests, the isolated sweep at the 7B one-row shapes (the table's kinds
  # of config with and without it), then the step on the sweep's best, alternated with the default
  timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_w4_mma.py -k bulk > "$o/tests_bulk.txt" 2>&1
  mark "bulk tests: $(tail -1 "$o/tests_bulk.txt")"
  timeout 300 python3 benchmarks/w4_mma_bench.py --ms 1 --warps 1,2,4 --tiles 2 --splits 16 --persist 0,8,16,20,24 \
    --bulk 3,4,6 --depths 1 --l2 0 --chains 1 --stages 0 --top 6 --json "$o/mma_bulk.json" > "$o/mma_bulk.txt" 2>&1
  mark "sweep"; grep -A7 "M=1" "$o/mma_bulk.txt" | grep -v "^--"
  for i in 1 2; do
    WKVQ_MMA_TABLE=$o/mma_bulk.json bench --batches 1 --prompts 2048,32768 --json "$o/b1_bulk_$i.json"; mark "bulk $i"
    bench --batches 1 --prompts 2048,32768 --json "$o/b1_bulk_default_$i.json"; mark "default $i"
  done ;;
pattern)  # the GEMV's access pattern against sequential reads of the same bytes (read-only kernel)
  timeout 200 python3 benchmarks/pattern_probe.py --shapes 22016x4096,12288x4096,4096x11008 --per-sm 16,32 \
    --json "$o/pattern.json" 2>&1 | grep -v Warn; mark "pattern" ;;
verify)  # the final tree's GPU tests of the projections and the decode step
  timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_w4_mma.py > "$o/tests_mma_final.txt" 2>&1
  mark "mma tests: $(tail -1 "$o/tests_mma_final.txt")"
  timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "fast_decode or decode_graph or rmsnorm" \
    > "$o/tests_decode_final.txt" 2>&1; mark "decode tests: $(tail -1 "$o/tests_decode_final.txt")" ;;
final)  # the record table (7B, 13B), on the final tree
  record ;;
esac; done
