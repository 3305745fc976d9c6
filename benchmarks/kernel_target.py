"""A few launches of one decode kernel at a LLaMA-2-7B projection shape, for a profiler to attach to, e.g.

    ncu --section SpeedOfLight --section WarpStateStats --section Occupancy -k regex:_w4_mma -c 1 \
        python3 benchmarks/kernel_target.py --kernel mma --shape 22016x4096

``--kernel``: ``mma`` (runtime.kernels.w4_mma) or ``gemv`` (runtime.kernels.w4_gemv), at the table config or
``--config`` (the config's fields, comma-separated, e.g. ``2,2,8,1,0,1,2`` for an ``MmaConfig`` with two stages),
on the weights' ``--layout`` (``group``: the decode step's on CUDA, runtime.quant.group_major; ``row``); or
``attn``: the decode attention in its rope form at the table config, 32 heads of 128, one sequence of
``--context`` past tokens (``-k regex:_attn_mma``). CUDA only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converter.bench_kernels import random_weight
from runtime import quant
from runtime.kernels import w4_gemv, w4_mma


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", default="mma", choices=("mma", "gemv", "attn"))
    ap.add_argument("--shape", default="22016x4096")
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--config", default=None, help="the kernel's config fields, comma-separated (default: table)")
    ap.add_argument("--layout", default="group", choices=("group", "row"))
    ap.add_argument("--context", type=int, default=32768, help="--kernel attn: past tokens")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernel_target: needs a CUDA device")
    if args.kernel == "attn":
        from benchmarks.attn_bench import HEAD_DIM, HEADS, _inputs, attend
        from runtime.kernels import kv4

        inputs = _inputs(1, args.context, HEADS, HEADS, HEAD_DIM, "cuda", 1, rope=True)
        cfg = kv4.attn_config(1, HEADS, args.context + 1)
        for _ in range(args.calls):
            attend(inputs, inputs.cache.layers[0], torch.float16, cfg)
        torch.cuda.synchronize()
        return
    n, k = (int(v) for v in args.shape.split("x"))
    qw, s, z = random_weight(n, k)
    if args.layout == "group" and args.kernel == "mma":
        qw, s, z = quant.group_major(qw, s, z)
    x = torch.randn(args.m, k, device="cuda", dtype=torch.float16)
    out = torch.zeros(args.m, n, device="cuda")
    cfg = tuple(int(v) for v in args.config.split(",")) if args.config else None
    for _ in range(args.calls):
        if args.kernel == "mma":
            w4_mma.w4_mma_accumulate(x, qw, s, z, 128, out, config=cfg)
        else:
            w4_gemv.w4_gemv_accumulate(x, qw, s, z, 128, out, config=cfg)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
