#!/usr/bin/env bash
# Next lease (nvidia-h200-x2, ~20 min), issues #4 and #6 side by side:
#   GPU 0 (#4): the new default recipe (cosine, 2x rates) at seed 0 (blocks kept) and seed 2, at once (~12 min);
#     then from the seed-0 blocks the end-to-end stage with rounding offsets (the best measured route, +5.4% from the
#     old default's blocks; it does not fit the 7B memory target, so this asks only whether any route reaches +5%
#     on SmolLM2), and one table with every row;
#   GPU 1 (#6): the decode bench at contexts the attention table does not hold (ATTN_DEFAULT since the eighth
#     session: the 16 x 1 tile with the policy's splits) and at the 13B shape, the fp16-compiled anchor at 7B b1
#     p32768 (10.30 ms in the second session), then the profile at p8192.
# Results: $r/bw (GPU 0), $r/kernels (GPU 1), $r/timeline.txt.
#
#   bash benchmarks/h200x2_round11.sh
# Setup as benchmarks/h200x2_round10.sh's header (run 1 carry [".gpu/p1"]; run 2 at once carry [".gpu/p2", ".gpu/whl"],
# ending in: setsid nohup bash benchmarks/h200x2_round11.sh > /root/a/driver.log 2>&1 < /dev/null &), then
# back-to-back monitoring runs with no gap over ~20 s (the machine goes after 30 s idle, and with it every result),
# each ending in a tar of $r without the artifacts' weights and work dirs (at most 8 files come back per run).
# Dry run on CPU: RESULTS=/tmp/x GPUS="" CONVERT_FLAGS="--device cpu --nsamples 2 --seqlen 64 --epochs 1"
#   BENCH_CMD=true
#   EVAL_FLAGS="--device cpu --max-windows 1 --seqlen 128".
set -uo pipefail
# shellcheck source=benchmarks/lease_lib.sh
source "$(dirname "$0")/lease_lib.sh"
lease_init

(
  on_gpu 1 bash -c "${BENCH_CMD:-python3 cli.py bench --shapes 7b,13b --paths wkvq-gemv --batches 1,8 \
    --prompts 2048,8192,32768 --steps 20 --json $k/bench.json && \
    python3 cli.py bench --shapes 7b --paths fp16_compiled --batches 1 --prompts 32768 --steps 20 --json $k/fp16.json && \
    python3 benchmarks/decode_profile.py --shape 7b --prompt 8192 --projections gemv --json $k/prof-p8192.json \
    > $k/prof-p8192.txt}" > "$k/bench.log" 2>&1
  mark "bench and profile rc=$?"
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
