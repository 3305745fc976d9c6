#!/usr/bin/env bash
# Seventeenth session, one H200 (device tool, carry .gpu/whl): the codes fed to the MMAs as the unpacking leaves
# them (WKVQ_FOLD, runtime/kernels/__init__.py), against the per-pair subtraction. Results in $OUT (default /root/out).
#   bash benchmarks/h200_round17.sh tests kern   (WKVQ_FOLD, reverted after this run: on later trees it times one form)
#   bash benchmarks/h200_round17.sh layout layout_e2e stats sweep final
# 13B sweep (ran by hand): python3 benchmarks/w4_mma_bench.py --ms 1,8 --splits 1,4,8,16 --warps 1,2,4,8 --tiles 2
#   --depths 1 --l2 0 --chains 1 --persist 0,4,8,16 --top 3 --shapes 15360x5120,5120x5120,27648x5120,5120x13824
#   --json mma_group_sweep_13b.json
source "$(dirname "$0")/h200_lib.sh"
for part in "$@"; do case $part in
tests)
  timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_w4_mma.py > "$o/tests_mma.txt" 2>&1
  mark "w4_mma tests: $(tail -1 "$o/tests_mma.txt")"
  timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py \
    -k "mma_attention or mma_rope or fused_combine or fold or fast_decode" > "$o/tests_attn.txt" 2>&1
  mark "attn tests: $(tail -1 "$o/tests_attn.txt")" ;;
kern)  # the table's configs, folded and not
  for f in none gemv,attn; do
    WKVQ_FOLD=$f python3 benchmarks/w4_mma_bench.py --ms 1,8 --splits 1,2,4,8,16 --warps 1,2,4,8 --tiles 2 \
      --depths 1 --l2 0 --chains 1 --persist 0,16 --top 3 --json "$o/mma_fold_${f//,/_}.json" > "$o/mma_fold_${f//,/_}.txt" 2>&1
    mark "w4_mma fold=$f"; grep -A2 " M=1 " "$o/mma_fold_$f.txt" | grep -v "^--"
    WKVQ_FOLD=$f python3 benchmarks/attn_bench.py --rope --mma 64x2,32x2 --copies mixed,lanes --mma-only \
      --batches 1 --contexts 2048,32768 --splits 16,32 --json "$o/attn_fold_$f.json" > "$o/attn_fold_$f.txt" 2>&1
    mark "attn fold=$f"; grep -A3 "^1x" "$o/attn_fold_$f.txt" | grep -v "^--"
  done ;;
e2e)  # 7B b1, folded (default) and not, alternated
  for i in 1 2; do
    bench --batches 1 --prompts 2048,32768 --json "$o/b1_fold_$i.json"; mark "b1 fold $i"
    WKVQ_FOLD=none bench --batches 1 --prompts 2048,32768 --json "$o/b1_nofold_$i.json"; mark "b1 no fold $i"
  done ;;
layout)  # the GEMV on the group-major weight layout against the row-major one (w4_mma.group_major)
  timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_w4_mma.py -k "group_major or matches" \
    > "$o/tests_layout.txt" 2>&1; mark "w4_mma tests: $(tail -1 "$o/tests_layout.txt")"
  python3 benchmarks/w4_layout_bench.py --json "$o/w4_layout.json" > "$o/w4_layout.txt" 2>&1
  mark "layout"; cat "$o/w4_layout.txt" | grep -v Warn ;;
layout_e2e)  # the step with the fused weights group-major (default) and row-major, alternated; GPU tests first
  timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_w4_mma.py tests/test_w4_gemv.py \
    tests/test_kernels.py -k "group_major or w4_linear or w4_accumulate or decode_graph or fast_decode or quantlinear" \
    > "$o/tests_layout_e2e.txt" 2>&1; mark "tests: $(tail -1 "$o/tests_layout_e2e.txt")"
  for i in 1 2; do
    bench --batches 1 --prompts 2048,32768 --json "$o/b1_group_$i.json"; mark "b1 group $i"
    WKVQ_LAYOUT=row bench --batches 1 --prompts 2048,32768 --json "$o/b1_row_$i.json"; mark "b1 row $i"
  done
  bench --batches 8 --prompts 2048,32768 --json "$o/b8_group.json"; mark "b8 group"
  WKVQ_LAYOUT=row bench --batches 8 --prompts 2048,32768 --json "$o/b8_row.json"; mark "b8 row" ;;
stats)  # what the attention's reads of the four per-token stats arrays cost (shared stats: L2-resident)
  python3 benchmarks/attn_stats_probe.py --json "$o/attn_stats_probe.json" 2>&1 | grep -v Warn; mark "stats probe" ;;
sweep)  # the GEMV configs on the group-major layout (the table was swept on the row-major one)
  python3 benchmarks/w4_mma_bench.py --ms 1,8 --splits 1,2,4,8,16 --warps 1,2,4,8 --tiles 1,2 --depths 1 --l2 0 \
    --chains 1 --persist 0,4,8,12,16 --top 4 --json "$o/mma_group_sweep.json" > "$o/mma_group_sweep.txt" 2>&1
  mark "sweep"; sed -n '/MMA_TABLE = {/,/}/p' "$o/mma_group_sweep.txt" ;;
final)  # the GPU tests of the kernels and decode graphs on the final tree, then the record table
  timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_w4_mma.py tests/test_w4_gemv.py \
    tests/test_kernels.py > "$o/tests_final.txt" 2>&1; mark "tests: $(tail -1 "$o/tests_final.txt")"
  for s in 7b 13b; do
    python3 cli.py bench --shapes $s --paths wkvq-gemv --batches 1,8 --prompts 2048,32768 --steps 20 \
      --json "$o/bench_${s}_final.json" 2>&1 | grep -v Warning | tail -6; mark "bench $s"
  done ;;
ncu)  # what bounds the attention at b1 p32768 and the gate_up GEMV (M = 1, group-major)
  N=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  S="--section SpeedOfLight --section WarpStateStats --section Occupancy --section MemoryWorkloadAnalysis --section LaunchStats"
  timeout 200 $N $S -k regex:_attn_mma -c 1 python3 benchmarks/kernel_target.py --kernel attn > "$o/ncu_attn.txt" 2>&1
  mark "ncu attn"; grep -E "Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers|Warp Cycles Per Issued|Issue Slots|Stall|Theoretical Occ" "$o/ncu_attn.txt" | head -30
  timeout 150 $N $S -k regex:_w4_mma -c 1 python3 benchmarks/kernel_target.py --kernel mma --shape 22016x4096 \
    > "$o/ncu_gate_up.txt" 2>&1
  mark "ncu gate_up"; grep -E "Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Warp Cycles Per Issued|Issue Slots" "$o/ncu_gate_up.txt" | head -12 ;;
esac; done
