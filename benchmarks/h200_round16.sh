#!/usr/bin/env bash
# Sixteenth session, one H200 (device tool, carry .gpu/whl): split counts that fill one wave of the tensor-core
# attention (any count now), and the GEMVs' L2 prefetch before the PDL wait. Results in $OUT (default /root/out).
#   bash benchmarks/h200_round16.sh tests attn;  ... e2e;  ... profile;  ... first
# The parts e2e and first ran with a w4_mma that read WKVQ_MMA_L2 (the GEMVs' L2 prefetch before the PDL wait: of
# the program's whole share, or of its first two groups); measured no gain (NOTES.md round 14) and removed again,
# so on later trees those parts time the same kernels twice.
source "$(dirname "$0")/h200_lib.sh"
for part in "$@"; do case $part in
tests)
  timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py \
    -k "mma_attention or mma_rope or fused_combine" > "$o/tests_attn.txt" 2>&1; mark "attn tests: $(tail -1 "$o/tests_attn.txt")"
  timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_w4_mma.py > "$o/tests_mma.txt" 2>&1
  mark "w4_mma tests: $(tail -1 "$o/tests_mma.txt")" ;;
attn)
  python3 benchmarks/attn_bench.py --rope --mma 64x2,32x2 --copies mixed,lanes --mma-only --batches 1 \
    --contexts 32768 --splits 32,40,44,48,64 --json "$o/attn_b1_32k.json" > "$o/attn_b1_32k.txt" 2>&1
  mark "b1 32k"; grep -A6 "1x32768" "$o/attn_b1_32k.txt" | head -8
  python3 benchmarks/attn_bench.py --rope --mma 32x2,64x2 --copies lanes --mma-only --batches 1 --contexts 2048 \
    --splits 16,20,24,32 --json "$o/attn_b1_2k.json" > "$o/attn_b1_2k.txt" 2>&1
  mark "b1 2k"; grep -A4 "1x2048" "$o/attn_b1_2k.txt" | head -6
  python3 benchmarks/attn_bench.py --mma 64x2 --mma-only --batches 8 --contexts 2048,32768 --splits 4,6,8,12,16,24 \
    --json "$o/attn_b8.json" > "$o/attn_b8.txt" 2>&1
  mark "b8"; grep -A4 "8x" "$o/attn_b8.txt" | head -12 ;;
e2e)  # the GEMVs' early L2 prefetch (WKVQ_MMA_L2=1) against the table (none), alternated
  for i in 1 2; do
    bench --batches 1 --prompts 2048,32768 --json "$o/b1_base$i.json"; mark "b1 base $i"
    WKVQ_MMA_L2=1 bench --batches 1 --prompts 2048,32768 --json "$o/b1_l2_$i.json"; mark "b1 l2 $i"
  done ;;
profile)  # the step's timeline: idle time between kernels, PDL's overlaps, one layer
  for p in 2048 32768; do
    python3 benchmarks/decode_profile.py --prompt $p --json "$o/prof_p$p.json" > "$o/prof_p$p.txt" 2>&1
    WKVQ_PDL=0 python3 benchmarks/decode_profile.py --prompt $p --json "$o/prof_p${p}_pdl0.json" \
      > "$o/prof_p${p}_pdl0.txt" 2>&1
    mark "profile p$p"
  done
  WKVQ_PDL=1 python3 benchmarks/decode_profile.py --prompt 32768 --json "$o/prof_p32768_pdl1.json" \
    > "$o/prof_p32768_pdl1.txt" 2>&1
  mark "profile p32768 PDL 1"; tail -32 "$o/prof_p32768.txt" ;;
first)  # the GEMVs' L2 prefetch of only their first two groups before the PDL wait (WKVQ_MMA_L2=first)
  for i in 1 2; do
    bench --batches 1 --prompts 2048,32768 --json "$o/b1_base_f$i.json"; mark "b1 base $i"
    WKVQ_MMA_L2=first bench --batches 1 --prompts 2048,32768 --json "$o/b1_first_$i.json"; mark "b1 first $i"
  done ;;
attnpdl)  # the attention launched early (PDL "attn") without letting the o GEMV start early ("attn_trigger"),
  # its programs capped at the grid's even share a multiprocessor (WKVQ_ATTN_CAP, default on) or not
  A=gemv,norm,silu,attn
  WKVQ_PDL=$A timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py \
    -k "mma_rope or fast_decode" > "$o/tests_attnpdl.txt" 2>&1; mark "tests: $(tail -1 "$o/tests_attnpdl.txt")"
  for i in 1 2; do
    bench --batches 1 --prompts 2048,32768 --json "$o/b1_def_$i.json"; mark "b1 default $i"
    WKVQ_PDL=$A bench --batches 1 --prompts 2048,32768 --json "$o/b1_attn_cap_$i.json"; mark "b1 attn, cap $i"
  done
  WKVQ_PDL=$A WKVQ_ATTN_CAP=0 bench --batches 1 --prompts 2048,32768 --json "$o/b1_attn_nocap.json"
  mark "b1 attn, no cap"
  WKVQ_PDL=$A,attn_trigger bench --batches 1 --prompts 2048,32768 --json "$o/b1_attn_trigger_cap.json"
  mark "b1 attn + trigger, cap"
  WKVQ_PDL=$A python3 benchmarks/decode_profile.py --prompt 32768 --json "$o/prof_p32768_attn.json" \
    > "$o/prof_p32768_attn.txt" 2>&1
  mark "profile"; tail -12 "$o/prof_p32768_attn.txt" ;;
attnpdl2)  # more pairs of default / "attn" PDL with the cap, b1 and b8
  A=gemv,norm,silu,attn
  for i in 1 2 3; do
    bench --batches 1 --prompts 2048,32768 --json "$o/b1_def2_$i.json"; mark "b1 default $i"
    WKVQ_PDL=$A bench --batches 1 --prompts 2048,32768 --json "$o/b1_attn2_$i.json"; mark "b1 attn $i"
  done
  bench --batches 8 --prompts 2048,32768 --json "$o/b8_def.json"; mark "b8 default"
  WKVQ_PDL=$A bench --batches 8 --prompts 2048,32768 --json "$o/b8_attn.json"; mark "b8 attn" ;;
final)  # the w4_mma tests on the final tree, then the record table
  timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_w4_mma.py > "$o/tests_mma_final.txt" 2>&1
  mark "w4_mma tests: $(tail -1 "$o/tests_mma_final.txt")"
  for s in 7b 13b; do
    python3 cli.py bench --shapes $s --paths wkvq-gemv --batches 1,8 --prompts 2048,32768 --steps 20 \
      --json "$o/bench_${s}_final.json" 2>&1 | grep -v Warning | tail -6; mark "bench $s"
  done ;;
early)  # AttnConfig.early (the table's b1 p32768 entry; reverted after this run) as the default: GPU tests, 7B b1,
  # 13B b1 p32768 with it
  # and without (WKVQ_PDL set explicitly to the default kinds: no early launch)
  timeout 60 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "mma_rope and 64" \
    > "$o/tests_early.txt" 2>&1; mark "tests: $(tail -1 "$o/tests_early.txt")"
  bench --batches 1 --prompts 2048,32768 --json "$o/b1_early_default.json"; mark "7b"
  for i in 1; do
    python3 cli.py bench --shapes 13b --paths wkvq-gemv --steps 20 --batches 1 --prompts 32768 \
      --json "$o/b1_13b_early.json" 2>&1 | tail -1; mark "13b early"
    WKVQ_PDL=gemv,norm,silu python3 cli.py bench --shapes 13b --paths wkvq-gemv --steps 20 --batches 1 \
      --prompts 32768 --json "$o/b1_13b_noearly.json" 2>&1 | tail -1; mark "13b not early"
  done ;;
esac; done
