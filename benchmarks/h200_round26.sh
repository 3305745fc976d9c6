#!/usr/bin/env bash
# Twenty-sixth session, one H200 (device tool, carry .gpu/whl). Results in $OUT (benchmarks/results/r29).
# normtests, norm[0-9] and nprof ran at b94725c (the norm input, reverted in the commit after it: slower); on
# later trees WKVQ_FUSE=...,norm with rope is the row GEMV's norm again, which drops rope.
#   normtests the GPU tests of the norm input of the tensor-core GEMV (w4_mma_accumulate_norm: program 0 publishes
#             the row's rstd, the ranges scale x * w into shared memory and their sums by rstd) and of the decode
#             step with it (WKVQ_FUSE=...,norm), beside the silu, heads and decode-step tests
#   norm[0-9] 7B b1 p2048 and p32768: the default against WKVQ_FUSE=rope,heads,silu,norm (no norm launches but the
#             final one), alternated
#   norm13    13B b1: WKVQ_FUSE=rope against WKVQ_FUSE=rope,norm
#   nprof     the 7B b1 p32768 profile (what each kernel adds a layer), the default and with "norm"
#   t4        the default step with a table of four-warp stream-K grids for qkv and gate_up (the norm input's)
# (no record run this session: the kernels are the twenty-fifth session's; its `final` part is h200_round25.sh's)
source "$(dirname "$0")/h200_lib.sh"
for part in "$@"; do case $part in
normtests)
  timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_w4_mma.py -k "norm or silu" \
    > "$o/tests_norm_mma.txt" 2>&1; mark "mma norm tests: $(tail -1 "$o/tests_norm_mma.txt")"
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py \
    -k "norm_input or silu_input or heads_ready or fast_decode or decode_graph" > "$o/tests_norm_step.txt" 2>&1
  mark "step tests: $(tail -1 "$o/tests_norm_step.txt")"
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_w4_gemv.py -k "fused" \
    > "$o/tests_norm_gemv.txt" 2>&1; mark "gemv fused-step tests: $(tail -1 "$o/tests_norm_gemv.txt")" ;;
norm[0-9])
  i=${part#norm}
  bench --batches 1 --prompts 2048,32768 --json "$o/norm_default_$i.json"; mark "default $i"
  WKVQ_FUSE=rope,heads,silu,norm bench --batches 1 --prompts 2048,32768 --json "$o/norm_on_$i.json"; mark "norm $i" ;;
norm13)
  for f in rope rope,norm; do
    WKVQ_FUSE=$f python3 cli.py bench --shapes 13b --paths wkvq-gemv --steps 20 --batches 1 --prompts 2048,32768 \
      --json "$o/norm13_${f/,/_}.json" 2>&1 | grep -v Warning | tail -3; mark "13b $f"
  done ;;
nprof)  # what each part adds a layer, 7B b1 p32768: the default and with "norm"
  timeout 120 python3 benchmarks/decode_profile.py --prompt 32768 --json "$o/prof_default.json" > "$o/prof_default.txt" \
    2>&1; mark "profile default"; grep -A12 "^one layer" "$o/prof_default.txt"
  WKVQ_FUSE=rope,heads,silu,norm timeout 120 python3 benchmarks/decode_profile.py --prompt 32768 \
    --json "$o/prof_norm.json" > "$o/prof_norm.txt" 2>&1; mark "profile norm"; grep -A12 "^one layer" "$o/prof_norm.txt" ;;
t4)  # the plain step with the norm input's configs for qkv and gate_up (four-warp stream-K) in the table
  printf '%s' '{"best": {"12288x4096x1": {"config": [4, 2, 1, 1, false, 1, 0, 4, 0]},
    "22016x4096x1": {"config": [4, 2, 1, 1, false, 1, 0, 4, 0]}}}' > /tmp/t4.json
  WKVQ_MMA_TABLE=/tmp/t4.json bench --batches 1 --prompts 2048,32768 --json "$o/t4_table.json"; mark "t4 table" ;;
esac; done
