"""Small fused elementwise kernels of the decode step: RMSNorm and SiLU-gated product."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import check_row_buffer, overlap


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, y_ptr, N, eps, stride_x, stride_y, clr_ptr, clr_n, stride_clr,
                    BLOCK: tl.constexpr, PDL: tl.constexpr):
    overlap.launch_dependents(PDL)
    row, part = tl.program_id(0), tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    if part == 0:
        mask = cols < N
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)  # the norm weight: not written by the step
        overlap.wait_prior(PDL)
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        var = tl.sum(x * x, 0) / N
        y = (x * tl.rsqrt(var + eps)).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + row * stride_y + cols, w * y, mask=mask)
    else:  # block `part - 1` of row `row` of another buffer, by programs of its own (off the norm's chain)
        overlap.wait_prior(PDL)
        c = (part - 1) * BLOCK + cols
        tl.store(clr_ptr + row * stride_clr + c, tl.zeros((BLOCK,), clr_ptr.dtype.element_ty), mask=c < clr_n)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype=None,
            clear: torch.Tensor | None = None) -> torch.Tensor:
    """LLaMA RMSNorm of ``x [..., N]`` (float32 statistics, result in ``out_dtype``, default ``x.dtype``).
    ``clear``: a ``[rows, n]`` buffer (unit stride along ``n``; ``rows`` those of ``x``) to zero in the same launch,
    e.g. the decode step's ``qkv`` accumulation buffer, free again once the previous layer's attention has read it
    (:func:`runtime.kernels.kv4.rope_attention`); programs of their own zero it, a block of ``N`` each, beside
    the norm's one program a row (zeroing the 7B ``qkv`` in the norm's program took it from 1.6 to 2.6 us)."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    y = torch.empty(x2.shape, dtype=out_dtype or x.dtype, device=x.device)
    if clear is not None:
        check_row_buffer("clear", clear, x2.shape[0])
    clr = clear if clear is not None else y
    block = triton.next_power_of_2(n)
    clr_n = clr.shape[1] if clear is not None else 0
    _rmsnorm_kernel[(x2.shape[0], 1 + triton.cdiv(clr_n, block))](
        x2, weight, y, n, eps, x2.stride(0), y.stride(0), clr, clr_n, clr.stride(0), BLOCK=block,
        **overlap.launch_options(x.device, "norm"))
    return y.reshape(x.shape)


@triton.jit
def _silu_mul_kernel(gu_ptr, y_ptr, N, stride_gu, stride_y, BLOCK: tl.constexpr, CLEAR: tl.constexpr,
                     PDL: tl.constexpr):
    overlap.launch_dependents(PDL)
    overlap.wait_prior(PDL)
    row, blk = tl.program_id(0), tl.program_id(1)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + N + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (silu * u).to(y_ptr.dtype.element_ty), mask=mask)
    if CLEAR:  # each element is zeroed by the thread that read it
        tl.store(gu_ptr + row * stride_gu + cols, tl.zeros_like(g).to(gu_ptr.dtype.element_ty), mask=mask)
        tl.store(gu_ptr + row * stride_gu + N + cols, tl.zeros_like(u).to(gu_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor, out_dtype=None, clear: bool = False) -> torch.Tensor:
    """``silu(gate) * up`` of the fused ``gate_up [M, 2I]`` (gate first) -> ``[M, I]`` in ``out_dtype``
    (default ``gate_up.dtype``). ``clear``: zero ``gate_up`` after reading it (an accumulation buffer)."""
    m, n2 = gate_up.shape
    n = n2 // 2
    y = torch.empty(m, n, dtype=out_dtype or gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(m, triton.cdiv(n, block))](gate_up, y, n, gate_up.stride(0), y.stride(0), BLOCK=block,
                                                 CLEAR=clear, **overlap.launch_options(gate_up.device, "silu"))
    return y
