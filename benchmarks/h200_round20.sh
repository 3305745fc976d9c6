#!/usr/bin/env bash
# Twentieth session, one H200 (device tool, carry .gpu/whl): the next projection asked of the L2 before a GEMV's
# PDL wait (WKVQ_NEXT_PF, w4_mma NEXT) and the attention's cache copies evict_first (WKVQ_ATTN_EVICT_FIRST).
# Results in $OUT. Parts: tests e2e probe early slack verify again final splits profile (the o-trigger comparison
# prepared here ran in the twenty-first session: h200_round21.sh ottests ot1 ot2 otprof), e.g. bash benchmarks/h200_round20.sh tests e2e. The parts tests,
# e2e and probe ran on commit 40c40be (the prefetch and benchmarks/next_probe.py; reverted after, being slower);
# early and slack on commit f0be2a6 plus an environment knob WKVQ_ATTN_CAP_SLACK (programs over the even share),
# since replaced by kv4_mma.CAP_SLACK = 1 with the tensor-core attention launched early by default ("attn_mma").
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
early)  # the attention launched early (PDL "attn", capped at the even share, or one or two over it), 7B and 13B
  A=gemv,norm,silu,attn
  for s in 7b 13b; do
    bench --shapes $s --batches 1 --prompts 32768 --json "$o/early_${s}_default.json"; mark "$s default"
    WKVQ_PDL=$A bench --shapes $s --batches 1 --prompts 32768 --json "$o/early_${s}_attn.json"; mark "$s attn"
    WKVQ_PDL=$A WKVQ_ATTN_CAP_SLACK=1 bench --shapes $s --batches 1 --prompts 32768 \
      --json "$o/early_${s}_attn_slack1.json"; mark "$s attn slack 1"
  done
  WKVQ_PDL=$A python3 benchmarks/decode_profile.py --shape 13b --prompt 32768 --json "$o/prof_13b_attn.json" \
    > "$o/prof_13b_attn.txt" 2>&1; mark "profile 13b attn"; grep -A12 "^one layer" "$o/prof_13b_attn.txt"
  python3 benchmarks/decode_profile.py --shape 13b --prompt 32768 --json "$o/prof_13b.json" \
    > "$o/prof_13b.txt" 2>&1; mark "profile 13b"; grep -A12 "^one layer" "$o/prof_13b.txt" ;;
slack)  # the early attention one and two programs over the even share, against the default, alternated; 13B; b8
  A=gemv,norm,silu,attn
  for i in 1 2; do
    bench --batches 1 --prompts 2048,32768 --json "$o/slack_7b_default_$i.json"; mark "7b default $i"
    for k in 1 2; do
      WKVQ_PDL=$A WKVQ_ATTN_CAP_SLACK=$k bench --batches 1 --prompts 2048,32768 --json "$o/slack_7b_s${k}_$i.json"
      mark "7b slack $k $i"
    done
  done
  bench --shapes 13b --batches 1 --prompts 2048,32768 --json "$o/slack_13b_default.json"; mark "13b default"
  for k in 1 2; do
    WKVQ_PDL=$A WKVQ_ATTN_CAP_SLACK=$k bench --shapes 13b --batches 1 --prompts 2048,32768 \
      --json "$o/slack_13b_s$k.json"; mark "13b slack $k"
  done
  bench --batches 8 --prompts 2048,32768 --json "$o/slack_7b_b8_default.json"; mark "7b b8 default"
  WKVQ_PDL=$A WKVQ_ATTN_CAP_SLACK=1 bench --batches 8 --prompts 2048,32768 --json "$o/slack_7b_b8_s1.json"
  mark "7b b8 slack 1" ;;
verify)  # the final tree's GPU tests of the attention (launched early by default now) and the decode step
  timeout 280 python3 -m pytest -q -x -p no:cacheprovider tests/test_kv4_mma.py > "$o/tests_attn_final.txt" 2>&1
  mark "attention tests: $(tail -1 "$o/tests_attn_final.txt")"
  timeout 250 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "fast_decode or decode_graph or decode_attention" \
    > "$o/tests_decode_final.txt" 2>&1; mark "decode tests: $(tail -1 "$o/tests_decode_final.txt")" ;;
again)  # the 7B batch-1 line twice more on the final tree
  for i in 1 2; do bench --batches 1 --prompts 2048,32768 --json "$o/b1_final_$i.json"; mark "b1 $i"; done ;;
splits)  # b1 p32768 split counts with the attention launched early (the default now), alternated with the table's 32
  V=benchmarks/variants
  bench --batches 1 --prompts 32768 --json "$o/sp32_1.json"; mark "32"
  for sp in 24 40 48; do
    WKVQ_ATTN_TABLE=$V/attn_b1_32k_sp$sp.json bench --batches 1 --prompts 32768 --json "$o/sp${sp}.json"; mark "$sp"
  done
  bench --batches 1 --prompts 32768 --json "$o/sp32_2.json"; mark "32" ;;
profile)  # the final tree: the GEMV's tests after launch_plan, then where a step's time goes (what each kernel adds)
  timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_w4_mma.py -k "reference or 7b_shapes or group_major" \
    > "$o/tests_mma_plan.txt" 2>&1; mark "mma tests: $(tail -1 "$o/tests_mma_plan.txt")"
  for p in 32768 2048; do
    python3 benchmarks/decode_profile.py --prompt $p --json "$o/prof_p$p.json" > "$o/prof_p$p.txt" 2>&1
    mark "profile p$p"; grep -v Warn "$o/prof_p$p.txt" | sed -n '/^timeline/,$p' | head -30
  done ;;
final)
  record ;;
esac; done
