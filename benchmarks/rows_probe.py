"""The decode step's projections at 9-32 rows (batches 9-32), graph-timed over a weight ring: what ``GemvW4`` ran
above 8 rows until the thirty-eighth session (the split-K kernel to 16 rows, the tiled kernel above), the
tensor-core GEMV in launches of 8 rows, and in one launch of 2-4 blocks of 8 rows (the weight read once) on a few
configs; the one-launch GEMV at 8 rows as the anchor; above 32 rows the decode step's ``GemvW4`` (launches of 32)
against the dequantization + cuBLAS; above ``w4_mma.LAUNCHES_MAX_ROWS`` (64 until the fortieth session, now 80)
launches of 32 against the dequantization (what ``GemvW4`` runs there). All on the group-major weights the decode
step holds on CUDA (the reference from the row-major weight); each checked against the float64 product first.

    python3 benchmarks/rows_probe.py --shapes 7b,13b --rows 8,9,16,24,32 --json rows.json
    python3 benchmarks/rows_probe.py --shapes 7b --rows 17,24,33,48,64 --json rows64.json
    python3 benchmarks/rows_probe.py --shapes 7b --rows 80,96,112,128 --json rows128.json
    python3 benchmarks/rows_probe.py --shapes 7b --rows 65,72,80 --json rows80.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gemlite_tune import RING_BYTES
from converter.bench_kernels import (
    SHAPES_7B,
    projection_case,
    ring_check_time,
    weight_ring,
)
from runtime import quant
from runtime.kernels import w4
from runtime.kernels import w4_mma as mm
from runtime.kernels.w4_gemv import GemvW4

SHAPES = {"7b": SHAPES_7B, "13b": ((15360, 5120), (5120, 5120), (27648, 5120), (5120, 13824))}


def _before(x, qw, sc, zr, out):
    """What ``GemvW4`` ran above 8 rows before the thirty-eighth session (``runtime.fast.W4Weight.accumulate``): the
    split-K kernel up to ``w4.SPLITK_MAX_ROWS`` rows, the tiled kernel above (``w4.DEQUANT_MIN_ROWS`` was 64)."""
    if w4.splitk_ok(x, qw):
        return w4.w4_accumulate(x, qw, sc, zr, 128, out)
    saved, w4.DEQUANT_MIN_ROWS = w4.DEQUANT_MIN_ROWS, 64
    try:
        return out.add_(w4.w4_linear(x, qw, sc, zr, 128))
    finally:
        w4.DEQUANT_MIN_ROWS = saved


def _dequant(x, qw, sc, zr, out):
    """The weight dequantized, then cuBLAS (``w4.w4_linear`` from ``DEQUANT_MIN_ROWS`` rows)."""
    return out.add_(w4._dequant_linear(x, qw, sc, zr, 128, None, None))


def _gemv_w4(x, qw, sc, zr, out):
    """``GemvW4.accumulate``: what the decode step runs (33-80 rows: launches of at most 32)."""
    return GemvW4(qw, sc, zr, x.shape[1], 128, None).accumulate(x, out)


def _launches(rows: int):
    """The tensor-core GEMV in launches of at most ``rows`` rows at any row count (every launch reads the whole
    weight; ``GemvW4`` runs launches of 32 to ``w4_mma.LAUNCHES_MAX_ROWS``)."""
    def run(x, qw, sc, zr, out):
        for i in range(0, x.shape[0], rows):
            mm.w4_mma_accumulate(x[i:i + rows], qw, sc, zr, 128, out[i:i + rows])
        return out
    return run


def kernels(n: int, k: int, m: int) -> dict:
    """The candidates at ``m`` rows: before, launches of 8, one launch on its default config and on the table's
    8-row config for the shape (where it has one) and on one tile a warp (fewer registers)."""
    out = {"before": _before}
    if m > mm.LAUNCHES_MAX_ROWS:
        return {"dequant": _dequant, "launches32": _launches(mm.MMA_MAX_ROWS)}
    if m > mm.MMA_MAX_ROWS:
        return {**out, "dequant": _dequant, "gemv_w4": _gemv_w4}
    if m <= 8:
        out["mma"] = lambda x, qw, sc, zr, o: mm.w4_mma_accumulate(x, qw, sc, zr, 128, o)
        return out
    out["chunks8"] = _launches(8)
    cfgs = {"blocks": mm.default_mma_config(n, k, m)}
    if (n, k, 8) in mm.MMA_TABLE:
        cfgs["blocks_t8"] = mm.MMA_TABLE[n, k, 8]
    cfgs["blocks_1t"] = mm.guess_mma_config(n, k, rule="1")
    for name, cfg in cfgs.items():
        out[name] = lambda x, qw, sc, zr, o, cfg=cfg: mm.w4_mma_accumulate(x, qw, sc, zr, 128, o, config=cfg)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="7b")
    ap.add_argument("--rows", default="8,9,16,24,32,48,63")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    records = []
    print(f"{'shape':>12} {'rows':>5} {'kernel':>10} {'us':>9} {'rel err':>9}")
    for shape in args.shapes.split(","):
        for n, k in SHAPES[shape]:
            ring, _ = weight_ring(n, k, RING_BYTES)
            first = ring[0]
            ring = [quant.group_major(*w) for w in ring]  # the reference from the row-major first weight
            for m in rows:
                x, ref, out = projection_case(first, m)
                for name, fn in kernels(n, k, m).items():
                    err, ms = ring_check_time(lambda qw, sc, zr, fn=fn, x=x, out=out: fn(x, qw, sc, zr, out),
                                              ring, out, ref)
                    records.append({"shape": shape, "n": n, "k": k, "m": m, "kernel": name, "us": ms * 1e3,
                                    "rel_err": err})
                    print(f"{n:6d}x{k:<5d} {m:5d} {name:>10} {ms * 1e3:9.2f} {err:9.1e}", flush=True)
            del ring
            torch.cuda.empty_cache()
    Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": records}, indent=1))


if __name__ == "__main__":
    main()
