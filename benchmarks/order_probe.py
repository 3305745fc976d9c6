"""Why the W4KV4 step can read longer queued than waited for (7B b16 p32768, thirty-eighth session: 20.96 ms waited,
22.35 queued): each step's own time in both modes, alternated in one process. Waited: every step synchronized, its
host-to-end time. Queued: the steps back to back, a CUDA event between each two, so each step's GPU time shows
and a drift over consecutive steps (clocks falling under a long full-bandwidth load) would too. Prints each
round's median and mean and the queued steps' first and last quarters.

    python3 benchmarks/order_probe.py --shape 7b --batch 16 --prompt 32768 --json order.json      # CUDA only
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converter.bench import SHAPES, llama_config


def waited(fn, steps: int) -> list[float]:
    """Each of ``steps`` calls of ``fn`` synchronized: ms from the call to the end of its work."""
    out = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def queued(fn, steps: int) -> list[float]:
    """``steps`` calls of ``fn`` back to back, an event between each two: each step's GPU ms."""
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    torch.cuda.synchronize()
    events[0].record()
    for e in events[1:]:
        fn()
        e.record()
    events[-1].synchronize()
    return [a.elapsed_time(b) for a, b in itertools.pairwise(events)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("order_probe: needs a CUDA device")
    from converter import bench_paths as bp

    _, _, graph, ids = bp.wkvq_decode_graph(llama_config(args.shape), args.batch, args.prompt,
                                            2 * args.rounds * (args.steps + 1) + 2)
    def step():
        graph.step(ids)

    step()
    rows = []
    print(f"{'round':>5} {'mode':>7} {'median':>9} {'mean':>9} {'first q':>9} {'last q':>9}")
    for r in range(args.rounds):
        for mode, fn in (("waited", waited), ("queued", queued)):
            times = fn(step, args.steps)
            q = max(1, len(times) // 4)
            row = {"round": r, "mode": mode, "ms": times, "median": statistics.median(times),
                   "mean": statistics.fmean(times), "first_quarter": statistics.fmean(times[:q]),
                   "last_quarter": statistics.fmean(times[-q:])}
            rows.append(row)
            print(f"{r:5d} {mode:>7} {row['median']:9.3f} {row['mean']:9.3f} {row['first_quarter']:9.3f} "
                  f"{row['last_quarter']:9.3f}", flush=True)
    Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "args": vars(args),
                                           "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
