#!/usr/bin/env bash
# Next lease (nvidia-h200-x2, ~22 min), issue #4: does the end-to-end stage take the default recipe under +5%
# reproducibly, and does it need the rounding offsets (which do not fit the 7B memory target)?
#   Both GPUs: the default recipe at seeds 0 (GPU 0) and 1 (GPU 1), blocks kept (~11.5 min);
#   then from d0's blocks the stage with offsets (lr 3e-3, the ninth session's +4.55%), without offsets (lr 3e-3 and
#   3e-2), and from d1's blocks with and without offsets (lr 3e-3): 5 stages at once over both GPUs (~6-8 min);
#   one table with every row (~2 min) and beside it, on GPU 1, the stage at the 7B shape as a default-recipe run holds it
#   (benchmarks/calibration.py --e2e-samples 8: time and peak memory); d0's blocks packed for CPU work
#   ($r/d0-blocks.tgz, ~16 MB).
# Results: $r/bw, $r/kernels/e2e_7b_lean.*, $r/timeline.txt.
#
#   bash benchmarks/h200x2_round13.sh
# Setup: benchmarks/lease_lib.sh's header with SCRIPT = h200x2_round13.sh; then back-to-back monitoring runs (the
# machine goes after 30 s idle), each ending in
# `cd /root; tar czf $OUT/a.tgz --exclude='*.safetensors' a` (the blocks: a last run copies $r/d0-blocks.tgz to $OUT).
# Dry run on CPU: RESULTS=/tmp/x GPUS="" CONVERT_FLAGS="--device cpu --nsamples 2 --seqlen 64 --epochs 1"
#   EVAL_FLAGS="--device cpu --max-windows 1 --seqlen 128" E2E7B_CMD=true.
set -uo pipefail
# shellcheck source=benchmarks/lease_lib.sh
source "$(dirname "$0")/lease_lib.sh"
lease_init

blockwise rr d0: d1:--seed=1
stage() {  # stage BASE PREFIX VARIANTS [FLAGS]: smollm2_e2e.sh's stages from BASE's kept blocks, into $r/bw; FLAGS:
  # BASE's own convert flags (a resumed run must have the recipe of the blocks, seed included)
  BASE=$1 NAME_PREFIX=$2 SKIP_BASE=1 SKIP_LEARNED=1 SKIP_TABLE=1 GPUS="${GPUS-0 1}" EVAL_FLAGS="${EVAL_FLAGS:-}" \
    bash "$(dirname "$0")/smollm2_e2e.sh" "$r/bw" "$3" --rounding learned "${extra[@]}" "${@:4}" \
    > "$r/bw/logs/stage-$1.log" 2>&1
  mark "stages from $1 rc=$?"
}
stage d0 "" "2:3e-3:--e2e-rounding 2:3e-3 2:3e-2" &
s0=$!
stage d1 d1- "2:3e-3:--e2e-rounding 2:3e-3" --seed=1 &
wait "$s0" $!
for name in e2e-2-3e-3-rounding e2e-2-3e-3 e2e-2-3e-2 d1-e2e-2-3e-3-rounding d1-e2e-2-3e-3; do
  [ -f "$r/bw/$name/wkvq.json" ] && { artifacts+=(--artifact "$name=$r/bw/$name"); rows="$rows,$name"; }
done
# GPU 1 beside the table: the stage at the 7B shape as a default-recipe run would hold it (learned decisions frozen
# in 2 bits, teacher states on the host): is its peak under 20 GB now?
on_gpu 1 bash -c "${E2E7B_CMD:-python3 benchmarks/calibration.py --shape llama2-7b --e2e-samples 8 --e2e-epochs 2 \
  --no-progress --json $k/e2e_7b_lean.json}" > "$k/e2e_7b_lean.txt" 2>&1 &
e7=$!
blockwise_table 0
wait "$e7"; mark "7B stage measurement rc=$?"
tar czf "$r/d0-blocks.tgz" -C "$r/bw" .d0.wkvq-work
mark "all done"
