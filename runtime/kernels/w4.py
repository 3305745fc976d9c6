"""INT4 group-wise weight matmul straight from the artifact's packed layout.

``y [M, N] = x [M, K] @ W^T (+ bias) (+ residual)`` with ``W ~ (q - zero) * scale`` per group of
``group_size`` input channels. ``qweight uint8 [N, ceil(K/2)]`` holds element ``2j`` in the low
nibble and ``2j + 1`` in the high nibble (:func:`runtime.quant.pack`), ``scales [N, G]`` (float16)
and ``zeros uint8 [N, G]``. ``K`` may end in a ragged group. One program computes a
``BLOCK_M x BLOCK_N`` tile, walking ``K`` one group at a time: the group's codes are dequantized
in registers (even and odd input channels separately) and multiplied on the tensor cores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting

SUPPORTED_GROUPS = (32, 64, 128, 256)


@triton.jit
def _w4_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, r_ptr, y_ptr, M, N, K,
               stride_xm, stride_qn, stride_sn, stride_zn, stride_rm, stride_ym,
               GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
    HALF: tl.constexpr = GROUP // 2
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rb = tl.arange(0, HALF)
    mask_m, mask_n = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, tl.cdiv(K, GROUP)):
        kb = g * HALF + rb  # packed byte index
        ke = 2 * kb  # even input channel
        x_rows = x_ptr + rm[:, None] * stride_xm
        xe = tl.load(x_rows + ke[None, :], mask=mask_m[:, None] & (ke < K)[None, :], other=0.0)
        xo = tl.load(x_rows + ke[None, :] + 1, mask=mask_m[:, None] & (ke + 1 < K)[None, :], other=0.0)
        qb = tl.load(qw_ptr + rn[None, :] * stride_qn + kb[:, None], mask=mask_n[None, :] & (ke < K)[:, None],
                     other=0)
        s = tl.load(s_ptr + rn * stride_sn + g, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rn * stride_zn + g, mask=mask_n, other=0).to(tl.float32)
        wl = (((qb & 15).to(tl.float32) - z[None, :]) * s[None, :]).to(xe.dtype)
        wh = (((qb >> 4).to(tl.float32) - z[None, :]) * s[None, :]).to(xe.dtype)
        acc += tl.dot(xe, wl)
        acc += tl.dot(xo, wh)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RES:
        acc += tl.load(r_ptr + rm[:, None] * stride_rm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


_DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=st)
    for bn, w, st in ((16, 2, 4), (32, 4, 4), (64, 4, 4), (32, 2, 6), (64, 8, 3))
]
_w4_tuned = triton.autotune(configs=_DECODE_CONFIGS, key=["N", "K", "BLOCK_M"])(_w4_kernel)


def check_w4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, in_features: int,
             group_size: int) -> None:
    if group_size not in SUPPORTED_GROUPS:
        raise ValueError(f"the INT4 kernel supports group sizes {SUPPORTED_GROUPS}, got {group_size}")
    if qweight.dtype != torch.uint8 or qweight.shape[1] != (in_features + 1) // 2:
        raise ValueError(f"qweight must be uint8 [out, {(in_features + 1) // 2}], "
                         f"got {qweight.dtype} {list(qweight.shape)}")
    if scales.shape != zeros.shape or scales.shape[0] != qweight.shape[0]:
        raise ValueError(f"scales {list(scales.shape)} and zeros {list(zeros.shape)} must both be [out, G]")


def _block_m(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


def w4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              group_size: int = 128, bias: torch.Tensor | None = None,
              residual: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] -> [..., N]`` in ``x.dtype`` (see the module docstring for the layout)."""
    k = x.shape[-1]
    check_w4(qweight, scales, zeros, k, group_size)
    n = qweight.shape[0]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    res = residual.reshape(m, n).contiguous() if residual is not None else y
    bm = _block_m(m)
    args = (x2, qweight, scales, zeros, bias if bias is not None else y, res, y, m, n, k,
            x2.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0), res.stride(0), y.stride(0))
    flags = dict(GROUP=group_size, BLOCK_M=bm, HAS_BIAS=bias is not None, HAS_RES=residual is not None)
    if interpreting() or bm > 16:
        bn = 64 if bm > 16 else 32
        _w4_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm))](*args, BLOCK_N=bn, **flags)
    else:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, bm))  # noqa: E731
        _w4_tuned[grid](*args, **flags)
    return y.reshape(*x.shape[:-1], n)
