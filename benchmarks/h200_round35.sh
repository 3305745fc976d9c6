# Prepared in the thirty-first session for the next (not run). Round 29 (NOTES.md) found that the split count that is
# best for the attention alone is not the step's at 8B (64 alone, 128 in the step: the early-launched attention fills
# the multiprocessors the qkv GEMV frees). The 7B's 32 splits at b1 p32768 were chosen alone (round 14). Parts:
#   sp7b     7B b1 p32768 with 32 (default), 48 and 64 splits as WKVQ_ATTN_TABLE variants, alternated twice; 64 splits
#            at 1 head is 64 rows (one merge level), so WKVQ_ATTN_GROUP=8 once as well
#   stamps8  the 8B b1 p32768 timeline on its new 128 splits
#   suite    is not here: run the whole suite first (benchmarks/gpu_suite.sh tests, after the SmolLM2 half), as this
#            session's table entry (8B on 128 splits) has not run under test_real_shapes on the GPU
# Usage: OUT=$OUT bash benchmarks/h200_round35.sh PART...  (carry .gpu/whl)
source benchmarks/h200_lib.sh
for part in "$@"; do case $part in
sp7b)
  for sp in 48 64; do sptable t_7b_sp$sp 32 1 32768 $sp; done
  for i in 1 2; do
    nbench sp32_7b_$i --shapes 7b --prompts 32768
    WKVQ_ATTN_TABLE=/root/t_7b_sp48.json nbench sp48_7b_$i --shapes 7b --prompts 32768
    WKVQ_ATTN_TABLE=/root/t_7b_sp64.json nbench sp64_7b_$i --shapes 7b --prompts 32768
  done
  WKVQ_ATTN_GROUP=8 WKVQ_ATTN_TABLE=/root/t_7b_sp64.json nbench sp64g8_7b --shapes 7b --prompts 32768;;
stamps8)
  python3 benchmarks/stamps_probe.py --shape 8b --prompt 32768 --json $o/stamps_8b_sp128.json 2>&1 \
    | grep -v -i warn | head -14;;
*) echo "unknown part $part"; exit 2;;
esac; done
