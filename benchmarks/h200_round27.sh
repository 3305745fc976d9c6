#!/usr/bin/env bash
# Twenty-seventh session, one H200 (device tool, carry .gpu/whl). Results in $OUT (benchmarks/results/r30).
# pftests, pf1 and pfprof ran at 7812666 (WKVQ_ATTN_PF, reverted in the commit after it: no faster); on later
# trees the variable is ignored and every pf variant is the default. etests, early1 and early2 ran at 9e3798e
# (WKVQ_ATTN_EARLY, reverted in the commit after it: no faster); likewise ignored on later trees.
#   pftests   the decode-step GPU tests with the attention asking the L2 for gate_up's first weights
#             (WKVQ_ATTN_PF=end:16 and merge:16): a hint, so the same results
#   pf[0-9]   7B b1 p2048 and p32768: the default against WKVQ_ATTN_PF=end:16, merge:16, merge:32, alternated
#   pfprof    the 7B b1 p32768 profile (what each kernel adds a layer), the default and with $PF (default merge:16)
#   etests    the attention and decode-step GPU tests with WKVQ_ATTN_EARLY=1 and 2 (the ring's last stage issued
#             right after the PDL wait, before the query's loads, or before the wait)
#   early[0-9] 7B b1 p2048 and p32768: WKVQ_ATTN_EARLY=0 (default), 1, 2, alternated
#   eprof     the profile with WKVQ_ATTN_EARLY=$EARLY (default 1)
#   postests  the GPU tests of the merge with the position passed in (the rope attention against rope_append +
#             attention, the heads flags, the decode step)
#   pos[0-9]  7B b1 p2048 and p32768: the merge with the position passed in, then reloading it (the tree's one
#             call edited back with sed), alternated
#   side      7B b1 p32768 side by side in one run: the default step, fp16 StaticCache + torch.compile, the step
#             again (the issue's ratio with this session's baseline)
source "$(dirname "$0")/h200_lib.sh"
for part in "$@"; do case $part in
pftests)
  for pf in end:16 merge:16; do
    WKVQ_ATTN_PF=$pf timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py \
      -k "heads_ready or fast_decode or decode_graph" > "$o/tests_pf_${pf/:/_}.txt" 2>&1
    mark "step tests $pf: $(tail -1 "$o/tests_pf_${pf/:/_}.txt")"
  done ;;
pf[0-9])
  i=${part#pf}
  for pf in off end:16 merge:16 merge:32; do
    WKVQ_ATTN_PF=$pf bench --batches 1 --prompts 2048,32768 --json "$o/pf_${pf/:/_}_$i.json"; mark "pf $pf $i"
  done ;;
pfprof)
  for pf in off ${PF:-merge:16}; do
    WKVQ_ATTN_PF=$pf timeout 120 python3 benchmarks/decode_profile.py --prompt 32768 --json "$o/prof_${pf/:/_}.json" \
      > "$o/prof_${pf/:/_}.txt" 2>&1; mark "profile $pf"; grep -A12 "^one layer" "$o/prof_${pf/:/_}.txt" | tail -4
  done ;;
etests)
  for e in 1 2; do
    WKVQ_ATTN_EARLY=$e timeout 400 python3 -m pytest -q -p no:cacheprovider tests/test_kv4_mma.py tests/test_kernels.py \
      -k "mma_attention_matches or mma_rope or heads_ready or fast_decode or decode_graph" > "$o/tests_early_$e.txt" 2>&1
    mark "tests early $e: $(tail -1 "$o/tests_early_$e.txt")"
  done ;;
early[0-9])
  i=${part#early}
  for e in 0 1 2; do
    WKVQ_ATTN_EARLY=$e bench --batches 1 --prompts 2048,32768 --json "$o/early_${e}_$i.json"; mark "early $e $i"
  done ;;
eprof)
  WKVQ_ATTN_EARLY=${EARLY:-1} timeout 120 python3 benchmarks/decode_profile.py --prompt 32768 \
    --json "$o/prof_early.json" > "$o/prof_early.txt" 2>&1; mark "profile early"; grep -A1 "adds to the step" "$o/prof_early.txt" ;;
postests)
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py \
    -k "(mma_rope and mixed and True) or heads_ready or fast_decode" > "$o/tests_pos.txt" 2>&1
  mark "tests pos: $(tail -1 "$o/tests_pos.txt")" ;;
pos[0-9])
  i=${part#pos}
  f=runtime/kernels/kv4_mma.py
  grep -q "ep_ptr, READY, length)" $f || { echo "not the tree with the position passed in"; exit 1; }
  bench --batches 1 --prompts 2048,32768 --json "$o/pos_given_$i.json"; mark "pos given $i"
  sed -i 's/ep_ptr, READY, length)/ep_ptr, READY)/' $f
  bench --batches 1 --prompts 2048,32768 --json "$o/pos_reload_$i.json"; mark "pos reloaded $i"
  sed -i 's/ep_ptr, READY)$/ep_ptr, READY, length)/' $f ;;
side|side[0-9])  # side: the first run's file names; sideN: N in them
  i=${part#side}
  bench --batches 1 --prompts 32768 --json "$o/side${i}_wkvq_1.json"; mark "wkvq 1"
  timeout 420 python3 cli.py bench --shapes 7b --paths fp16_compiled --batches 1 --prompts 32768 --steps 20 \
    --json "$o/side${i}_fp16_compiled.json" 2>&1 | grep -v Warning | tail -3; mark "fp16 compiled"
  bench --batches 1 --prompts 32768 --json "$o/side${i}_wkvq_2.json"; mark "wkvq 2" ;;
esac; done
