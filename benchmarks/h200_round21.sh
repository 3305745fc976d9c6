#!/usr/bin/env bash
# Twenty-first session, one H200 (device tool, carry .gpu/whl). Results in $OUT. Parts, e.g.
# OUT=$OUT bash benchmarks/h200_round21.sh ottests ot1:
#   ottests   the GPU tests of the attention's o trigger (round 20's otrigger, prepared, never run)
#   otN       round N of the o-trigger comparison, alternated: default / o on one-warp programs / trigger two tiles
#             ahead / trigger at the end + o one-warp / trigger two tiles ahead + o one-warp (7B b1 p2048,32768)
#   otprof    the profile of the trigger two tiles ahead with o one-warp (7B b1 p32768)
#   ahtests   the decode step's GPU tests with the attention asking the L2 for o's weights (WKVQ_ATTN_AHEAD)
#   ahN       round N: default / WKVQ_ATTN_AHEAD=end / =2 / =4 (7B b1 p2048,32768)
#   comboN    round N: default / trigger 2 tiles ahead + o one-warp (T2W) / T2W + ahead end / T2W + ahead 2 /
#             ahead end / ahead 2 (7B b1 p2048,32768), after the decode-graph tests with T2W + ahead 2 (first round)
#   wide      the candidate T2W against the default at 7B b8 and 13B b1 (p2048,32768)
#   heads     the per-head ready flags (WKVQ_FUSE=rope,heads: o's programs wait for their heads, not the whole
#             attention): GPU tests, then default / heads / heads + o one-warp alternated twice (7B b1), 13B b1
#             default / heads, the profile with heads (7B b1 p32768)
#   htest     the heads GPU test alone (tests/test_kernels.py -k heads_ready)
#   h13       13B b1: the profile with heads (p32768), heads + o one-warp against the default and heads
#   final     the final tree ("heads" the default at 7B b1): the heads test, the record (7B, 13B; b1, b8; p2048,
#             p32768), then 7B b1 without "heads" (WKVQ_FUSE=rope, the old default) and with it once more
#   ahheads   NOT RUN (no device time left): the default ("heads" at 7B b1) against it with WKVQ_ATTN_AHEAD=end, alternated twice (7B b1 p32768)
#   h13next   NOT RUN (no device time left): 13B b1 p32768, the default against "heads" launched at the attention's
#             start, two tiles before its end, after its tiles (WKVQ_ATTN_TRIGGER_AT with heads), alternated; then
#             the default's profile with what each part adds (against prof_13b_heads.txt)
#   stamps    NOT RUN: the heads GPU test (with the stamps), then benchmarks/stamps_probe.py (per-program timestamps of
#             the last layer's attention and o) at 7B and 13B b1 p32768, with "heads" and without (WKVQ_FUSE=rope)
#   ahprof    the profile with WKVQ_ATTN_AHEAD=$AH (default end), 7B b1 p32768
source "$(dirname "$0")/h200_lib.sh"
V=benchmarks/variants; T=gemv,norm,silu,attn_mma,attn_trigger; W=$V/mma_7b_m1_o_w1_x16.json
for part in "$@"; do case $part in
ottests)
  timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_kv4_mma.py tests/test_kernels.py \
    -k "fast_decode or decode_graph or trigger" > "$o/tests_otrigger.txt" 2>&1; mark "tests: $(tail -1 "$o/tests_otrigger.txt")"
  WKVQ_PDL=$T WKVQ_ATTN_TRIGGER_AT=2 WKVQ_MMA_TABLE=$W timeout 200 python3 -m pytest -q -x -p no:cacheprovider \
    tests/test_kernels.py -k "fast_decode or decode_graph or mma_rope" > "$o/tests_otrigger_on.txt" 2>&1
  mark "tests (trigger 2 tiles ahead, o w1): $(tail -1 "$o/tests_otrigger_on.txt")" ;;
ot[0-9]*)
  i=${part#ot}
  bench --batches 1 --prompts 2048,32768 --json "$o/ot_default_$i.json"; mark "default $i"
  WKVQ_MMA_TABLE=$W bench --batches 1 --prompts 2048,32768 --json "$o/ot_w1_$i.json"; mark "o w1 $i"
  WKVQ_PDL=$T WKVQ_ATTN_TRIGGER_AT=2 bench --batches 1 --prompts 2048,32768 --json "$o/ot_at2_$i.json"; mark "at 2 $i"
  for at in end 2; do
    WKVQ_PDL=$T WKVQ_ATTN_TRIGGER_AT=$at WKVQ_MMA_TABLE=$W bench --batches 1 --prompts 2048,32768 \
      --json "$o/ot_at${at}_w1_$i.json"; mark "at $at + o w1 $i"
  done ;;
otprof)
  WKVQ_PDL=$T WKVQ_ATTN_TRIGGER_AT=2 WKVQ_MMA_TABLE=$W python3 benchmarks/decode_profile.py --prompt 32768 \
    --json "$o/prof_ot.json" > "$o/prof_ot.txt" 2>&1; mark "profile"; grep -A12 "^one layer" "$o/prof_ot.txt" ;;
ahtests)
  for at in end 2; do
    WKVQ_ATTN_AHEAD=$at timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py \
      -k "fast_decode or decode_graph or mma_rope" > "$o/tests_ahead_$at.txt" 2>&1
    mark "tests (ahead $at): $(tail -1 "$o/tests_ahead_$at.txt")"
  done ;;
ah[0-9]*)
  i=${part#ah}
  bench --batches 1 --prompts 2048,32768 --json "$o/ah_default_$i.json"; mark "default $i"
  for at in end 2 4; do
    WKVQ_ATTN_AHEAD=$at bench --batches 1 --prompts 2048,32768 --json "$o/ah_${at}_$i.json"; mark "ahead $at $i"
  done ;;
combo[0-9]*)
  i=${part#combo}
  if [ "$i" = 1 ]; then
    WKVQ_PDL=$T WKVQ_ATTN_TRIGGER_AT=2 WKVQ_MMA_TABLE=$W WKVQ_ATTN_AHEAD=2 timeout 150 python3 -m pytest -q -x \
      -p no:cacheprovider tests/test_kernels.py -k "decode_graph" > "$o/tests_combo.txt" 2>&1
    mark "decode graph tests (T2W + ahead 2): $(tail -1 "$o/tests_combo.txt")"
  fi
  bench --batches 1 --prompts 2048,32768 --json "$o/c_default_$i.json"; mark "default $i"
  WKVQ_PDL=$T WKVQ_ATTN_TRIGGER_AT=2 WKVQ_MMA_TABLE=$W bench --batches 1 --prompts 2048,32768 \
    --json "$o/c_t2w_$i.json"; mark "T2W $i"
  for at in end 2; do
    WKVQ_PDL=$T WKVQ_ATTN_TRIGGER_AT=2 WKVQ_MMA_TABLE=$W WKVQ_ATTN_AHEAD=$at bench --batches 1 \
      --prompts 2048,32768 --json "$o/c_t2w_ah${at}_$i.json"; mark "T2W + ahead $at $i"
  done
  for at in end 2; do
    WKVQ_ATTN_AHEAD=$at bench --batches 1 --prompts 2048,32768 --json "$o/c_ah${at}_$i.json"; mark "ahead $at $i"
  done ;;
wide)
  bench --batches 8 --prompts 2048,32768 --json "$o/w_7b_b8_default.json"; mark "7b b8 default"
  WKVQ_PDL=$T WKVQ_ATTN_TRIGGER_AT=2 WKVQ_MMA_TABLE=$W bench --batches 8 --prompts 2048,32768 \
    --json "$o/w_7b_b8_t2w.json"; mark "7b b8 T2W"
  bench --shapes 13b --batches 1 --prompts 2048,32768 --json "$o/w_13b_default.json"; mark "13b default"
  WKVQ_PDL=$T WKVQ_ATTN_TRIGGER_AT=2 bench --shapes 13b --batches 1 --prompts 2048,32768 \
    --json "$o/w_13b_t2.json"; mark "13b T2" ;;
heads)
  timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py \
    -k "heads_ready or decode_graph or fast_decode or mma_rope" > "$o/tests_heads.txt" 2>&1
  mark "tests: $(tail -1 "$o/tests_heads.txt")"; grep -B5 -A25 "Error\|FAIL" "$o/tests_heads.txt" | head -60
  H=rope,heads
  for i in 1 2; do
    bench --batches 1 --prompts 2048,32768 --json "$o/h_default_$i.json"; mark "default $i"
    WKVQ_FUSE=$H bench --batches 1 --prompts 2048,32768 --json "$o/h_heads_$i.json"; mark "heads $i"
    WKVQ_FUSE=$H WKVQ_MMA_TABLE=$W bench --batches 1 --prompts 2048,32768 --json "$o/h_heads_w1_$i.json"
    mark "heads + o w1 $i"
  done
  bench --shapes 13b --batches 1 --prompts 2048,32768 --json "$o/h_13b_default.json"; mark "13b default"
  WKVQ_FUSE=$H bench --shapes 13b --batches 1 --prompts 2048,32768 --json "$o/h_13b_heads.json"; mark "13b heads"
  WKVQ_FUSE=$H python3 benchmarks/decode_profile.py --prompt 32768 --json "$o/prof_heads.json" \
    > "$o/prof_heads.txt" 2>&1; mark "profile heads"; grep -A12 "^one layer" "$o/prof_heads.txt" ;;
htest)
  timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "heads_ready" \
    > "$o/tests_heads2.txt" 2>&1; mark "heads tests: $(tail -1 "$o/tests_heads2.txt")"
  grep -B2 -A30 "^E  \|Error" "$o/tests_heads2.txt" | head -50 ;;
h13)
  W13=$V/mma_13b_m1_o_w1_x16.json
  WKVQ_FUSE=rope,heads python3 benchmarks/decode_profile.py --shape 13b --prompt 32768 --json "$o/prof_13b_heads.json" \
    > "$o/prof_13b_heads.txt" 2>&1; mark "profile 13b heads"; grep -A12 "^one layer" "$o/prof_13b_heads.txt"
  bench --shapes 13b --batches 1 --prompts 2048,32768 --json "$o/h13_default.json"; mark "13b default"
  WKVQ_FUSE=rope,heads WKVQ_MMA_TABLE=$W13 bench --shapes 13b --batches 1 --prompts 2048,32768 \
    --json "$o/h13_heads_w1.json"; mark "13b heads + o w1"
  WKVQ_FUSE=rope,heads bench --shapes 13b --batches 1 --prompts 2048,32768 --json "$o/h13_heads.json"
  mark "13b heads" ;;
ahheads)
  for i in 1 2; do
    bench --batches 1 --prompts 32768 --json "$o/ahh_default_$i.json"; mark "default (heads) $i"
    WKVQ_ATTN_AHEAD=end bench --batches 1 --prompts 32768 --json "$o/ahh_end_$i.json"; mark "heads + ahead end $i"
  done ;;
h13next)
  for i in 1 2; do
    bench --shapes 13b --batches 1 --prompts 32768 --json "$o/n13_default_$i.json"; mark "13b default $i"
    for at in start 2 end; do
      WKVQ_FUSE=rope,heads WKVQ_ATTN_TRIGGER_AT=$at bench --shapes 13b --batches 1 --prompts 32768 \
        --json "$o/n13_heads_${at}_$i.json"; mark "13b heads, o launched at $at $i"
    done
  done
  python3 benchmarks/decode_profile.py --shape 13b --prompt 32768 --json "$o/prof_13b_default.json" \
    > "$o/prof_13b_default.txt" 2>&1; mark "profile 13b default"
  python3 benchmarks/decode_profile.py --compare "$o/prof_13b_default.json" benchmarks/results/r24/prof_13b_heads.json ;;
stamps)
  timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "heads_ready" \
    > "$o/tests_stamps.txt" 2>&1; mark "heads tests (stamps): $(tail -1 "$o/tests_stamps.txt")"
  for s in 7b 13b; do
    for f in rope,heads rope; do
      WKVQ_FUSE=$f python3 benchmarks/stamps_probe.py --shape $s --prompt 32768 --json "$o/stamps_${s}_${f/,/_}.json" \
        2>&1 | grep -v Warn; mark "stamps $s $f"
    done
  done ;;
ahprof)
  WKVQ_ATTN_AHEAD=${AH:-end} python3 benchmarks/decode_profile.py --prompt 32768 --json "$o/prof_ah.json" \
    > "$o/prof_ah.txt" 2>&1; mark "profile ahead ${AH:-end}"; grep -A12 "^one layer" "$o/prof_ah.txt" ;;
final)
  timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "heads_ready" \
    > "$o/tests_heads_final.txt" 2>&1; mark "heads tests: $(tail -1 "$o/tests_heads_final.txt")"
  record
  WKVQ_FUSE=rope bench --batches 1 --prompts 2048,32768 --json "$o/final_rope_only.json"; mark "7b b1 rope only"
  bench --batches 1 --prompts 2048,32768 --json "$o/final_default_again.json"; mark "7b b1 default again" ;;
esac; done
