#!/usr/bin/env bash
# Next lease (nvidia-h200-x2, ~25 min), issues #4 and #6 side by side:
#   GPU 1 first: KERNEL_CMD (default: the full sweep of the row-owning GEMV at M = 1, benchmarks/w4_gemv_bench.py)
#     on an otherwise idle GPU, so its timings are clean, then BENCH_CMD (default: cli.py bench, 7B b1, paths
#     wkvq and wkvq-gemv, the latter on the sweep's best configs through WKVQ_GEMV_TABLE);
#   GPU 0 meanwhile: block-wise SmolLM2 runs, all with --rounding learned --keep-work, named "NAME:FLAG,FLAG ..."
#     (argument 1; default "cos:--schedule=cosine cos2:--schedule=cosine,--lwc-lr=2e-2,--round-lr=1e-2,--smooth-lr=1e-2
#     lwc2:--lwc-lr=2e-2": three runs share GPU 0, ~14 min);
#   GPU 1 after the kernels (unless STAGE is set and empty): end-to-end stage variants (STAGE, "EPOCHS:LR[:FLAGS] ...", default
#     "2:1e-3:--e2e-rounding 4:3e-3:--e2e-rounding 2:3e-3:--e2e-rounding,--e2e-round-lr=1e-3") resumed from the
#     sixth session's learned blocks (BLOCKS, default /root/learned-blocks-r7.tgz: .gpu/work/learned-blocks-r7.tgz
#     copied there by an earlier run) via benchmarks/smollm2_e2e.sh;
#   then one table of the block-wise runs (the stage variants get smollm2_e2e.sh's own table).
# Results in RESULTS (default /root/a): timeline.txt, kernels/, bw/, stage/.
#
#   bash benchmarks/h200x2_round8.sh ["NAME:FLAGS ..."]
# Setup: run 1 (kind nvidia-h200-x2) carry [".gpu/p1", ".gpu/w8"] (.gpu/w8 holds a copy of .gpu/work/learned-blocks-r7.tgz;
#   62 MiB in all): cp .gpu/p1/part_aa /root/part_aa; cp .gpu/w8/learned-blocks-r7.tgz /root/
# run 2 at once, carry [".gpu/p2", ".gpu/whl"]: mkdir -p /root/c /root/a; cat /root/part_aa .gpu/p2/part_ab >
#   /root/c/SmolLM2-135M-Instruct.Q4_1.gguf; cp .gpu/whl/enwiki-sample.xml.bz2 /root/c/; python3 -m pip install -q
#   --no-index --no-deps --target /tmp/site .gpu/whl/*.whl; rm -rf /root/src; cp -r $PWD /root/src; cd /root/src;
#   export PYTHONPATH=/tmp/site:/root/src HF_HUB_OFFLINE=1 WKVQ_CACHE=/root/c;
#   setsid nohup bash benchmarks/h200x2_round8.sh > /root/a/driver.log 2>&1 < /dev/null &
# then back-to-back monitoring runs (the machine goes after ~30 s idle); the kernel sweep (146 configs) compiles
# for ~9 min with 14 workers; block-wise runs ~13 min; results: tar RESULTS without *.safetensors and ./*/.*.
# Dry run on CPU: CONVERT_FLAGS (model and a small recipe), GPUS="", KERNEL_CMD=true, EVAL_FLAGS, BLOCKS.
set -uo pipefail
r=${RESULTS:-/root/a}
read -r -a extra <<< "${CONVERT_FLAGS:-}"
read -r -a gpus <<< "${GPUS-0 1}"
blocks=${BLOCKS:-/root/learned-blocks-r7.tgz}
mkdir -p "$r/kernels" "$r/stage"
t0=$(date +%s)
# shellcheck source=benchmarks/lease_lib.sh
source "$(dirname "$0")/lease_lib.sh"
model=${MODEL:-${WKVQ_CACHE:-$HOME/.cache/wkvquant}/SmolLM2-135M-Instruct.Q4_1.gguf}

# GPU 1: kernels, then the stage variants (in the background)
(
  on_gpu 1 bash -c "${KERNEL_CMD:-python3 benchmarks/w4_gemv_bench.py --ms 1 --workers 14 --json $r/kernels/w4_gemv_m1.json}" \
    > "$r/kernels/kernels.log" 2>&1
  mark "kernels rc=$?"
  # the decode step with the projections on the swept GEMV configs (WKVQ_GEMV_TABLE), beside wkvq, same process
  if [ -f "$r/kernels/w4_gemv_m1.json" ]; then
    WKVQ_GEMV_TABLE="$r/kernels/w4_gemv_m1.json" on_gpu 1 bash -c \
      "${BENCH_CMD:-python3 cli.py bench --shapes 7b --paths wkvq,wkvq-gemv --batches 1 --prompts 2048,32768 --steps 20 --json $r/kernels/bench-gemv.json}" \
      > "$r/kernels/bench.log" 2>&1
    mark "bench rc=$?"
  fi
  [ -n "${STAGE-x}" ] || { mark "no stage variants (STAGE empty)"; exit 0; }
  tar xzf "$blocks" -C "$r/stage" && mark "blocks unpacked from $blocks" || { mark "no blocks at $blocks"; exit 1; }
  # the base artifact from the kept blocks (every block done: only the export runs)
  on_gpu 1 python3 -m cli -v convert --out "$r/stage/learned" --overwrite --resume --keep-work --rounding learned \
    "${extra[@]}" > "$r/stage/base.log" 2>&1
  mark "base re-exported rc=$?"
  BASE=learned SKIP_BASE=1 SKIP_LEARNED=1 GPUS="${gpus[*]:1}" bash benchmarks/smollm2_e2e.sh "$r/stage" \
    "${STAGE:-2:1e-3:--e2e-rounding 4:3e-3:--e2e-rounding 2:3e-3:--e2e-rounding,--e2e-round-lr=1e-3}" \
    --rounding learned "${extra[@]}" > "$r/stage/stage.log" 2>&1
  mark "stage variants and table rc=$?"
) &
gpu1=$!

# GPU 0: block-wise variants
# shellcheck disable=SC2086
blockwise 0 ${1:-cos:--schedule=cosine cos2:--schedule=cosine,--lwc-lr=2e-2,--round-lr=1e-2,--smooth-lr=1e-2 lwc2:--lwc-lr=2e-2}
blockwise_table 0
wait "$gpu1"
mark "all done"
