# Prepared in the thirty-third session for the next (not run). Parts:
#   realshapes  the real-shape tests at the two cells whose split count changed this session (13B b1 p2048 and 7B b8
#               p32768 on 12 splits, ATTN_KV_TABLE), with the attention table tests; the bench's queued timing
#   record      7B b1 p2048 / p32768 on wkvq, fp16_compiled and int4_tinygemm in one run, with the bench's new
#               `queued` column (the GPU's time a step) beside the waited-for median
#   inproc      benchmarks/inproc_probe.py: the W4KV4 step alone, beside a 31 GB allocation, after the fp16 compiled
#               model ran (still held), after it is freed (this session: 2.607 and 3.019 ms queued after the fp16
#               model in the same process against 2.586 alone)
#   sp8k        the split count at a context no table has, where the fallback keeps the nearest entry's splits: 7B
#               b1 p8192 (16 from the p2048 entry: 512 programs; 24, 32) and LLaMA-3-8B b1 p8192 (8 KV heads: 16 are
#               128 programs; 32, 64), each against the default, alternated twice
#   sp8k2       (added and run in the thirty-fourth session, after sp8k) 7B on 32/48, 8B on 64/128, 13B on the default
#               and 24/32 splits at b1 p8192, alternated twice
# Run in the thirty-fourth session: record, inproc, sp8k, sp8k2 (realshapes' cells ran inside the whole suite);
# records benchmarks/results/r40/.
# (h200_round37.sh stamps13, the 13B timeline on 24 against 28 splits, is still unrun.)
# Usage: OUT=$OUT bash benchmarks/h200_round38.sh PART...  (carry .gpu/whl, and .gpu/xdist for realshapes)
source benchmarks/h200_lib.sh
for part in "$@"; do case $part in
realshapes)
  gpu_tests "real_shapes and (13b-1-2048 or 7b-8-32768) or attn_config"
  python3 -m pytest -q -p no:cacheprovider tests/test_static_cache.py -k "queued or bench" 2>&1 | tail -2;;
record)
  python3 cli.py bench --shapes 7b --paths wkvq,fp16_compiled,int4_tinygemm --batches 1 --prompts 2048,32768 \
    --steps 20 --json "$o/record_7b.json" 2>&1 | grep -v -i warn | tail -8; mark record;;
inproc)
  python3 benchmarks/inproc_probe.py --shape 7b --prompt 32768 --json "$o/inproc.json" 2>&1 | grep -v -i warn \
    | tail -16; mark inproc;;
sp8k)
  for sp in 24 32; do sptable h32_b1_8k_sp$sp 32 1 8192 $sp; done
  for sp in 32 64; do attn_table h8_b1_8k_sp$sp 1 8192 \
    "dataclasses.replace(kv4.attn_config(1, 32, 8193, kv_heads=8), splits=$sp)"; done
  for i in 1 2; do
    nbench def_7b_8k_$i --shapes 7b --prompts 8192
    for sp in 24 32; do
      WKVQ_ATTN_TABLE=/root/h32_b1_8k_sp$sp.json nbench sp${sp}_7b_8k_$i --shapes 7b --prompts 8192
    done
    nbench def_8b_8k_$i --shapes 8b --prompts 8192
    for sp in 32 64; do
      WKVQ_ATTN_TABLE=/root/h8_b1_8k_sp$sp.json nbench sp${sp}_8b_8k_$i --shapes 8b --prompts 8192
    done
  done;;
sp8k2)  # added in the thirty-fourth session, after sp8k: more splits at p8192 (7B 48, 8B 128) and 13B on 24/32
  for sp in 32 48; do sptable h32_b1_8k_sp$sp 32 1 8192 $sp; done
  for sp in 24 32; do sptable h40_b1_8k_sp$sp 40 1 8192 $sp; done
  for sp in 64 128; do attn_table h8_b1_8k_sp$sp 1 8192 \
    "dataclasses.replace(kv4.attn_config(1, 32, 8193, kv_heads=8), splits=$sp)"; done
  for i in 1 2; do
    for sp in 32 48; do WKVQ_ATTN_TABLE=/root/h32_b1_8k_sp$sp.json nbench sp${sp}_7b_8k_$i --shapes 7b --prompts 8192; done
    for sp in 64 128; do WKVQ_ATTN_TABLE=/root/h8_b1_8k_sp$sp.json nbench sp${sp}_8b_8k_$i --shapes 8b --prompts 8192; done
    nbench def_13b_8k_$i --shapes 13b --prompts 8192
    for sp in 24 32; do WKVQ_ATTN_TABLE=/root/h40_b1_8k_sp$sp.json nbench sp${sp}_13b_8k_$i --shapes 13b --prompts 8192; done
  done;;
*) echo "unknown part $part"; exit 2;;
esac; done
