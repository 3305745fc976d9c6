# Thirty-first session, second run: the attention's merge in two levels (kv4._combine_if_last GROUP,
# runtime.kernels.merge_group: above 64 partial rows a program, the last of each group of ~sqrt(splits) splits merges
# its group, the last group the groups). Round 32 (r35) showed the one-level merge still ending ~13-15 µs after the
# last tile at 8 KV heads with every head's loads issued together. Parts:
#   tests   the attention and decode-step GPU tests, the two-level merge against the reference (both kernels)
#   ab      8B b1 p32768 with WKVQ_ATTN_GROUP=1 (one level) and the default (8 groups of 8), alternated twice;
#           70B b1 p32768 one pair; 7B b1 p32768 (one level either way)
#   stamps  8B b1 p32768 timeline with the default
#   attn    the attention alone at 32 on 8 heads, b1 p32768, one level and the default
# Ran on 2e3987d (the 8B table entry later moved to 128 splits: a re-run on a later tree times that tree).
# Usage: OUT=$OUT bash benchmarks/h200_round33.sh PART...  (carry .gpu/whl .gpu/xdist)
source benchmarks/h200_lib.sh
for part in "$@"; do case $part in
tests)
  gpu_tests "two_level or merge_group or mma_attention_matches or mma_rope or heads_ready or query_parts or real_shape or lost_split or combine";;
ab)
  for i in 1 2; do
    WKVQ_ATTN_GROUP=1 nbench ab_8b_one$i --shapes 8b --prompts 32768
    nbench ab_8b_two$i --shapes 8b --prompts 32768
  done
  WKVQ_ATTN_GROUP=1 nbench ab_70b_one --shapes 70b --prompts 32768
  nbench ab_70b_two --shapes 70b --prompts 32768
  nbench ab_7b --shapes 7b --prompts 32768;;
stamps)
  python3 benchmarks/stamps_probe.py --shape 8b --prompt 32768 --json $o/stamps_8b_p32768.json 2>&1 \
    | grep -v -i warn | head -14;;
attn)
  for g in 1 default; do
    if [ $g = default ]; then unset WKVQ_ATTN_GROUP; else export WKVQ_ATTN_GROUP=$g; fi
    python3 benchmarks/attn_bench.py --heads 32 --kv-heads 8 --batches 1 --contexts 32768 --rope --mma-only \
      --json $o/attn_h32_kv8_g$g.json 2>&1 | grep -v -i warn | grep -A1 "batch x context" | sed "s/^/group $g /"
  done; unset WKVQ_ATTN_GROUP;;
*) echo "unknown part $part"; exit 2;;
esac; done
