# Sourced by the benchmarks/h200_round*.sh scripts (device tool, carry .gpu/whl): the wheels of .gpu/whl into
# /tmp/site, the environment, the output folder $o ($OUT, default /root/out), `mark` (seconds since the start and a
# message), `bench` (cli.py bench of the 7B shape on the wkvq-gemv path, 20 steps, plus the arguments given),
# `bbench` / `nbench` (named bench rows on the wkvq path, any batch / batch 1), `heads_of` (a shape's heads),
# `side` (7B W4KV4 beside fp16 compiled), `gpu_tests` (the kernel GPU tests matching a -k expression; with .gpu/xdist
# carried), `attn_table` / `mtable` / `sptable` (attention tables for WKVQ_ATTN_TABLE) and `record` (the record table).
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
# `side NAME BATCHES PROMPTS`: the 7B W4KV4 step beside fp16 compiled in one run, 20 steps, into $o/NAME.json (its
# table and speedups printed)
side() {
  python3 cli.py bench --shapes 7b --paths wkvq,fp16_compiled --batches "$2" --prompts "$3" --steps 20 \
    --json "$o/$1.json" 2>&1 | grep -v Warning | tail -8
}
# `bbench NAME ARGS...`: cli.py bench on the wkvq path, 20 steps, plus ARGS, into $o/NAME.json; rows prefixed by NAME
bbench() { local name=$1; shift
  python3 cli.py bench --paths wkvq --steps 20 --json "$o/$name.json" "$@" 2>&1 | grep "wkvq" | sed "s/^/$name /"; }
# `nbench NAME ARGS...`: bbench at batch 1
nbench() { local name=$1; shift; bbench "$name" --batches 1 "$@"; }
# `heads_of SHAPE`: the bench shape's query heads and KV heads
heads_of() { case $1 in 7b) echo "32 32";; 8b) echo "32 8";; 13b) echo "40 40";; 3b) echo "24 8";; 70b) echo "64 8";;
  *) echo "unknown shape $1" >&2; exit 2;; esac; }
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
# `mtable NAME HEADS KV_HEADS SPEC...`: an attention table at /root/NAME.json for WKVQ_ATTN_TABLE, one entry a SPEC
# `batch:context:splits`, each the config the tables give HEADS heads on KV_HEADS there with that many splits; printed
mtable() { local name=$1 h=$2 kv=$3; shift 3; python3 -c "
import dataclasses, json, sys
from runtime.kernels import kv4
best = {}
for spec in sys.argv[1:]:
    b, c, s = (int(v) for v in spec.split(':'))
    best[f'{b}x{c}'] = {'config': dataclasses.asdict(dataclasses.replace(
        kv4.attn_config(b, $h, c + 1, kv_heads=$kv), splits=s))}
json.dump({'best': best}, open('/root/$name.json', 'w'))
print('$name:', ' '.join(f'{k}:{v[\"config\"][\"splits\"]}' for k, v in best.items()))" "$@"; }
# `sptable NAME HEADS BATCH CONTEXT SPLITS [KV_HEADS]`: mtable NAME's one entry at (BATCH, CONTEXT), HEADS heads on
# KV_HEADS (default as many)
sptable() { mtable "$1" "$2" "${6:-$2}" "$3:$4:$5"; }
