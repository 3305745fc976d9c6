#!/usr/bin/env bash
# Eighteenth session, one H200 (device tool, carry .gpu/whl): the keys as the score MMAs' A operand in the
# tensor-core attention (AttnConfig.keys_a, WKVQ_ATTN_KEYS_A) against the query as A. Results in $OUT.
#   bash benchmarks/h200_round18.sh tests kern e2e ncu
source "$(dirname "$0")/h200_lib.sh"
for part in "$@"; do case $part in
tests)  # the tensor-core attention (both forms) and the CUDA-graph generate
  timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py \
    -k "mma_attention or mma_rope or mma_config or fused_combine" > "$o/tests_attn.txt" 2>&1
  mark "attn tests: $(tail -1 "$o/tests_attn.txt")"
  timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_runtime.py -k "fast_generate" \
    > "$o/tests_generate.txt" 2>&1; mark "generate tests: $(tail -1 "$o/tests_generate.txt")" ;;
generate)  # only the generate tests (the first run's failure: head_dim 40 on the kernels, now refused)
  timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_runtime.py -k "fast_generate or head_dim" \
    > "$o/tests_generate.txt" 2>&1; mark "generate tests: $(tail -1 "$o/tests_generate.txt")" ;;
kern)  # graph-timed, the rope form (the decode step's), keys_a 0 and 1 at the table's tiles and neighbours
  python3 benchmarks/attn_bench.py --rope --mma 64x2,32x2,128x2 --copies mixed,lanes --keys-a 0,1 --mma-only \
    --batches 1 --contexts 2048,32768 --splits 16,32 --json "$o/attn_ka_b1.json" > "$o/attn_ka_b1.txt" 2>&1
  mark "attn b1"; grep -A6 "^1x" "$o/attn_ka_b1.txt" | grep -v "^--"
  python3 benchmarks/attn_bench.py --mma 64x2,128x2 --keys-a 0,1 --mma-only --batches 8 --contexts 2048,32768 \
    --splits 4,16 --json "$o/attn_ka_b8.json" > "$o/attn_ka_b8.txt" 2>&1
  mark "attn b8"; grep -A5 "^8x" "$o/attn_ka_b8.txt" | grep -v "^--" ;;
e2e)  # the step, keys_a on and off (the table's configs otherwise), alternated
  for i in 1 2; do
    WKVQ_ATTN_KEYS_A=1 bench --batches 1 --prompts 2048,32768 --json "$o/b1_ka_$i.json"; mark "b1 ka $i"
    WKVQ_ATTN_KEYS_A=0 bench --batches 1 --prompts 2048,32768 --json "$o/b1_qa_$i.json"; mark "b1 qa $i"
  done
  WKVQ_ATTN_KEYS_A=1 bench --batches 8 --prompts 2048,32768 --json "$o/b8_ka.json"; mark "b8 ka"
  WKVQ_ATTN_KEYS_A=0 bench --batches 8 --prompts 2048,32768 --json "$o/b8_qa.json"; mark "b8 qa" ;;
splits)  # keys_a: split counts and tiles at b1 (its per-program chain is shorter)
  python3 benchmarks/attn_bench.py --rope --mma 64x2,32x2,64x3 --keys-a 1 --mma-only --batches 1 --contexts 32768 \
    --splits 24,32,40,48 --json "$o/attn_ka_splits_32k.json" > "$o/attn_ka_splits_32k.txt" 2>&1
  mark "splits 32k"; grep -A6 "^1x" "$o/attn_ka_splits_32k.txt" | grep -v "^--"
  python3 benchmarks/attn_bench.py --rope --mma 64x2,32x2,16x2 --keys-a 1 --mma-only --batches 1 --contexts 2048 \
    --splits 8,16,24,32 --json "$o/attn_ka_splits_2k.json" > "$o/attn_ka_splits_2k.txt" 2>&1
  mark "splits 2k"; grep -A6 "^1x" "$o/attn_ka_splits_2k.txt" | grep -v "^--" ;;
pdl)  # the attention launched early (PDL, programs capped at the grid's even share) with keys_a
  for i in 1 2; do
    WKVQ_PDL=gemv,norm,silu,attn bench --batches 1 --prompts 2048,32768 --json "$o/b1_pdl_attn_$i.json"
    mark "b1 pdl attn $i"
    bench --batches 1 --prompts 2048,32768 --json "$o/b1_default_$i.json"; mark "b1 default $i"
  done ;;
ncu)  # the attention (b1 p32768, table config) with each form: where its warps wait
  N=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  S="--section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats"
  M="--metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,smsp__inst_executed.sum"
  for ka in 0 1; do
    WKVQ_ATTN_KEYS_A=$ka timeout 200 $N $S $M -k regex:_attn_mma -c 1 python3 benchmarks/kernel_target.py \
      --kernel attn > "$o/ncu_attn_ka$ka.txt" 2>&1
    mark "ncu attn keys_a=$ka"; grep -E "Duration|DRAM Throughput|Registers Per|Achieved Occ|Warp Cycles Per Issued|inst_executed" "$o/ncu_attn_ka$ka.txt" | head -8
    grep -E "issue_stalled" "$o/ncu_attn_ka$ka.txt" | sort -k3 -n -r | head -8
  done ;;
pdl13)  # the same at the 13B shape (one run there was slower in the sixteenth session)
  for i in 1 2; do
    WKVQ_PDL=gemv,norm,silu,attn python3 cli.py bench --shapes 13b --paths wkvq-gemv --steps 20 --batches 1 \
      --prompts 2048,32768 --json "$o/b1_13b_pdl_attn_$i.json" 2>&1 | grep -v Warning | tail -3; mark "13b pdl attn $i"
    python3 cli.py bench --shapes 13b --paths wkvq-gemv --steps 20 --batches 1 --prompts 2048,32768 \
      --json "$o/b1_13b_default_$i.json" 2>&1 | grep -v Warning | tail -3; mark "13b default $i"
  done ;;
profile)  # where a step's time goes now (b1 p32768), with and without PDL
  python3 benchmarks/decode_profile.py --prompt 32768 --json "$o/prof_p32768.json" > "$o/prof_p32768.txt" 2>&1
  WKVQ_PDL=0 python3 benchmarks/decode_profile.py --prompt 32768 --json "$o/prof_p32768_pdl0.json" \
    > "$o/prof_p32768_pdl0.txt" 2>&1
  mark "profile"; grep -v Warn "$o/prof_p32768_pdl0.txt" | head -60 ;;
norm)  # rmsnorm's clear in programs of its own (GPU test, then the step and its profile)
  timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "rmsnorm or pdl or decode_graph" \
    > "$o/tests_norm.txt" 2>&1; mark "tests: $(tail -1 "$o/tests_norm.txt")"
  for i in 1 2; do bench --batches 1 --prompts 2048,32768 --json "$o/b1_norm_$i.json"; mark "b1 $i"; done
  WKVQ_PDL=0 python3 benchmarks/decode_profile.py --prompt 32768 --json "$o/prof_norm_pdl0.json" \
    > "$o/prof_norm_pdl0.txt" 2>&1; mark "profile"; grep -A12 "^one layer" "$o/prof_norm_pdl0.txt" ;;
fixed)  # the attention's fixed cost: short pasts and split counts (b1, keys as A, rope form)
  python3 benchmarks/attn_bench.py --rope --mma 64x2 --keys-a 1 --mma-only --batches 1 \
    --contexts 64,512,2048,8192 --splits 1,4,16,32 --top 16 --json "$o/attn_fixed.json" > "$o/attn_fixed.txt" 2>&1
  mark "fixed"; grep -v Warn "$o/attn_fixed.txt" | grep -E "^1x|sp[0-9]" | head -40 ;;
final)  # the record table (7B, 13B), on the final tree
  record ;;
esac; done
