"""GemLite vs the split-K INT4 kernel at the LLaMA-2-7B projection shapes, timed by CUDA-graph replay (H200).

``python3 benchmarks/gemlite_probe.py --out FILE.json``: per shape and rows (1, 8): us, GB/s (packed codes +
fp16 scales + uint8 zeros, the artifact's bytes) and the relative error against the float32 dequantized
matmul, for the split-K kernel (its config table), GemLite launched into the float32 output (``direct``,
1 row) and GemLite's forward + add (``public``); then all 128 projections of a 7B step (fresh weights per
layer) for both backends. GemLite runs on fixed configs (nearest pre-tuned shape; no autotuning).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converter.bench_kernels import SHAPES_7B, _nbytes, _reference, graph_ms, random_weight  # noqa: E402
from runtime.fast import W4Weight  # noqa: E402
from runtime.kernels import gemlite_backend as gb  # noqa: E402

log = logging.getLogger("gemlite_probe")


def _row(kind, n, k, m, fn, out, ref, nbytes, **extra) -> dict:
    out.zero_()
    fn()
    err = ((out - ref).norm() / ref.norm()).item()
    t = graph_ms(fn)
    row = dict(kernel=kind, n=n, k=k, m=m, us=t * 1e3, GBps=nbytes / t / 1e6, rel_err=err, **extra)
    log.info("%s", row)
    return row


def projection_rows(ms=(1, 8)) -> list[dict]:
    rows = []
    for n, k in SHAPES_7B:
        w = W4Weight(*random_weight(n, k), k, 128)
        g = gb.GemLiteW4.from_w4(w, torch.float16)
        kind8, sig8 = gb.signature(g.linear, 8)
        nbytes = _nbytes(w.qweight, w.scales, w.zeros)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            ref = _reference(x, w.qweight, w.scales, w.zeros)
            out = torch.zeros(m, n, device="cuda")
            rows.append(_row("w4_splitk", n, k, m, lambda: w.accumulate(x, out), out, ref, nbytes))
            for direct in ((True, False) if m <= 4 else (False,)):
                rows.append(_row("gemlite_" + ("direct" if direct else "public"), n, k, m,
                                 lambda: gb.accumulate(g.linear, x, out, direct=direct), out, ref, nbytes,
                                 matmul_type=gb.signature(g.linear, m)[0]))
        del g
        torch.cuda.empty_cache()
    return rows


def step_row(backend: str, m: int, layers: int = 32) -> dict:
    """All projections of a 7B decode step (fresh weights per layer, so nothing is served from L2)."""
    weights = [[W4Weight(*random_weight(n, k), k, 128) for n, k in SHAPES_7B] for _ in range(layers)]
    if backend == "gemlite":
        weights = [[gb.GemLiteW4.from_w4(w, torch.float16) for w in layer] for layer in weights]
    xs = {k: torch.randn(m, k, device="cuda", dtype=torch.float16) for _, k in SHAPES_7B}
    outs = {n: torch.zeros(m, n, device="cuda") for n, _ in SHAPES_7B}

    def step():
        for layer in weights:
            for (n, k), w in zip(SHAPES_7B, layer):
                w.accumulate(xs[k], outs[n])

    t = graph_ms(step, reps=50)
    nbytes = sum(_nbytes(w.qweight, w.scales, w.zeros) for layer in weights for w in layer)
    row = dict(kernel=f"{backend} x128 (7B projections)", m=m, us=t * 1e3, GBps=nbytes / t / 1e6)
    log.info("%s", row)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import gemlite

    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": torch.cuda.get_device_name(),
              "gemlite": gemlite.__version__, "torch": torch.__version__, "rows": []}

    def save():
        Path(args.out).write_text(json.dumps(result, indent=1))

    result["rows"] += projection_rows()
    save()
    for m in (1, 8):
        for backend in ("triton", "gemlite"):
            result["rows"].append(step_row(backend, m))
            save()
            torch.cuda.empty_cache()
    import gemlite.core

    result["configs"] = {kind: {s: c for s, c in table.items() if any(f", {n}, {k}," in s for n, k in SHAPES_7B)}
                         for kind, table in gemlite.core.GEMLITE_TRITON_CONFIG_CACHE.items()}
    save()
    for r in result["rows"]:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
