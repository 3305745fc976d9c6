# Thirty-first session: the attention's merge at 8 KV heads. Round 31's stamps (r34) showed the combining program of
# a KV head's part ending ~14 µs after the last tiles at LLaMA-2-70B (4 query heads a program, 64 splits) against
# ~3 µs at 7B (1 head, 32 splits): the merge stored each head before loading the next one's partials, and a store
# may alias them as far as the compiler knows, so each head was its own chain of L2 round trips. Now every head is
# merged before any is stored (kv4._combine_if_last). Parts:
#   tests   the GPU tests of the attention and the decode step with the merge (the tensor-core kernel at 2-8 query
#           heads a KV head, rope, heads flags, real shapes)
#   step    8B and 7B b1 p2048/p32768, 70B b1 p32768 (before: r34's profiles, 8B 2.79 / 7B 2.60 / 70B 13.11 ms)
#   stamps  8B and 70B b1 p32768 timelines: the combining programs' end after the last tiles
#   attn    the attention alone at 8 KV heads, 32 and 64 query heads, b1 p32768, the default config (before 24.0 /
#           31.5 µs)
# Ran on 9245b59 (the merge in two levels came after it: a re-run on a later tree times that tree).
# Usage: OUT=$OUT bash benchmarks/h200_round32.sh PART...  (carry .gpu/whl .gpu/xdist)
source benchmarks/h200_lib.sh
for part in "$@"; do case $part in
tests)
  gpu_tests "mma_attention_matches or mma_rope or heads_ready or query_parts or real_shape or lost_split or combine";;
step)
  nbench step_8b --shapes 8b --prompts 2048,32768
  nbench step_7b --shapes 7b --prompts 2048,32768
  nbench step_70b --shapes 70b --prompts 32768;;
stamps)
  for s in 8b 70b; do
    python3 benchmarks/stamps_probe.py --shape $s --prompt 32768 --json $o/stamps_${s}_p32768.json 2>&1 \
      | grep -v -i warn | head -14
  done;;
attn)
  for h in 32 64; do
    python3 benchmarks/attn_bench.py --heads $h --kv-heads 8 --batches 1 --contexts 32768 --rope --mma-only \
      --json $o/attn_h${h}_kv8.json 2>&1 | grep -v -i warn | grep -A3 "batch x context"
  done;;
*) echo "unknown part $part"; exit 2;;
esac; done
