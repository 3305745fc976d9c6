"""Does the tensor-core GEMV's access pattern cost DRAM bandwidth? The same bytes read two ways by the same
read-only kernel (one-warp programs, ``--per-sm`` a multiprocessor, each an equal contiguous share of 2 KB blocks,
each block read as 16 bytes a lane and folded into a running xor so that nothing is optimised away):

* ``gemv``: the group-major layout's blocks in the GEMV's stream-K order (:mod:`runtime.kernels.w4_mma`: a share
  walks the groups of one 32-row block, whose blocks lie ``64 N`` bytes apart, then the next row block);
* ``seq``: the same shares over a layout in which a row block's groups are contiguous (``[N / 32, G, 32, 64]``):
  each program reads one sequential stream, the programs' streams one after another (a copy's pattern).

    python3 benchmarks/pattern_probe.py --shapes 22016x4096,12288x4096,4096x11008 --json pattern.json

Prints GB/s per shape and pattern (graph-timed, median of ``--reps``; a ring of buffers read in turn, so that
the reads come from DRAM) and writes the JSON record. CUDA only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converter.bench import _time_ms
from runtime.kernels import multiprocessors

BLOCK = 2048  # bytes: 32 rows x 64 bytes, one warp's codes of one group


@triton.jit
def _read_kernel(buf_ptr, out_ptr, RB, G, N, MODE: tl.constexpr, ROWS: tl.constexpr):
    """Program ``p`` reads blocks ``[p W / P, (p + 1) W / P)`` of the ``W = RB * G`` blocks (block ``w``: row block
    ``w // G``, group ``w % G``) at the byte offset its ``MODE`` gives; xors them into one value it stores."""
    p, P = tl.program_id(0), tl.num_programs(0)
    work = RB * G
    w = p * work // P
    w_end = (p + 1) * work // P
    idx = tl.arange(0, 128)  # 4 words (16 bytes) a lane
    acc = tl.zeros((128,), tl.int32)
    while w < w_end:
        rb = w // G
        g = w - rb * G
        if MODE == 0:  # group-major: group g's rows contiguous, row block rb at 64 * 32 rb within it
            base = g * (16 * N) + rb * (16 * ROWS)  # in words
        else:  # row-block-major: block w at 2048 w
            base = w * (16 * ROWS)
        ptrs = buf_ptr + tl.multiple_of(base, 512) + idx
        for h in tl.static_range(ROWS * 16 // 128):  # 512 bytes a step: 16 a lane
            acc = acc ^ tl.load(ptrs + h * 128, cache_modifier=".cg")
        w += 1
    tl.store(out_ptr + p * 128 + idx, acc)


RING = 6  # buffers read in turn: each was last read 5 launches (>= 110 MB) before, out of the 50 MB L2


def _graph_ms(fns, reps: int) -> float:
    """Median ms a launch of the ``fns`` (one per buffer of the ring) captured in turn in a CUDA graph."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for fn in fns:
            fn()
    return _time_ms(g.replay, reps) / len(fns)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="22016x4096,12288x4096,4096x11008")
    ap.add_argument("--per-sm", default="16", help="comma-separated one-warp programs a multiprocessor")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("pattern_probe: needs a CUDA GPU")
    sms = multiprocessors(torch.device("cuda"))
    rows = []
    print(f"{torch.cuda.get_device_name()}: GB/s of reading the codes in each pattern")
    print(f"{'shape':>12} {'per SM':>6} {'gemv':>8} {'seq':>8}")
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        g = k // 128
        rb = n // 32
        bufs = [torch.randint(-2**31, 2**31 - 1, (n * g * 16,), dtype=torch.int32, device="cuda")  # 64 n g bytes
                for _ in range(RING)]
        nbytes = bufs[0].numel() * 4
        for per in (int(v) for v in args.per_sm.split(",")):
            P = per * sms
            out = torch.empty(P * 128, dtype=torch.int32, device="cuda")
            res = {}
            for name, mode in (("gemv", 0), ("seq", 1)):
                def fn(buf, mode=mode, out=out, P=P, rb=rb, g=g, n=n):
                    _read_kernel[(P,)](buf, out, rb, g, n, MODE=mode, ROWS=32, num_warps=1)
                fns = [lambda buf=buf, fn=fn: fn(buf) for buf in bufs]
                res[name] = nbytes / (_graph_ms(fns, args.reps) * 1e-3) / 1e9
            rows.append({"n": n, "k": k, "per_sm": per, **{f"{key}_GBps": v for key, v in res.items()}})
            print(f"{shape:>12} {per:6d} {res['gemv']:8.0f} {res['seq']:8.0f}")
        del bufs
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
