#!/usr/bin/env bash
# Rescue of round 14 on the same lease (run from a fresh copy of the tree with the fix of mean_kl_paged, whose
# head got the host states): the paged stage failed on the GPU ("cuda:0 and cpu") in both the CUDA test and the 7B
# benchmark, so the round-14 runs (same driver) fail at their stage with their blocks kept.
#   GPU 1: the CUDA tests again, then the 7B paged stage benchmark;
#   GPU 0: once round 14's block-wise runs have ended, its driver is stopped and each run's stage is redone from its
#     kept blocks (`convert --resume`, paged; in place with --no-e2e-offload if the paged one fails), then the table.
#   bash benchmarks/h200x2_round14b.sh     (env as round 14; r=/root/a)
set -uo pipefail
# shellcheck source=benchmarks/lease_lib.sh
source "$(dirname "$0")/lease_lib.sh"
lease_init
mark "rescue started"
(
  on_gpu 1 bash -c "python3 -m pytest -q -p no:cacheprovider tests/test_offload.py tests/test_e2e.py \
      -k 'cuda or paged' > $k/tests2.txt 2>&1; echo tests rc=\$? >> $k/tests2.txt; \
    python3 benchmarks/calibration.py --shape llama2-7b --e2e-samples 8 --e2e-epochs 2 --e2e-rounding --no-progress \
      --json $k/e2e_7b_paged2.json > $k/e2e_7b_paged2.txt 2>&1"
  mark "GPU 1 (tests, 7B paged stage) rc=$?"
) &
gpu1=$!

while pgrep -f "cli -v convert --out $r/bw" > /dev/null; do sleep 5; done
pkill -f "h200x2_round14.sh"; pkill -f "cli eval"
mark "round 14 block-wise ended; driver stopped"
pids=()
for v in def0: def1:--seed=1 r1e-3:--e2e-round-lr=1e-3; do
  n=${v%%:*} f=${v#*:}
  # shellcheck disable=SC2086
  ( on_gpu 0 python3 -m cli -v convert --out "$r/bw/$n" --resume --keep-work --rounding learned $f \
      > "$r/bw/logs/resume-$n.log" 2>&1 \
    || on_gpu 0 python3 -m cli -v convert --out "$r/bw/$n" --resume --keep-work --rounding learned $f --no-e2e-offload \
      > "$r/bw/logs/resume-inplace-$n.log" 2>&1
    mark "stage $n rc=$?" ) &
  pids+=($!)
done
wait "${pids[@]}"
artifacts=(); rows=fp16,w4kv4-rtn
for n in def0 def1 r1e-3; do
  [ -f "$r/bw/$n/wkvq.json" ] && { artifacts+=(--artifact "$n=$r/bw/$n"); rows="$rows,$n"; }
done
rows="$rows,def0:w,def0:kv"
blockwise_table 0
wait "$gpu1"
mark "all done"
