# Prepared and run in the thirty-sixth session. Parts:
#   batch    the 7B's split count at batches 2 and 4 (p2048, p8192, p32768): no table entry names these batches, so
#            they take ATTN_TABLE's nearest entry (b2: the b1 entries' 16 / 32 splits; b4: the b8 entries' 4 / 16,
#            i.e. 512 programs at p2048-p8192, half a placement). Three tables, each one bench of six cells: the
#            default, A (fewer or more splits where the placement reading points), B (the other side)
#   batch2   (after batch) p8192 / p16384 / p32768 at batches 2, 4 and 8: the default and two tables, C and D
#   b70      LLaMA-2-70B b1 p4096 / p8192 / p16384 on kv4.placement_splits (64) against 32 splits (the rule came in
#            the thirty-fifth session untimed at 70B but for p32768's entry)
#   confirm SPEC...  each SPEC `shape:batch:context:splits` (splits "def": the default) alternated twice (PASSES=N: N
#            times)
#   check    the real-shape tests at the batch-2-4 cells kv4.placement_splits now decides, and the table test
# Usage: OUT=$OUT bash benchmarks/h200_round40.sh PART...  (carry .gpu/whl)
source benchmarks/h200_lib.sh
for part in "$@"; do case $part in
batch)
  mtable bA 32 32 2:2048:8 2:8192:32 2:32768:24 4:2048:8 4:8192:8 4:32768:12
  mtable bB 32 32 2:2048:32 2:8192:8 2:32768:16 4:2048:16 4:8192:16 4:32768:8
  for t in def bA bB; do
    if [ $t = def ]; then bbench b_def --shapes 7b --batches 2,4 --prompts 2048,8192,32768
    else WKVQ_ATTN_TABLE=/root/$t.json bbench b_$t --shapes 7b --batches 2,4 --prompts 2048,8192,32768; fi
    mark "batch $t"
  done;;
batch2)  # (after batch) p8192-p32768 at batches 2, 4 and 8, two more split counts a cell
  mtable bC 32 32 2:8192:16 2:16384:16 2:32768:20 4:8192:8 4:16384:8 4:32768:10 8:8192:8 8:16384:12 8:32768:12
  mtable bD 32 32 2:8192:12 2:16384:24 2:32768:12 4:8192:6 4:16384:12 4:32768:6 8:8192:6 8:16384:8 8:32768:10
  for t in def bC bD; do
    if [ $t = def ]; then bbench b2_def --shapes 7b --batches 2,4,8 --prompts 8192,16384,32768
    else WKVQ_ATTN_TABLE=/root/$t.json bbench b2_$t --shapes 7b --batches 2,4,8 --prompts 8192,16384,32768; fi
    mark "batch2 $t"
  done;;
check)
  cells="[7b-2-32768] or [7b-4-4096] or [13b-2-16384] or [8b-4-8192] or [70b-2-4096]"
  gpu_tests "real_shapes and ($cells) or attn_config_policy"
  mark check;;
b70)
  mtable t70 64 8 1:4096:32 1:8192:32 1:16384:32
  bbench b70_def --shapes 70b --batches 1 --prompts 4096,8192,16384; mark "b70 def"
  WKVQ_ATTN_TABLE=/root/t70.json bbench b70_sp32 --shapes 70b --batches 1 --prompts 4096,8192,16384; mark "b70 sp32";;
confirm)
  shift; for i in $(seq "${PASSES:-2}"); do for spec in "$@"; do
    IFS=: read -r s b c sp <<< "$spec"; read -r h kv <<< "$(heads_of "$s")"; n="${s}_b${b}_${c}_sp${sp}_$i"
    if [ "$sp" = def ]; then bbench "$n" --shapes "$s" --batches "$b" --prompts "$c"
    else mtable "$n" "$h" "$kv" "$b:$c:$sp" > /dev/null
      WKVQ_ATTN_TABLE=/root/$n.json bbench "$n" --shapes "$s" --batches "$b" --prompts "$c"; fi
  done; done; mark confirm; exit 0;;
*) echo "unknown part $part"; exit 2;;
esac; done
