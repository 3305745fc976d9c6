#!/usr/bin/env bash
# Twenty-fifth session, one H200 (device tool, carry .gpu/whl). Results in $OUT:
#   nofence   what the merge's two fences cost: the step (7B b1 p32768) and the last layer's per-program stamps on
#             the tree as it is, and on a copy whose attention counts its splits and sets the heads' flags with
#             relaxed atomics (kv4._combine_if_last's acq_rel / release -> relaxed: a timing probe only, the merge
#             may then read partials not yet visible). If the fences cost >= 1 us a layer, partials and head
#             outputs that carry the step's tag in every word (checked by the reader, no fence) are worth building
#   silutests the GPU tests of the SiLU input of the tensor-core GEMV (w4_mma_accumulate_silu) and the decode step
#             with it (WKVQ_FUSE=...,silu), beside the heads and decode-step tests
#   silu[0-9] 7B b1 p2048 and p32768: the default against WKVQ_FUSE=rope,heads,silu (down builds silu(gate) * up in
#             shared memory: no SiLU launch), alternated
#   silu13    13B b1, the default against WKVQ_FUSE=rope,silu
#   s13_[0-9] 13B b1 with "silu" in the default: WKVQ_FUSE=rope (no silu) against the default, alternated
#   tags      ran at 5786ffa (the fusion "tags", reverted in the commit after it: 0.45 ms a step slower): the GPU tests
#             of the tagged attention output (the merge stores words tagged with the step, no fence or flag; the
#             output projection's threads read them until the tags are the step's), then 7B b1 p2048 and p32768: the
#             default against WKVQ_FUSE=rope,heads,silu,tags, alternated twice (on later trees WKVQ_FUSE names an
#             unknown fusion: a one-line error)
#   final     with "silu" in the default: the decode-step GPU tests, the record table (bench_{7b,13b}_final.json),
#             fp16 StaticCache + torch.compile at 7B b1 (bench_7b_fp16_compiled.json), the 7B b1 p32768 profile
source "$(dirname "$0")/h200_lib.sh"
patched() {  # a copy of the tree with the merge's atomics relaxed, in /tmp/nf
  rm -rf /tmp/nf && mkdir /tmp/nf && cp -r cli.py converter runtime schemas benchmarks /tmp/nf/
  sed -i 's/sem="acq_rel"/sem="relaxed"/; s/sem="release"/sem="relaxed"/' /tmp/nf/runtime/kernels/kv4.py
  grep -c 'sem="relaxed"' /tmp/nf/runtime/kernels/kv4.py
}
for part in "$@"; do case $part in
nofence)
  patched
  for i in 1 2; do
    bench --batches 1 --prompts 32768 --json "$o/nf_default_$i.json"; mark "default $i"
    (cd /tmp/nf && PYTHONPATH=/tmp/site:/tmp/nf bench --batches 1 --prompts 32768 --json "$o/nf_relaxed_$i.json")
    mark "relaxed $i"
  done
  python3 benchmarks/stamps_probe.py --shape 7b --prompt 32768 --json "$o/nf_stamps_default.json" 2>&1 | grep -v Warn
  mark "stamps default"
  (cd /tmp/nf && PYTHONPATH=/tmp/site:/tmp/nf python3 benchmarks/stamps_probe.py --shape 7b --prompt 32768 \
    --json "$o/nf_stamps_relaxed.json" 2>&1 | grep -v Warn)
  mark "stamps relaxed" ;;
silutests)
  timeout 400 python3 -m pytest -q -x -p no:cacheprovider tests/test_w4_mma.py -k silu > "$o/tests_silu_mma.txt" 2>&1
  mark "mma silu tests: $(tail -1 "$o/tests_silu_mma.txt")"
  timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py \
    -k "silu_input or heads_ready or fast_decode or decode_graph" > "$o/tests_silu_step.txt" 2>&1
  mark "step tests: $(tail -1 "$o/tests_silu_step.txt")" ;;
silu[0-9])
  i=${part#silu}
  bench --batches 1 --prompts 2048,32768 --json "$o/silu_default_$i.json"; mark "default $i"
  WKVQ_FUSE=rope,heads,silu bench --batches 1 --prompts 2048,32768 --json "$o/silu_on_$i.json"; mark "silu $i" ;;
silu13)
  python3 cli.py bench --shapes 13b --paths wkvq-gemv --steps 20 --batches 1 --prompts 2048,32768 \
    --json "$o/silu13_default.json" 2>&1 | grep -v Warning | tail -4; mark "13b default"
  WKVQ_FUSE=rope,silu python3 cli.py bench --shapes 13b --paths wkvq-gemv --steps 20 --batches 1 \
    --prompts 2048,32768 --json "$o/silu13_on.json" 2>&1 | grep -v Warning | tail -4; mark "13b silu" ;;
s13_[0-9])
  i=${part#s13_}
  WKVQ_FUSE=rope python3 cli.py bench --shapes 13b --paths wkvq-gemv --steps 20 --batches 1 --prompts 2048,32768 \
    --json "$o/s13_rope_$i.json" 2>&1 | grep -v Warning | tail -3; mark "13b rope $i"
  python3 cli.py bench --shapes 13b --paths wkvq-gemv --steps 20 --batches 1 --prompts 2048,32768 \
    --json "$o/s13_default_$i.json" 2>&1 | grep -v Warning | tail -3; mark "13b default (silu) $i" ;;
tags)
  timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_w4_mma.py -k tagged > "$o/tests_tags_mma.txt" 2>&1
  mark "mma tags tests: $(tail -1 "$o/tests_tags_mma.txt")"
  timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "tags_match or heads_ready" \
    > "$o/tests_tags_step.txt" 2>&1; mark "step tests: $(tail -1 "$o/tests_tags_step.txt")"
  if grep -q " passed" "$o/tests_tags_step.txt" && ! grep -q "failed" "$o/tests_tags_step.txt"; then
    for i in 1 2; do
      bench --batches 1 --prompts 2048,32768 --json "$o/tags_default_$i.json"; mark "default $i"
      WKVQ_FUSE=rope,heads,silu,tags bench --batches 1 --prompts 2048,32768 --json "$o/tags_on_$i.json"
      mark "tags $i"
    done
  fi ;;
final)
  timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py \
    -k "silu_input or heads_ready or fast_decode or decode_graph or mma_rope" > "$o/tests_final.txt" 2>&1
  mark "step tests: $(tail -1 "$o/tests_final.txt")"
  record
  timeout 500 python3 cli.py bench --shapes 7b --paths fp16_compiled --batches 1 --prompts 2048,32768 --steps 20 \
    --json "$o/bench_7b_fp16_compiled.json" 2>&1 | grep -v Warning | tail -4; mark "fp16 compiled"
  timeout 120 python3 benchmarks/decode_profile.py --prompt 32768 --json "$o/prof_p32768.json" > "$o/prof_p32768.txt" \
    2>&1; mark "profile"; grep -A12 "^one layer" "$o/prof_p32768.txt" ;;
esac; done
