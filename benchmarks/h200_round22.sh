#!/usr/bin/env bash
# Twenty-second session, one H200 (device tool, carry .gpu/whl). Results in $OUT. Parts, e.g.
# OUT=$OUT bash benchmarks/h200_round22.sh stests steal1:
#   stests    the tensor-core attention's GPU tests with shared tiles (AttnConfig.steal), and the decode-step tests
#             with WKVQ_ATTN_STEAL=25
#   stealN    round N, 7B b1 p32768: the default against WKVQ_ATTN_STEAL=15 / 25 / 40, and 25 with WKVQ_ATTN_AHEAD=end
#   sstamps   benchmarks/stamps_probe.py at 7B b1 p32768 with WKVQ_ATTN_STEAL=$ST (default 25) and without
#   swide     WKVQ_ATTN_STEAL=$ST (default 25) against the default: 7B b1 p2048, 7B b8, 13B b1
source "$(dirname "$0")/h200_lib.sh"
for part in "$@"; do case $part in
stests)
  timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py \
    -k "mma_attention_matches or mma_rope or heads_ready" > "$o/tests_steal.txt" 2>&1
  mark "attention tests: $(tail -1 "$o/tests_steal.txt")"; grep -B5 -A25 "^E  \|Error" "$o/tests_steal.txt" | head -40
  WKVQ_ATTN_STEAL=25 timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py \
    -k "decode_graph or fast_decode or heads_ready" > "$o/tests_steal_step.txt" 2>&1
  mark "decode tests (steal 25): $(tail -1 "$o/tests_steal_step.txt")"; grep -B5 -A25 "^E  \|Error" "$o/tests_steal_step.txt" | head -40 ;;
steal[0-9]*)
  i=${part#steal}
  bench --batches 1 --prompts 32768 --json "$o/s_default_$i.json"; mark "default $i"
  for st in 15 25 40; do
    WKVQ_ATTN_STEAL=$st bench --batches 1 --prompts 32768 --json "$o/s_${st}_$i.json"; mark "steal $st $i"
  done
  WKVQ_ATTN_STEAL=25 WKVQ_ATTN_AHEAD=end bench --batches 1 --prompts 32768 --json "$o/s_25_ahead_$i.json"
  mark "steal 25 + ahead end $i" ;;
sstamps)
  for st in ${ST:-25} 0; do
    WKVQ_ATTN_STEAL=$st python3 benchmarks/stamps_probe.py --shape 7b --prompt 32768 2>&1 | grep -v Warn
    mark "stamps 7b steal $st"
  done ;;
swide)
  for st in 0 ${ST:-25}; do
    WKVQ_ATTN_STEAL=$st bench --batches 1,8 --prompts 2048,32768 --json "$o/sw_7b_$st.json"; mark "7b steal $st"
    WKVQ_ATTN_STEAL=$st bench --shapes 13b --batches 1 --prompts 2048,32768 --json "$o/sw_13b_$st.json"
    mark "13b steal $st"
  done ;;
esac; done
