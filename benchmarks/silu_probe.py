"""Isolates the fused SiLU epilogue's launches (w4_mma_accumulate's ``silu``) by config and shape: each launch
alone, synchronized, against the plain GEMV then misc.silu_mul; prints one line per case (ok, or which launch
failed). ``python3 benchmarks/silu_probe.py [i]``: only case ``i`` (a fault breaks the process's CUDA context, so
run each case in its own process, e.g. under ``compute-sanitizer``)."""

from __future__ import annotations

import functools
import sys

import torch

sys.path.insert(0, ".")
from runtime import quant
from runtime.kernels import misc, w4_mma
from tests.helpers import quantized_weight

# the stream-K grids are what this probe is about: let the launch plan take them (silu_ok refuses them)
w4_mma.silu_ok = functools.partial(w4_mma.silu_ok, stream_k=True)

CASES = [((1280, 576), (1, 2, 1, 1, False, 1, 0, 16), False), ((1280, 576), (1, 2, 8), False),
         ((1280, 576), (4, 2, 1, 1, False, 1, 0, 4), False), ((1280, 512), (1, 2, 1, 1, False, 1, 0, 16), False),
         ((1280, 512), (1, 2, 1, 1, False, 1, 0, 16), True), ((22016, 4096), None, True)]
for (n, k), cfg, group in CASES[int(sys.argv[1]):int(sys.argv[1]) + 1] if len(sys.argv) > 1 else CASES:
    qw, s, z, w = quantized_weight(n, k, 128, 1, "cuda")
    if group:
        qw, s, z = quant.group_major(qw, s, z)
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    label = f"n {n} k {k} cfg {cfg} group {group}"
    step = "plain"
    try:
        ref = misc.silu_mul(w4_mma.w4_mma_accumulate(x, qw, s, z, 128, torch.zeros(1, n, device="cuda"), config=cfg),
                            torch.float16)
        torch.cuda.synchronize()
        step = "fused"
        h = torch.empty(1, n // 2, device="cuda", dtype=torch.float16)
        flags = torch.zeros(n // 256, dtype=torch.int32, device="cuda")
        out = torch.zeros(1, n, device="cuda")
        w4_mma.w4_mma_accumulate(x, qw, s, z, 128, out, config=cfg, silu=(h, flags, torch.tensor([3], dtype=torch.int32,
                                                                                                  device="cuda")))
        torch.cuda.synchronize()
        err = ((h.float() - ref.float()).norm() / ref.float().norm()).item()
        print(f"{label}: ok err {err:.2e} flags {flags.unique().tolist()} out zero {not out.any().item()}", flush=True)
    except Exception as e:  # noqa: BLE001 - a probe: report and stop (the context is broken after a fault)
        print(f"{label}: {step} launch: {type(e).__name__} {str(e).splitlines()[0]}", flush=True)
        break
