# Thirty-first session, third run: with the merge in two levels (round 33) the split count's cost moved. Round 27
# found more splits than 64 slower at 8 KV heads, when the one-level merge of 4 heads x splits was the tail. Parts:
#   sweep   the attention alone at 32 on 8 heads, b1 p32768: 64 / 128 / 256 splits x tiles 32x2, 64x2, 64x3, 128x2
#   step    8B b1 p32768 with 128 splits (64x2, a WKVQ_ATTN_TABLE variant) and the default (64), alternated twice
# Usage: OUT=$OUT bash benchmarks/h200_round34.sh PART...  (carry .gpu/whl)
source benchmarks/h200_lib.sh
for part in "$@"; do case $part in
sweep)
  python3 benchmarks/attn_bench.py --heads 32 --kv-heads 8 --batches 1 --contexts 32768 --rope --mma-only \
    --mma 32x2,64x2,64x3,128x2 --keys-a 1 --splits 64,128,256 --json $o/attn_h32_kv8_sweep.json 2>&1 \
    | grep -v -i warn | grep -A14 "batch x context";;
step)
  # (as run, on 2e3987d, the second of each pair was the default, then 64 splits; the table now gives the 8B 128, so
  # both are explicit variants here: the same two configs)
  for sp in 64 128; do
    attn_table t_sp$sp 1 32768 "dataclasses.replace(kv4.ATTN_KV_TABLE[1, 32768, 8], splits=$sp)"
  done
  for i in 1 2; do
    WKVQ_ATTN_TABLE=/root/t_sp128.json nbench sp128_8b_$i --shapes 8b --prompts 32768
    WKVQ_ATTN_TABLE=/root/t_sp64.json nbench sp64_8b_$i --shapes 8b --prompts 32768
  done;;
*) echo "unknown part $part"; exit 2;;
esac; done
