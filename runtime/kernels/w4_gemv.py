"""INT4 GEMV for the decode step (1 to 4 rows of ``x``), streaming whole weight rows (optionally split over ``K``).

``out [M, N] (float32) += x [M, K] @ W^T`` with ``W = (q - zero) * scale`` per group of ``GROUP`` input
channels, on the artifact's layout as it is (:mod:`runtime.kernels.w4`): ``qweight uint8 [N, K/2]`` read as
int32 words, word ``w`` of a row holding channels ``8w .. 8w+7`` at bits ``4i``; ``scales float16 [N, G]``,
``zeros uint8 [N, G]``; ``K % 8 == 0``, the last group may be ragged.

A program owns ``BLOCK_N`` whole rows (in 1-4 sub-tiles, see :func:`_w4_gemv_rows_kernel`) and walks ``K`` in
steps of ``BLOCK_K`` channels (a power-of-two number of groups): per step one row-contiguous
``[rows, BLOCK_K/GROUP, GROUP/8]`` tile of words per sub-tile (16-byte loads, optionally prefetched one step
ahead), and for each row of ``x`` the ``BLOCK_K`` values it needs (read once per program and step, shared by
all its rows). The weights are read once for all ``M`` rows of ``x``; no shared memory in the loop. With
``GemvConfig.split > 1`` (accumulate mode only) ``split`` programs share a row block, each over a contiguous
range of the steps, and add their sums into the float32 output with ``atomic_add``: more programs (loads in
flight) for the 4096-row shapes, whose ``N / BLOCK_N`` programs are about one per SM.

Unpack (no int->float conversion, plain Triton, so Triton's interpreter runs the same code): code ``i`` of a
word becomes the float32 ``f = 2 + q/8`` by putting the nibble into mantissa bits 19..22 under the exponent
of 2.0 (``0x40000000 | q << 19``: one shift and one ``lop3`` per code). Then per word ``p = sum_i f_i x_i``
(one FMA per code and row of ``x``) and ``sx = sum_i x_i`` (shared by the program's rows), and since
``q - z = 8 (f - 2) - z``::

    sum_i (q_i - z) s x_i = 8 s (p - (2 + z/8) sx)

is added per word into a float32 accumulator ``[BLOCK_N, BLOCK_K/GROUP, GROUP/8]``, reduced across words once
after the ``K`` loop. ``f`` lies in ``[2, 4)``, so ``p`` and ``(2 + z/8) sx`` are of the size of the result:
no cancellation beyond float32 rounding (relative error ~1e-6 against the float32 dequantized product).

Float16 products (``GemvConfig.half``, the measured default at ``M = 1`` for float16 inputs): per word one
inline-PTX block makes ``(q - z) / 32`` of code pairs in ``f16x2`` registers and multiplies-adds them with
``x`` pairs (:func:`_half_dot`): ~3.6 instructions a code against ~4.6, relative error ~3e-4 (the float16 ``x``
itself carries 4.9e-4); other input dtypes keep the float32 form (:func:`half_math`).

Fused inputs (accumulate mode; off by default, and then the kernel's code is that of the plain GEMV): the
kernel can make its input from the decode step's float32 buffers itself, rounded to the activation dtype as
:mod:`runtime.kernels.misc` rounds it, which saves the decode step that kernel's launch and its round trip
through memory: the RMSNorm of the residual stream (each program first reads its rows of ``x`` whole for
their statistics; :func:`w4_gemv_accumulate_rmsnorm`) and ``silu(gate) * up`` of ``gate_up``
(:func:`w4_gemv_accumulate_silu`, which leaves ``gate_up`` for a later kernel to zero).

Entry points: :func:`gemv_ok`, :func:`w4_gemv_accumulate` (``out += x @ W^T``, the decode step's residual
stream), its fused forms above, :func:`w4_gemv` (``y = x @ W^T (+ bias) (+ residual)`` in a new tensor),
:class:`GemvW4` (the decode step's projections on this kernel: ``FastLlama.with_projections("gemv")``, bench
path ``wkvq-gemv``, the fused forms when ``WKVQ_FUSE`` asks and every qkv, gate_up and down projection is one). :data:`GEMV_CONFIGS` lists
(in :mod:`runtime.kernels.w4_gemv_config`, re-exported here) the candidates of a GPU sweep (``benchmarks/w4_gemv_bench.py``), :data:`GEMV_TABLE` the chosen config per
shape (7B shapes at M = 1 measured; elsewhere :func:`default_config` guesses).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import quant
from . import interpreting, overlap
from ..fast import W4Weight
from .w4_gemv_config import (GEMV_CONFIGS, GEMV_TABLE, GEMV_TABLE_F32, TABLE_ENV, GemvConfig, _fit,  # noqa: F401 - re-exported
                             default_config, l2_override, load_table, shared_memory_free)

GEMV_MAX_ROWS = 4
CODE_MASK = 0x00780000
HALF_MAGIC = 0x38003800  # float16 0.5 in both halves: the exponent under the codes of the half-precision form
# the input dtypes of the GEMV, and the roundings of the fused input transforms (_input_at)
TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _codes(words, I: tl.constexpr, code_mask):
    """Code ``I`` (bits ``4I .. 4I+3``) of each int32 word as the float32 ``2 + q/8`` (exact).

    ``code_mask`` is ``0x00780000`` passed as a kernel argument: as an immediate, ptxas rematerialises it
    with a ``MOV`` before every ``LOP3`` (one extra instruction per code)."""
    SH: tl.constexpr = 19 - 4 * I
    if SH >= 0:
        t = words << SH
    else:
        t = words >> (-SH)  # arithmetic shift: the sign bits land above the mask
    return ((t & code_mask) | 0x40000000).to(tl.float32, bitcast=True)


@triton.jit
def _sub_ptrs(qw_ptr, s_ptr, z_ptr, row0, N, stride_qn, stride_sn, stride_zn, cw, SUB_N: tl.constexpr):
    """Pointers of a sub-tile of ``SUB_N`` rows from ``row0``: (words ``[SUB_N, GPC, WPG]``, scale and zero
    rows ``[SUB_N, 1]``, row mask, row index)."""
    rn = row0 + tl.arange(0, SUB_N)
    qw_tile = qw_ptr + rn[:, None, None].to(tl.int64) * stride_qn + cw[None, :, :]
    return qw_tile, s_ptr + rn[:, None] * stride_sn, z_ptr + rn[:, None] * stride_zn, rn < N, rn


@triton.jit
def _load_tile(P, kw0, cw, rg, KWB, G, WPG: tl.constexpr, MASK_N: tl.constexpr, MASK_K: tl.constexpr):
    """Code words, scales and zero points of one step (``BLOCK_K`` channels from word ``kw0``) of a sub-tile;
    ``MASK_K``: words from ``KWB`` on and groups from ``G`` on read as 0."""
    qw_tile, s_rows, z_rows, mask_n, rn = P
    g = kw0 // WPG + rg  # [GPC]
    if MASK_K:
        wmask = mask_n[:, None, None] & ((kw0 + cw) < KWB)[None, :, :]
        gmask = mask_n[:, None] & (g < G)[None, :]
        words = tl.load(qw_tile + kw0, mask=wmask, other=0)
        s = tl.load(s_rows + g[None, :], mask=gmask, other=0.0)
        z = tl.load(z_rows + g[None, :], mask=gmask, other=0)
    elif MASK_N:
        words = tl.load(qw_tile + kw0, mask=mask_n[:, None, None], other=0)
        s = tl.load(s_rows + g[None, :], mask=mask_n[:, None], other=0.0)
        z = tl.load(z_rows + g[None, :], mask=mask_n[:, None], other=0)
    else:
        words = tl.load(qw_tile + kw0)
        s = tl.load(s_rows + g[None, :])
        z = tl.load(z_rows + g[None, :])
    return words, s, z


@triton.jit
def _input_at(xp, wp, r, K, xmask, MASK_K: tl.constexpr, INPUT: tl.constexpr, DT: tl.constexpr):
    """The GEMV input at ``xp`` (float32), as :mod:`runtime.kernels.misc` would have written it in ``DT``:
    ``INPUT`` 0: ``x`` itself; 1 (rmsnorm): ``DT(w * DT(x r))`` with the row's ``r = rsqrt(mean(x^2) + eps)``
    and the norm weight at ``wp``; 2 (silu_mul): ``DT(DT(silu(g)) * u)`` with ``g = x`` and ``u`` at ``xp + K``."""
    if MASK_K:
        v = tl.load(xp, mask=xmask, other=0.0).to(tl.float32)
    else:
        v = tl.load(xp).to(tl.float32)
    if INPUT == 1:
        if MASK_K:
            w = tl.load(wp, mask=xmask, other=0.0).to(tl.float32)
        else:
            w = tl.load(wp).to(tl.float32)
        v = ((v * r).to(DT).to(tl.float32) * w).to(DT).to(tl.float32)
    elif INPUT == 2:
        if MASK_K:
            u = tl.load(xp + K, mask=xmask, other=0.0).to(tl.float32)
        else:
            u = tl.load(xp + K).to(tl.float32)
        v = ((v / (1.0 + tl.exp(-v))).to(DT).to(tl.float32) * u).to(DT).to(tl.float32)
    return v


@triton.jit
def _load_x(x_row, kw, KW, w_ptr, r, MASK_K: tl.constexpr, INPUT: tl.constexpr, DT: tl.constexpr):
    """The inputs at channels ``8 kw + i`` (``[GPC, WPG]`` each, float32, see :func:`_input_at`) and their sums
    over ``i``."""
    xp, wp, K = x_row + 8 * kw, w_ptr + 8 * kw, 8 * KW
    xmask = kw < KW  # used only if MASK_K
    x0 = _input_at(xp + 0, wp + 0, r, K, xmask, MASK_K, INPUT, DT)
    x1 = _input_at(xp + 1, wp + 1, r, K, xmask, MASK_K, INPUT, DT)
    x2 = _input_at(xp + 2, wp + 2, r, K, xmask, MASK_K, INPUT, DT)
    x3 = _input_at(xp + 3, wp + 3, r, K, xmask, MASK_K, INPUT, DT)
    x4 = _input_at(xp + 4, wp + 4, r, K, xmask, MASK_K, INPUT, DT)
    x5 = _input_at(xp + 5, wp + 5, r, K, xmask, MASK_K, INPUT, DT)
    x6 = _input_at(xp + 6, wp + 6, r, K, xmask, MASK_K, INPUT, DT)
    x7 = _input_at(xp + 7, wp + 7, r, K, xmask, MASK_K, INPUT, DT)
    sx = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
    return x0, x1, x2, x3, x4, x5, x6, x7, sx


@triton.jit
def _rstd(x_row, K, eps, RBLOCK: tl.constexpr):
    """``rsqrt(mean(x^2) + eps)`` of a float32 row of ``K`` values (as :func:`runtime.kernels.misc.rmsnorm`;
    the sum in another order: float32 rounding apart)."""
    acc = tl.zeros((RBLOCK,), dtype=tl.float32)
    for k0 in range(0, K, RBLOCK):
        c = k0 + tl.arange(0, RBLOCK)
        v = tl.load(x_row + c, mask=c < K, other=0.0).to(tl.float32)
        acc += v * v
    return tl.rsqrt(tl.sum(acc, 0) / K + eps)


@triton.jit
def _fma_row(acc, f, xs, s8, zz):
    """``acc += 8 s (sum_i f_i x_i - (2 + z/8) sum_i x_i)`` (per word) for one row of ``x``."""
    p = f[0] * xs[0][None, :, :]
    p += f[1] * xs[1][None, :, :]
    p += f[2] * xs[2][None, :, :]
    p += f[3] * xs[3][None, :, :]
    p += f[4] * xs[4][None, :, :]
    p += f[5] * xs[5][None, :, :]
    p += f[6] * xs[6][None, :, :]
    p += f[7] * xs[7][None, :, :]
    return acc + s8 * (p - zz * xs[8][None, :, :])


@triton.jit
def _pair(a, b):
    """Two float32 values that are float16 numbers as one int32 holding the float16 pair ``(a, b)`` (``a`` in the
    low half), the ``f16x2`` operand of :func:`_half_dot`."""
    lo = a.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return lo | (b.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) << 16)


@triton.jit
def _half_code(words, I: tl.constexpr):
    """Code ``I`` of each word as the float16 ``0.5 + q/32`` (exact), computed in plain Triton."""
    return (((words >> (4 * I)) & 15).to(tl.float32) * 0.03125 + 0.5).to(tl.float16)


@triton.jit
def _half_chain(words, xs, zh, I: tl.constexpr):
    """Plain-Triton model of one half of :func:`_half_dot`'s ``f16x2`` chain: ``(f - zh) x`` of codes ``I .. I+3``,
    the differences exact, each product-sum rounded to float16 (the GPU's ``fma.rn`` rounds once; this model
    rounds the float32 result, the same value unless that float32 sum itself rounded)."""
    a = ((_half_code(words, I) - zh).to(tl.float32) * xs[I][None, :, :]).to(tl.float16)
    for j in tl.static_range(1, 4):
        a = ((_half_code(words, I + j) - zh).to(tl.float32) * xs[I + j][None, :, :] + a.to(tl.float32)).to(tl.float16)
    return a.to(tl.float32)


@triton.jit
def _half_dot(words, xs, xh, zh, zh2, USE_ASM: tl.constexpr):
    """``p = sum_i (f_i - zh) x_i = sum_i (q_i - z) x_i / 32`` per word, in float16 arithmetic with a float32
    result: ``f_i = 0.5 + q_i/32``, ``zh = 0.5 + z/32`` (float16 ``[SUB_N, GPC, 1]``; ``zh2`` the same as an
    ``f16x2`` pair in an int32).

    On the GPU one inline-PTX block per word: code pairs ``(i, i+4)`` land in mantissa bits 6..9 of the two
    halves of a register under the exponent of 0.5 (a shift and one ``lop3`` per pair: ``0x38003800 |
    (t & 0x03C003C0)``, the constant ``xh[4]``), ``sub.f16x2`` of ``zh`` (exact: both are multiples of 1/32 in
    ``[0.5, 1)``), then four ``fma.rn.f16x2`` with the ``x`` pairs ``xh`` (:func:`_pair`; codes 0-3 in the low
    halves, 4-7 in the high) and the two halves converted and added in float32: ~2.4 arithmetic instructions per
    code against ~3.3 for the float32 form (the whole loop in the local sm_90 SASS: 3.6 against 4.6). Subtracting
    before the products keeps the float16 rounding relative to the result's terms (a product of ``f`` with ``x``
    and a float32 ``- zh sum x`` measured 2e-3 relative error, this 3-4e-4); ``|f - zh| < 0.5`` keeps each half's
    four products under ``2 max|x|`` (float16 range). Triton's interpreter cannot run PTX: it runs
    :func:`_half_chain`'s model."""
    if USE_ASM:
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t, h, a;
            .reg .b16 lo, hi;
            .reg .f32 fl, fh;
            shl.b32 t, $1, 6;
            lop3.b32 h, t, 0x03C003C0, $6, 0xEA;
            sub.rn.f16x2 h, h, $7;
            mul.rn.f16x2 a, h, $2;
            shl.b32 t, $1, 2;
            lop3.b32 h, t, 0x03C003C0, $6, 0xEA;
            sub.rn.f16x2 h, h, $7;
            fma.rn.f16x2 a, h, $3, a;
            shr.u32 t, $1, 2;
            lop3.b32 h, t, 0x03C003C0, $6, 0xEA;
            sub.rn.f16x2 h, h, $7;
            fma.rn.f16x2 a, h, $4, a;
            shr.u32 t, $1, 6;
            lop3.b32 h, t, 0x03C003C0, $6, 0xEA;
            sub.rn.f16x2 h, h, $7;
            fma.rn.f16x2 a, h, $5, a;
            mov.b32 {lo, hi}, a;
            cvt.f32.f16 fl, lo;
            cvt.f32.f16 fh, hi;
            add.f32 $0, fl, fh;
            }""",
            constraints="=f,r,r,r,r,r,r,r",
            args=[words, xh[0][None, :, :], xh[1][None, :, :], xh[2][None, :, :], xh[3][None, :, :], xh[4], zh2],
            dtype=tl.float32, is_pure=True, pack=1)
    else:
        return _half_chain(words, xs, zh, 0) + _half_chain(words, xs, zh, 4)


@triton.jit
def _half_row(acc, words, xs, xh, s32, zh, zh2, USE_ASM: tl.constexpr):
    """``acc += 32 s sum_i (f_i - zh) x_i`` (per word) for one row of ``x``, in float16 (:func:`_half_dot`)."""
    return acc + s32 * _half_dot(words, xs, xh, zh, zh2, USE_ASM)


@triton.jit
def _sub_step(A, T, X0, X1, X2, X3, H0, H1, H2, H3, code_mask, M: tl.constexpr, HALF: tl.constexpr,
              USE_ASM: tl.constexpr):
    """Accumulators ``A`` (one per row of ``x``) of a sub-tile after one step with tile ``T`` (``HALF``: products
    in float16, ``H*`` the rows' ``x`` pairs, :func:`_half_row`)."""
    words, s, z = T
    if HALF:
        s32 = (s.to(tl.float32) * 32.0)[:, :, None]  # [SUB_N, GPC, 1]
        zh = (z.to(tl.float32) * 0.03125 + 0.5).to(tl.float16)  # exact
        zh2 = _pair(zh, zh)[:, :, None]
        zh = zh[:, :, None]
        a0 = _half_row(A[0], words, X0, H0, s32, zh, zh2, USE_ASM)
        a1, a2, a3 = A[1], A[2], A[3]
        if M > 1:
            a1 = _half_row(a1, words, X1, H1, s32, zh, zh2, USE_ASM)
        if M > 2:
            a2 = _half_row(a2, words, X2, H2, s32, zh, zh2, USE_ASM)
        if M > 3:
            a3 = _half_row(a3, words, X3, H3, s32, zh, zh2, USE_ASM)
        return a0, a1, a2, a3
    s8 = (s.to(tl.float32) * 8.0)[:, :, None]  # [SUB_N, GPC, 1]
    zz = (z.to(tl.float32) * 0.125 + 2.0)[:, :, None]
    f = (_codes(words, 0, code_mask), _codes(words, 1, code_mask), _codes(words, 2, code_mask),
         _codes(words, 3, code_mask), _codes(words, 4, code_mask), _codes(words, 5, code_mask),
         _codes(words, 6, code_mask), _codes(words, 7, code_mask))
    a0 = _fma_row(A[0], f, X0, s8, zz)
    a1, a2, a3 = A[1], A[2], A[3]
    if M > 1:
        a1 = _fma_row(a1, f, X1, s8, zz)
    if M > 2:
        a2 = _fma_row(a2, f, X2, s8, zz)
    if M > 3:
        a3 = _fma_row(a3, f, X3, s8, zz)
    return a0, a1, a2, a3


@triton.jit
def _pairs(X, magic, HALF: tl.constexpr):
    """The ``x`` pairs of one row for :func:`_half_dot` (``(x_i, x_{i+4})``, ``i < 4``) and the ``lop3`` constant
    ``magic`` (``0x38003800``); placeholders unless ``HALF``."""
    if HALF:
        return _pair(X[0], X[4]), _pair(X[1], X[5]), _pair(X[2], X[6]), _pair(X[3], X[7]), magic
    else:  # same types (Triton unifies the branches' returns); unused, so compiled away
        p = X[0].to(tl.int32, bitcast=True)
        return p, p, p, p, magic


@triton.jit
def _step(A0, A1, A2, A3, T0, T1, T2, T3, x_ptr, stride_xm, kw, KW, code_mask, w_ptr, R, magic,
          M: tl.constexpr, SUB: tl.constexpr, MASK_K: tl.constexpr, INPUT: tl.constexpr, DT: tl.constexpr,
          HALF: tl.constexpr, USE_ASM: tl.constexpr):
    """One step for all sub-tiles and rows of ``x`` (``x`` read once per program and step; ``R``: the rows'
    ``rsqrt(mean(x^2) + eps)`` when ``INPUT == 1``; ``HALF``: the rows' ``x`` pairs made once per step)."""
    X0 = _load_x(x_ptr, kw, KW, w_ptr, R[0], MASK_K, INPUT, DT)
    X1, X2, X3 = X0, X0, X0
    if M > 1:
        X1 = _load_x(x_ptr + stride_xm, kw, KW, w_ptr, R[1], MASK_K, INPUT, DT)
    if M > 2:
        X2 = _load_x(x_ptr + 2 * stride_xm, kw, KW, w_ptr, R[2], MASK_K, INPUT, DT)
    if M > 3:
        X3 = _load_x(x_ptr + 3 * stride_xm, kw, KW, w_ptr, R[3], MASK_K, INPUT, DT)
    H0 = _pairs(X0, magic, HALF)
    H1, H2, H3 = H0, H0, H0
    if M > 1:
        H1 = _pairs(X1, magic, HALF)
    if M > 2:
        H2 = _pairs(X2, magic, HALF)
    if M > 3:
        H3 = _pairs(X3, magic, HALF)
    A0 = _sub_step(A0, T0, X0, X1, X2, X3, H0, H1, H2, H3, code_mask, M, HALF, USE_ASM)
    if SUB > 1:
        A1 = _sub_step(A1, T1, X0, X1, X2, X3, H0, H1, H2, H3, code_mask, M, HALF, USE_ASM)
    if SUB > 2:
        A2 = _sub_step(A2, T2, X0, X1, X2, X3, H0, H1, H2, H3, code_mask, M, HALF, USE_ASM)
    if SUB > 3:
        A3 = _sub_step(A3, T3, X0, X1, X2, X3, H0, H1, H2, H3, code_mask, M, HALF, USE_ASM)
    return A0, A1, A2, A3


@triton.jit
def _load_tiles(P0, P1, P2, P3, kw0, cw, rg, KWB, G, WPG: tl.constexpr, SUB: tl.constexpr, MASK_N: tl.constexpr,
                MASK_K: tl.constexpr):
    T0 = _load_tile(P0, kw0, cw, rg, KWB, G, WPG, MASK_N, MASK_K)
    T1, T2, T3 = T0, T0, T0
    if SUB > 1:
        T1 = _load_tile(P1, kw0, cw, rg, KWB, G, WPG, MASK_N, MASK_K)
    if SUB > 2:
        T2 = _load_tile(P2, kw0, cw, rg, KWB, G, WPG, MASK_N, MASK_K)
    if SUB > 3:
        T3 = _load_tile(P3, kw0, cw, rg, KWB, G, WPG, MASK_N, MASK_K)
    return T0, T1, T2, T3


@triton.jit
def _finish(acc, m, rn, mask_n, b_ptr, r_ptr, y_ptr, stride_rm, stride_ym,
            ACCUMULATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, SPLIT: tl.constexpr):
    y = tl.sum(tl.sum(acc, 2), 1)  # [SUB_N]
    yp = y_ptr + m * stride_ym + rn
    if SPLIT > 1:  # float32 out, accumulate mode, no residual (see _launch): partial sums added atomically
        if HAS_BIAS:
            if tl.program_id(1) == 0:  # once per row: by the program of the first range
                y += tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
        tl.atomic_add(yp, y, mask=mask_n, sem="relaxed")
    else:
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
        if HAS_RES:
            y += tl.load(r_ptr + m * stride_rm + rn, mask=mask_n, other=0.0).to(tl.float32)
        if ACCUMULATE:  # the program owns these rows: a plain read-modify-write
            y += tl.load(yp, mask=mask_n, other=0.0)
        tl.store(yp, y.to(y_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _finish_sub(A, P, b_ptr, r_ptr, y_ptr, stride_rm, stride_ym, M: tl.constexpr, ACCUMULATE: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, SPLIT: tl.constexpr):
    rn, mask_n = P[4], P[3]
    _finish(A[0], 0, rn, mask_n, b_ptr, r_ptr, y_ptr, stride_rm, stride_ym, ACCUMULATE, HAS_BIAS, HAS_RES, SPLIT)
    if M > 1:
        _finish(A[1], 1, rn, mask_n, b_ptr, r_ptr, y_ptr, stride_rm, stride_ym, ACCUMULATE, HAS_BIAS, HAS_RES, SPLIT)
    if M > 2:
        _finish(A[2], 2, rn, mask_n, b_ptr, r_ptr, y_ptr, stride_rm, stride_ym, ACCUMULATE, HAS_BIAS, HAS_RES, SPLIT)
    if M > 3:
        _finish(A[3], 3, rn, mask_n, b_ptr, r_ptr, y_ptr, stride_rm, stride_ym, ACCUMULATE, HAS_BIAS, HAS_RES, SPLIT)


@triton.jit
def _w4_gemv_rows_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, r_ptr, y_ptr, w_ptr, N, KW, G, code_mask, magic, eps,
                         stride_xm, stride_qn, stride_sn, stride_zn, stride_rm, stride_ym,
                         M: tl.constexpr, GROUP: tl.constexpr, SUB_N: tl.constexpr, SUB: tl.constexpr,
                         BLOCK_K: tl.constexpr, MASK_N: tl.constexpr, HAS_TAIL: tl.constexpr,
                         PREFETCH: tl.constexpr, ACCUMULATE: tl.constexpr, HAS_BIAS: tl.constexpr,
                         HAS_RES: tl.constexpr, SPLIT: tl.constexpr, INPUT: tl.constexpr, DT: tl.constexpr,
                         RBLOCK: tl.constexpr, HALF: tl.constexpr, USE_ASM: tl.constexpr, L2: tl.constexpr,
                         PDL: tl.constexpr):
    """``y[m, rows] (+)= x[m] @ W[rows]^T`` for ``m < M`` (``M <= 4``); a program owns ``SUB`` (1..4) sub-tiles
    of ``SUB_N`` consecutive rows.

    ``qw_ptr``: int32 words, ``KW = K / 8`` per row; ``code_mask``: ``0x00780000`` (see :func:`_codes`).
    ``HAS_TAIL``: ``K % BLOCK_K != 0``: every step masks along ``K`` (~10% more instructions; a separate masked
    last step instead doubled the registers); ``MASK_N``: ``N`` is not a multiple of the program's rows.
    ``PREFETCH``: the words, scales and zeros of step ``i + 1`` are loaded before step ``i`` is computed (twice
    the registers for them, loads in flight during the arithmetic); the step sits behind an always-true branch,
    without which ptxas moves those loads to the end of the loop body (after the arithmetic, i.e. no prefetch).

    Sub-tiles (not one ``[SUB * SUB_N, ...]`` tile) because Triton gives a load of fewer elements than the
    program has threads the layout of its user (the ``x`` and scale loads below), and converts the layout
    of larger ones through shared memory with a barrier per step; ``SUB_N * BLOCK_K / GROUP`` and
    ``BLOCK_K / 8`` under ``32 * num_warps`` keep every step free of shared memory. ``x`` is read once per
    step for all sub-tiles.

    ``SPLIT > 1``: program ``(i, j)`` walks only range ``j`` of the ``cdiv(KW, BW)`` steps (contiguous, sizes
    differing by at most one; empty when there are fewer steps than ranges) and adds its sums into ``y`` with
    ``atomic_add`` (bias by range 0 only). The ranges are whole steps, so the ``HAS_TAIL`` masks (against
    ``KW``) stay as they are: only the last step of the last range reaches past ``K``. The prefetch stays
    inside the range (its last step re-reads its own words; an empty range loads the last step of ``K``, in
    bounds or masked, and adds zeros). ``SPLIT == 1`` compiles the code of the plain kernel.

    ``INPUT`` (fused input transforms, :func:`_input_at`; 0 compiles the code of the plain kernel): 1: ``x_ptr``
    is the float32 residual stream and the input its RMSNorm with the weight at ``w_ptr`` (each program first
    reads its rows of ``x`` whole for their ``rsqrt(mean(x^2) + eps)``, in chunks of ``RBLOCK``: 16 KB a row at
    ``K = 4096``, from L2); 2: ``x_ptr`` is the float32 ``gate_up [M, 2K]`` and the input ``silu(gate) * up``.
    Both rounded to ``DT`` as :mod:`runtime.kernels.misc` rounds its outputs.

    ``PDL`` (:mod:`runtime.kernels.overlap`): the kernel lets the next one launch at once, and waits for the one
    before it only after its weight reads have been issued (the first step's tiles with ``PREFETCH``, the L2
    prefetches with ``L2``): nothing it reads before that is written by the decode step. ``L2``: thread 0 of each
    program first asks the L2 for the program's whole code range, row by row (``cp.async.bulk.prefetch.L2``; needs
    ``K % 32 == 0`` and 16-byte aligned rows, see :func:`_launch`)."""
    overlap.launch_dependents(PDL)
    WPG: tl.constexpr = GROUP // 8  # words per group
    GPC: tl.constexpr = BLOCK_K // GROUP  # groups per step
    BW: tl.constexpr = BLOCK_K // 8  # words per step
    row0 = tl.program_id(0) * (SUB * SUB_N)
    rg = tl.arange(0, GPC)
    cw = rg[:, None] * WPG + tl.arange(0, WPG)[None, :]  # [GPC, WPG] word offset within a step
    P0 = _sub_ptrs(qw_ptr, s_ptr, z_ptr, row0, N, stride_qn, stride_sn, stride_zn, cw, SUB_N)
    P1, P2, P3 = P0, P0, P0
    if SUB > 1:
        P1 = _sub_ptrs(qw_ptr, s_ptr, z_ptr, row0 + SUB_N, N, stride_qn, stride_sn, stride_zn, cw, SUB_N)
    if SUB > 2:
        P2 = _sub_ptrs(qw_ptr, s_ptr, z_ptr, row0 + 2 * SUB_N, N, stride_qn, stride_sn, stride_zn, cw, SUB_N)
    if SUB > 3:
        P3 = _sub_ptrs(qw_ptr, s_ptr, z_ptr, row0 + 3 * SUB_N, N, stride_qn, stride_sn, stride_zn, cw, SUB_N)
    if SPLIT > 1:  # words [kw_lo, kw_end) of range j; kw_end: a multiple of BW (past KW after the tail step)
        steps = (KW + BW - 1) // BW
        j = tl.program_id(1)
        kw_lo = (j * (steps // SPLIT) + tl.minimum(j, steps % SPLIT)) * BW
        kw_end = kw_lo + (steps // SPLIT + (j < steps % SPLIT).to(tl.int32)) * BW
    else:
        kw_lo = 0
        kw_end = KW
    if L2:  # the program's codes, row by row, into L2 (before the wait: the weights are not written by the step)
        for r in range(row0, tl.minimum(row0 + SUB * SUB_N, N)):
            overlap.prefetch_range(qw_ptr + r.to(tl.int64) * stride_qn, kw_lo, kw_end, KW, 4)
    if PREFETCH:
        if SPLIT > 1:  # an empty range (kw_lo = kw_end = steps * BW) loads the last step instead
            first = tl.minimum(kw_lo, kw_end - BW)
        else:
            first = 0
        T0, T1, T2, T3 = _load_tiles(P0, P1, P2, P3, first, cw, rg, KW, G, WPG, SUB, MASK_N, HAS_TAIL)
    overlap.wait_prior(PDL)  # x, y (and the fused inputs' buffers) are written by earlier kernels
    R = (eps, eps, eps, eps)  # placeholders, read only if INPUT == 1
    if INPUT == 1:
        r1, r2, r3 = eps, eps, eps
        if M > 1:
            r1 = _rstd(x_ptr + stride_xm, 8 * KW, eps, RBLOCK)
        if M > 2:
            r2 = _rstd(x_ptr + 2 * stride_xm, 8 * KW, eps, RBLOCK)
        if M > 3:
            r3 = _rstd(x_ptr + 3 * stride_xm, 8 * KW, eps, RBLOCK)
        R = (_rstd(x_ptr, 8 * KW, eps, RBLOCK), r1, r2, r3)
    zero = tl.zeros((SUB_N, GPC, WPG), dtype=tl.float32)
    A0 = (zero, zero, zero, zero)
    A1, A2, A3 = A0, A0, A0
    if PREFETCH:
        for kw0 in range(kw_lo, kw_end, BW):
            if SPLIT > 1:
                nxt = tl.minimum(kw0 + BW, kw_end - BW)  # within the range (a tail step: masked as below)
            elif HAS_TAIL:
                nxt = kw0 + BW  # past the end: masked off
            else:
                nxt = tl.minimum(kw0 + BW, KW - BW)  # the last step re-reads its own words (cached)
            U0, U1, U2, U3 = _load_tiles(P0, P1, P2, P3, nxt, cw, rg, KW, G, WPG, SUB, MASK_N, HAS_TAIL)
            if kw0 != code_mask:  # always (kw0 < 2**23): a block boundary that keeps ptxas from sinking the loads
                A0, A1, A2, A3 = _step(A0, A1, A2, A3, T0, T1, T2, T3, x_ptr, stride_xm, kw0 + cw, KW, code_mask,
                                       w_ptr, R, magic, M, SUB, HAS_TAIL, INPUT, DT, HALF, USE_ASM)
            T0, T1, T2, T3 = U0, U1, U2, U3
    else:
        for kw0 in range(kw_lo, kw_end, BW):
            T0, T1, T2, T3 = _load_tiles(P0, P1, P2, P3, kw0, cw, rg, KW, G, WPG, SUB, MASK_N, HAS_TAIL)
            A0, A1, A2, A3 = _step(A0, A1, A2, A3, T0, T1, T2, T3, x_ptr, stride_xm, kw0 + cw, KW, code_mask,
                                   w_ptr, R, magic, M, SUB, HAS_TAIL, INPUT, DT, HALF, USE_ASM)
    _finish_sub(A0, P0, b_ptr, r_ptr, y_ptr, stride_rm, stride_ym, M, ACCUMULATE, HAS_BIAS, HAS_RES, SPLIT)
    if SUB > 1:
        _finish_sub(A1, P1, b_ptr, r_ptr, y_ptr, stride_rm, stride_ym, M, ACCUMULATE, HAS_BIAS, HAS_RES, SPLIT)
    if SUB > 2:
        _finish_sub(A2, P2, b_ptr, r_ptr, y_ptr, stride_rm, stride_ym, M, ACCUMULATE, HAS_BIAS, HAS_RES, SPLIT)
    if SUB > 3:
        _finish_sub(A3, P3, b_ptr, r_ptr, y_ptr, stride_rm, stride_ym, M, ACCUMULATE, HAS_BIAS, HAS_RES, SPLIT)


def shape_ok(m: int, k: int, qweight: torch.Tensor) -> bool:
    """Whether the GEMV takes ``m`` rows of ``k`` channels against ``qweight``: 1..4 rows, ``K % 8 == 0``, codes
    readable as int32 words (row starts 4-byte aligned, unit stride along ``K``)."""
    return (1 <= m <= GEMV_MAX_ROWS and k > 0 and k % 8 == 0 and qweight.dim() == 2
            and qweight.dtype == torch.uint8 and qweight.shape[1] == k // 2 and qweight.stride(1) == 1
            and qweight.storage_offset() % 4 == 0 and qweight.stride(0) % 4 == 0)


def l2_ok(qweight: torch.Tensor) -> bool:
    """Whether the L2 prefetch of :func:`_w4_gemv_rows_kernel` may run on ``qweight``: a Hopper GPU
    (:func:`runtime.kernels.overlap.hopper`) and every row's byte range 16-byte aligned with a length that is a
    multiple of 16 (``K % 32 == 0``, 16-byte aligned rows)."""
    return (overlap.hopper(qweight.device) and qweight.shape[1] % 16 == 0 and qweight.stride(0) % 16 == 0
            and qweight.data_ptr() % 16 == 0)


def gemv_ok(x2: torch.Tensor, qweight: torch.Tensor) -> bool:
    """Whether :func:`w4_gemv_accumulate` can take ``x2 [M, K]`` (float16, bfloat16 or float32; :func:`shape_ok`)."""
    return x2.dim() == 2 and x2.dtype in TL_DTYPES and shape_ok(x2.shape[0], x2.shape[1], qweight)


def _check(x2, qweight, scales, zeros, group_size, out=None):
    if not gemv_ok(x2, qweight):
        raise ValueError(f"w4_gemv needs 1..{GEMV_MAX_ROWS} rows with K % 8 == 0 and uint8 codes [N, K/2] readable "
                         f"as int32 words; got x {x2.dtype} {list(x2.shape)}, qweight {qweight.dtype} "
                         f"{list(qweight.shape)} strides {qweight.stride()}")
    if group_size % 8 or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two >= 8, got {group_size}")
    g = quant.num_groups(x2.shape[1], group_size)
    if scales.shape != (qweight.shape[0], g) or zeros.shape != scales.shape:
        raise ValueError(f"scales {list(scales.shape)} and zeros {list(zeros.shape)} must both be "
                         f"[{qweight.shape[0]}, {g}]")
    m, n = x2.shape[0], qweight.shape[0]
    if out is not None and (out.dtype != torch.float32 or out.shape != (m, n) or out.stride(1) != 1):
        raise ValueError(f"out must be float32 [{m}, {n}] with unit stride, got {out.dtype} {list(out.shape)}")


class _Input(NamedTuple):
    """The kernel's input transform (``INPUT`` of :func:`_w4_gemv_rows_kernel`): 0 none, 1 rmsnorm with
    ``weight`` and ``eps``, 2 silu_mul; rounded to ``dt``."""

    kind: int = 0
    dt: torch.dtype = torch.float32
    weight: torch.Tensor | None = None
    eps: float = 0.0


_PLAIN = _Input()


def _check_fused(src, what, m, k, dt, weight=None):
    """Inputs of the fused forms: ``src`` float32 ``[m, k]`` with unit stride, ``dt`` one of :data:`TL_DTYPES`,
    a norm ``weight [k]`` (contiguous, a float dtype)."""
    if src.dtype != torch.float32 or src.dim() != 2 or src.shape != (m, k) or src.stride(1) != 1:
        raise ValueError(f"{what} must be float32 [{m}, {k}] with unit stride (1..{GEMV_MAX_ROWS} rows), got "
                         f"{src.dtype} {list(src.shape)} strides {src.stride()}")
    if dt not in TL_DTYPES:
        raise ValueError(f"dt must be one of {', '.join(map(str, TL_DTYPES))}, got {dt}")
    if weight is not None and (weight.shape != (k,) or weight.stride(0) != 1 or weight.dtype not in TL_DTYPES):
        raise ValueError(f"the norm weight must be a contiguous [{k}] tensor of {', '.join(map(str, TL_DTYPES))}, "
                         f"got {weight.dtype} {list(weight.shape)}")


def half_input(x_dtype: torch.dtype, fused: _Input = _PLAIN) -> bool:
    """Whether the GEMV's input values are float16 numbers (a float16 ``x``, or a fused input rounded to float16),
    so that float16 products (``GemvConfig.half``) may run."""
    return (fused.dt if fused.kind else x_dtype) == torch.float16


def half_math(cfg: GemvConfig, x_dtype: torch.dtype, fused: _Input = _PLAIN) -> bool:
    """Whether a launch with ``cfg`` multiplies in float16 (:func:`_half_dot`): ``cfg.half`` and
    :func:`half_input`; otherwise the float32 form."""
    return bool(cfg.half) and half_input(x_dtype, fused)


def _launch(x2, qweight, scales, zeros, group_size, y, bias, residual, accumulate, config, fused=_PLAIN):
    m, k = x2.shape
    n = qweight.shape[0]
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    cfg = (_fit(GemvConfig(*config), group_size) if config is not None
           else default_config(n, k, m, group_size, half_input(x2.dtype, fused)))
    if not accumulate:  # y = x @ W^T (+ bias) (+ residual) in any dtype: the programs own their rows, no atomics
        cfg = cfg._replace(split=1)
    cfg = l2_override(cfg)
    sub_n = cfg.block_n // cfg.sub
    if cfg.block_n % cfg.sub or sub_n & (sub_n - 1) or not 1 <= cfg.sub <= 4:
        raise ValueError(f"config {cfg}: block_n / sub must be a power of two, sub 1..4")
    split = int(cfg.split)
    if split < 1:
        raise ValueError(f"config {cfg}: split must be >= 1")
    words = qweight.view(torch.int32)
    res = residual if residual is not None else y
    grid = (triton.cdiv(n, cfg.block_n),) if split == 1 else (triton.cdiv(n, cfg.block_n), split)
    _w4_gemv_rows_kernel[grid](
        x2, words, scales, zeros, bias if bias is not None else y, res, y,
        fused.weight if fused.weight is not None else y, n, k // 8, scales.shape[1], CODE_MASK, HALF_MAGIC, fused.eps,
        x2.stride(0), words.stride(0), scales.stride(0), zeros.stride(0), res.stride(0), y.stride(0),
        M=m, GROUP=group_size, SUB_N=cfg.block_n // cfg.sub, SUB=cfg.sub, BLOCK_K=cfg.block_k,
        MASK_N=n % cfg.block_n != 0, HAS_TAIL=k % cfg.block_k != 0, PREFETCH=bool(cfg.prefetch),
        ACCUMULATE=accumulate, HAS_BIAS=bias is not None, HAS_RES=residual is not None, SPLIT=split,
        INPUT=fused.kind, DT=TL_DTYPES[fused.dt], RBLOCK=min(triton.next_power_of_2(k), 128 * cfg.num_warps),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        HALF=half_math(cfg, x2.dtype, fused), USE_ASM=not interpreting(), L2=bool(cfg.l2) and l2_ok(qweight),
        enable_fp_fusion=True,  # FFMA (Triton 3.10 turns fusion off by default)
        **overlap.launch_options(x2.device, "gemv"))
    return y


def w4_gemv_accumulate(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                       group_size: int, out: torch.Tensor, config: GemvConfig | tuple | None = None,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """``out [M, N] (float32) += x2 [M, K] @ W^T (+ bias)`` (see :func:`gemv_ok`); returns ``out``.

    ``config``: a :class:`GemvConfig` (or its fields) or None for :func:`default_config`."""
    _check(x2, qweight, scales, zeros, group_size, out)
    return _launch(x2, qweight, scales, zeros, group_size, out, bias, None, True, config)


def w4_gemv_accumulate_rmsnorm(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, dt: torch.dtype,
                               qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                               out: torch.Tensor, config: GemvConfig | tuple | None = None,
                               bias: torch.Tensor | None = None) -> torch.Tensor:
    """``out += misc.rmsnorm(x, norm_weight, eps, dt) @ W^T (+ bias)`` in one kernel: ``x [M, K]`` float32 (the
    residual stream), ``norm_weight [K]``; each program computes the rows' statistics itself (in another order
    than :func:`runtime.kernels.misc.rmsnorm`: float32 rounding apart) and rounds the input to ``dt`` as it does.
    Otherwise as :func:`w4_gemv_accumulate`."""
    _check_fused(x, "x", x.shape[0] if x.dim() == 2 else 0, qweight.shape[1] * 2, dt, norm_weight)
    _check(x, qweight, scales, zeros, group_size, out)
    return _launch(x, qweight, scales, zeros, group_size, out, bias, None, True, config,
                   _Input(1, dt, norm_weight, float(eps)))


def w4_gemv_accumulate_silu(gate_up: torch.Tensor, dt: torch.dtype, qweight: torch.Tensor, scales: torch.Tensor,
                            zeros: torch.Tensor, group_size: int, out: torch.Tensor,
                            config: GemvConfig | tuple | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``out += misc.silu_mul(gate_up, dt) @ W^T (+ bias)`` in one kernel: ``gate_up [M, 2K]`` float32 (gate
    first), the input ``silu(gate) * up`` rounded to ``dt`` as :func:`runtime.kernels.misc.silu_mul` rounds it.
    ``gate_up`` is left as it is (other programs read it: zero it afterwards, e.g. ``kv4.rope_append``'s
    ``clear_extra``). Otherwise as :func:`w4_gemv_accumulate`."""
    k = qweight.shape[1] * 2
    _check_fused(gate_up, "gate_up", gate_up.shape[0] if gate_up.dim() == 2 else 0, 2 * k, dt)
    _check(gate_up[:, :k], qweight, scales, zeros, group_size, out)
    return _launch(gate_up[:, :k], qweight, scales, zeros, group_size, out, bias, None, True, config, _Input(2, dt))


def w4_gemv(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
            bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
            out_dtype: torch.dtype | None = None, config: GemvConfig | tuple | None = None) -> torch.Tensor:
    """``y [M, N] = x2 [M, K] @ W^T (+ bias) (+ residual)`` in ``out_dtype`` (default ``x2.dtype``), float32
    accumulation, one rounding at the store."""
    _check(x2, qweight, scales, zeros, group_size)
    m, n = x2.shape[0], qweight.shape[0]
    y = torch.empty(m, n, dtype=out_dtype or x2.dtype, device=x2.device)
    if residual is not None and (residual.shape != (m, n) or residual.stride(1) != 1):
        residual = residual.reshape(m, n).contiguous()
    return _launch(x2, qweight, scales, zeros, group_size, y, bias, residual, False, config)


@dataclass
class GemvW4(W4Weight):
    """A :class:`W4Weight` whose decode-step ``accumulate`` runs on the tensor-core GEMV
    (:func:`runtime.kernels.w4_mma.w4_mma_accumulate`: CUDA, float16, 1..32 rows, 33..80 in launches of 32, group 128,
    ``K % 32 == 0``, unless ``WKVQ_MMA=0``), else on :func:`w4_gemv_accumulate` when :func:`gemv_ok` (1..4 rows,
    ``K % 8 == 0``), else on :meth:`W4Weight.accumulate` (split-K to 16 rows, then the dequantization); same
    tensors, no copy. The fused
    forms run on the row GEMV (:meth:`accumulate_rmsnorm`, :meth:`fuses_inputs`) and, for the SiLU product at one
    row, on the tensor-core GEMV too (:meth:`accumulate_silu`, :meth:`fuses_silu`)."""

    @classmethod
    def from_w4(cls, w: W4Weight) -> GemvW4:
        return cls(w.qweight, w.scales, w.zeros, w.in_features, w.group_size, w.bias)

    def plain(self) -> W4Weight:
        return W4Weight(self.qweight, self.scales, self.zeros, self.in_features, self.group_size, self.bias)

    def accumulate(self, x: torch.Tensor, out: torch.Tensor, ready=None, stamps: str | None = None) -> torch.Tensor:
        """:meth:`W4Weight.accumulate`; ``ready`` (flags that ``x``'s groups are written) and ``stamps`` (the kind of
        the programs' timestamps where ``WKVQ_STAMPS=1``), see :func:`runtime.kernels.w4_mma.w4_mma_accumulate`,
        only on the tensor-core GEMV; the other kernels wait for the kernel before, which implies the flags."""
        from . import w4_mma

        if w4_mma.mma_enabled() and w4_mma.mma_ok(x, self.qweight, self.scales, self.zeros, self.group_size,
                                                   self.bias):
            return w4_mma.w4_mma_accumulate(x, self.qweight, self.scales, self.zeros, self.group_size, out,
                                            ready=ready, stamps_kind=stamps)
        launches = w4_mma.row_launches(x.shape[0]) if x.dim() == 2 and w4_mma.mma_enabled() else None
        if launches and w4_mma.mma_ok(x[:launches[0][1]], self.qweight, self.scales, self.zeros, self.group_size,
                                      self.bias):  # 33-80 rows: launches of 32 (each reads the weight)
            for lo, hi in launches:
                w4_mma.w4_mma_accumulate(x[lo:hi], self.qweight, self.scales, self.zeros, self.group_size,
                                         out[lo:hi], stamps_kind=stamps)
            return out
        if gemv_ok(x, self.qweight):
            return w4_gemv_accumulate(x, self.qweight, self.scales, self.zeros, self.group_size, out, bias=self.bias)
        return super().accumulate(x, out)

    def fuses_inputs(self, m: int) -> bool:
        """Whether :meth:`accumulate_rmsnorm` takes ``m`` rows (:func:`shape_ok`: the row GEMV)."""
        return shape_ok(m, self.in_features, self.qweight)

    def fuses_silu(self, m: int, dt: torch.dtype) -> bool:
        """Whether :meth:`accumulate_silu` takes ``m`` rows with products in ``dt``: on the tensor-core GEMV at one
        row in float16 (its programs build ``silu(gate) * up`` in shared memory,
        :func:`runtime.kernels.w4_mma.silu_ok`), else on the row GEMV (:func:`shape_ok`: a row-major weight)."""
        return self._mma_silu(m, dt=dt) or shape_ok(m, self.in_features, self.qweight)

    def silu_by_default(self, m: int, dt: torch.dtype) -> bool:
        """Whether the decode step's default fusions take the SiLU input here: on the tensor-core GEMV (not the row
        GEMV) with a split grid (H200, b1, twenty-fifth session: 7B's down on a split grid 0.03-0.05 ms a step
        faster; 13B's on a stream-K grid, whose shares run the prologue once a row block they cross, 0.03 slower)."""
        return self._mma_silu(m, dt=dt) and not self._mma_silu_plan()[1]

    def _mma_silu(self, m: int, gate_up: torch.Tensor | None = None, dt: torch.dtype = torch.float16) -> bool:
        """Whether the tensor-core GEMV takes the SiLU input at ``m`` rows (of ``gate_up`` where given) with products
        in ``dt`` (float16 only: a model in another dtype runs the row GEMV's or the SiLU kernel)."""
        from . import w4_mma

        if m != 1 or dt != torch.float16 or not w4_mma.mma_enabled():
            return False
        if gate_up is not None and not (w4_mma.silu_input_ok(gate_up) and gate_up.shape[1] == 2 * self.in_features
                                        and gate_up.device == self.qweight.device):
            return False
        return self._mma_silu_plan()[0]

    def _mma_silu_plan(self) -> tuple[bool, bool]:
        """Whether the tensor-core GEMV's SiLU input takes this weight at one row, and whether its config is a
        stream-K grid: ~10 us (a launch plan), kept per value of the variables they depend on (``WKVQ_MMA``,
        ``WKVQ_MMA_TABLE``, ``WKVQ_MMA_GUESS``), as the eager decode step asks every layer every step."""
        from . import w4_mma

        key = tuple(os.environ.get(v) for v in (w4_mma.MMA_ENV, w4_mma.TABLE_ENV, w4_mma.GUESS_ENV))
        known = self.__dict__.setdefault("_silu_plan", {})
        if key not in known:
            n, k = self.qweight.shape[0], self.in_features
            known[key] = (w4_mma.silu_weight_ok(self.qweight.device, k, self.qweight, self.scales, self.zeros,
                                                self.group_size, self.bias),
                          bool(w4_mma.default_mma_config(n, k, 1).persist))
        return known[key]

    def accumulate_rmsnorm(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, dt: torch.dtype,
                           out: torch.Tensor) -> torch.Tensor:
        """``out += rmsnorm(x) @ W^T (+ bias)``, the norm in the kernel (:func:`w4_gemv_accumulate_rmsnorm`)."""
        return w4_gemv_accumulate_rmsnorm(x, norm_weight, eps, dt, self.qweight, self.scales, self.zeros,
                                          self.group_size, out, bias=self.bias)

    def accumulate_silu(self, gate_up: torch.Tensor, dt: torch.dtype, out: torch.Tensor) -> torch.Tensor:
        """``out += silu_mul(gate_up) @ W^T (+ bias)`` in the kernel: the tensor-core GEMV's (float16, one row,
        :meth:`fuses_silu`; :func:`runtime.kernels.w4_mma.w4_mma_accumulate_silu`), else the row GEMV's
        (:func:`w4_gemv_accumulate_silu`); leaves ``gate_up`` to be zeroed by its next user."""
        if self._mma_silu(1, gate_up, dt):  # one row: gate_up [1, 2K], float16
            from . import w4_mma

            return w4_mma.w4_mma_accumulate_silu(gate_up, self.qweight, self.scales, self.zeros, self.group_size, out)
        return w4_gemv_accumulate_silu(gate_up, dt, self.qweight, self.scales, self.zeros, self.group_size, out,
                                       bias=self.bias)
