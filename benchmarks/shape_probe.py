"""Probe: the CUDA decode step at real LLaMA shapes against the eager path (what ``tests/test_real_shapes.py``
asserts), printed for any cases: two layers of a random model of ``wkvq bench``'s shape, its 4-bit cache filled
with random codes and sized as the benchmark sizes it, three CUDA-graph steps against the eager path on the same
weights and cache. One line a case: the relative L2 errors of the logits.

    PYTHONPATH=$PWD python3 benchmarks/shape_probe.py [--cases 7b:1:2048,13b:8:32768] [--lost 0.0625] [--json probe.json]
"""

from __future__ import annotations

import argparse
import json
import time

from tests.helpers import real_shape_decode_errors
from tests.test_real_shapes import CASES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", help="shape:batch:prompt,... (default: the test's cases)")
    ap.add_argument("--lost", type=float, default=0.0,
                    help="redraw the key codes of this fraction of the past in the eager path's copy (the check's power)")
    ap.add_argument("--json", help="write the errors here")
    args = ap.parse_args()
    cases = ([(s, int(b), int(p)) for s, b, p in (c.split(":") for c in args.cases.split(","))]
             if args.cases else CASES)
    rows = []
    print(f"{'shape':5} {'batch':>5} {'prompt':>6}  errors (three steps)   seconds")
    for shape, batch, prompt in cases:
        start = time.time()
        errs = real_shape_decode_errors(shape, batch, prompt, lost=args.lost)
        rows.append({"shape": shape, "batch": batch, "prompt": prompt, "lost": args.lost, "errors": errs})
        print(f"{shape:5} {batch:5d} {prompt:6d}  " + " ".join(f"{e:.2e}" for e in errs)
              + f"   {time.time() - start:.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
