"""Does asking the L2 for the next projection before a GEMV's PDL wait (``w4_mma`` ``NEXT``, ``WKVQ_NEXT_PF``) let
the weights stream across kernel boundaries? A chain of the 7B one-row projections without the attention and the
norms: o -> gate_up -> down -> qkv, per "layer" of a ring of layers (random group-major weights, ~102 MB a layer,
the ring out of the 50 MB L2), each GEMV asking for ``--mb`` MB of the next one (0: none), captured in one CUDA
graph with the step's PDL launches.

    python3 benchmarks/next_probe.py --mb 0,8,16,64 --json next_probe.json

Prints µs a layer (graph-timed, median of ``--reps``) and the layer's bytes over that time; writes the JSON record.
CUDA only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converter.bench import _time_ms
from converter.bench_kernels import random_weight
from runtime import quant
from runtime.kernels.w4_mma import NextWeight, w4_mma_accumulate

SHAPES = {"o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008), "qkv": (12288, 4096)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", default="0,8,16,64", help="comma-separated MB of the next projection; suffix l: evict_last")
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("next_probe: needs a CUDA GPU")
    torch.manual_seed(0)
    chain = []  # (name, (qweight, scales, zeros), x, out) in the order they run
    for _ in range(args.layers):
        for name, (n, k) in SHAPES.items():
            w = quant.group_major(*random_weight(n, k))
            x = torch.randn(1, k, device="cuda", dtype=torch.float16) * 0.01
            chain.append((name, w, x, torch.zeros(1, n, device="cuda")))
    layer_bytes = sum(sum(t.numel() * t.element_size() for t in w) for _, w, _, _ in chain) / args.layers
    rows = []
    print(f"{torch.cuda.get_device_name()}: o -> gate_up -> down -> qkv, {args.layers} layers of "
          f"{layer_bytes / 1e6:.1f} MB in a ring")
    print(f"{'next MB':>8} {'us/layer':>9} {'GB/s':>7}")
    for spec in args.mb.split(","):
        last = spec.endswith("l")
        mb = float(spec.rstrip("l"))

        def run(mb=mb, last=last):
            for i, (_, w, x, out) in enumerate(chain):
                nw = chain[(i + 1) % len(chain)][1]
                nxt = NextWeight(*nw, int(mb * (1 << 20)), last) if mb > 0 else None
                w4_mma_accumulate(x, *w, 128, out, next_weight=nxt)

        run()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run()
        us = _time_ms(g.replay, args.reps) * 1e3 / args.layers
        rows.append({"next_mb": mb, "evict_last": last, "us_per_layer": us, "GBps": layer_bytes / us / 1e3})
        print(f"{spec:>8} {us:9.2f} {layer_bytes / us / 1e3:7.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "layer_bytes": layer_bytes,
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
