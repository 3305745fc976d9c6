#!/usr/bin/env bash
# Lease (nvidia-h200-x2, ~15 min) after round8's machine was lost mid-run (seventh session):
#   GPU 0: block-wise SmolLM2 variants GPU0_RUNS (three share the GPU), then their table, into $r/bw;
#   GPU 1: the decode step's kernel profile (benchmarks/decode_profile.py: 7B b1 p2048 / p32768, gemv and triton
#     projections), then block-wise variants GPU1_RUNS and their table, into $r1/bw.
# Setup as benchmarks/h200x2_round8.sh (run 1 carry [".gpu/p1"], run 2 carry [".gpu/p2", ".gpu/whl"]), then
#   setsid nohup bash benchmarks/h200x2_round9.sh > /root/a/driver.log 2>&1 < /dev/null &
set -uo pipefail
r=${RESULTS:-/root/a}; r1=${RESULTS1:-/root/a1}
mkdir -p "$r" "$r1/prof"
t0=$(date +%s)
# shellcheck source=benchmarks/lease_lib.sh
source "$(dirname "$0")/lease_lib.sh"
model=${MODEL:-${WKVQ_CACHE:-$HOME/.cache/wkvquant}/SmolLM2-135M-Instruct.Q4_1.gguf}
read -r -a extra <<< "${CONVERT_FLAGS:-}"
(
  r=$r1 gpus=(1)
  for spec in gemv:2048 gemv:32768 triton:2048; do
    p=${spec%%:*} n=${spec#*:}
    on_gpu 0 python3 benchmarks/decode_profile.py --shape 7b --prompt "$n" --projections "$p" \
      --json "$r/prof/7b-b1-p$n-$p.json" > "$r/prof/7b-b1-p$n-$p.txt" 2>&1
    mark "profile $spec rc=$?"
  done
  # shellcheck disable=SC2086
  blockwise 0 ${GPU1_RUNS:-cos:--schedule=cosine lwc05:--lwc-lr=5e-3}
  blockwise_table 0
) &
gpus=(0)
# shellcheck disable=SC2086
blockwise 0 ${GPU0_RUNS:-cos2:--schedule=cosine,--lwc-lr=2e-2,--round-lr=1e-2,--smooth-lr=1e-2 lwc2:--lwc-lr=2e-2 seed1:--seed=1}
blockwise_table 0
wait
mark "all done"
