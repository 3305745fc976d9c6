# Sourced by the benchmarks/h200_round*.sh scripts (device tool, carry .gpu/whl): the wheels of .gpu/whl into
# /tmp/site, the environment, the output folder $o ($OUT, default /root/out), `mark` (seconds since the start and a
# message), `bench` (cli.py bench of the 7B shape on the wkvq-gemv path, 20 steps, plus the arguments given),
# `nbench` (a named bench row on the wkvq path), `gpu_tests` (the kernel GPU tests matching a -k expression; with
# .gpu/xdist carried), `attn_table` / `sptable` (one-entry attention tables for WKVQ_ATTN_TABLE) and `record` (the
# record table).
set -uo pipefail
o=${OUT:-/root/out}; mkdir -p "$o"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl $(ls .gpu/xdist/*.whl 2>/dev/null) \
  > /dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
t0=$(date +%s); mark() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
# each bench's output starts with its arguments and WKVQ_ settings (the mark after it comes after its table: a console
# read line by line once put a table under the wrong name, twenty-first session)
bench() {
  echo "--- bench $* $(env | grep '^WKVQ_' | sort | tr '\n' ' ')"
  python3 cli.py bench --shapes 7b --paths wkvq-gemv --steps 20 "$@" 2>&1 | grep -v Warning | tail -6
}
# the record table: 7B and 13B on the wkvq-gemv path, batches 1 and 8, prompts 2048 and 32768 (bench_<shape>_final.json)
record() {
  for s in 7b 13b; do
    python3 cli.py bench --shapes $s --paths wkvq-gemv --batches 1,8 --prompts 2048,32768 --steps 20 \
      --json "$o/bench_${s}_final.json" 2>&1 | grep -v Warning | tail -6; mark "bench $s"
  done
}
# `nbench NAME ARGS...`: cli.py bench on the wkvq path at batch 1, 20 steps, plus ARGS, into $o/NAME.json; its rows
# prefixed by NAME
nbench() { local name=$1; shift
  python3 cli.py bench --paths wkvq --batches 1 --steps 20 --json "$o/$name.json" "$@" 2>&1 | grep "wkvq" \
    | sed "s/^/$name /"; }
# `gpu_tests EXPR`: the real-shape, kernel and tensor-core attention tests matching `pytest -k EXPR` on 8 workers
# ($o/tests.txt; the failures and the summary printed)
gpu_tests() {
  python3 -m pytest -n 8 -q -p no:cacheprovider tests/test_real_shapes.py tests/test_kernels.py tests/test_kv4_mma.py \
    -k "$1" > "$o/tests.txt" 2>&1; echo "pytest rc=$?"
  grep -E "^(FAILED|ERROR)" "$o/tests.txt" | head -30; tail -2 "$o/tests.txt"
}
# `attn_table NAME BATCH CONTEXT CONFIG`: a one-entry attention table (for WKVQ_ATTN_TABLE) at /root/NAME.json, its
# (BATCH, CONTEXT) entry the Python expression CONFIG (an AttnConfig; `kv4` and `dataclasses` imported); printed
attn_table() { python3 -c "
import dataclasses, json
from runtime.kernels import kv4
c = $4
json.dump({'best': {'$2x$3': {'config': dataclasses.asdict(c)}}}, open('/root/$1.json', 'w'))
print('$1:', c)"; }
# `sptable NAME HEADS BATCH CONTEXT SPLITS [KV_HEADS]`: the config the tables give HEADS heads (on KV_HEADS, default
# as many) at (BATCH, CONTEXT) with SPLITS splits, as attn_table NAME
sptable() { attn_table "$1" "$3" "$4" \
  "dataclasses.replace(kv4.attn_config($3, $2, $4 + 1, kv_heads=${6:-$2}), splits=$5)"; }
