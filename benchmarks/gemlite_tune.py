"""Graph-timed config search for GemLite's ``GEMV_REVSPLITK`` (one row) at the LLaMA-2-7B projection shapes.

GemLite's own autotuner times launches outside CUDA graphs, which for kernels of a few microseconds
measures the Python launch rate; its shipped tables are tuned on other GPUs (the H100's is used on an
H200). This script times every candidate config by CUDA-graph replay over a ring of weight copies
larger than L2 (so every replay reads from HBM), checks each candidate's output against the float32
dequantized matmul, and writes the fastest per shape as a GemLite config table, which
:mod:`runtime.kernels.gemlite_backend` loads on a GPU whose name matches (``TUNED_TABLES``).

    python3 benchmarks/gemlite_tune.py --table runtime/kernels/gemlite_h200.json --json RECORD.json

Compiles run first in ``--workers`` processes (Triton's on-disk cache), so the timing loop only loads them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converter.bench_kernels import SHAPES_7B, _nbytes, _reference, graph_ms, random_weight  # noqa: E402
from runtime.fast import W4Weight  # noqa: E402
from runtime.kernels import gemlite_backend as gb  # noqa: E402

log = logging.getLogger("gemlite_tune")
RING_BYTES = 256 << 20  # > H200 L2 (60 MB) several times over
MAX_REL_ERR = 1e-3  # float16 weights: ~1.5e-4 measured (module doc of gemlite_backend)


def candidates(quick: bool = False) -> list[dict]:
    """Configs to try: block N x block K (K x split 2 <= group 128) x warps x stages x A load order."""
    ns, ks, ws, ss, aos = (128, 256, 512, 1024), (8, 16, 32, 64), (1, 2, 4, 8), (1, 2), (0, 1)
    if quick:
        ns, ks, ws, ss, aos = (256, 512), (8, 32), (2, 4), (1,), (0,)
    return [dict(BLOCK_SIZE_M=1, BLOCK_SIZE_N=n, BLOCK_SIZE_K=k, A_load_order=a, dot_prod_mode=0,
                 num_warps=w, num_stages=s, num_ctas=1)
            for n, k, w, s, a in itertools.product(ns, ks, ws, ss, aos)]


def _linear(n: int, k: int):
    w = W4Weight(*random_weight(n, k), k, 128)
    return w, gb.to_gemlite(w, torch.float16)


def _check(args) -> list[tuple[int, float | None, str]]:
    """Worker: compile and run each config once on one weight of the shape; (index, rel. error, error text)."""
    (n, k), items = args
    torch.manual_seed(0)
    w, lin = _linear(n, k)
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    ref = _reference(x, w.qweight, w.scales, w.zeros)
    out = torch.zeros(1, n, device="cuda")
    res = []
    for i, cfg in items:
        try:
            out.zero_()
            gb._launch_direct(lin, x, out, cfg)
            torch.cuda.synchronize()
            res.append((i, ((out - ref).norm() / ref.norm()).item(), ""))
        except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped, with its reason
            res.append((i, None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"))
    return res


def check_all(shape, cands, workers: int) -> list[tuple[int, float | None, str]]:
    items = list(enumerate(cands))
    chunks = [items[j::workers] for j in range(workers)]
    if workers <= 1:
        return _check((shape, items))
    with mp.get_context("spawn").Pool(workers) as pool:
        return sorted(sum(pool.map(_check, [(shape, c) for c in chunks]), []))


def time_config(ring, x, out, cfg) -> float:
    def step():
        for lin in ring:
            gb._launch_direct(lin, x, out, cfg)
    return graph_ms(step, reps=30) / len(ring)


def current_config(lin) -> tuple[str, dict | None]:
    """(signature, the config GemLite runs now for one row of ``lin``: :func:`gemlite_backend.seed_config`'s
    pick, the H100 table's nearest shape or an earlier tuning)."""
    from gemlite import core

    kind, sig = gb.signature(lin, 1)
    gb.seed_config(lin, 1)
    return sig, core.GEMLITE_TRITON_CONFIG_CACHE.get(kind, {}).get(sig)


def tune_shape(n: int, k: int, cands, workers: int) -> tuple[str, dict, list[dict]]:
    t0 = time.time()
    checked = check_all((n, k), cands, workers)
    ok = [(i, err) for i, err, msg in checked if err is not None and err < MAX_REL_ERR]
    bad = [(i, err, msg) for i, err, msg in checked if err is None or err >= MAX_REL_ERR]
    log.info("%dx%d: %d configs compiled and correct, %d not (%.0f s)", n, k, len(ok), len(bad), time.time() - t0)
    w, lin = _linear(n, k)
    nbytes = _nbytes(w.qweight, w.scales, w.zeros)
    sig, before = current_config(lin)
    ring = [lin] + [_linear(n, k)[1] for _ in range(max(1, RING_BYTES // nbytes) - 1)]
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    out = torch.zeros(1, n, device="cuda")
    rows = []
    for label, cfg, err in ([("before", before, None)] if before else []) + [("cand", cands[i], e) for i, e in ok]:
        t = time_config(ring, x, out, cfg)
        rows.append(dict(n=n, k=k, source=label, us=t * 1e3, GBps=nbytes / t / 1e6, rel_err=err,
                         config={key: v for key, v in cfg.items() if not key.startswith("EVEN")}))
    rows += [dict(n=n, k=k, source="failed", config=cands[i], rel_err=err, error=msg) for i, err, msg in bad]
    best = min((r for r in rows if r["source"] == "cand"), key=lambda r: r["us"])
    base = next((r for r in rows if r["source"] == "before"), None)
    log.info("%dx%d best %.2f us (%.0f GB/s) %s; the table's config before %s", n, k, best["us"], best["GBps"], best["config"],
             f"{base['us']:.2f} us ({base['GBps']:.0f} GB/s)" if base else "-")
    del ring
    torch.cuda.empty_cache()
    return sig, best, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", required=True, help="GemLite config table to write (GEMV_REVSPLITK entries)")
    ap.add_argument("--json", required=True, help="record: every candidate's time")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="a few candidates only (a smoke test)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import gemlite

    gb.require_gemlite()
    cands = candidates(args.quick)
    record = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": torch.cuda.get_device_name(),
              "gemlite": gemlite.__version__, "torch": torch.__version__, "candidates": len(cands), "rows": []}
    table = {}
    for n, k in SHAPES_7B:
        sig, best, rows = tune_shape(n, k, cands, args.workers)
        record["rows"] += rows
        table[sig] = best["config"]
        Path(args.json).write_text(json.dumps(record, indent=1))
        Path(args.table).write_text(json.dumps({gb.DIRECT_TYPE: table}, indent=1) + "\n")
    for r in (r for r in record["rows"] if r["source"] == "failed"):
        log.info("failed: %s", r)
    print(json.dumps({"table": table}, indent=1))


if __name__ == "__main__":
    main()
