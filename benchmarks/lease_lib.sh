# Helpers sourced by the lease scripts (benchmarks/h200x2_round7.sh, h200x2_round8.sh, smollm2_e2e.sh).
# They read the caller's variables: r (results dir) and t0 (start, seconds) for mark; the array gpus for on_gpu;
# the array extra (convert flags of every run) for blockwise; model and EVAL_FLAGS (env) for blockwise_table.
# lease_init sets them all from the environment (RESULTS, CONVERT_FLAGS, GPUS, MODEL, WKVQ_CACHE).
#
# Lease setup for a script SCRIPT that uses these helpers (SmolLM2 on the device machine): run 1 (kind
# nvidia-h200-x2) carry [".gpu/p1"]: cp .gpu/p1/part_aa /root/part_aa
# run 2 at once, carry [".gpu/p2", ".gpu/whl"]: mkdir -p /root/c /root/a; cat /root/part_aa .gpu/p2/part_ab >
#   /root/c/SmolLM2-135M-Instruct.Q4_1.gguf; cp .gpu/whl/enwiki-sample.xml.bz2 /root/c/; python3 -m pip install -q
#   --no-index --no-deps --target /tmp/site .gpu/whl/*.whl; rm -rf /root/src; cp -r $PWD /root/src; cd /root/src;
#   export PYTHONPATH=/tmp/site:/root/src HF_HUB_OFFLINE=1 WKVQ_CACHE=/root/c;
#   setsid nohup bash benchmarks/SCRIPT > /root/a/driver.log 2>&1 < /dev/null &
# then back-to-back monitoring runs (the machine goes after 30 s idle, and with it every result), each ending in a
# tar of /root/a without the artifacts' weights (at most 8 files come back per run).
# shellcheck shell=bash

lease_init() {  # the variables of every lease script: r (results), extra, gpus, t0, model, k (made)
  r=${RESULTS:-/root/a}
  read -r -a extra <<< "${CONVERT_FLAGS:-}"
  read -r -a gpus <<< "${GPUS-0 1}"
  k=$r/kernels
  mkdir -p "$k"
  t0=$(date +%s)
  model=${MODEL:-${WKVQ_CACHE:-$HOME/.cache/wkvquant}/SmolLM2-135M-Instruct.Q4_1.gguf}
}

mark() { echo "[$(( $(date +%s) - t0 ))s] $*" >> "$r/timeline.txt"; }

on_gpu() {  # on_gpu I CMD...: CMD on the I-th of gpus (round robin), or as is without gpus
  if [ ${#gpus[@]} -gt 0 ]; then CUDA_VISIBLE_DEVICES=${gpus[$(( $1 % ${#gpus[@]} ))]} "${@:2}"; else "${@:2}"; fi
}

# blockwise PLACE NAME:FLAG,FLAG... : block-wise SmolLM2 runs (--rounding learned, work dirs kept) at once under
# $r/bw, run I on the I-th GPU (PLACE = rr) or all on GPU PLACE; waits for them and sets rows and artifacts
# (fp16, RTN and every run that wrote an artifact) for blockwise_table.
blockwise() {
  local place=$1 names=() flags=() pids=() i v
  shift
  mkdir -p "$r/bw/logs"
  for v in "$@"; do
    names+=("${v%%:*}")
    flags+=("$(echo "${v#*:}" | tr ',' ' ')")
  done
  for i in "${!names[@]}"; do
    # shellcheck disable=SC2086
    on_gpu "$([ "$place" = rr ] && echo "$i" || echo "$place")" python3 -m cli -v convert --out "$r/bw/${names[$i]}" \
      --overwrite --keep-work --rounding learned ${flags[$i]} "${extra[@]}" > "$r/bw/logs/convert-${names[$i]}.log" 2>&1 &
    pids+=($!)
  done
  artifacts=()
  rows=fp16,w4kv4-rtn
  for i in "${!names[@]}"; do
    wait "${pids[$i]}"; mark "block-wise ${names[$i]} rc=$?"
    [ -f "$r/bw/${names[$i]}/wkvq.json" ] && { artifacts+=(--artifact "${names[$i]}=$r/bw/${names[$i]}"); rows="$rows,${names[$i]}"; }
  done
}

# blockwise_table [GPU]: one table (held-back articles) of the rows blockwise set, into $r/bw/table-blockwise.*
blockwise_table() {
  # shellcheck disable=SC2086
  on_gpu "${1:-0}" python3 -m cli eval "$model" --table --no-progress --rows "$rows" "${artifacts[@]}" \
    --json "$r/bw/table-blockwise.json" --markdown "$r/bw/table-blockwise.md" ${EVAL_FLAGS:-} \
    > "$r/bw/logs/eval-blockwise.log" 2>&1
  mark "block-wise table rc=$?"
}
