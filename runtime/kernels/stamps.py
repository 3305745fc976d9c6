"""Per-program timestamps of the decode step's attention and output projection, for diagnosis (``WKVQ_STAMPS=1``).

Where a kernel's programs spend their time is what a profiler's per-kernel durations hide: when the attention's
programs start, get their query, finish their tiles and end (the combining one after the merge), and when the
output projection's programs start, get their input and end. With ``WKVQ_STAMPS=1`` the decode step's attention
(the tensor-core kernel) and output projection (the tensor-core GEMV) write ``%globaltimer`` (ns) at those points,
one row per program, into buffers kept per device (:func:`buffer`; every layer overwrites them: after a step they
hold the last layer's). ``benchmarks/stamps_probe.py`` reads and summarises them (:func:`summary`). Off by default:
the kernels then compile without the stamps (a constexpr), unchanged.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import kept, kept_zeros

STAMPS_ENV = "WKVQ_STAMPS"
POINTS = {"attn": ("start", "ready", "tiles", "end"), "o": ("start", "ready", "end")}  # per kind, in order


def enabled() -> bool:
    """Whether ``WKVQ_STAMPS`` is ``1``."""
    return os.environ.get(STAMPS_ENV, "") == "1"


def buffer(device, kind: str, programs: int) -> torch.Tensor:
    """The ``int64 [programs, len(POINTS[kind])]`` stamps of ``kind`` ("attn" or "o") on ``device``, kept for the
    process (grown where a launch has more programs; a CUDA graph captures the tensor it was given)."""
    return kept_zeros(f"stamps {kind}", device, programs, (len(POINTS[kind]),), torch.int64)


def read(device, kind: str) -> torch.Tensor | None:
    """The stamps of ``kind`` on ``device`` as the last launch left them (None where none was armed)."""
    buf = kept(f"stamps {kind}", device)
    return None if buf is None else buf.cpu()


@triton.jit
def stamp(ptr, program, POINT: tl.constexpr, NPOINTS: tl.constexpr):
    """Store ``%globaltimer`` at point ``POINT`` of row ``program`` of ``ptr`` (``int64 [programs, NPOINTS]``)."""
    t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [program], dtype=tl.int64, is_pure=False,
                                  pack=1)
    tl.store(ptr + program * NPOINTS + POINT, t)


def summary(t: torch.Tensor, points: tuple[str, ...], base: int | None = None) -> dict[str, dict[str, float]]:
    """Per point of ``t`` (``[programs, len(points)]`` ns; rows of zeros, programs that did not run, left out):
    the first, 10th, 50th and 90th percentile and last time in µs after ``base`` (default: the earliest start)."""
    t = t[(t != 0).all(dim=1)].double()
    if not len(t):
        return {}
    base = t[:, 0].min().item() if base is None else base
    out = {}
    for i, name in enumerate(points):
        v = (t[:, i] - base) / 1e3
        q = torch.quantile(v, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
        out[name] = {"first": v.min().item(), "p10": q[0].item(), "p50": q[1].item(), "p90": q[2].item(),
                     "last": v.max().item()}
    return out
