# Thirty-first session, third run: with the merge in two levels (round 33) the split count's cost moved. Round 27
# found more splits than 64 slower at 8 KV heads, when the one-level merge of 4 heads x splits was the tail. Parts:
#   sweep   the attention alone at 32 on 8 heads, b1 p32768: 64 / 128 / 256 splits x tiles 32x2, 64x2, 64x3, 128x2
#   step    8B b1 p32768 with 128 splits (64x2, a WKVQ_ATTN_TABLE variant) and the default (64), alternated twice
# Usage: OUT=$OUT bash benchmarks/h200_round34.sh PART...  (carry .gpu/whl)
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl >/dev/null 2>&1
bench() { local name=$1; shift
  python3 cli.py bench --paths wkvq --batches 1 --steps 20 --json $OUT/$name.json "$@" 2>&1 | grep "wkvq" | sed "s/^/$name /"; }
for part in "$@"; do case $part in
sweep)
  python3 benchmarks/attn_bench.py --heads 32 --kv-heads 8 --batches 1 --contexts 32768 --rope --mma-only \
    --mma 32x2,64x2,64x3,128x2 --keys-a 1 --splits 64,128,256 --json $OUT/attn_h32_kv8_sweep.json 2>&1 \
    | grep -v -i warn | grep -A14 "batch x context";;
step)
  python3 -c "
import dataclasses, json
from runtime.kernels import kv4
c = dataclasses.replace(kv4.attn_config(1, 32, 32769, kv_heads=8), splits=128)
json.dump({'best': {'1x32768': {'config': dataclasses.asdict(c)}}}, open('/root/t_sp128.json', 'w'))
print(c)"
  for i in 1 2; do
    WKVQ_ATTN_TABLE=/root/t_sp128.json bench sp128_8b_$i --shapes 8b --prompts 32768
    bench sp64_8b_$i --shapes 8b --prompts 32768
  done;;
*) echo "unknown part $part"; exit 2;;
esac; done
