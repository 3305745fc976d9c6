# Prepared in the thirty-second session for the next (not run). Parts:
#   fp16modes  the fp16 compiled baseline at 7B b1 p32768 is bimodal across fresh processes (~9.4-9.6 or ~10.4-10.5
#              ms; the 7B step's ratio to it 3.62-4.05x by the draw): benchmarks/fp16_probe.py four times, each a
#              fresh process, then the records side by side (which kernels part the two modes)
#   spcells    the step's split count at the record cells other than b1 p32768, where the tables' entries were
#              chosen from the attention alone (round 30: at 13B b1 p32768 the step's optimum was 24, not the 7B's
#              32): 13B b1 p2048 (16: 12, 20, 24), 7B b8 p32768 (16: 8, 12, 24), each against the default, alternated
#   stamps13   the 13B b1 p32768 timeline on 24 splits (the default) and on 28 (5.12-5.16 ms against 4.32-4.35):
#              whether the 1120 programs leave a second wave (late starts), or the cap of 10 an SM unbalances them
#   untabled   batches and contexts no attention table entry has ran the split kernel's default until this session;
#              they now take the nearest entry's tensor-core config (kv4.nearest_entry). The step at 7B b1 p8192,
#              b2 p2048 and b4 p32768 on the new default and on the old one (a one-entry table of the split kernel's
#              default, ATTN_DEFAULT with num_splits), alternated twice; then the real-shape tests at those cells
# Usage: OUT=$OUT bash benchmarks/h200_round37.sh PART...  (carry .gpu/whl)
source benchmarks/h200_lib.sh
for part in "$@"; do case $part in
fp16modes)
  for i in 1 2 3 4; do
    python3 benchmarks/fp16_probe.py --shape 7b --prompt 32768 --json "$o/fp16_$i.json" 2>&1 | grep -v -i warn \
      | head -4; mark "fp16 $i"
  done
  python3 benchmarks/fp16_probe.py --compare "$o"/fp16_[1-4].json;;
spcells)
  for sp in 12 20 24; do sptable h40_b1_2k_sp$sp 40 1 2048 $sp; done
  for sp in 8 12 24; do sptable h32_b8_32k_sp$sp 32 8 32768 $sp; done
  for i in 1 2; do
    nbench def_13b_2k_$i --shapes 13b --prompts 2048
    for sp in 12 20 24; do
      WKVQ_ATTN_TABLE=/root/h40_b1_2k_sp$sp.json nbench sp${sp}_13b_2k_$i --shapes 13b --prompts 2048
    done
    python3 cli.py bench --paths wkvq --batches 8 --steps 20 --shapes 7b --prompts 32768 \
      --json "$o/def_7b_b8_$i.json" 2>&1 | grep wkvq | sed "s/^/def_7b_b8_$i /"
    for sp in 8 12 24; do
      WKVQ_ATTN_TABLE=/root/h32_b8_32k_sp$sp.json python3 cli.py bench --paths wkvq --batches 8 --steps 20 \
        --shapes 7b --prompts 32768 --json "$o/sp${sp}_7b_b8_$i.json" 2>&1 | grep wkvq | sed "s/^/sp${sp}_7b_b8_$i /"
    done
  done;;
stamps13)
  sptable h40_b1_32k_sp28 40 1 32768 28
  python3 benchmarks/stamps_probe.py --shape 13b --prompt 32768 --json $o/stamps_13b_sp24.json 2>&1 \
    | grep -v -i warn | head -14
  WKVQ_ATTN_TABLE=/root/h40_b1_32k_sp28.json python3 benchmarks/stamps_probe.py --shape 13b --prompt 32768 \
    --json $o/stamps_13b_sp28.json 2>&1 | grep -v -i warn | head -14;;
untabled)
  for cell in "1 8192" "2 2048" "4 32768"; do set -- $cell
    attn_table old_b$1_p$2 $1 $2 "dataclasses.replace(kv4.ATTN_DEFAULT, splits=kv4.num_splits($1, 32, $2 + 28))"
  done
  for i in 1 2; do for cell in "1 8192" "2 2048" "4 32768"; do set -- $cell
    python3 cli.py bench --paths wkvq --batches $1 --steps 20 --shapes 7b --prompts $2 --json "$o/new_b$1_p$2_$i.json" \
      2>&1 | grep wkvq | sed "s/^/new_b$1_p$2_$i /"
    WKVQ_ATTN_TABLE=/root/old_b$1_p$2.json python3 cli.py bench --paths wkvq --batches $1 --steps 20 --shapes 7b \
      --prompts $2 --json "$o/old_b$1_p$2_$i.json" 2>&1 | grep wkvq | sed "s/^/old_b$1_p$2_$i /"
  done; done
  gpu_tests "real_shapes and (8192 or 512 or 7b-2-2048 or 7b-3-2048 or 8b-4-2048 or 3b-3-2048)";;
*) echo "unknown part $part"; exit 2;;
esac; done
