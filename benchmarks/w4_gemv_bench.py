"""Graph-timed sweep of the row-streaming INT4 GEMV (:mod:`runtime.kernels.w4_gemv`) at the LLaMA-2-7B projection
shapes, against the split-K kernel (:func:`runtime.kernels.w4.w4_accumulate`) in the same table.

Every candidate of ``GEMV_CONFIGS`` (plus the shape's default config; ``split`` > 1: the split over ``K``, labels
ending in ``_x2`` / ``_x4``, recorded in the ``split`` field of each row) is timed by CUDA-graph replay over a ring of
distinct weights of >= 256 MB (H200 L2: 60 MB; every replay reads from HBM), as in ``benchmarks/gemlite_tune.py``,
and checked against the float64 product of the dequantized weight (relative error must stay < 1e-5: the kernel is
float32 throughout; < 1e-3 for ``--half``, float16 products). GB/s counts the packed codes + float16 scales + uint8
zeros read per call.

    python3 benchmarks/w4_gemv_bench.py --json benchmarks/results/w4_gemv_h200.json [--ms 1,4] [--quick] [--half]

Compiles run first in ``--workers`` processes (Triton's on-disk cache), so the timing loop only loads them. Prints
one table per shape and M (fastest first), and the best config per shape as ``GEMV_TABLE`` entries.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gemlite_tune import RING_BYTES  # noqa: E402
from converter.bench import copy_bandwidth  # noqa: E402
from converter.bench_kernels import (  # noqa: E402
    SHAPES_7B,
    error_line,
    in_workers,
    projection_case,
    random_weight,
    ring_check_time,
    weight_ring,
)
from runtime.kernels import w4  # noqa: E402
from runtime.kernels import w4_gemv as gv  # noqa: E402

log = logging.getLogger("w4_gemv_bench")
# error floors against the float64 reference: this GEMV accumulates in float32 (~1e-7 measured); the split-K
# kernel multiplies float16 codes by x on the tensor cores (1e-5 .. 4e-5 measured, runtime/kernels/NOTES.md)
MAX_REL_ERR = {"w4_gemv": 1e-5, "w4_splitk": 1e-4}
HALF_REL_ERR = 1e-3  # configs with ``half``: products in float16 (~3e-4 measured in Triton's interpreter)
QUICK = [gv.GemvConfig(*c) for c in ((16, 512, 4, 1, 1, False), (32, 512, 4, 1, 2, True), (32, 256, 2, 1, 2, True),
                                     (64, 512, 8, 1, 2, True), (64, 512, 4, 1, 4, True),
                                     # split over K (atomic float32 adds): 256 / 512 programs at N = 4096
                                     (32, 512, 4, 1, 2, True, 2), (32, 512, 4, 1, 2, True, 4),
                                     (16, 512, 4, 1, 1, False, 2))]


def _compile(shapes, ms, items) -> list[tuple[int, str]]:
    """Worker: run each config once at every shape and M (compiles into Triton's cache); (index, error text)."""
    bad = []
    for n, k in shapes:
        qw, sc, zr = random_weight(n, k)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            out = torch.zeros(m, n, device="cuda")
            for i, cfg in items:
                try:
                    gv.w4_gemv_accumulate(x, qw, sc, zr, 128, out, config=cfg)
                    torch.cuda.synchronize()
                except Exception as e:  # noqa: BLE001 - reported, the config is skipped
                    bad.append((i, f"{n}x{k} m={m}: {error_line(e)}"))
    return bad


def precompile(cands, shapes, ms, workers: int) -> dict[int, str]:
    return dict(in_workers(functools.partial(_compile, shapes, ms), list(enumerate(cands)), workers))


def bench_shape(n: int, k: int, ms, cands, failed: dict[int, str]) -> list[dict]:
    ring, nbytes = weight_ring(n, k, RING_BYTES)
    first = ring[0]
    rows = []
    for m in ms:
        x, ref, out = projection_case(first, m)
        default = gv.default_config(n, k, m, 128)
        runs = [("w4_gemv", "default", default)] + [("w4_gemv", "cand", c) for i, c in enumerate(cands)
                                                   if i not in failed]
        runs.append(("w4_splitk", "table", w4.SPLITK_TABLE.get((n, k), w4.SPLITK_DEFAULT)))
        for kernel, source, cfg in runs:
            if kernel == "w4_gemv":
                def launch(qw, sc, zr, cfg=cfg):
                    gv.w4_gemv_accumulate(x, qw, sc, zr, 128, out, config=cfg)
                label = gv.GemvConfig(*cfg).label()
            else:
                def launch(qw, sc, zr, cfg=cfg):
                    w4.w4_accumulate(x, qw, sc, zr, 128, out, config=cfg)
                label = "splitk_n{}_g{}_w{}".format(*cfg)
            try:
                err, t = ring_check_time(launch, ring, out, ref)
            except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
                log.warning("%s %s %dx%d m=%d: %s: %s", kernel, label, n, k, m, type(e).__name__, e)
                continue
            split = gv.GemvConfig(*cfg).split if kernel == "w4_gemv" else None
            half = kernel == "w4_gemv" and gv.half_math(gv.GemvConfig(*cfg), x.dtype)
            rows.append(dict(kernel=kernel, source=source, n=n, k=k, m=m, config=label, fields=list(cfg), split=split,
                             us=t * 1e3, GBps=nbytes / t / 1e6, rel_err=err,
                             ok=err < (HALF_REL_ERR if half else MAX_REL_ERR[kernel]),
                             ring=len(ring)))
        log.info("%dx%d done (%d weights in the ring, %d MB each)", n, k, len(ring), nbytes >> 20)
    del ring
    torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict], top: int) -> None:
    for n, k, m in sorted({(r["n"], r["k"], r["m"]) for r in rows if "n" in r}):
        sel = sorted((r for r in rows if (r.get("n"), r.get("k"), r.get("m")) == (n, k, m)), key=lambda r: r["us"])
        print(f"\n{n}x{k} M={m}            config                     us      GB/s   rel_err")
        shown = sel[:top] + [r for r in sel[top:] if r["source"] != "cand"]
        for r in shown:
            flag = "" if r["ok"] else "  WRONG"
            print(f"  {r['kernel']:10s} {r['source']:8s} {r['config']:28s} {r['us']:8.2f} {r['GBps']:8.0f}   "
                  f"{r['rel_err']:.1e}{flag}")


def best_table(rows: list[dict]) -> dict:
    best = {}
    for r in rows:
        if r.get("kernel") == "w4_gemv" and r["ok"]:
            key = (r["n"], r["k"], r["m"])
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="record: every config's time, error and the best per shape")
    ap.add_argument("--ms", default="1,4", help="rows of x, comma-separated (1..4)")
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES_7B), help="NxK,...")
    ap.add_argument("--workers", type=int, default=8, help="compile processes")
    ap.add_argument("--quick", action="store_true", help="a few configs only (a smoke test)")
    ap.add_argument("--top", type=int, default=12, help="rows per table")
    ap.add_argument("--half", action="store_true",
                    help="every candidate with float16 products (GemvConfig.half); the default row stays as it is")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import triton

    ms = [int(m) for m in args.ms.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    cands = QUICK if args.quick else list(gv.GEMV_CONFIGS)
    if args.half:
        cands = [c._replace(half=True) for c in cands]
    record = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "triton": triton.__version__, "candidates": len(cands), "ms": ms, "rows": []}
    t0 = time.time()
    failed = precompile(cands + [gv.default_config(n, k, m, 128) for n, k in shapes for m in ms], shapes, ms,
                        args.workers)
    failed = {i: msg for i, msg in failed.items() if i < len(cands)}
    log.info("compiled %d configs x %d shapes x %d M in %.0f s; %d failed", len(cands), len(shapes), len(ms),
             time.time() - t0, len(failed))
    record["failed"] = [dict(config=cands[i].label(), error=msg) for i, msg in failed.items()]
    record["rows"].append(dict(kernel="copy", GBps=copy_bandwidth() / 1e9))  # read + written, for scale
    log.info("copy: %.0f GB/s", record["rows"][-1]["GBps"])
    for n, k in shapes:
        record["rows"] += bench_shape(n, k, ms, cands, failed)
        Path(args.json).write_text(json.dumps(record, indent=1))
    best = best_table(record["rows"])
    # read back by runtime.kernels.w4_gemv.load_table (WKVQ_GEMV_TABLE=this file)
    record["best"] = {f"{n}x{k}x{m}": dict(config=r["fields"], split=r["split"], us=r["us"], GBps=r["GBps"])
                      for (n, k, m), r in best.items()}
    Path(args.json).write_text(json.dumps(record, indent=1))
    print(f"copy {record['rows'][0]['GBps']:.0f} GB/s")
    print_table(record["rows"][1:], args.top)
    print("\nGEMV_TABLE = {")
    for (n, k, m), r in sorted(best.items()):
        print(f"    ({n}, {k}, {m}): GemvConfig{tuple(r['fields'])},  # {r['us']:.2f} us, {r['GBps']:.0f} GB/s")
    print("}")
    for f in record["failed"]:
        log.info("failed: %s", f)


if __name__ == "__main__":
    main()
