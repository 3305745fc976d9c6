# Thirtieth session: the tensor-core attention at more than 4 query heads a KV head (LLaMA-2-70B's 8 as two
# programs of 4 sharing each split, runtime.kernels.query_parts), and the runs round 29 prepared. Parts:
#   tests      the GPU tests the change touches: the attention against its reference at 6, 7, 8 query heads a KV
#              head, the rope form at 8, the decode step with "heads" flags a part, the real shapes (70B p32768)
#   q8         70B b1 p2048/p32768 with the default (tensor-core attention, two parts) and with the split kernel
#              (an attention table without mma, what ran before), and at 32 splits; 7B and 8B b1 p32768 unchanged?
#   guess      the GEMV's second guess (WKVQ_MMA_GUESS=2) at LLaMA-3.2-3B, which no table has (round 29's)
#   gqa_sweep  the attention's sweep at LLaMA-3-8B's heads (32 on 8), b1 (round 29's; not run)
#   deep       the step at 8 KV heads (70B, 8B) b1 p32768 with deeper attention rings, as WKVQ_ATTN_TABLE variants
# Usage: OUT=$OUT bash benchmarks/h200_round30.sh PART...  (carry .gpu/whl .gpu/xdist)
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
[ -d /tmp/site/xdist ] || python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl \
  .gpu/xdist/*.whl >/dev/null 2>&1
# t_split: what the 70B ran before (its table configs, which the tensor-core kernel did not take at 8 query heads,
# as the split kernel: kv4._split_kernel); t_p32: the default with 32 splits at p32768
python3 -c "
import dataclasses, json
from runtime.kernels import kv4
c = lambda s, f=lambda x: x: {'config': dataclasses.asdict(f(kv4.attn_config(1, 64, s + 1, kv_heads=8)))}
json.dump({'best': {'1x32768': c(32768, kv4._split_kernel), '1x2048': c(2048, kv4._split_kernel)}},
          open('/root/t_split.json', 'w'))
p32 = {'config': dataclasses.asdict(dataclasses.replace(kv4.attn_config(1, 64, 32769, kv_heads=8), splits=32))}
json.dump({'best': {'1x32768': p32}}, open('/root/t_p32.json', 'w'))
print(open('/root/t_split.json').read()); print(open('/root/t_p32.json').read())"
bench() { local name=$1; shift
  python3 cli.py bench --paths wkvq --batches 1 --steps 20 --json $OUT/$name.json "$@" 2>&1 | grep "wkvq" | sed "s/^/$name /"; }
for part in "$@"; do case $part in
tests)
  python3 -m pytest -n 8 -q -p no:cacheprovider tests/test_real_shapes.py tests/test_kernels.py \
    -k "mma_attention_matches or mma_rope or heads_ready or query_parts or real_shape or lost_split" \
    > $OUT/tests.txt 2>&1; echo "pytest rc=$?"
  grep -E "^(FAILED|ERROR)" $OUT/tests.txt | head -30; tail -2 $OUT/tests.txt;;
q8)
  bench q8_def --shapes 70b --prompts 2048,32768
  WKVQ_ATTN_TABLE=/root/t_split.json bench q8_split --shapes 70b --prompts 2048,32768
  WKVQ_ATTN_TABLE=/root/t_p32.json bench q8_p32 --shapes 70b --prompts 32768
  bench q8_def2 --shapes 70b --prompts 32768
  bench q8_7b --shapes 7b --prompts 32768
  bench q8_8b --shapes 8b --prompts 32768;;
guess|gqa_sweep)  # round 29's parts as that script has them
  bash benchmarks/h200_round29.sh $part;;
deep)  # the step at 8 KV heads (70B, 8B) b1 p32768 with deeper rings (tokens x stages at 64 splits, 64x4 at 32)
  for v in 64x3:64 64x4:64 32x4:64 64x4:32; do t=${v%%:*}; sp=${v##*:}
    python3 -c "
import dataclasses, json
from runtime.kernels import kv4
c = dataclasses.replace(kv4.attn_config(1, 64, 32769, kv_heads=8), splits=$sp, block_s=${t%%x*}, stages=${t##*x})
json.dump({'best': {'1x32768': {'config': dataclasses.asdict(c)}}}, open('/root/t_deep.json', 'w'))"
    for s in 70b 8b; do WKVQ_ATTN_TABLE=/root/t_deep.json bench deep_${s}_${t}_sp$sp --shapes $s --prompts 32768; done
  done
  for s in 70b 8b; do bench deep_${s}_def --shapes $s --prompts 32768; done;;
*) echo "unknown part $part"; exit 2;;
esac; done
