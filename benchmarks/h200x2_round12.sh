#!/usr/bin/env bash
# Lease of the ninth session (nvidia-h200-x2, ~20 min), issues #4 and #6 side by side:
#   GPU 0 (#4): planned for an eleventh round that never ran: the default recipe at seeds 0 (blocks kept) and
#     2 at once (~12 min), the end-to-end stage with rounding offsets from the seed-0 blocks, one table with every row;
#   GPU 1 (#6): the GEMV with float16 products (GemvConfig.half): its GPU tests, the M = 1 sweep with every candidate
#     in the half form (the default row is the float32 table config, same run), then the decode step with the
#     sweep's table against the float32 table in one bench, and the profile at p2048 with it.
# Results: $r/bw (GPU 0), $r/kernels (GPU 1), $r/timeline.txt.
#
#   bash benchmarks/h200x2_round12.sh
# Setup: benchmarks/lease_lib.sh's header with SCRIPT = h200x2_round12.sh; then back-to-back monitoring runs (the
# machine goes after 30 s idle), each ending in a tar of $r without the artifacts'
# weights and work dirs.
# Dry run on CPU: RESULTS=/tmp/x GPUS="" CONVERT_FLAGS="--device cpu --nsamples 2 --seqlen 64 --epochs 1"
#   KERNEL_CMD=true EVAL_FLAGS="--device cpu --max-windows 1 --seqlen 128".
set -uo pipefail
# shellcheck source=benchmarks/lease_lib.sh
source "$(dirname "$0")/lease_lib.sh"
lease_init

(
  on_gpu 1 bash -c "${KERNEL_CMD:-python3 -m pytest -q -x tests/test_w4_gemv.py > $k/tests.txt 2>&1; \
    echo tests rc=\$? >> $k/tests.txt; \
    python3 benchmarks/w4_gemv_bench.py --ms 1 --half --workers 14 --json $k/gemv_half.json > $k/gemv_half.txt 2>&1; \
    WKVQ_FUSE=none python3 cli.py bench --shapes 7b --paths wkvq-gemv --batches 1 --prompts 2048,32768 --steps 20 \
      --json $k/bench-f32.json > $k/bench-f32.txt 2>&1; \
    WKVQ_GEMV_TABLE=$k/gemv_half.json WKVQ_FUSE=none python3 cli.py bench --shapes 7b --paths wkvq-gemv --batches 1,8 \
      --prompts 2048,32768 --steps 20 --json $k/bench-half.json > $k/bench-half.txt 2>&1; \
    WKVQ_GEMV_TABLE=$k/gemv_half.json python3 benchmarks/decode_profile.py --shape 7b --prompt 2048 --projections gemv \
      --json $k/prof-half-p2048.json > $k/prof-half-p2048.txt 2>&1}" > "$k/kernels.log" 2>&1
  mark "kernels rc=$?"
) &
gpu1=$!

blockwise 0 d0: d2:--seed=2
# the stage from d0's blocks (kept by blockwise's --keep-work), into the one table below
BASE=d0 SKIP_BASE=1 SKIP_LEARNED=1 SKIP_TABLE=1 GPUS="${GPUS-0 1}" EVAL_FLAGS="${EVAL_FLAGS:-}" bash "$(dirname "$0")/smollm2_e2e.sh" \
  "$r/bw" "2:3e-3:--e2e-rounding" --rounding learned "${extra[@]}" > "$r/bw/logs/stage.log" 2>&1
mark "stage from d0 rc=$?"
[ -f "$r/bw/e2e-2-3e-3-rounding/wkvq.json" ] && { artifacts+=(--artifact "d0-stage=$r/bw/e2e-2-3e-3-rounding"); rows="$rows,d0-stage"; }
rows="$rows,d0:w,d0:kv"
blockwise_table 0
wait "$gpu1"
mark "all done"
