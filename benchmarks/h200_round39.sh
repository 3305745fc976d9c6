# Prepared in the thirty-fourth session for the next (not run). Parts:
#   ctx     the step's split count at b1 contexts between the tables' (p4096, p16384) for the 7B, 8B and 13B, once
#           each (a first pass; the winners to be alternated twice in `confirm`). The thirty-fourth session found
#           the nearest entry 6-23% off the step's optimum at p8192 (7B 16 → 32, 8B 16 → 64, 13B 16 → 24 splits);
#           the fallback (kv4.nearest_entry) searches ATTN_TABLE only, so at p16384 the 8B takes the 7B's p32768 32
#           splits (256 programs at 8 KV heads), not its own p8192 64 or p32768 128
#   confirm SPECS...  each SPEC `shape:context:splits` (splits "def": the default) alternated twice
#   check   (added in the thirty-fifth session, after both ran and the winners became ATTN_KV_TABLE entries) the
#           real-shape tests at the new cells and the table test, then the step at those cells on the committed tables
#   rule    (added in the thirty-fifth session) the placement rule (kv4.placement_splits) on the GPU: tests, the 3B's step
# Usage: OUT=$OUT bash benchmarks/h200_round39.sh PART...  (carry .gpu/whl)
source benchmarks/h200_lib.sh
# `one SHAPE CONTEXT SPLITS NAME`: the step of SHAPE at b1 CONTEXT on SPLITS (def: the default), row prefixed by NAME
one() { local shape=$1 ctx=$2 sp=$3 name=$4; read -r h kv <<< "$(heads_of "$shape")"
  if [ "$sp" = def ]; then nbench "$name" --shapes "$shape" --prompts "$ctx"; return; fi
  sptable "$name" "$h" 1 "$ctx" "$sp" "$kv" > /dev/null
  WKVQ_ATTN_TABLE=/root/$name.json nbench "$name" --shapes "$shape" --prompts "$ctx"; }
for part in "$@"; do case $part in
ctx)
  for spec in 7b:4096:def 7b:4096:24 7b:4096:32 7b:16384:def 7b:16384:24 7b:16384:48 \
              8b:4096:def 8b:4096:32 8b:4096:64 8b:16384:def 8b:16384:64 8b:16384:128 \
              13b:4096:def 13b:4096:12 13b:4096:24 13b:16384:def 13b:16384:24; do
    IFS=: read -r s c sp <<< "$spec"; one "$s" "$c" "$sp" "${s}_${c}_sp${sp}"
  done; mark ctx;;
confirm)
  shift; for i in 1 2; do for spec in "$@"; do
    IFS=: read -r s c sp <<< "$spec"; one "$s" "$c" "$sp" "${s}_${c}_sp${sp}_$i"
  done; done; mark confirm; exit 0;;
check)  # (thirty-fifth session) the committed entries: real-shape tests at the new cells, then the step on defaults
  gpu_tests "real_shapes and (4096 or 16384) or attn_config_policy"; mark tests
  for spec in 7b:4096 8b:4096 13b:4096 8b:16384 13b:16384; do
    IFS=: read -r s c <<< "$spec"; nbench "${s}_${c}_committed" --shapes "$s" --prompts "$c"
  done; mark check;;
rule)  # (thirty-fifth session) kv4.placement_splits for models without entries: the real-shape tests at LLaMA-3.2-3B
  # b1 p16384 / p32768 and the 70B at p8192, then the 3B's step on the rule (def) and on what it had before (p16384 the
  # nearest entry's 32 splits, p32768 the 8-KV-head key's 64), alternated twice
  gpu_tests "real_shapes and ([3b-1-16384] or [3b-1-32768] or [70b-1-8192]) or attn_config_policy"; mark tests
  for i in 1 2; do for spec in 3b:16384:def 3b:16384:32 3b:32768:def 3b:32768:64; do
    IFS=: read -r s c sp <<< "$spec"; one "$s" "$c" "$sp" "${s}_${c}_sp${sp}_$i"
  done; mark "rule $i"; done;;
*) echo "unknown part $part"; exit 2;;
esac; done
