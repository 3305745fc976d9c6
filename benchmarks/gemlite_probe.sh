#!/usr/bin/env bash
# One H200 run for the GemLite projection backend (issue #6), about 6 minutes at most:
# install gemlite from .gpu/whl-gemlite (plus the project's wheels in .gpu/whl) into /tmp/site, run
# tests/test_gemlite.py + tests/test_kernels.py, the per-projection microbench (benchmarks/gemlite_probe.py)
# and `cli.py bench` of wkvq vs wkvq-gemlite. Every result lands in $OUT (default: ./out-gemlite).
#
#   run tool: command "bash benchmarks/gemlite_probe.sh", carry [".gpu/whl-gemlite", ".gpu/whl"]
#
# Each step has its own time cap, so a hang or a failure in one still leaves the others' results.
set -uo pipefail
out=${OUT:-out-gemlite}
mkdir -p "$out"
t0=$(date +%s)
step() { echo "=== [$(( $(date +%s) - t0 ))s] $*"; }

step "install gemlite (no deps: numpy, tqdm and triton 3.6 are on the image)"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl-gemlite/*.whl
ls .gpu/whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import torch, triton, gemlite; print('torch', torch.__version__, 'triton', triton.__version__,
'gemlite', gemlite.__version__, torch.cuda.get_device_name())" 2>&1 | tail -n 3

step "tests (cap 100 s)"
timeout 100 python3 -m pytest -q -rs --durations=5 tests/test_gemlite.py tests/test_kernels.py \
  > "$out/tests.log" 2>&1; echo "pytest rc=$?"
tail -n 25 "$out/tests.log"

step "microbench: 7B projections, split-K vs gemlite, M=1/8, graph-timed (cap 80 s)"
timeout 80 python3 benchmarks/gemlite_probe.py --out "$out/projections.json" > "$out/projections.log" 2>&1
echo "probe rc=$?"
grep '^{' "$out/projections.log" | cut -c1-220

step "bench: wkvq vs wkvq-gemlite, 7B, b1/b8, p2048/p32768 (cap 170 s)"
timeout 170 python3 cli.py bench --shapes 7b --paths wkvq,wkvq-gemlite --batches 1,8 --prompts 2048,32768 \
  --steps 20 --json "$out/bench.json" > "$out/bench.log" 2>&1
echo "bench rc=$?"
tail -n 14 "$out/bench.log"
step "done"
