"""Overlap between the decode step's kernels: programmatic dependent launch (PDL) and L2 prefetches.

The decode step is ~330 short kernels in a CUDA graph; each one's launch, its first trip to memory and its tail
cost ~1-3 us on an H200 in which no other kernel runs. Two Hopper features let the next kernel start early:

* **PDL** (``launch_pdl=True``, sm_90+): a kernel may be launched once every program of the kernel before it
  has called ``griddepcontrol.launch_dependents`` (:func:`launch_dependents`, first thing in every kernel here);
  before it reads anything that kernel (or any earlier one) wrote, and before it writes anything, it waits with
  ``griddepcontrol.wait`` (:func:`wait_prior`) for that kernel's completion and memory flush. What a kernel reads
  before the wait must not be written by the step at all: weights, norm weights, the rope tables, the KV cache
  slots of earlier tokens. Every kernel waits in every program before it ends, so one kernel's completion implies
  that of all earlier ones (a kernel without the wait could finish before its predecessor). Kernels launched
  without the attribute (torch's) start after their predecessor has completed, as before.
* **Bulk L2 prefetch** (:func:`prefetch_l2`, ``cp.async.bulk.prefetch.L2``): one thread of a program asks the L2
  for a contiguous range (16-byte aligned, a multiple of 16 bytes) without waiting for it; the program's own
  loads then find the lines in L2 or in flight. Issued before the wait, the weight reads of a GEMV start during
  the previous kernel's tail.

Both are off under Triton's interpreter (it runs neither PTX nor grid dependency control) and where the Triton or
the GPU lacks them. ``WKVQ_PDL`` picks the kernel kinds that use PDL (:func:`pdl_kinds`); by default
:data:`PDL_DEFAULT`, the projections, norms and SiLU product, and the tensor-core attention: each of them starts
while the one before ends, so the launch and the first loads of a GEMV overlap the small kernel before it. Measured
on an H200 (fifteenth session, runtime/kernels/NOTES.md round 13), 7B b1: 2.05 -> 1.90 ms a step at p2048, 3.31 ->
3.19-3.23 at p32768; PDL on only one side of those pairs ("gemv", or "norm,silu") was slower than none. The
attention is three kinds: "attn_mma" (the tensor-core kernel, ``kv4_mma``) and "attn" (the split kernel and the
separate combine kernel), launched early (the programs issue their first tiles, then wait), and "attn_trigger",
letting the next kernel (the output projection) launch early. Early-launched programs land where the kernel before
frees room first, up to the residency limit, which unbalanced the attention's one-wave grid (sixteenth session:
p32768 3.76 ms against 3.23); the tensor-core attention therefore caps its programs a multiprocessor when launched
early (``kv4_mma.even_cap``, ``kv4_mma.cap_bytes``): at the grid's even share it was -0.07 ms at 7B p32768 but +0.3
at 13B (the last programs waiting for a multiprocessor the GEMV before still held); one program over the even share,
-0.05 ms at p32768 at 7B and at 13B, p2048 within the spread (perhaps +0.02), batch 8 unchanged (twentieth
session): in the default since then.
The split kernel has no cap and stays off by default. "attn_trigger" alone is slower (3.88 ms), not measured why;
triggered after the tiles instead, or a few tiles before their end, it was not faster either (nineteenth and
twenty-first sessions; the knob, ``WKVQ_ATTN_TRIGGER_AT``, was removed in the twenty-third). With the per-head ready flags
(``runtime.fast`` fusion "heads", the default at 7B's shapes) the attention lets the output projection launch at
once, whose programs then wait for their heads' flags instead of ``griddepcontrol.wait``. The prefetches are config
fields of the kernels that issue them (``GemvConfig.l2``, ``AttnConfig.l2_ahead``). The tensor-core GEMV
(``w4_mma``) also loads its first two groups' weights into registers before its wait (``WKVQ_MMA_PRE``). A load
meant to run before the wait must be a coherent ``ld.global``: ptxas hoists the wait above ``.nc`` loads (and moves
``.nc`` loads placed after it above it).
"""

from __future__ import annotations

import functools
import os

import triton
import triton.language as tl

from . import cuda_major

PDL_ENV = "WKVQ_PDL"


@functools.cache
def _triton_has_pdl() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


def hopper(device) -> bool:
    """Whether ``device`` is a CUDA GPU of compute capability 9 or newer, outside Triton's interpreter (the
    PTX of :func:`prefetch_l2` and PDL need sm_90)."""
    return cuda_major(device) >= 9


KINDS = ("gemv", "attn_mma", "attn", "attn_trigger", "rope", "norm", "silu")  # the decode step's kernels
PDL_DEFAULT = frozenset({"gemv", "norm", "silu", "attn_mma"})  # WKVQ_PDL unset or empty


def pdl_kinds(value: str | None) -> frozenset[str]:
    """The kernel kinds that ``WKVQ_PDL`` turns PDL on for: unset or empty :data:`PDL_DEFAULT`, ``1`` all of
    :data:`KINDS`, ``0`` none, else a comma-separated list of them; anything else is a one-line ``ValueError``."""
    value = (value or "").strip()
    if value == "":
        return PDL_DEFAULT
    if value == "0":
        return frozenset()
    if value == "1":
        return frozenset(KINDS)
    kinds = frozenset(v.strip() for v in value.split(","))
    if not kinds <= set(KINDS):
        raise ValueError(f"{PDL_ENV}={value!r}: use 0, 1 or a comma-separated list of {', '.join(KINDS)}")
    return kinds


def pdl(device, kind: str) -> bool:
    """Whether a kernel of ``kind`` (one of :data:`KINDS`) on ``device`` launches with PDL: chosen by ``WKVQ_PDL``
    (:func:`pdl_kinds`), a Hopper GPU (:func:`hopper`) and a Triton with grid dependency control."""
    return kind in pdl_kinds(os.environ.get(PDL_ENV)) and hopper(device) and _triton_has_pdl()


def options(on: bool) -> dict:
    """Keyword arguments of a launch with PDL ``on`` or off: ``PDL`` (the kernels' constexpr) and ``launch_pdl``
    (Triton's launch option, only where it exists)."""
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


def launch_options(device, kind: str) -> dict:
    """:func:`options` of a launch of a ``kind`` kernel (:func:`pdl`)."""
    return options(pdl(device, kind))


@triton.jit
def launch_dependents(PDL: tl.constexpr):
    """Let the next kernel be launched (PDL) once every program of this one has got here."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def wait_prior(PDL: tl.constexpr):
    """Wait for the completion (and memory) of the kernels before this one (PDL); a no-op without PDL."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def prefetch_l2(ptr, nbytes):
    """Thread 0 of the program asks the L2 to fetch ``nbytes`` bytes from ``ptr`` (``ptr`` 16-byte aligned,
    ``nbytes`` a multiple of 16; nothing when 0). A hint: it returns at once, and its result (0) means nothing."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .pred p, q;
        .reg .u32 t;
        mov.u32 t, %tid.x;
        setp.eq.u32 p, t, 0;
        setp.ne.u32 q, $2, 0;
        and.pred p, p, q;
        @p cp.async.bulk.prefetch.L2.global [$1], $2;
        mov.u32 $0, 0;
        }""",
        constraints="=r,l,r", args=[ptr, nbytes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_range(base, lo, hi, limit, ELEM: tl.constexpr):
    """:func:`prefetch_l2` of elements ``[lo, min(hi, limit))`` (``ELEM`` bytes each) from ``base`` (pointer to
    element 0, 16-byte aligned with ``lo * ELEM``), the byte count rounded down to a multiple of 16."""
    n = (tl.maximum(tl.minimum(hi, limit) - lo, 0) * ELEM) // 16 * 16
    return prefetch_l2(base + lo, n.to(tl.int32))
