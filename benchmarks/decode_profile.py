"""Where one decode step's GPU time goes: the CUDA-graph decode step of a random LLaMA-shaped W4KV4 model
(the ``wkvq`` bench path, any projections backend) replayed under ``torch.profiler``, kernel time summed by
kernel name, per step.

    python3 benchmarks/decode_profile.py --shape 7b --prompt 2048 --projections gemv --json prof.json

Prints one row per kernel name (time per step, calls per step, share of the summed kernel time) and the
step's wall time by graph replay (the gap to the summed kernel time is launch latency and idle time between
kernels). CUDA only. With PDL (``WKVQ_PDL``, on by default for the projections, norms and SiLU) a kernel launched
early counts its wait for the one before in its time, and the summed time exceeds the wall time: run with
``WKVQ_PDL=0`` for each kernel's own cost (the record notes which it was).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converter.bench import SHAPES, llama_config  # noqa: E402
from converter.bench_paths import wkvq_decode_graph  # noqa: E402
from runtime.kernels import overlap  # noqa: E402


def kernel_times(prof, steps: int) -> list[dict]:
    """``[{name, us, calls}]`` per step, summed over the profiler's CUDA kernel events, slowest first."""
    us, calls = defaultdict(float), defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            us[ev.name] += ev.device_time / steps if hasattr(ev, "device_time") else ev.cuda_time / steps
            calls[ev.name] += 1
    return sorted(({"name": n, "us": us[n], "calls": calls[n] / steps} for n in us), key=lambda r: -r["us"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--projections", default="gemv", help="triton, gemlite or gemv")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("decode_profile: needs a CUDA device")
    _, _, graph, ids = wkvq_decode_graph(llama_config(args.shape), args.batch, args.prompt, 2 * args.steps,
                                         args.projections)
    for _ in range(3):
        graph.step(ids)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.steps):
        graph.step(ids)
    torch.cuda.synchronize()
    wall_us = (time.perf_counter() - t) / args.steps * 1e6
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            graph.step(ids)
        torch.cuda.synchronize()
    rows = kernel_times(prof, args.steps)
    total = sum(r["us"] for r in rows)
    pdl = sorted(k for k in overlap.KINDS if overlap.pdl("cuda", k))
    if pdl:
        print(f"PDL on for {', '.join(pdl)} (WKVQ_PDL): those kernels' times include their early launch's wait; "
              "WKVQ_PDL=0 gives each kernel's own cost")
    print(f"{args.shape} b{args.batch} p{args.prompt} projections={args.projections}: step {wall_us:.1f} us wall, "
          f"{total:.1f} us summed kernel time, {sum(r['calls'] for r in rows):.0f} kernels per step")
    print(f"{'us/step':>9} {'calls':>6} {'share':>6}  kernel")
    for r in rows:
        print(f"{r['us']:9.1f} {r['calls']:6.0f} {r['us'] / max(total, 1e-9):6.1%}  {r['name'][:110]}")
    Path(args.json).write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d %H:%M"), "device": torch.cuda.get_device_name(), "shape": args.shape,
         "batch": args.batch, "prompt": args.prompt, "projections": args.projections, "steps": args.steps,
         "pdl": pdl, "wall_us": wall_us, "kernel_us": total, "kernels": rows}, indent=1))


if __name__ == "__main__":
    main()
