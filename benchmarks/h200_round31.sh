# Prepared in the thirtieth session for the next (not run): why the attention at 8 KV heads reads at half the copy
# rate (NOTES.md round 28: isolated, 17.9 µs at one query head a KV head for 35.7 MB, 24.0 at 4, 30.6 at 8). Parts:
#   gqaprof    per-program timelines (stamps) and the step's profile at LLaMA-3-8B and LLaMA-2-70B, b1 p32768:
#              is a program's fixed cost (query, rope, merge over 64 partials) or its streaming the loss?
#   gqasweep   the attention swept at 8 KV heads with 8, 32 and 64 query heads, b1 p32768 (tiles x stages x splits)
# Usage: OUT=$OUT bash benchmarks/h200_round31.sh PART...  (carry .gpu/whl)
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl >/dev/null 2>&1
for part in "$@"; do case $part in
gqaprof)
  for s in 8b 70b 7b; do
    python3 benchmarks/stamps_probe.py --shape $s --prompt 32768 --json $OUT/stamps_${s}_p32768.json 2>&1 | grep -v -i warn
    python3 benchmarks/decode_profile.py --shape $s --prompt 32768 --json $OUT/prof_${s}_p32768.json 2>&1 \
      | grep -v -i warn | tail -25
  done;;
gqasweep)
  for h in 8 32 64; do
    python3 benchmarks/attn_bench.py --heads $h --kv-heads 8 --batches 1 --contexts 32768 --rope --mma all --keys-a 1 \
      --mma-only --json $OUT/attn_h${h}_kv8_all.json 2>&1 | grep -v -i warn | tail -20
  done;;
*) echo "unknown part $part"; exit 2;;
esac; done
