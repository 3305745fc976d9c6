#!/usr/bin/env bash
# Next lease (nvidia-h200-x2, ~20 min), issues #4 and #6 side by side:
#   GPU 1 (kernels, otherwise idle): the kernel tests compiled (the seventh session's fused GEMV inputs and attention
#     options ran only under the interpreter), the attention sweep per batch (benchmarks/attn_bench.py), then the
#     decode bench and profile with the fused GEMV inputs and the swept attention table (WKVQ_ATTN_TABLE);
#   GPU 0: block-wise SmolLM2 variants (argument 1, "NAME:FLAG,FLAG ...", default: the seventh session's best,
#     cosine with twice the rates, under another seed; cosine with four times the rates; cosine at the default
#     rates), three at once (~14 min), then their table.
# Results: $r/kernels (GPU 1), $r/bw (GPU 0), $r/timeline.txt.
#
#   bash benchmarks/h200x2_round10.sh ["NAME:FLAGS ..."]
# Setup as benchmarks/h200x2_round8.sh's header (run 1 carry [".gpu/p1"]; run 2 at once carry [".gpu/p2", ".gpu/whl"],
# ending in: setsid nohup bash benchmarks/h200x2_round10.sh > /root/a/driver.log 2>&1 < /dev/null &), then
# back-to-back monitoring runs with no gap over ~20 s (the machine goes after 30 s idle, and with it every result:
# the seventh session lost one lease that way). Copy results out as one tar (at most 8 files come back per run).
# Dry run on CPU: RESULTS=/tmp/x GPUS="" CONVERT_FLAGS="MODEL --device cpu --nsamples 2 --seqlen 64 --epochs 1"
#   KERNEL_TESTS=true ATTN_CMD=true BENCH_CMD=true EVAL_FLAGS="--device cpu --max-windows 1 --seqlen 128".
set -uo pipefail
# shellcheck source=benchmarks/lease_lib.sh
source "$(dirname "$0")/lease_lib.sh"
lease_init

(
  on_gpu 1 bash -c "${KERNEL_TESTS:-python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_w4_gemv.py}" \
    > "$k/tests.log" 2>&1
  mark "kernel tests rc=$?"
  on_gpu 1 bash -c "${ATTN_CMD:-python3 benchmarks/attn_bench.py --batches 1 --json $k/attn_b1.json && \
    python3 benchmarks/attn_bench.py --batches 8 --json $k/attn_b8.json}" > "$k/attn.log" 2>&1
  mark "attention sweep rc=$?"
  tables=$(ls "$k"/attn_b*.json 2>/dev/null | paste -sd:)
  WKVQ_ATTN_TABLE=$tables on_gpu 1 bash -c "${BENCH_CMD:-python3 cli.py bench --shapes 7b --paths wkvq-gemv,wkvq \
    --batches 1,8 --prompts 2048,32768 --steps 20 --json $k/bench.json && \
    for p in 2048 32768; do python3 benchmarks/decode_profile.py --shape 7b --prompt \$p --projections gemv \
    --json $k/prof-b1-p\$p.json > $k/prof-b1-p\$p.txt; done}" > "$k/bench.log" 2>&1
  mark "bench and profile (WKVQ_ATTN_TABLE=$tables) rc=$?"
) &
gpu1=$!

# shellcheck disable=SC2086
blockwise 0 ${1:-cos2s1:--schedule=cosine,--lwc-lr=2e-2,--round-lr=1e-2,--smooth-lr=1e-2,--seed=1 cos4:--schedule=cosine,--lwc-lr=4e-2,--round-lr=2e-2,--smooth-lr=2e-2 cos:--schedule=cosine}
blockwise_table 0
wait "$gpu1"
mark "all done"
