# Twenty-ninth session: the LLaMA-3-8B shape (grouped-query attention, 8 KV heads; projections 6144x4096,
# 28672x4096, 4096x14336) on the tables tuned at LLaMA-2-7B's. Parts:
#   gqa_attn   attention splits and tiles at 8 KV heads, as WKVQ_ATTN_TABLE variants
#   gqa_mma    a sweep of the 8B projections at one row, then the step with it as WKVQ_MMA_TABLE, with and without
#              attention variant A
#   big70      the same for LLaMA-2-70B's projections
#   gqa_sweep  prepared, not run: the attention's sweep at 8 KV heads
#   guess      prepared, not run: the GEMV's second guess (WKVQ_MMA_GUESS=2) at LLaMA-3.2-3B, which no table has
# Usage: OUT=$OUT bash benchmarks/h200_round29.sh PART...
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl >/dev/null 2>&1
mk() { python3 -c "
import json,sys
c=lambda sp,s: {'config': {'splits': sp, 'block_s': s, 'keys_a': True, 'mma': True, 'stages': 2, 'combine': True}}
json.dump({'best': {'1x32768': c($2,$3), '1x2048': c($4,$5)}}, open('/root/t_$1.json','w'))"; }
mk A 64 64 32 32; mk B 128 64 64 16; mk C 128 32 32 16; mk D 256 64 16 32
b8() { python3 cli.py bench --shapes 8b --paths wkvq --batches 1 --prompts 2048,32768 --steps 20 --json $OUT/$1.json 2>&1 | grep "wkvq" | sed "s/^/$1 /"; }
for part in "$@"; do case $part in
gqa_attn)
  for v in def A B C D; do
    if [ $v = def ]; then unset WKVQ_ATTN_TABLE; else export WKVQ_ATTN_TABLE=/root/t_$v.json; fi
    b8 gqa_$v
  done; unset WKVQ_ATTN_TABLE;;
gqa_mma)
  python3 benchmarks/w4_mma_bench.py --json $OUT/mma_8b_m1.json --ms 1 --shapes 6144x4096,28672x4096,4096x14336 \
    --splits 4,8,16 --warps 1,2,4 --tiles 2 --depths 1 --l2 0 --chains 1 --persist 0,4,8,16 --top 4 2>&1 | grep -v -i warn | tail -30
  for r in 1 2; do
    unset WKVQ_MMA_TABLE WKVQ_ATTN_TABLE; b8 mma_def_$r
    export WKVQ_MMA_TABLE=$OUT/mma_8b_m1.json; b8 mma_tab_$r
    export WKVQ_ATTN_TABLE=/root/t_A.json; b8 mma_tab_attnA_$r
  done; unset WKVQ_MMA_TABLE WKVQ_ATTN_TABLE;;
big70)  # LLaMA-2-70B at one row: its four projections swept, then the step with them against the guess
  python3 benchmarks/w4_mma_bench.py --json $OUT/mma_70b_m1.json --ms 1 \
    --shapes 10240x8192,8192x8192,57344x8192,8192x28672 \
    --splits 4,8,16 --warps 1,2,4 --tiles 2 --depths 1 --l2 0 --chains 1 --persist 0,4,8,16 --top 3 2>&1 | grep -v -i warn | tail -24
  b70() { python3 cli.py bench --shapes 70b --paths wkvq --batches 1 --prompts 2048 --steps 20 --json $OUT/$1.json 2>&1 | grep "wkvq" | sed "s/^/$1 /"; }
  unset WKVQ_MMA_TABLE; b70 b70_def
  export WKVQ_MMA_TABLE=$OUT/mma_70b_m1.json; b70 b70_tab; unset WKVQ_MMA_TABLE;;
gqa_sweep)  # prepared, not run (no device time left): the attention swept at LLaMA-3-8B's heads (32 on 8), b1
  python3 benchmarks/attn_bench.py --heads 32 --kv-heads 8 --batches 1 --contexts 2048,32768 --rope --mma all \
    --keys-a 1 --mma-only --json $OUT/attn_8b_b1.json 2>&1 | grep -v -i warn | tail -40;;
guess)  # prepared, not run: the GEMV's second guess (WKVQ_MMA_GUESS=2) at a shape no table has, LLaMA-3.2-3B
  for g in 1 2; do WKVQ_MMA_GUESS=$g python3 benchmarks/shape_probe.py --cases 3b:1:2048,3b:3:2048,3b:1:32768 \
    --json $OUT/probe_3b_guess$g.json 2>&1 | grep -v -i warn; done
  for r in 1 2; do for g in 1 2; do
    WKVQ_MMA_GUESS=$g python3 cli.py bench --shapes 3b --paths wkvq --batches 1,4 --prompts 2048,32768 --steps 20 \
      --json $OUT/guess${g}_$r.json 2>&1 | grep "wkvq" | sed "s/^/guess$g /"
  done; done;;
esac; done
