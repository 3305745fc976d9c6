#!/usr/bin/env bash
# Twenty-fourth session (prepared in the twenty-third), one H200 (device tool, carry .gpu/whl). Results in $OUT:
#   bulkbisect  the phase probe's GEMV chain on the table's register path and on the bulk ring
#               (benchmarks/variants/mma_7b_m1_bulk.json), each as it is, without x loads, without the arithmetic,
#               without both: is the per-group x load what keeps the ring (whose loads are issued ahead of the
#               arithmetic) from the read-only chain's rate? (runtime/kernels/NOTES.md round 21)
source "$(dirname "$0")/h200_lib.sh"
for part in "$@"; do case $part in
bulkbisect)
  K=pdl-pre,gemv,gemv-nox,gemv-nomma,gemv-nox-nomma
  timeout 150 python3 benchmarks/phase_probe.py --kinds $K --per-sm 16 --warps 1 --reps 20 --json "$o/gb_table.json" \
    2>&1 | grep -v Warn | tail -6
  WKVQ_MMA_TABLE=benchmarks/variants/mma_7b_m1_bulk.json timeout 150 python3 benchmarks/phase_probe.py \
    --kinds gemv,gemv-nox,gemv-nomma,gemv-nox-nomma --reps 20 --json "$o/gb_bulk.json" 2>&1 | grep -v Warn | tail -5
  mark "bulk bisect" ;;
esac; done
