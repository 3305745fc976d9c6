"""INT4 group-wise weight matmul straight from the artifact's packed layout.

``y [M, N] = x [M, K] @ W^T (+ bias) (+ residual)`` with ``W ~ (q - zero) * scale`` per group of
``group_size`` input channels. ``qweight uint8 [N, ceil(K/2)]`` holds element ``2j`` in the low
nibble and ``2j + 1`` in the high nibble (:func:`runtime.quant.pack`), ``scales [N, G]`` (float16)
and ``zeros uint8 [N, G]``. ``K`` may end in a ragged group. Three kernels:

* one row (decode at batch 1), ``K % 8 == 0``: :func:`_w4_gemv32_kernel`, the packed bytes read as
  int32 words, float32 FMA;
* one row otherwise: :func:`_w4_gemv_kernel` (bytes);
* several rows (batched decode, prefill): :func:`_w4_kernel`, a ``BLOCK_M x BLOCK_N`` tile per
  program walking ``K`` one group at a time, dequantized in registers and multiplied on the
  tensor cores.
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


@triton.jit
def _w4_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, r_ptr, y_ptr, M, N, K,
                    stride_xm, stride_qn, stride_sn, stride_zn, stride_rm, stride_ym,
                    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, KG: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
    """One row of ``x`` per program (rows fastest, so their programs share the weight tile in L2);
    ``KG`` groups per iteration as a ``[BLOCK_N, KG, GROUP/2]`` tile; float32 FMA, one reduction."""
    HALF: tl.constexpr = GROUP // 2
    m = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rn < N
    gi = tl.arange(0, KG)
    jj = gi[:, None] * HALF + tl.arange(0, HALF)[None, :]  # byte offset within the tile [KG, HALF]
    acc = tl.zeros((BLOCK_N, KG, HALF), dtype=tl.float32)
    n3 = rn[:, None, None]
    for g0 in range(0, tl.cdiv(K, GROUP), KG):
        kb = g0 * HALF + jj
        ke = 2 * kb
        xe = tl.load(x_ptr + m * stride_xm + ke, mask=ke < K, other=0.0).to(tl.float32)
        xo = tl.load(x_ptr + m * stride_xm + ke + 1, mask=ke + 1 < K, other=0.0).to(tl.float32)
        wmask = mask_n[:, None, None] & (ke < K)[None, :, :]
        qb = tl.load(qw_ptr + n3 * stride_qn + kb[None, :, :], mask=wmask, other=0)
        gmask = mask_n[:, None] & ((g0 + gi) * GROUP < K)[None, :]
        s = tl.load(s_ptr + rn[:, None] * stride_sn + g0 + gi[None, :], mask=gmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rn[:, None] * stride_zn + g0 + gi[None, :], mask=gmask, other=0).to(tl.float32)
        lo = (qb & 15).to(tl.float32) - z[:, :, None]
        hi = (qb >> 4).to(tl.float32) - z[:, :, None]
        acc += s[:, :, None] * (lo * xe[None, :, :] + hi * xo[None, :, :])
    y = tl.sum(tl.sum(acc, 2), 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_RES:
        y += tl.load(r_ptr + m * stride_rm + rn, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _w4_gemv32_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, r_ptr, y_ptr, M, N, K,
                      stride_xm, stride_qn, stride_sn, stride_zn, stride_rm, stride_ym,
                      GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
    """GEMV reading the packed bytes as int32 words (``qw_ptr``: ``int32 [N, K/8]``, word ``w`` holds
    input channels ``8w .. 8w+7`` at bits ``4i``; needs ``K % 8 == 0``). Codes become floats by the
    exponent trick (``0x4B000000 | q`` is ``2**23 + q``), not by int-to-float conversions."""
    m = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rn < N
    rw = tl.arange(0, BLOCK_W)
    lane = tl.arange(0, 8)
    shifts = (lane * 4)[None, None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_W, 8), dtype=tl.float32)
    kw = K // 8
    for w0 in range(0, kw, BLOCK_W):
        wi = w0 + rw
        wmask = mask_n[:, None] & (wi < kw)[None, :]
        words = tl.load(qw_ptr + rn[:, None] * stride_qn + wi[None, :], mask=wmask, other=0)
        g = (wi * 8) // GROUP
        s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :], mask=wmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rn[:, None] * stride_zn + g[None, :], mask=wmask, other=0).to(tl.float32)
        x = tl.load(x_ptr + m * stride_xm + wi[:, None] * 8 + lane[None, :], mask=(wi < kw)[:, None],
                    other=0.0).to(tl.float32)
        q = ((words[:, :, None] >> shifts) & 15) | 0x4B000000
        qz = q.to(tl.float32, bitcast=True) - (z + 8388608.0)[:, :, None]
        acc += qz * (s[:, :, None] * x[None, :, :])
    y = tl.sum(tl.sum(acc, 2), 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_RES:
        y += tl.load(r_ptr + m * stride_rm + rn, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=mask_n)


_GEMV32_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_W": bw}, num_warps=w, num_stages=st)
    for bn, bw, w, st in ((4, 64, 4, 3), (8, 64, 4, 3), (4, 128, 4, 2), (2, 128, 4, 3), (8, 32, 4, 4),
                          (16, 32, 4, 3), (4, 32, 2, 4))
]
_w4_gemv32_tuned = triton.autotune(configs=_GEMV32_CONFIGS, key=["M", "N", "K"])(_w4_gemv32_kernel)


GEMV_MAX_ROWS = 1
_GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "KG": kg}, num_warps=w, num_stages=st)
    for bn, kg, w, st in ((8, 8, 4, 3), (4, 8, 4, 3), (16, 4, 4, 3), (8, 4, 4, 4), (16, 8, 8, 2), (4, 16, 4, 2))
]
_w4_gemv_tuned = triton.autotune(configs=_GEMV_CONFIGS, key=["M", "N", "K"])(_w4_gemv_kernel)


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


def _no_block_m(flags: dict) -> dict:
    return {k: v for k, v in flags.items() if k != "BLOCK_M"}


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
    if m <= GEMV_MAX_ROWS and k % 8 == 0 and qweight.storage_offset() % 4 == 0:
        words = qweight.view(torch.int32)
        args = (x2, words, *args[2:11], words.stride(0), *args[12:])
        if interpreting():
            _w4_gemv32_kernel[(m, triton.cdiv(n, 4))](*args, BLOCK_N=4, BLOCK_W=16, **_no_block_m(flags))
        else:
            grid = lambda meta: (m, triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
            _w4_gemv32_tuned[grid](*args, **_no_block_m(flags))
    elif m <= GEMV_MAX_ROWS:
        if interpreting():
            _w4_gemv_kernel[(m, triton.cdiv(n, 8))](*args, BLOCK_N=8, KG=2, **_no_block_m(flags))
        else:
            grid = lambda meta: (m, triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
            _w4_gemv_tuned[grid](*args, **_no_block_m(flags))
    elif interpreting() or bm > 16:
        bn = 64 if bm > 16 else 32
        _w4_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm))](*args, BLOCK_N=bn, **flags)
    else:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, bm))  # noqa: E731
        _w4_tuned[grid](*args, **flags)
    return y.reshape(*x.shape[:-1], n)
