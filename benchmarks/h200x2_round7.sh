#!/usr/bin/env bash
# Next lease for issue #4 (nvidia-h200-x2, or one GPU with GPUS="0"), ~25 minutes: the block-wise recipe with
# learned rounding (`--rounding learned`), which the fifth session ran at full scale only with the end-to-end
# stage on top (19.522; its train KL before the stage, 0.063, was the lowest of any run). Here:
#   1. block-wise runs, all at once, spread over GPUS round robin, each with --keep-work: the default recipe
#      with `--rounding learned` (named "learned") plus BLOCKWISE variants ("NAME:FLAG,FLAG ...", e.g.
#      "lr1e-2:--round-lr=1e-2"), each also with --rounding learned;
#   2. one table (fp16, RTN, every block-wise run);
#   3. STAGE variants ("EPOCHS:LR[:FLAGS] ...", default "2:3e-3:--e2e-rounding": from learned blocks a stage
#      that moves only the clips raised the KL, GPU and CPU alike) resumed from the blocks of "learned"
#      (benchmarks/smollm2_e2e.sh with BASE=learned), and their table;
#   4. the blocks of "learned" tarred to RESULTS/learned-blocks.tgz (keep it in .gpu/work for later leases).
# Results in RESULTS (default /root/a); timeline in RESULTS/timeline.txt.
#
#   bash benchmarks/h200x2_round7.sh ["NAME:FLAGS ..."]   (after the setup in BENCHMARKS.md; carry [".gpu/p2", ".gpu/whl"])
# Dry run on CPU: CONVERT_FLAGS (model and a small recipe), GPUS="", EVAL_FLAGS.
set -uo pipefail
r=${RESULTS:-/root/a}
read -r -a extra <<< "${CONVERT_FLAGS:-}"
read -r -a gpus <<< "${GPUS-0 1}"
t0=$(date +%s)
# shellcheck source=benchmarks/lease_lib.sh
source "$(dirname "$0")/lease_lib.sh"
model=${MODEL:-${WKVQ_CACHE:-$HOME/.cache/wkvquant}/SmolLM2-135M-Instruct.Q4_1.gguf}

# shellcheck disable=SC2086
blockwise rr "learned:" ${1:-}
(cd "$r/bw" && tar czf "$r/learned-blocks.tgz" .learned.wkvq-work)
mark "blocks of learned saved rc=$?"
blockwise_table 0
# the stage from the blocks of "learned" (smollm2_e2e.sh re-evaluates fp16/RTN/learned in its table too)
BASE=learned SKIP_BASE=1 SKIP_LEARNED=1 GPUS="${GPUS-0 1}" bash benchmarks/smollm2_e2e.sh "$r/bw" \
  "${STAGE:-2:3e-3:--e2e-rounding}" --rounding learned "${extra[@]}" > "$r/stage.log" 2>&1
mark "stage variants and table rc=$?"
