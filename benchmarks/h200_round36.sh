# Thirty-second session. Round 30 (NOTES.md) closed the 7B's split count in the step: 16 / 24 / 28 / 32 / 48 / 64
# splits at b1 p32768 took 3.47 / 2.87-2.89 / 2.67-2.68 / 2.61-2.65 / 2.80 / 3.27 ms; 32 (1024 programs, 8 an SM)
# stays. The 13B's 32 splits at b1 p32768 came from the 7B's entry (1280 programs, 10 an SM); the step's optimum at
# 40 heads was never timed. Parts:
#   sp13b  13B b1 p32768 on 24, 26, 28 and 32 (default) splits as WKVQ_ATTN_TABLE variants, alternated twice
#   g8b    LLaMA-3-8B b1 p32768 (128 splits) with merge groups of 8, 16 (default) and 32 splits, alternated twice
#   g7b    7B b1 p32768 (1 head x 32 splits, one merge level by the rule) with two levels, groups of 4 and 8
# Usage: OUT=$OUT bash benchmarks/h200_round36.sh PART...  (carry .gpu/whl)
source benchmarks/h200_lib.sh
for part in "$@"; do case $part in
sp13b)
  for sp in 24 26 28; do sptable t_h40_sp$sp 40 1 32768 $sp; done
  for i in 1 2; do
    nbench sp32_13b_$i --shapes 13b --prompts 32768
    for sp in 24 26 28; do WKVQ_ATTN_TABLE=/root/t_h40_sp$sp.json nbench sp${sp}_13b_$i --shapes 13b --prompts 32768; done
  done;;
g8b)
  for i in 1 2; do
    nbench g16_8b_$i --shapes 8b --prompts 32768
    for g in 8 32; do WKVQ_ATTN_GROUP=$g nbench g${g}_8b_$i --shapes 8b --prompts 32768; done
  done;;
g7b)
  for i in 1 2; do
    nbench g1_7b_$i --shapes 7b --prompts 32768
    for g in 4 8; do WKVQ_ATTN_GROUP=$g nbench g${g}_7b_$i --shapes 7b --prompts 32768; done
  done;;
*) echo "unknown part $part"; exit 2;;
esac; done
# After the 13B entry (1, 32768, 40, 40) -> 24 splits was added (same session), run as one command:
#   source benchmarks/h200_lib.sh; gpu_tests 13b; nbench def_13b --shapes 13b --prompts 2048,32768
#   python3 cli.py bench --shapes 7b --paths wkvq,fp16_compiled --batches 1 --prompts 32768 --steps 20 --json $o/cmp_7b.json
