"""Graph-timed sweep of the tensor-core INT4 GEMV (:mod:`runtime.kernels.w4_mma`) at the LLaMA-2-7B projection
shapes, against the row-streaming GEMV's table config (:mod:`runtime.kernels.w4_gemv`, M <= 4) and the split-K
kernel (M = 8) in the same table.

Every candidate of ``MMA_CONFIGS`` is first checked against the float64 product of the dequantized weight (relative
error < 1e-4: exact products, float32 sums), then timed by CUDA-graph replay over a ring of distinct weights of
>= 256 MB (every replay reads HBM). GB/s counts the packed codes + float16 scales + uint8 zeros read per call.

    python3 benchmarks/w4_mma_bench.py --json w4_mma.json [--ms 1,8]

Prints one table per shape and M (fastest first) and the best config per shape as ``MMA_TABLE`` entries; the JSON
record's ``best`` table is what ``WKVQ_MMA_TABLE`` reads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gemlite_tune import RING_BYTES
from converter.bench_kernels import (
    SHAPES_7B,
    error_line,
    projection_case,
    ring_check_time,
    weight_ring,
)
from runtime import quant
from runtime.kernels import w4
from runtime.kernels import w4_gemv as gv
from runtime.kernels import w4_mma as mm

MAX_REL_ERR = {"w4_mma": 1e-4, "w4_gemv": 1e-3, "w4_splitk": 1e-4}


def bench_shape(n: int, k: int, ms, cands, layout: str = "group") -> list[dict]:
    """Rows of the sweep at one shape; ``layout``: the tensor-core GEMV's weights "group"-major (as the decode step
    holds them on CUDA, ``runtime.fast.weight_layout``) or "row"-major (the artifact's); the other kernels read
    row-major."""
    ring, nbytes = weight_ring(n, k, RING_BYTES)
    mma_ring = [quant.group_major(*w) for w in ring] if layout == "group" else ring
    first = ring[0]
    rows = []
    for m in ms:
        x, ref, out = projection_case(first, m)
        runs = [("w4_mma", c) for c in cands]
        if m <= gv.GEMV_MAX_ROWS:
            runs.append(("w4_gemv", gv.default_config(n, k, m, 128)))
        else:
            runs.append(("w4_splitk", w4.SPLITK_TABLE.get((n, k), w4.SPLITK_DEFAULT)))
        for kernel, cfg in runs:
            if kernel == "w4_mma":
                def launch(qw, sc, zr, cfg=cfg, x=x, out=out):
                    mm.w4_mma_accumulate(x, qw, sc, zr, 128, out, config=cfg)
                label = mm.MmaConfig(*cfg).label()
            elif kernel == "w4_gemv":
                def launch(qw, sc, zr, cfg=cfg, x=x, out=out):
                    gv.w4_gemv_accumulate(x, qw, sc, zr, 128, out, config=cfg)
                label = gv.GemvConfig(*cfg).label()
            else:
                def launch(qw, sc, zr, cfg=cfg, x=x, out=out):
                    w4.w4_accumulate(x, qw, sc, zr, 128, out, config=cfg)
                label = "splitk_n{}_g{}_w{}".format(*cfg)
            try:
                err, t = ring_check_time(launch, mma_ring if kernel == "w4_mma" else ring, out, ref)
            except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
                rows.append(dict(kernel=kernel, n=n, k=k, m=m, config=label, error=error_line(e)))
                print(f"  {kernel} {label} {n}x{k} m={m}: {error_line(e)}", flush=True)
                continue
            rows.append(dict(kernel=kernel, n=n, k=k, m=m, config=label, fields=list(cfg), us=t * 1e3,
                             GBps=nbytes / t / 1e6, rel_err=err, ok=err < MAX_REL_ERR[kernel], ring=len(ring)))
    torch.cuda.empty_cache()
    return rows


def best_table(rows: list[dict]) -> dict:
    best = {}
    for r in rows:
        if r.get("kernel") != "w4_mma" or not r.get("ok"):
            continue
        key = f"{r['n']}x{r['k']}x{r['m']}"
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = {"config": r["fields"], "us": r["us"], "GBps": r["GBps"]}
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", default="1,8")
    ap.add_argument("--json", required=True)
    ap.add_argument("--top", type=int, default=6)
    ap.add_argument("--splits", default="1,2,4,8,16", help="the candidates' splits to time")
    ap.add_argument("--warps", default="2,4,8")
    ap.add_argument("--tiles", default="1,2")
    ap.add_argument("--depths", default="1,2")
    ap.add_argument("--l2", default="0,1")
    ap.add_argument("--chains", default="1,2")
    ap.add_argument("--persist", default="0", help="0: the split grid; else stream-K programs a multiprocessor")
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES_7B))
    ap.add_argument("--layout", default="group", choices=("group", "row"), help="the w4_mma weights' layout")
    ap.add_argument("--configs", default="", help="extra configs, ';'-separated MmaConfig fields (e.g. 1,2,1,1,0,1,0,16)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("w4_mma_bench: needs a CUDA device")
    ms = [int(m) for m in args.ms.split(",")]
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": torch.cuda.get_device_name(), "rows": [],
              "layout": args.layout}
    pick = {f: {int(v) for v in getattr(args, f).split(",")} for f in ("splits", "warps", "tiles", "depths", "l2",
                                                                         "chains", "persist")}
    cands = [c for c in mm.MMA_CONFIGS if c.split in pick["splits"] and c.warps in pick["warps"]
             and c.tiles in pick["tiles"] and c.depth in pick["depths"] and int(c.l2) in pick["l2"]
             and c.chains in pick["chains"] and c.persist in pick["persist"]]
    cands += [mm.MmaConfig(*(int(v) for v in c.split(","))) for c in filter(None, args.configs.split(";"))]
    result["candidates"] = len(cands)
    for n, k in (tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")):
        result["rows"] += bench_shape(n, k, ms, cands, args.layout)
        result["best"] = best_table(result["rows"])
        Path(args.json).write_text(json.dumps(result, indent=1))
        for m in ms:
            sel = sorted((r for r in result["rows"] if (r["n"], r["k"], r["m"]) == (n, k, m) and "us" in r),
                         key=lambda r: r["us"])
            print(f"\n{n}x{k} M={m}   kernel    config              us     GB/s  rel_err ok", flush=True)
            shown = sel[:args.top] + [r for r in sel[args.top:] if r["kernel"] != "w4_mma"]
            for r in shown:
                print(f"  {r['kernel']:<10} {r['config']:<18} {r['us']:7.2f} {r['GBps']:7.0f} {r['rel_err']:8.1e} "
                      f"{'ok' if r['ok'] else 'BAD'}", flush=True)
            bad = [r["config"] for r in sel if not r["ok"]]
            if bad:
                print(f"  BAD (error over {MAX_REL_ERR}): {bad}")
    print("\nMMA_TABLE = {")
    for key, b in result["best"].items():
        n, k, m = key.split("x")
        print(f"    ({n}, {k}, {m}): MmaConfig{tuple(b['config'])},  # {b['us']:.2f} us, {b['GBps']:.0f} GB/s")
    print("}")


if __name__ == "__main__":
    main()
