# Sourced by the benchmarks/h200_round*.sh scripts (device tool, carry .gpu/whl): the wheels of .gpu/whl into
# /tmp/site, the environment, the output folder $o ($OUT, default /root/out), `mark` (seconds since the start and a
# message) and `bench` (cli.py bench of the 7B shape on the wkvq-gemv path, 20 steps, plus the arguments given).
set -uo pipefail
o=${OUT:-/root/out}; mkdir -p "$o"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl > /dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
t0=$(date +%s); mark() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
bench() { python3 cli.py bench --shapes 7b --paths wkvq-gemv --steps 20 "$@" 2>&1 | grep -v Warning | tail -6; }
