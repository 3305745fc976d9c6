#!/usr/bin/env bash
# Next lease (nvidia-h200-x2, ~25 min of the 30), issue #4: the new default recipe (block-wise, then the end-to-end stage with
# rounding offsets, its blocks paged from the host) run fresh on SmolLM2, and the paged stage at the 7B shape.
#   GPU 0: the default recipe at seeds 0 and 1 and, at seed 0, with the offsets' rate halved (--e2e-round-lr 1e-3:
#     on the quick CPU recipe 17.039 against 17.065) at once (`python3 -m cli -v convert --out ... --keep-work`; ~22 min: blocks ~14, three stages ~8);
#     if the paged stage fails on the GPU, the blocks are kept: `--resume --no-e2e-offload` redoes only the stage;
#   GPU 1 meanwhile: the CUDA tests of the pager and the paged stage (~1 min), then the paged stage with offsets at
#     the 7B shape (benchmarks/calibration.py --e2e-samples 8 --e2e-rounding: time extrapolated, peak GPU memory);
#   then one table (GPU 0): fp16, RTN, the three runs, and run 0's error split (def0:w, def0:kv).
# Results: $r/bw (table, logs, artifacts' metadata), $r/kernels (tests, e2e_7b_paged.*), $r/timeline.txt.
#
#   bash benchmarks/h200x2_round14.sh
# Setup: benchmarks/lease_lib.sh's header with SCRIPT = h200x2_round14.sh; then back-to-back monitoring runs (the
# machine goes after 30 s idle), each ending in `cd /root; tar czf $OUT/a.tgz --exclude='*.safetensors'
# --exclude='*.wkvq-work' a` (at most 8 files come back a run, each under the size limit).
# Dry run on CPU: RESULTS=/tmp/x GPUS="" CONVERT_FLAGS="--device cpu --nsamples 2 --seqlen 64 --epochs 1"
#   EVAL_FLAGS="--device cpu --max-windows 1 --seqlen 128" GPU1_CMD=true.
set -uo pipefail
# shellcheck source=benchmarks/lease_lib.sh
source "$(dirname "$0")/lease_lib.sh"
lease_init

(
  on_gpu 1 bash -c "${GPU1_CMD:-python3 -m pytest -q -p no:cacheprovider tests/test_offload.py tests/test_e2e.py \
      -k 'cuda or paged' > $k/tests.txt 2>&1; echo tests rc=\$? >> $k/tests.txt; \
    python3 benchmarks/calibration.py --shape llama2-7b --e2e-samples 8 --e2e-epochs 2 --e2e-rounding --no-progress \
      --json $k/e2e_7b_paged.json > $k/e2e_7b_paged.txt 2>&1}" > "$k/gpu1.log" 2>&1
  mark "GPU 1 (tests, 7B paged stage) rc=$?"
) &
gpu1=$!

blockwise 0 def0: def1:--seed=1 r1e-3:--e2e-round-lr=1e-3
rows="$rows,def0:w,def0:kv"
blockwise_table 0
wait "$gpu1"
mark "all done"
