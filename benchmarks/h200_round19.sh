#!/usr/bin/env bash
# Nineteenth session, one H200 (device tool, carry .gpu/whl): the GEMVs' weight preload before the PDL wait
# (w4_mma PRE, WKVQ_MMA_PRE) against waiting first. Results in $OUT.
#   bash benchmarks/h200_round19.sh tests e2e
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
final)  # the record table (7B, 13B), on the final tree
  for s in 7b 13b; do
    python3 cli.py bench --shapes $s --paths wkvq-gemv --batches 1,8 --prompts 2048,32768 --steps 20 \
      --json "$o/bench_${s}_final.json" 2>&1 | grep -v Warning | tail -6; mark "bench $s"
  done ;;
esac; done
