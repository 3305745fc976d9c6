#!/usr/bin/env bash
# Twenty-fourth session (prepared in the twenty-third), one H200 (device tool, carry .gpu/whl). Results in $OUT:
#   bulkbisect  the phase probe's GEMV chain on the table's register path and on the bulk ring
#               (benchmarks/results/r27/mma_7b_m1_bulk.json), each as it is, without x loads, without the arithmetic,
#               without both: is the per-group x load what keeps the ring (whose loads are issued ahead of the
#               arithmetic) from the read-only chain's rate? (runtime/kernels/NOTES.md round 21). Ran at b3047fa;
#               the ring was removed after (NOTES round 22): on later trees its half stops at a one-line error
#   d2nox       the chain with x taken out at depth 1 (with and without the weight preload) and at depth 2
#               (benchmarks/results/r27/mma_7b_m1_d2.json): without x's 16 registers a group a third set of weight
#               loads fits in 128 registers (local SASS: 100); would x read from shared memory and depth 2 pay?
#   arith       the chain with one class of the compute block's instructions taken out at a time (phase_probe's
#               noxp, nohf, nolop edits): which of the arithmetic's instructions cost the time?
#   zfold       the chain with the "zfold" edit (phase_probe: the float16 dequantization's offsets out, the float32
#               work of taking them off after the MMAs in, as if x's writers gave each group's sums of x): what a
#               design with x sums from the norm, SiLU and attention kernels could gain at most
#   zlate       the same with the zero point applied at the accumulators' end (the MMAs then wait on the codes and
#               x only, as with nohf)
#   zsum        the zero points taken off after the MMAs (WKVQ_MMA_ZSUM=1, w4_mma._compute_zsum_asm): the GEMV
#               tests with it, then the chain with and without it. Ran at e8bab8e; the option was removed after
#               (f8bfa0a: no gain), so on later trees both halves of the chain run the same kernel
source "$(dirname "$0")/h200_lib.sh"
for part in "$@"; do case $part in
bulkbisect)
  K=pdl-pre,gemv,gemv-nox,gemv-nomma,gemv-nox-nomma
  timeout 150 python3 benchmarks/phase_probe.py --kinds $K --per-sm 16 --warps 1 --reps 20 --json "$o/gb_table.json" \
    2>&1 | grep -v Warn | tail -6
  WKVQ_MMA_TABLE=benchmarks/results/r27/mma_7b_m1_bulk.json timeout 150 python3 benchmarks/phase_probe.py \
    --kinds gemv,gemv-nox,gemv-nomma,gemv-nox-nomma --reps 20 --json "$o/gb_bulk.json" 2>&1 | grep -v Warn | tail -5
  mark "bulk bisect" ;;
d2nox)
  timeout 100 python3 benchmarks/phase_probe.py --kinds gemv,gemv-nox,gemv-nox-nomma --reps 20 \
    --json "$o/d2_table.json" 2>&1 | grep -v Warn | tail -4
  WKVQ_MMA_PRE=0 timeout 100 python3 benchmarks/phase_probe.py --kinds gemv,gemv-nox --reps 20 \
    --json "$o/d2_nopre.json" 2>&1 | grep -v Warn | tail -3
  WKVQ_MMA_TABLE=benchmarks/results/r27/mma_7b_m1_d2.json timeout 100 python3 benchmarks/phase_probe.py \
    --kinds gemv,gemv-nox,gemv-nox-nomma --reps 20 --json "$o/d2_depth2.json" 2>&1 | grep -v Warn | tail -4
  mark "d2 nox" ;;
arith)
  timeout 200 python3 benchmarks/phase_probe.py --kinds gemv,gemv-noxp,gemv-nohf,gemv-nolop,gemv-nohf-nolop,gemv-nomma,gemv \
    --reps 20 --json "$o/arith.json" 2>&1 | grep -v Warn | tail -8
  mark "arith" ;;
zfold)
  timeout 200 python3 benchmarks/phase_probe.py --kinds gemv,gemv-zfold,gemv-nohf,gemv,gemv-zfold --reps 20 \
    --json "$o/zfold.json" 2>&1 | grep -v Warn | tail -6
  mark "zfold" ;;
zlate)
  timeout 200 python3 benchmarks/phase_probe.py --kinds gemv,gemv-zlate,gemv-nohf,gemv,gemv-zlate --reps 20 \
    --json "$o/zlate.json" 2>&1 | grep -v Warn | tail -6
  mark "zlate" ;;
zsum)
  WKVQ_MMA_ZSUM=1 timeout 240 python3 -m pytest -q -x tests/test_w4_mma.py 2>&1 | tail -3; mark "zsum tests"
  for i in 0 1 2 3; do z=$((i % 2)); WKVQ_MMA_ZSUM=$z timeout 60 python3 benchmarks/phase_probe.py --kinds gemv \
    --reps 20 --json "$o/zsum_${z}_$i.json" 2>&1 | grep -v Warn | tail -1 | sed "s/^/zsum=$z /"; done
  mark "zsum chain" ;;
esac; done
