"""The tensor-core GEMV (``runtime.kernels.w4_mma``) on the artifact's row-major weight layout against the
group-major one (``runtime.quant.group_major``: each group's rows next to each other, so a warp's loads of one group
read one contiguous block instead of 64 bytes from each of 32 rows): graph-timed over a ring of distinct weights
larger than the L2, as ``benchmarks/w4_mma_bench.py``. Prints a table, writes a JSON record.

    python3 benchmarks/w4_layout_bench.py --json w4_layout.json [--ms 1,8] [--configs 1,2,1,1,0,1,0,16;4,2,16]
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
from converter import bench_kernels as bk
from runtime import quant
from runtime.kernels import w4_mma as mm

LAYOUTS = ("row", "group")


def bench_shape(n: int, k: int, ms, configs) -> list[dict]:
    ring, nbytes = bk.weight_ring(n, k, RING_BYTES)
    rings = {"row": ring, "group": [quant.group_major(*w) for w in ring]}
    rows = []
    for m in ms:
        x, ref, out = bk.projection_case(ring[0], m)
        for cfg in [mm.default_mma_config(n, k, m)] + configs:
            for layout in LAYOUTS:
                def launch(qw, sc, zr, cfg=cfg, x=x, out=out):
                    mm.w4_mma_accumulate(x, qw, sc, zr, 128, out, config=cfg)
                row = {"n": n, "k": k, "m": m, "layout": layout, "config": cfg.label(), "fields": list(cfg)}
                try:
                    err, t = bk.ring_check_time(launch, rings[layout], out, ref)
                except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
                    rows.append(dict(row, error=bk.error_line(e)))
                    print(f"  {n}x{k} m={m} {layout} {cfg.label()}: {bk.error_line(e)}", flush=True)
                    continue
                rows.append(dict(row, us=t * 1e3, GBps=nbytes / t / 1e6, rel_err=err))
    del rings, ring
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--ms", default="1,8")
    ap.add_argument("--configs", default="1,2,1,1,0,1,0,16;4,2,16;2,2,16;1,2,1,1,0,1,0,8",
                    help="MmaConfig fields, ';'-separated (the table's config of each shape is always timed)")
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in bk.SHAPES_7B))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("w4_layout_bench: needs a CUDA device")
    configs = [mm.MmaConfig(*(int(v) for v in c.split(","))) for c in args.configs.split(";") if c]
    ms = [int(m) for m in args.ms.split(",")]
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": torch.cuda.get_device_name(), "rows": []}
    print(f"{'shape':<14} {'M':>2} {'config':<16} {'row us':>8} {'group us':>9} {'row GB/s':>9} {'group GB/s':>10}"
          f" {'err row':>8} {'err group':>9}")
    for n, k in (tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")):
        rows = bench_shape(n, k, ms, configs)
        result["rows"] += rows
        Path(args.json).write_text(json.dumps(result, indent=1))
        by = {(r["m"], r["config"], r["layout"]): r for r in rows if "us" in r}
        for m, label in dict.fromkeys((r["m"], r["config"]) for r in rows):
            a, b = by.get((m, label, "row")), by.get((m, label, "group"))
            if a and b:
                print(f"{n}x{k:<9} {m:>2} {label:<16} {a['us']:8.2f} {b['us']:9.2f} {a['GBps']:9.0f} {b['GBps']:10.0f}"
                      f" {a['rel_err']:8.1e} {b['rel_err']:9.1e}", flush=True)


if __name__ == "__main__":
    main()
