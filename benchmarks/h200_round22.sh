#!/usr/bin/env bash
# Twenty-second session, one H200 (device tool, carry .gpu/whl). Results in $OUT. Parts, e.g.
# OUT=$OUT bash benchmarks/h200_round22.sh mtests mlp1 (next session, first: sprobe msplit awide):
#   stests, stealN, sstamps   ran at commit 09c0611 (the attention's shared tiles, AttnConfig.steal, reverted in
#             fbc6005): the attention's GPU tests with steal, then 7B b1 p32768 default against WKVQ_ATTN_STEAL=15 /
#             25 / 40 and 25 + WKVQ_ATTN_AHEAD=end; the stamps probe with and without steal 25. The knob is gone.
#   mtests    the fused SiLU's GPU tests (tests/test_w4_mma.py -k silu; the decode-step tests with "mlp" and "heads")
#   mlpN      round N: 7B b1 p2048,32768, the default (rope,heads) against WKVQ_FUSE=rope,heads,mlp
#   m13       13B b1 p2048,32768: the default (rope) against WKVQ_FUSE=rope,mlp
#   msplit    7B b1 p32768 with gate_up on a split grid (the fused SiLU does not take the table's stream-K grid):
#             WKVQ_MMA_TABLE=$V/mma_7b_m1_gate_up_x8.json (w1_t2_x8) without and with "mlp", then the default
#   sprobe    NOT RUN: the pure-Triton stand-in grid with the real SiLU epilogue compiled (tests/test_kernels.py -k
#             silu_epilogue_counts: does stream-K fault without the GEMV's PTX?), then benchmarks/silu_probe.py case by
#             case (stream-K faults, split grids do not), each under compute-sanitizer where the machine has it (the
#             faulting instruction), else CUDA_LAUNCH_BLOCKING=1
#   awide     NOT RUN: WKVQ_ATTN_AHEAD=end against the default where it is not yet measured beside "heads": 7B b1
#             p2048,32768, 7B b8, 13B b1 (for the default's next record)
#   mprof     the profiles of the default and of WKVQ_FUSE=rope,heads,mlp (7B b1 p32768), side by side
source "$(dirname "$0")/h200_lib.sh"
for part in "$@"; do case $part in
mtests)
  timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_w4_mma.py -k silu > "$o/tests_silu.txt" 2>&1
  mark "silu tests: $(tail -1 "$o/tests_silu.txt")"; grep -B5 -A25 "^E  \|Error" "$o/tests_silu.txt" | head -40
  timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "mlp_flags or heads_ready" \
    > "$o/tests_mlp.txt" 2>&1
  mark "decode tests: $(tail -1 "$o/tests_mlp.txt")"; grep -B5 -A25 "^E  \|Error" "$o/tests_mlp.txt" | head -40 ;;
mlp[0-9]*)
  i=${part#mlp}
  bench --batches 1 --prompts 2048,32768 --json "$o/m_default_$i.json"; mark "default $i"
  WKVQ_FUSE=rope,heads,mlp bench --batches 1 --prompts 2048,32768 --json "$o/m_mlp_$i.json"; mark "mlp $i" ;;
m13)
  bench --shapes 13b --batches 1 --prompts 2048,32768 --json "$o/m13_default.json"; mark "13b default"
  WKVQ_FUSE=rope,mlp bench --shapes 13b --batches 1 --prompts 2048,32768 --json "$o/m13_mlp.json"; mark "13b mlp" ;;
msplit)
  V=benchmarks/variants/mma_7b_m1_gate_up_x8.json
  timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_w4_mma.py -k silu_epilogue_matches > "$o/t.txt" 2>&1
  mark "silu tests: $(tail -1 "$o/t.txt")"
  WKVQ_MMA_TABLE=$V bench --batches 1 --prompts 32768 --json "$o/ms_split.json"; mark "gate_up x8"
  WKVQ_MMA_TABLE=$V WKVQ_FUSE=rope,heads,mlp bench --batches 1 --prompts 32768 --json "$o/ms_split_mlp.json"
  mark "gate_up x8 + mlp"
  bench --batches 1 --prompts 32768 --json "$o/ms_default.json"; mark "default" ;;
sprobe)
  timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k silu_epilogue_counts > "$o/t_sg.txt" 2>&1
  mark "pure-Triton grid with the real epilogue (split and stream-K; passes under the interpreter): $(tail -1 "$o/t_sg.txt")"
  SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  for i in 0 1 2 3 4 5; do
    CUDA_LAUNCH_BLOCKING=1 timeout 120 ${SAN:+$SAN --print-limit 3} python3 benchmarks/silu_probe.py $i 2>&1 \
      | grep -v Warn | grep -E "^n |Invalid|at 0x|Address|by thread" | head -8
  done ;;
awide)
  for a in "" end; do
    WKVQ_ATTN_AHEAD=$a bench --batches 1,8 --prompts 2048,32768 --json "$o/aw_7b_${a:-default}.json"
    mark "7b ahead ${a:-off}"
    WKVQ_ATTN_AHEAD=$a bench --shapes 13b --batches 1 --prompts 2048,32768 --json "$o/aw_13b_${a:-default}.json"
    mark "13b ahead ${a:-off}"
  done ;;
mprof)
  python3 benchmarks/decode_profile.py --prompt 32768 --json "$o/prof_default.json" > "$o/prof_default.txt" 2>&1
  mark "profile default"
  WKVQ_FUSE=rope,heads,mlp python3 benchmarks/decode_profile.py --prompt 32768 --json "$o/prof_mlp.json" \
    > "$o/prof_mlp.txt" 2>&1; mark "profile mlp"; grep -A12 "^one layer" "$o/prof_mlp.txt"
  python3 benchmarks/decode_profile.py --compare "$o/prof_default.json" "$o/prof_mlp.json" ;;
esac; done
