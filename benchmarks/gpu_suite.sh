# The test suite on the GPU machine (device tool), in parallel (pytest-xdist). Two runs back to back, as GPU.md
# describes for SmolLM2: first `cp .gpu/p1/part_aa /root/part_aa` (carry .gpu/p1), then at once
# `OUT=$OUT bash benchmarks/gpu_suite.sh [PYTEST ARGS]` (carry .gpu/p2 .gpu/whl .gpu/xdist .gpu/enwiki).
# .gpu/xdist: `pip download --no-deps -d .gpu/xdist pytest-xdist execnet`; .gpu/enwiki: the Wikipedia sample's
# two cache files (~/.cache/wkvquant/enwiki-sample.*, made by any run that read it): the GPU machine has no network.
# The log goes to $OUT/tests.txt; the failures and the summary are printed.
set -uo pipefail
o=${OUT:-/root/out}; mkdir -p "$o"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl .gpu/xdist/*.whl > /dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD  # not HF_HUB_OFFLINE: the Hub tests run against a local server
c=$(python3 -c "from converter.source import cache_dir; print(cache_dir())"); mkdir -p "$c"
[ -f "$c/SmolLM2-135M-Instruct.Q4_1.gguf" ] || cat /root/part_aa .gpu/p2/part_ab > "$c/SmolLM2-135M-Instruct.Q4_1.gguf"
for f in .gpu/enwiki/*; do [ -f "$c/${f##*/}" ] || cp "$f" "$c/"; done
# the session fixture smollm2_dir, made once here: xdist's workers would each make it, in the same folder
python3 -c "
import torch
from converter.source import cache_dir, load_model
t = cache_dir() / 'test-smollm2-hf'
if not (t / 'model.safetensors').is_file():
    m, tok, _ = load_model(None, dtype=torch.float32); m.save_pretrained(t); tok.save_pretrained(t)
" 2>&1 | grep -v Warning | tail -3
python3 -m pytest -n "${N:-14}" -v -p no:cacheprovider "$@" > "$o/tests.txt" 2>&1; echo "pytest rc=$?"
grep -E "^(FAILED|ERROR)|(FAILED|ERROR) tests" "$o/tests.txt" | head -60; tail -3 "$o/tests.txt"
