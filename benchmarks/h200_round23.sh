#!/usr/bin/env bash
# Twenty-third session, one H200 (device tool, carry .gpu/whl). Results in $OUT. Parts, e.g.
# OUT=$OUT bash benchmarks/h200_round23.sh tests stages final:
#   tests   the attention's (rope form) and the decode step's GPU tests after the removal of the fused SiLU ("mlp")
#           and of the attention's WKVQ_ATTN_AHEAD / WKVQ_ATTN_TRIGGER_AT knobs (the GEMVs' sm_90 SASS is unchanged)
#   stages  7B b1 p32768: more of each attention program's first tiles issued before its PDL wait (the ring's
#           stages, benchmarks/variants/attn_b1_32k_{s3,t32s4,t128s2}.json) against the default, alternated
#   qkvgrid 7B b1 p32768: qkv on fewer programs a multiprocessor (benchmarks/variants/mma_7b_m1_qkv_{w4p2,w1p8,w1p4}
#           .json: 2 four-warp, 8 or 4 one-warp, against the table's 16 one-warp), so that the early-launched
#           attention's programs fit beside qkv's registers and start their tiles while it runs; alternated
#   final   the record table (7B, 13B), then fp16 StaticCache + torch.compile at 7B b1 in the same machine session
#   phase   benchmarks/phase_probe.py: the 7B projections' codes streamed in phases with kernel boundaries (plain, PDL,
#           PDL with a preload) against grid barriers in one persistent launch (with and without the preload)
#   mahead  ran at 29cf99e only (WKVQ_MMA_AHEAD, removed in the next commit: slower): the GEMVs ask the L2 for the
#           groups after their preload before the PDL wait; its GPU test, the phase probe's GEMV chain at 0, 1, 2, 4
#           groups, then 7B b1 p2048,32768 at 0 / 2 / 4 / 0
#   gbisect the phase probe's GEMV chain with parts of its PTX taken out (x loads, scale/zero loads, the MMAs)
#   fp16    fp16 StaticCache + torch.compile at 7B b1 p2048 and p32768 alone
source "$(dirname "$0")/h200_lib.sh"
V=benchmarks/variants
# alternate VAR STEM TAG NAME...: two rounds of 7B b1 p32768, the default, then VAR=$V/STEM<NAME>.json for each NAME
# (records $o/TAG_<NAME or default>_<round>.json)
alternate() {
  local var=$1 stem=$2 tag=$3 r v; shift 3
  for r in 1 2; do
    bench --batches 1 --prompts 32768 --json "$o/${tag}_default_$r.json"; mark "default $r"
    for v in "$@"; do
      (export "$var=$V/$stem$v.json"; bench --batches 1 --prompts 32768 --json "$o/${tag}_${v}_$r.json")
      mark "$v $r"
    done
  done
}
# fp16 StaticCache + torch.compile, 7B b1 p2048 and p32768 (bench_7b_fp16_compiled.json)
fp16_compiled() {
  timeout 500 python3 cli.py bench --shapes 7b --paths fp16_compiled --batches 1 --prompts 2048,32768 --steps 20 \
    --json "$o/bench_7b_fp16_compiled.json" 2>&1 | grep -v Warning | tail -6; mark "fp16 compiled"
}
for part in "$@"; do case $part in
tests)
  timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py \
    -k "mma_rope or heads_ready or fast_decode or decode_graph or stamps" > "$o/tests_attn.txt" 2>&1
  mark "attention/decode tests: $(tail -1 "$o/tests_attn.txt")"; grep -B5 -A25 "^E  \|Error" "$o/tests_attn.txt" | head -40 ;;
stages)
  alternate WKVQ_ATTN_TABLE attn_b1_32k_ st s3 t32s4 t128s2 ;;
qkvgrid)
  alternate WKVQ_MMA_TABLE mma_7b_m1_qkv_ qg w4p2 w1p8 w1p4 ;;
final)
  record; fp16_compiled ;;
phase)
  timeout 300 python3 benchmarks/phase_probe.py --per-sm 16,4,8 --warps 1,4,2 --json "$o/phase.json" 2>&1 \
    | grep -v Warn | tail -22; mark "phase probe" ;;
mahead)
  timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_w4_mma.py -k ahead_prefetch > "$o/t_ahead.txt" 2>&1
  mark "ahead tests: $(tail -1 "$o/t_ahead.txt")"; grep -B5 -A20 "^E  \|Error" "$o/t_ahead.txt" | head -30
  for a in 0 1 2 4; do
    WKVQ_MMA_AHEAD=$a timeout 120 python3 benchmarks/phase_probe.py --kinds gemv --json "$o/pg_ahead$a.json" 2>&1 \
      | grep "^gemv" | sed "s/^/ahead $a: /"
  done
  for a in 0 2 4 0; do
    WKVQ_MMA_AHEAD=$a bench --batches 1 --prompts 2048,32768 --json "$o/ma_$a.json"; mark "ahead $a"
  done ;;
gbisect)
  timeout 170 python3 benchmarks/phase_probe.py --kinds gemv,gemv-nox,gemv-nomma,gemv-nosz --reps 20 \
    --json "$o/gbisect.json" 2>&1 | grep -v Warn | tail -6 ;;
fp16)
  fp16_compiled ;;
esac; done
