"""4-bit POQ KV cache kernels: fused rope + quantize-and-append, and split-K decode attention.

:func:`decode_attention` runs, per :class:`AttnConfig` (the table :data:`ATTN_TABLE`), either the split kernel
here (any head_dim, KV groups and GQA; the interpreter) or, with ``mma``, the tensor-core kernel of
:mod:`runtime.kernels.kv4_mma` (sm_90, head_dim 128, per-token stats; over 4 query heads a KV head in parts).

Cache layout (see :mod:`runtime.static_cache`): codes ``uint8 [B, Hkv, S, D/2]`` packed with
:func:`runtime.quant.pack` (channel ``2j`` in the low nibble), ``step`` and ``minimum``
``float16 [B, Hkv, S, G]`` over ``G`` groups of ``D / G`` channels of the smoothed vector
``x~ = (x - delta) / s``. The decode step's own key/value stay in full precision (POQ).

The static smoothing is folded into the query and the output instead of dequantizing the cache:
``q . (s * k~ + delta) = (q * s) . k~ + q . delta`` and
``sum_j p_j (s * v~_j + delta) = s * sum_j p_j v~_j + delta * sum_j p_j``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import triton
import triton.language as tl

from . import (
    check_row_buffer,
    env_tables,
    head_dim_ok,
    merge_group,
    multiprocessors,
    overlap,
    query_parts,
    sweep_table,
    zeroed_counts,
)


@triton.jit
def _round_half_even(x):
    r = tl.floor(x + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where(((r - x) == 0.5) & odd, r - 1.0, r)


@triton.jit
def _rope(base, d, cos_row, sin_row, HALF: tl.constexpr, D: tl.constexpr):
    """HF rotate-half rope of channels ``d`` of the head vector at ``base``, in float32."""
    x = tl.load(base + d).to(tl.float32)
    partner = tl.load(base + (d + HALF) % D).to(tl.float32)
    sign = tl.where(d < HALF, -1.0, 1.0)
    return x * tl.load(cos_row + d) + sign * partner * tl.load(sin_row + d)


@triton.jit
def _quant_store(xe, xo, jj, scale_ptr, shift_ptr, codes_ptr, step_ptr, min_ptr, gi, QMAX: tl.constexpr):
    """Token-wise asymmetric quantization of one head's groups (even/odd channels ``[rows, GSH]``, a row a group;
    ``jj`` their packed byte index in the head), stored packed at ``codes_ptr + jj``, the rows' steps and minima at
    ``step_ptr + gi`` and ``min_ptr + gi``. The rows may be several tokens' groups (per-row pointers)."""
    # IEEE divisions (div.rn): Triton's "/" on float32 is the approximate division, which left a minimum one float16
    # step off the torch path's now and then (thirty-seventh session, on the H200)
    ye = tl.math.div_rn(xe - tl.load(shift_ptr + 2 * jj), tl.load(scale_ptr + 2 * jj))
    yo = tl.math.div_rn(xo - tl.load(shift_ptr + 2 * jj + 1), tl.load(scale_ptr + 2 * jj + 1))
    lo = tl.minimum(tl.min(ye, 1), tl.min(yo, 1))
    hi = tl.maximum(tl.max(ye, 1), tl.max(yo, 1))
    # step and minimum are rounded to the float16 the cache stores (as KVQuantizer.quantize does)
    step = tl.math.div_rn(hi - lo, tl.zeros_like(hi) + QMAX)
    step = tl.minimum(tl.maximum(tl.maximum(step, 1e-8), 6.103515625e-05), 65504.0)
    step = step.to(tl.float16).to(tl.float32)
    lo = tl.minimum(tl.maximum(lo, -65504.0), 65504.0).to(tl.float16).to(tl.float32)
    ce = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(ye - lo[:, None], step[:, None])), 0.0), QMAX)
    co = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(yo - lo[:, None], step[:, None])), 0.0), QMAX)
    tl.store(codes_ptr + jj, (ce.to(tl.uint8) | (co.to(tl.uint8) << 4)))
    tl.store(step_ptr + gi, step.to(tl.float16))
    tl.store(min_ptr + gi, lo.to(tl.float16))


@triton.jit
def _clear(base, jj, like):
    """Zero the head vector at ``base`` after every thread of the program has read it."""
    tl.debug_barrier()
    zero = tl.zeros_like(like).to(base.dtype.element_ty)
    tl.store(base + 2 * jj, zero)
    tl.store(base + 2 * jj + 1, zero)


@triton.jit
def _zero_part(ptr, n, part, PARTS: tl.constexpr, BLOCK: tl.constexpr):
    """Zero part ``part`` of ``PARTS`` contiguous parts of ``ptr[:n]`` (``cdiv(n, PARTS)`` elements each)."""
    chunk = tl.cdiv(n, PARTS)
    lo = part * chunk
    hi = tl.minimum(lo + chunk, n)
    for e0 in range(lo, hi, BLOCK):
        e = e0 + tl.arange(0, BLOCK)
        tl.store(ptr + e, tl.zeros((BLOCK,), dtype=ptr.dtype.element_ty), mask=e < hi)


@triton.jit
def _append_kv(row, b, kh, pos, jj, cos_row, sin_row, kc_ptr, ks_ptr, km_ptr, vc_ptr, vs_ptr, vm_ptr, kscale_ptr,
               kshift_ptr, vscale_ptr, vshift_ptr, S, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
               G: tl.constexpr, QMAX: tl.constexpr):
    """KV head ``kh`` of the token in ``row`` (a ``qkv`` row): its key roped, key and value quantized into slot
    ``pos`` of the cache (:func:`_quant_store`). Returns the full-precision ``(ke, ko, ve, vo)`` (even/odd
    channels ``[G, GSH]``, ``jj`` their packed byte index)."""
    HALF: tl.constexpr = D // 2
    ke = _rope(row + (HQ + kh) * D, 2 * jj, cos_row, sin_row, HALF, D)
    ko = _rope(row + (HQ + kh) * D, 2 * jj + 1, cos_row, sin_row, HALF, D)
    vrow = row + (HQ + HKV + kh) * D
    ve = tl.load(vrow + 2 * jj).to(tl.float32)
    vo = tl.load(vrow + 2 * jj + 1).to(tl.float32)
    slot = (b * HKV + kh) * S + pos
    g = tl.arange(0, G)
    _quant_store(ke, ko, jj, kscale_ptr + kh * D, kshift_ptr + kh * D, kc_ptr + slot * HALF,
                 ks_ptr + slot * G, km_ptr + slot * G, g, QMAX)
    _quant_store(ve, vo, jj, vscale_ptr + kh * D, vshift_ptr + kh * D, vc_ptr + slot * HALF,
                 vs_ptr + slot * G, vm_ptr + slot * G, g, QMAX)
    return ke, ko, ve, vo


@triton.jit
def _rope_append_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, kcur_ptr, vcur_ptr,
                        kc_ptr, ks_ptr, km_ptr, vc_ptr, vs_ptr, vm_ptr,
                        kscale_ptr, kshift_ptr, vscale_ptr, vshift_ptr, stride_qkv, S,
                        ex_ptr, ex_n, stride_ex,
                        HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
                        QMAX: tl.constexpr, CLEAR: tl.constexpr, CLEAR_EXTRA: tl.constexpr, BLOCK_EX: tl.constexpr,
                        PDL: tl.constexpr):
    overlap.launch_dependents(PDL)
    overlap.wait_prior(PDL)  # qkv is written by the projection before; the buffers cleared are read by others
    HALF: tl.constexpr = D // 2
    GSH: tl.constexpr = HALF // G
    b, h = tl.program_id(0), tl.program_id(1)
    if CLEAR_EXTRA:  # row b of another buffer, split over the row's programs
        _zero_part(ex_ptr + b * stride_ex, ex_n, h, HQ + HKV, BLOCK_EX)
    pos = tl.load(pos_ptr)
    jj = tl.arange(0, G)[:, None] * GSH + tl.arange(0, GSH)[None, :]  # packed byte index [G, GSH]
    cos_row, sin_row = cos_ptr + pos * D, sin_ptr + pos * D
    row = qkv_ptr + b * stride_qkv
    if h < HQ:
        out = q_ptr + (b * HQ + h) * D
        qe = _rope(row + h * D, 2 * jj, cos_row, sin_row, HALF, D)
        qo = _rope(row + h * D, 2 * jj + 1, cos_row, sin_row, HALF, D)
        tl.store(out + 2 * jj, qe)
        tl.store(out + 2 * jj + 1, qo)
        if CLEAR:
            _clear(row + h * D, jj, qe)
    else:
        kh = h - HQ
        ke, ko, ve, vo = _append_kv(row, b, kh, pos, jj, cos_row, sin_row, kc_ptr, ks_ptr, km_ptr, vc_ptr, vs_ptr,
                                    vm_ptr, kscale_ptr, kshift_ptr, vscale_ptr, vshift_ptr, S, HQ, HKV, D, G, QMAX)
        cur = (b * HKV + kh) * D
        tl.store(kcur_ptr + cur + 2 * jj, ke)
        tl.store(kcur_ptr + cur + 2 * jj + 1, ko)
        tl.store(vcur_ptr + cur + 2 * jj, ve)
        tl.store(vcur_ptr + cur + 2 * jj + 1, vo)
        if CLEAR:
            _clear(row + h * D, jj, ke)
            _clear(row + (HQ + HKV + kh) * D, jj, ve)


@triton.jit
def _quant_write_kernel(k_ptr, v_ptr, kc_ptr, ks_ptr, km_ptr, vc_ptr, vs_ptr, vm_ptr, kscale_ptr, kshift_ptr,
                        vscale_ptr, vshift_ptr, start, T, S, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
                        HKV: tl.constexpr, D: tl.constexpr, G: tl.constexpr, QMAX: tl.constexpr,
                        TOKENS: tl.constexpr):
    """Tokens ``TOKENS * i ..`` (program ``(i, b * HKV + kh)``) of KV head ``kh`` of sequence ``b``: key and value
    quantized into slots ``start + t`` (:func:`_quant_store`, the decode step's append), a row a token's group. Past
    ``T`` the rows repeat the last token (the same bytes to the same place: no masks)."""
    HALF: tl.constexpr = D // 2
    GSH: tl.constexpr = HALF // G
    bh = tl.program_id(1)
    b, kh = bh // HKV, bh % HKV
    r = tl.arange(0, TOKENS * G)
    t = tl.minimum(tl.program_id(0) * TOKENS + r // G, T - 1)
    gi = r % G
    jj = gi[:, None] * GSH + tl.arange(0, GSH)[None, :]
    slot = bh * S + start + t
    krow = (k_ptr + b * sk_b + kh * sk_h + t * sk_t)[:, None]
    vrow = (v_ptr + b * sv_b + kh * sv_h + t * sv_t)[:, None]
    _quant_store(tl.load(krow + 2 * jj).to(tl.float32), tl.load(krow + 2 * jj + 1).to(tl.float32), jj,
                 kscale_ptr + kh * D, kshift_ptr + kh * D, (kc_ptr + slot * HALF)[:, None], ks_ptr + slot * G,
                 km_ptr + slot * G, gi, QMAX)
    _quant_store(tl.load(vrow + 2 * jj).to(tl.float32), tl.load(vrow + 2 * jj + 1).to(tl.float32), jj,
                 vscale_ptr + kh * D, vshift_ptr + kh * D, (vc_ptr + slot * HALF)[:, None], vs_ptr + slot * G,
                 vm_ptr + slot * G, gi, QMAX)


def quant_write_ok(store, key, value, bits: int) -> bool:
    """Whether :func:`quant_write` takes these tokens: 4-bit codes, head_dim and its groups powers of two, the
    channels of ``key`` and ``value`` contiguous."""
    half, g = store.k_codes.shape[-1], store.k_step.shape[-1]
    return (bits == 4 and half & (half - 1) == 0 and g & (g - 1) == 0 and half % g == 0 and key.stride(-1) == 1
            and value.stride(-1) == 1)


def quant_write(key, value, store, kv_params, start: int) -> None:
    """Quantize ``key, value [B, Hkv, T, D]`` (channels contiguous, any float dtype) into ``store``'s slots
    ``start .. start + T``: the same bytes as :meth:`runtime.static_cache.StaticPOQCache.write`'s torch path, in one
    launch (a prefill's write). ``kv_params`` as :func:`rope_append`'s."""
    b, hkv, s, half = store.k_codes.shape
    t = key.shape[2]
    tokens = 32
    _quant_write_kernel[(triton.cdiv(t, tokens), b * hkv)](
        key, value, store.k_codes, store.k_step, store.k_min, store.v_codes, store.v_step, store.v_min,
        *(p.float().contiguous() for p in kv_params), start, t, s, *key.stride()[:3], *value.stride()[:3],
        HKV=hkv, D=2 * half, G=store.k_step.shape[-1], QMAX=15, TOKENS=tokens)


def rope_append(qkv, cos, sin, pos, store, kv_params, num_heads: int, bits: int = 4, clear: bool = False,
                clear_extra: torch.Tensor | None = None):
    """Rope the decode token's q/k, append its quantized k/v to ``store`` at slot ``pos``.

    ``qkv [B, (Hq + 2 Hkv) * D]`` (fused projection output), ``cos, sin float32 [S, D]``,
    ``pos int32 [1]`` (device tensor: the token's position = number of cached tokens),
    ``store``: a :class:`runtime.static_cache.LayerStore`; ``kv_params``: the four
    ``[Hkv, D]`` float32 tensors ``(k_scale, k_shift, v_scale, v_shift)``.
    Returns ``q float32 [B, Hq, D]``, ``k_cur, v_cur float32 [B, Hkv, D]`` (full precision).
    ``clear``: zero ``qkv`` after reading it (an accumulation buffer of the split-K projection).
    ``clear_extra``: a ``[B, n]`` buffer (unit stride along ``n``) to zero as well, e.g. the decode step's
    ``gate_up`` when the down GEMV computes its SiLU input itself and so cannot zero it
    (:func:`runtime.kernels.w4_gemv.w4_gemv_accumulate_silu`).
    """
    b, hkv, s, half = store.k_codes.shape
    d, g = 2 * half, store.k_step.shape[-1]
    if bits != 4:
        raise ValueError(f"the KV kernels store 4-bit codes, got kv bits {bits}")
    q = torch.empty(b, num_heads, d, dtype=torch.float32, device=qkv.device)
    k_cur = torch.empty(b, hkv, d, dtype=torch.float32, device=qkv.device)
    v_cur = torch.empty_like(k_cur)
    ex = clear_extra if clear_extra is not None else q
    if clear_extra is not None:
        check_row_buffer("clear_extra", ex, b)
    ex_n = ex.shape[1] if clear_extra is not None else 0
    _rope_append_kernel[(b, num_heads + hkv)](
        qkv, cos, sin, pos, q, k_cur, v_cur, store.k_codes, store.k_step, store.k_min,
        store.v_codes, store.v_step, store.v_min, *kv_params, qkv.stride(0), s, ex, ex_n, ex.stride(0),
        HQ=num_heads, HKV=hkv, D=d, G=g, QMAX=15, CLEAR=clear, CLEAR_EXTRA=clear_extra is not None,
        BLOCK_EX=min(1024, triton.next_power_of_2(max(1, -(-ex_n // (num_heads + hkv))))),
        **overlap.launch_options(qkv.device, "rope"))
    return q, k_cur, v_cur


@triton.jit
def _slot(words, i: tl.constexpr):
    """Code ``i`` of each int32 word as the float32 ``1 + code / 16`` (the nibble moved to mantissa bits
    19..22 under the exponent of 1.0): a shift and one ``lop3``, no conversion or subtraction."""
    if i <= 4:
        t = words << (19 - 4 * i)
    else:
        t = words >> (4 * i - 19)
    return ((t & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _group_stats(ptr, rows, gw, mask, G: tl.constexpr):
    """``[BLOCK_S, NW]`` float32 step (or minimum) of each token and word (one load per token when G == 1)."""
    if G == 1:
        return tl.load(ptr + rows, mask=mask, other=0.0).to(tl.float32)[:, None]
    else:
        return tl.load(ptr + rows[:, None] * G + gw[None, :], mask=mask[:, None], other=0.0).to(tl.float32)


@triton.jit
def _tile(kc_ptr, ks_ptr, km_ptr, vc_ptr, vs_ptr, vm_ptr, head, s0, end, wi, gw, G: tl.constexpr, NW: tl.constexpr,
          BLOCK_S: tl.constexpr, LATE: tl.constexpr):
    """The loads of tokens ``s0 .. s0 + BLOCK_S`` (masked from ``end``: no traffic past it): key and value words
    ``[BLOCK_S, NW]``, key and value steps and minima (:func:`_group_stats`), the token mask and rows. ``LATE``: the
    value stats are left to :func:`_attn_step` (after the scores; the key stats stand in for them here)."""
    rows = head + s0 + tl.arange(0, BLOCK_S)
    smask = (s0 + tl.arange(0, BLOCK_S)) < end
    kw = tl.load(kc_ptr + rows[:, None] * NW + wi[None, :], mask=smask[:, None], other=0)
    vw = tl.load(vc_ptr + rows[:, None] * NW + wi[None, :], mask=smask[:, None], other=0)
    kst, kmn = _group_stats(ks_ptr, rows, gw, smask, G), _group_stats(km_ptr, rows, gw, smask, G)
    if LATE:
        vst, vmn = kst, kmn
    else:
        vst, vmn = _group_stats(vs_ptr, rows, gw, smask, G), _group_stats(vm_ptr, rows, gw, smask, G)
    return kw, vw, kst, kmn, vst, vmn, smask, rows


@triton.jit
def _prefetch_tokens(kc_ptr, ks_ptr, km_ptr, vc_ptr, vs_ptr, vm_ptr, head, lo, hi, end, NW: tl.constexpr,
                     G: tl.constexpr):
    """L2 prefetches (:func:`runtime.kernels.overlap.prefetch_range`) of the key and value words and stats of tokens
    ``[lo, min(hi, end))`` of the head whose token 0 is row ``head``."""
    overlap.prefetch_range(kc_ptr + head * NW, lo * NW, hi * NW, end * NW, 4)
    overlap.prefetch_range(vc_ptr + head * NW, lo * NW, hi * NW, end * NW, 4)
    overlap.prefetch_range(ks_ptr + head * G, lo * G, hi * G, end * G, 2)
    overlap.prefetch_range(km_ptr + head * G, lo * G, hi * G, end * G, 2)
    overlap.prefetch_range(vs_ptr + head * G, lo * G, hi * G, end * G, 2)
    overlap.prefetch_range(vm_ptr + head * G, lo * G, hi * G, end * G, 2)


@triton.jit
def _scores(kw, kst, kmn, smask, QS, qsw, const):
    """Scaled scores ``[BLOCK_S]`` of a tile (``-inf`` where masked): ``16 step (part - qs_w) + minimum qs_w`` per
    token and word (see :func:`_attn_split_kernel`), summed over the words."""
    part = _slot(kw, 0) * QS[0][None, :] + _slot(kw, 1) * QS[1][None, :]
    part += _slot(kw, 2) * QS[2][None, :] + _slot(kw, 3) * QS[3][None, :]
    part += _slot(kw, 4) * QS[4][None, :] + _slot(kw, 5) * QS[5][None, :]
    part += _slot(kw, 6) * QS[6][None, :] + _slot(kw, 7) * QS[7][None, :]
    sc = tl.sum(16.0 * kst * (part - qsw[None, :]) + kmn * qsw[None, :], 1) + const
    return tl.where(smask, sc, float("-inf"))


@triton.jit
def _rescale(A, alpha):
    """The ten value sums ``A`` (:func:`_accumulate`) times ``alpha``."""
    return (A[0] * alpha, A[1] * alpha, A[2] * alpha, A[3] * alpha, A[4] * alpha, A[5] * alpha, A[6] * alpha,
            A[7] * alpha, A[8] * alpha, A[9] * alpha)


@triton.jit
def _accumulate(A, p, vst, vmn, vw):
    """Per token and word: ``A[i] += p step f_i`` (code ``i`` as ``f_i = 1 + c_i / 16``, :func:`_slot`),
    ``A[8] += p step``, ``A[9] += p minimum``."""
    pv = p[:, None] * vst
    return (A[0] + pv * _slot(vw, 0), A[1] + pv * _slot(vw, 1), A[2] + pv * _slot(vw, 2), A[3] + pv * _slot(vw, 3),
            A[4] + pv * _slot(vw, 4), A[5] + pv * _slot(vw, 5), A[6] + pv * _slot(vw, 6), A[7] + pv * _slot(vw, 7),
            A[8] + pv, A[9] + p[:, None] * vmn)


@triton.jit
def _attn_step(T, m_i, l_i, A, QS, qsw, const, vs_ptr, vm_ptr, gw, G: tl.constexpr, LATE: tl.constexpr,
               ROW_MAX: tl.constexpr):
    """Online softmax over the tile ``T`` (:func:`_tile`): returns the running maximum and sum (scalars; ``[BLOCK_S]``
    per token row with ``ROW_MAX``) and the value sums. The sums are rescaled only when a maximum grows by more than 8
    (``exp(8)`` bounds the unscaled weights); with ``ROW_MAX`` each row has its own maximum and is rescaled by its
    own factor (1 while it does not grow), so no value of the loop is reduced across the tile's rows (warps)."""
    kw, vw, kst, kmn, vst, vmn, smask, rows = T
    sc = _scores(kw, kst, kmn, smask, QS, qsw, const)
    if ROW_MAX:
        m_new = tl.where(sc > m_i + 8.0, sc, m_i)
        alpha = tl.exp(m_i - m_new)
        A = _rescale(A, alpha[:, None])
        m_i = m_new
        p = tl.exp(sc - m_i)
        l_i = l_i * alpha + p
    else:
        m_blk = tl.max(sc, 0)
        if m_blk > m_i + 8.0:  # lazy rescale
            alpha = tl.exp(m_i - m_blk)
            A = _rescale(A, alpha)
            l_i, m_i = l_i * alpha, m_blk
        p = tl.exp(sc - m_i)
        l_i += tl.sum(p, 0)
    if LATE:
        vst, vmn = _group_stats(vs_ptr, rows, gw, smask, G), _group_stats(vm_ptr, rows, gw, smask, G)
    return m_i, l_i, _accumulate(A, p, vst, vmn, vw)


@triton.jit
def _attn_split_kernel(q_ptr, kc_ptr, ks_ptr, km_ptr, vc_ptr, vs_ptr, vm_ptr, kscale_ptr, kshift_ptr,
                       len_ptr, m_ptr, l_ptr, acc_ptr, S, sm_scale,
                       cnt_ptr, kcur_ptr, vcur_ptr, vscale_ptr, vshift_ptr, out_ptr,
                       qkv_ptr, cos_ptr, sin_ptr, stride_qkv, kc8_ptr, vc8_ptr,
                       HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
                       QG: tl.constexpr, BLOCK_S: tl.constexpr, NSPLIT: tl.constexpr, LOADS: tl.constexpr,
                       ROW_MAX: tl.constexpr, L2_AHEAD: tl.constexpr, PDL: tl.constexpr, COMBINE: tl.constexpr,
                       ROPE: tl.constexpr, TRIGGER: tl.constexpr = False, gcnt_ptr=None, gm_ptr=None, gl_ptr=None,
                       gacc_ptr=None, GROUP: tl.constexpr = 1):
    """One query head and one slice of the past per program (query heads of a KV head are adjacent
    programs, so they share the K/V tiles in L2). Codes are read as int32 words (``kc_ptr``/``vc_ptr``:
    ``int32 [.., S, D/8]``, channel ``8w + i`` at bits ``4i``) in ``[BLOCK_S, D/8]`` tiles walked slot by
    slot, never dequantized per channel: ``score = step . (qs . c) + minimum . sum(qs)`` per group, values
    accumulate ``p * step * c`` and ``p * minimum`` separately. Online softmax in float32.

    With ``f = 1 + c / 16`` (:func:`_slot`): ``sum_i a_i c_i = 16 (sum_i a_i f_i - sum_i a_i)``, so a code costs
    a shift, a ``lop3`` and one FMA, for the scores and for the values. Per word and token the scores take
    ``16 step (part - qs_w) + minimum qs_w``; the value sums stay per token and word until the end of the
    slice (:func:`_attn_step`).

    ``LOADS`` (:data:`LOADS`): 0 ("late", the kernel measured in rounds 2-6): a tile's value stats are loaded after
    its scores and rescale, and ptxas sinks the value words below the scores (local sm_90 SASS): each step waits
    for memory two or three times; 1 ("early"): all loads of a tile before its arithmetic; 2 ("prefetch"): the loads
    of tile ``i + 1`` are issued before tile ``i`` is computed (carried in loop variables). With 1 and 2 the step
    sits behind an always-true branch, as in :func:`runtime.kernels.w4_gemv._w4_gemv_rows_kernel`, without which
    ptxas moves loads below the arithmetic. Triton does not pipeline loads in loops without ``tl.dot``.
    ``ROW_MAX``: one running maximum and sum per token row of the tile (see :func:`_attn_step`), merged once after
    the loop. The partial results written are the same in every variant, up to float32 rounding.

    ``L2_AHEAD > 0``: thread 0 asks the L2 for the words and stats of the first ``L2_AHEAD`` tiles of the slice at
    the start, and for tile ``i + L2_AHEAD`` at step ``i`` (:func:`_prefetch_tokens`; needs ``S % 8 == 0``).
    ``PDL`` (:mod:`runtime.kernels.overlap`): the kernel waits for the kernels before it only after reading the
    length and issuing those prefetches: the past slots and the length are not written by the decode step's
    kernels (the length only by a torch op between steps), the query is.

    ``COMBINE``: the last program of each query head to finish (an ``acq_rel`` count per head in ``cnt_ptr``, which
    that program sets back to 0) merges the head's partial results itself (:func:`_combine_if_last`), instead of
    :func:`_attn_combine_kernel`: one launch fewer per layer; in two levels with ``GROUP > 1`` (group counts at
    ``gcnt_ptr [B * HQ * NSPLIT / GROUP]``, the groups' partials in ``gm``, ``gl``, ``gacc``; see
    :func:`_combine_if_last`).

    ``ROPE`` (:func:`rope_attention`): the query, the current key and value come from the projection's output
    ``qkv`` (roped here at position ``length``, as :func:`_rope_append_kernel` ropes them; ``q_ptr``, ``kcur_ptr``
    and ``vcur_ptr`` unused), and the first split of the first query head of each KV head appends the token's key
    and value to the cache at slot ``length`` (:func:`_append_kv`), which no program reads in this step (past
    only): one launch fewer per layer. ``TRIGGER``: the next kernel may launch early (PDL)."""
    overlap.launch_dependents(TRIGGER)
    NW: tl.constexpr = D // 8
    GS: tl.constexpr = D // G
    bh, sp = tl.program_id(0), tl.program_id(1)
    b, h = bh // HQ, bh % HQ
    kh = h // QG
    length = tl.load(len_ptr)
    chunk = tl.cdiv(tl.cdiv(length, NSPLIT), BLOCK_S) * BLOCK_S
    start = sp * chunk
    end = tl.minimum(start + chunk, length)
    head = (b * HKV + kh) * S
    if L2_AHEAD > 0:
        _prefetch_tokens(kc_ptr, ks_ptr, km_ptr, vc_ptr, vs_ptr, vm_ptr, head, start, start + L2_AHEAD * BLOCK_S, end,
                         NW, G)
    overlap.wait_prior(PDL)
    wi = tl.arange(0, NW)
    gw = (wi * 8) // GS  # group of each word
    q_row, sc_row, sh_row = q_ptr + bh * D + wi * 8, kscale_ptr + kh * D + wi * 8, kshift_ptr + kh * D + wi * 8
    if ROPE:
        cos_row, sin_row = cos_ptr + length * D, sin_ptr + length * D
        row = qkv_ptr + b * stride_qkv
        q0 = _rope(row + h * D, wi * 8, cos_row, sin_row, D // 2, D)
        q1 = _rope(row + h * D, wi * 8 + 1, cos_row, sin_row, D // 2, D)
        q2 = _rope(row + h * D, wi * 8 + 2, cos_row, sin_row, D // 2, D)
        q3 = _rope(row + h * D, wi * 8 + 3, cos_row, sin_row, D // 2, D)
        q4 = _rope(row + h * D, wi * 8 + 4, cos_row, sin_row, D // 2, D)
        q5 = _rope(row + h * D, wi * 8 + 5, cos_row, sin_row, D // 2, D)
        q6 = _rope(row + h * D, wi * 8 + 6, cos_row, sin_row, D // 2, D)
        q7 = _rope(row + h * D, wi * 8 + 7, cos_row, sin_row, D // 2, D)
        if (h % QG == 0) & (sp == 0):  # the token's key and value into the cache (slot length: past only)
            jj = tl.arange(0, G)[:, None] * (D // 2 // G) + tl.arange(0, D // 2 // G)[None, :]
            _append_kv(row, b, kh, length, jj, cos_row, sin_row, kc8_ptr, ks_ptr, km_ptr, vc8_ptr, vs_ptr, vm_ptr,
                       kscale_ptr, kshift_ptr, vscale_ptr, vshift_ptr, S, HQ, HKV, D, G, 15)
    else:
        q0, q1, q2, q3 = tl.load(q_row), tl.load(q_row + 1), tl.load(q_row + 2), tl.load(q_row + 3)
        q4, q5, q6, q7 = tl.load(q_row + 4), tl.load(q_row + 5), tl.load(q_row + 6), tl.load(q_row + 7)
    const = (q0 * tl.load(sh_row) + q1 * tl.load(sh_row + 1) + q2 * tl.load(sh_row + 2) + q3 * tl.load(sh_row + 3)
             + q4 * tl.load(sh_row + 4) + q5 * tl.load(sh_row + 5) + q6 * tl.load(sh_row + 6)
             + q7 * tl.load(sh_row + 7))
    const = tl.sum(const, 0) * sm_scale  # the query's dot product with the keys' static shift
    qs0 = q0 * tl.load(sc_row) * sm_scale
    qs1 = q1 * tl.load(sc_row + 1) * sm_scale
    qs2 = q2 * tl.load(sc_row + 2) * sm_scale
    qs3 = q3 * tl.load(sc_row + 3) * sm_scale
    qs4 = q4 * tl.load(sc_row + 4) * sm_scale
    qs5 = q5 * tl.load(sc_row + 5) * sm_scale
    qs6 = q6 * tl.load(sc_row + 6) * sm_scale
    qs7 = q7 * tl.load(sc_row + 7) * sm_scale
    qsw = qs0 + qs1 + qs2 + qs3 + qs4 + qs5 + qs6 + qs7  # [NW]
    QS = (qs0, qs1, qs2, qs3, qs4, qs5, qs6, qs7)
    if ROW_MAX:  # finite start: a row that never holds a token keeps exp(-inf - m) = 0
        m_i = tl.full((BLOCK_S,), -1.0e30, tl.float32)
        l_i = tl.zeros((BLOCK_S,), tl.float32)
    else:
        m_i = tl.max(tl.full((BLOCK_S,), float("-inf"), tl.float32), 0)
        l_i = tl.sum(tl.zeros((BLOCK_S,), tl.float32), 0)
    zero = tl.zeros((BLOCK_S, NW), tl.float32)
    A = (zero, zero, zero, zero, zero, zero, zero, zero, zero, zero)
    AH: tl.constexpr = L2_AHEAD * BLOCK_S
    if LOADS == 2:
        T = _tile(kc_ptr, ks_ptr, km_ptr, vc_ptr, vs_ptr, vm_ptr, head, start, end, wi, gw, G, NW, BLOCK_S, False)
        for s0 in range(start, end, BLOCK_S):
            if L2_AHEAD > 0:
                _prefetch_tokens(kc_ptr, ks_ptr, km_ptr, vc_ptr, vs_ptr, vm_ptr, head, s0 + AH, s0 + AH + BLOCK_S,
                                 end, NW, G)
            U = _tile(kc_ptr, ks_ptr, km_ptr, vc_ptr, vs_ptr, vm_ptr, head, s0 + BLOCK_S, end, wi, gw, G, NW, BLOCK_S,
                      False)
            if s0 < S:  # always (s0 < end <= length <= S): a block boundary, see above
                m_i, l_i, A = _attn_step(T, m_i, l_i, A, QS, qsw, const, vs_ptr, vm_ptr, gw, G, False, ROW_MAX)
            T = U
    elif LOADS == 1:
        for s0 in range(start, end, BLOCK_S):
            if L2_AHEAD > 0:
                _prefetch_tokens(kc_ptr, ks_ptr, km_ptr, vc_ptr, vs_ptr, vm_ptr, head, s0 + AH, s0 + AH + BLOCK_S,
                                 end, NW, G)
            T = _tile(kc_ptr, ks_ptr, km_ptr, vc_ptr, vs_ptr, vm_ptr, head, s0, end, wi, gw, G, NW, BLOCK_S, False)
            if s0 < S:  # always: a block boundary, see above
                m_i, l_i, A = _attn_step(T, m_i, l_i, A, QS, qsw, const, vs_ptr, vm_ptr, gw, G, False, ROW_MAX)
    else:
        for s0 in range(start, end, BLOCK_S):
            if L2_AHEAD > 0:
                _prefetch_tokens(kc_ptr, ks_ptr, km_ptr, vc_ptr, vs_ptr, vm_ptr, head, s0 + AH, s0 + AH + BLOCK_S,
                                 end, NW, G)
            T = _tile(kc_ptr, ks_ptr, km_ptr, vc_ptr, vs_ptr, vm_ptr, head, s0, end, wi, gw, G, NW, BLOCK_S, True)
            m_i, l_i, A = _attn_step(T, m_i, l_i, A, QS, qsw, const, vs_ptr, vm_ptr, gw, G, True, ROW_MAX)
    if ROW_MAX:  # the rows' states merged into one per program
        m_out = tl.max(m_i, 0)
        w = tl.exp(m_i - m_out)
        l_out = tl.sum(l_i * w, 0)
        A = _rescale(A, w[:, None])
    else:
        m_out, l_out = m_i, l_i
    part_id = bh * NSPLIT + sp
    tl.store(m_ptr + part_id, m_out)
    tl.store(l_ptr + part_id, l_out)
    base = tl.sum(A[9], 0) - 16.0 * tl.sum(A[8], 0)  # [NW]
    out = acc_ptr + part_id * D + wi * 8
    tl.store(out, 16.0 * tl.sum(A[0], 0) + base)
    tl.store(out + 1, 16.0 * tl.sum(A[1], 0) + base)
    tl.store(out + 2, 16.0 * tl.sum(A[2], 0) + base)
    tl.store(out + 3, 16.0 * tl.sum(A[3], 0) + base)
    tl.store(out + 4, 16.0 * tl.sum(A[4], 0) + base)
    tl.store(out + 5, 16.0 * tl.sum(A[5], 0) + base)
    tl.store(out + 6, 16.0 * tl.sum(A[6], 0) + base)
    tl.store(out + 7, 16.0 * tl.sum(A[7], 0) + base)
    if COMBINE:
        _combine_if_last(cnt_ptr + bh, b, h, q_ptr, kcur_ptr, vcur_ptr, m_ptr, l_ptr, acc_ptr, vscale_ptr, vshift_ptr,
                         out_ptr, sm_scale, qkv_ptr, cos_ptr, sin_ptr, len_ptr, stride_qkv, HQ, HKV, D, QG, NSPLIT, 1,
                         ROPE, sp=sp, gcnt_ptr=gcnt_ptr + bh * (NSPLIT // GROUP), gm_ptr=gm_ptr, gl_ptr=gl_ptr,
                         gacc_ptr=gacc_ptr, GROUP=GROUP)


@triton.jit
def _combine_if_last(count_ptr, b, h0, q_ptr, kcur_ptr, vcur_ptr, m_ptr, l_ptr, acc_ptr, vscale_ptr, vshift_ptr,
                     out_ptr, sm_scale, qkv_ptr, cos_ptr, sin_ptr, pos_ptr, stride_qkv, HQ: tl.constexpr,
                     HKV: tl.constexpr, D: tl.constexpr, QG: tl.constexpr, NSPLIT: tl.constexpr, HEADS: tl.constexpr,
                     ROPE: tl.constexpr, ready_ptr=None, ep_ptr=None, READY: tl.constexpr = False, pos=None,
                     sp=0, gcnt_ptr=None, gm_ptr=None, gl_ptr=None, gacc_ptr=None, GROUP: tl.constexpr = 1):
    """The fused combine, after a program (split ``sp``) has stored its partials: the last of the ``NSPLIT``
    programs that count at ``count_ptr`` (``acq_rel``; it sets the count back to 0 for the next launch) merges query
    heads ``h0 .. h0 + HEADS - 1`` of sequence ``b`` (:func:`_merged_head`). ``READY``: it then sets the flag at
    ``ready_ptr`` to the step's epoch at ``ep_ptr`` (``release``, after every thread's stores of the merged heads):
    those heads' output is there for a reader that does not wait for the whole kernel (the output projection,
    :func:`runtime.kernels.w4_mma.w4_mma_accumulate`'s ``ready``). The epoch changes every step, so a flag of an
    earlier step never reads as set and nothing needs to clear them. ``pos``: the value at ``pos_ptr`` where the
    caller has it already (the acquire invalidates L1, so loading it again is an L2 round trip that every later
    load of the merge waits behind: its rope rows' addresses depend on it).

    ``GROUP > 1`` (:func:`runtime.kernels.merge_group`, dividing ``NSPLIT``): two levels. The last of each group of
    ``GROUP`` splits (counting at ``gcnt_ptr + sp // GROUP``) merges the group's partials (:func:`_group_partial`)
    into ``gm``, ``gl``, ``gacc`` (``[B, HQ, NSPLIT // GROUP]`` and ``[..., D]``, the layout of the splits' own), and
    the last of the groups to count at ``count_ptr`` merges those."""
    if GROUP > 1:
        NG: tl.constexpr = NSPLIT // GROUP
        g = sp // GROUP
        tl.debug_barrier()  # every thread's partials stored before the count (released by it)
        if tl.atomic_add(gcnt_ptr + g, 1, sem="acq_rel") == GROUP - 1:
            gm = ()  # every head merged before any is stored (see _merge_if_last)
            gl = ()
            gacc = ()
            for j in tl.static_range(HEADS):
                m_j, l_j, acc_j = _group_partial(b, h0 + j, g, m_ptr, l_ptr, acc_ptr, HQ, D, NSPLIT, GROUP)
                gm = gm + (m_j,)
                gl = gl + (l_j,)
                gacc = gacc + (acc_j,)
            d = tl.arange(0, D)
            for j in tl.static_range(HEADS):
                at = (b * HQ + h0 + j) * NG + g
                tl.store(gm_ptr + at, gm[j])
                tl.store(gl_ptr + at, gl[j])
                tl.store(gacc_ptr + at * D + d, gacc[j])
            tl.store(gcnt_ptr + g, 0)
            _merge_if_last(count_ptr, b, h0, q_ptr, kcur_ptr, vcur_ptr, gm_ptr, gl_ptr, gacc_ptr, vscale_ptr,
                           vshift_ptr, out_ptr, sm_scale, qkv_ptr, cos_ptr, sin_ptr, pos_ptr, stride_qkv, HQ, HKV, D,
                           QG, NG, HEADS, ROPE, ready_ptr, ep_ptr, READY, pos)
    else:
        _merge_if_last(count_ptr, b, h0, q_ptr, kcur_ptr, vcur_ptr, m_ptr, l_ptr, acc_ptr, vscale_ptr, vshift_ptr,
                       out_ptr, sm_scale, qkv_ptr, cos_ptr, sin_ptr, pos_ptr, stride_qkv, HQ, HKV, D, QG, NSPLIT, HEADS,
                       ROPE, ready_ptr, ep_ptr, READY, pos)


@triton.jit
def _merge_if_last(count_ptr, b, h0, q_ptr, kcur_ptr, vcur_ptr, m_ptr, l_ptr, acc_ptr, vscale_ptr, vshift_ptr,
                   out_ptr, sm_scale, qkv_ptr, cos_ptr, sin_ptr, pos_ptr, stride_qkv, HQ: tl.constexpr,
                   HKV: tl.constexpr, D: tl.constexpr, QG: tl.constexpr, NSPLIT: tl.constexpr, HEADS: tl.constexpr,
                   ROPE: tl.constexpr, ready_ptr, ep_ptr, READY: tl.constexpr, pos):
    """:func:`_combine_if_last`'s last level: the last of ``NSPLIT`` programs counting at ``count_ptr`` merges the
    ``NSPLIT`` partials of each of its heads (``m``, ``l``, ``acc``) with the current token."""
    tl.debug_barrier()  # every thread's partials stored before the count (released by it)
    if tl.atomic_add(count_ptr, 1, sem="acq_rel") == NSPLIT - 1:
        # every head merged before any is stored: a store may alias the partials as far as the compiler knows, so
        # a head's loads would otherwise wait for the head before it to be stored (HEADS chains of L2 round trips)
        outs = ()
        for j in tl.static_range(HEADS):
            outs = outs + (_merged_head(b, h0 + j, q_ptr, kcur_ptr, vcur_ptr, m_ptr, l_ptr, acc_ptr, vscale_ptr,
                                        vshift_ptr, sm_scale, qkv_ptr, cos_ptr, sin_ptr, pos_ptr, stride_qkv, HQ, HKV,
                                        D, QG, NSPLIT, ".cg", ROPE, pos),)
        d = tl.arange(0, D)
        for j in tl.static_range(HEADS):
            tl.store(out_ptr + (b * HQ + h0 + j) * D + d, outs[j].to(out_ptr.dtype.element_ty))
        tl.store(count_ptr, 0)
        if READY:
            tl.debug_barrier()  # every thread's output stored before the flag (released by it)
            tl.atomic_xchg(ready_ptr, tl.load(ep_ptr), sem="release")


@triton.jit
def _group_partial(b, h, g, m_ptr, l_ptr, acc_ptr, HQ: tl.constexpr, D: tl.constexpr, NSPLIT: tl.constexpr,
                   GROUP: tl.constexpr):
    """Head ``h`` of sequence ``b``: the partials of splits ``g * GROUP ..`` (another program's: loaded past L1)
    merged into one (``m``, ``l``, ``acc [D]``: the maximum, the mass and the values' sum relative to it)."""
    first = (b * HQ + h) * NSPLIT + g * GROUP
    j = tl.arange(0, GROUP)
    ms = tl.load(m_ptr + first + j, cache_modifier=".cg")
    ls = tl.load(l_ptr + first + j, cache_modifier=".cg")
    acc = tl.load(acc_ptr + (first + j)[:, None] * D + tl.arange(0, D)[None, :], cache_modifier=".cg")
    big = tl.maximum(tl.max(ms, 0), -1.0e30)  # an empty split's maximum may be -inf: a group of them weighs 0
    w = tl.exp(ms - big)
    return big, tl.sum(w * ls, 0), tl.sum(w[:, None] * acc, 0)


@triton.jit
def _combine_head(b, h, q_ptr, kcur_ptr, vcur_ptr, m_ptr, l_ptr, acc_ptr, vscale_ptr, vshift_ptr, out_ptr, sm_scale,
                  qkv_ptr, cos_ptr, sin_ptr, pos_ptr, stride_qkv, HQ: tl.constexpr, HKV: tl.constexpr,
                  D: tl.constexpr, QG: tl.constexpr, NSPLIT: tl.constexpr, CACHE: tl.constexpr, ROPE: tl.constexpr,
                  pos=None):
    """Query head ``h`` of sequence ``b`` merged (:func:`_merged_head`) and written to ``out``."""
    o = _merged_head(b, h, q_ptr, kcur_ptr, vcur_ptr, m_ptr, l_ptr, acc_ptr, vscale_ptr, vshift_ptr, sm_scale, qkv_ptr,
                     cos_ptr, sin_ptr, pos_ptr, stride_qkv, HQ, HKV, D, QG, NSPLIT, CACHE, ROPE, pos)
    tl.store(out_ptr + (b * HQ + h) * D + tl.arange(0, D), o.to(out_ptr.dtype.element_ty))


@triton.jit
def _merged_head(b, h, q_ptr, kcur_ptr, vcur_ptr, m_ptr, l_ptr, acc_ptr, vscale_ptr, vshift_ptr, sm_scale, qkv_ptr,
                 cos_ptr, sin_ptr, pos_ptr, stride_qkv, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                 QG: tl.constexpr, NSPLIT: tl.constexpr, CACHE: tl.constexpr, ROPE: tl.constexpr, pos=None):
    """Query head ``h`` of sequence ``b``: the splits' partial results merged with the current token (POQ), the
    static shift and scale of the values applied (float32 ``[D]``). ``CACHE``: the partials' load cache modifier
    (``".cg"``, past L1, when other programs of the same kernel wrote them). ``ROPE``: the query and the current
    key and value from ``qkv`` (roped at position ``pos``, loaded from ``pos_ptr`` unless given), else from ``q``,
    ``k_cur``, ``v_cur``."""
    kh = h // QG
    d = tl.arange(0, D)
    if ROPE:
        if pos is None:
            pos = tl.load(pos_ptr)
        cos_row, sin_row, row = cos_ptr + pos * D, sin_ptr + pos * D, qkv_ptr + b * stride_qkv
        q = _rope(row + h * D, d, cos_row, sin_row, D // 2, D)
        k_cur = _rope(row + (HQ + kh) * D, d, cos_row, sin_row, D // 2, D)
        v_cur = tl.load(row + (HQ + HKV + kh) * D + d).to(tl.float32)
    else:
        q = tl.load(q_ptr + (b * HQ + h) * D + d)
        k_cur = tl.load(kcur_ptr + (b * HKV + kh) * D + d)
        v_cur = tl.load(vcur_ptr + (b * HKV + kh) * D + d)
    s_cur = tl.sum(q * k_cur, 0) * sm_scale
    # any split count (the power-of-two padding masked out); the partial sums in chunks of at most COMBINE_CHUNK
    # splits, so the registers stay those of 16 rows of D floats however many splits there are
    NP2: tl.constexpr = triton.next_power_of_2(NSPLIT)
    CH: tl.constexpr = min(NP2, COMBINE_CHUNK)
    first = (b * HQ + h) * NSPLIT
    sp = tl.arange(0, NP2)
    live = sp < NSPLIT
    ms = tl.load(m_ptr + first + sp, mask=live, other=-1.0e30, cache_modifier=CACHE)
    ls = tl.load(l_ptr + first + sp, mask=live, other=0.0, cache_modifier=CACHE)
    big = tl.maximum(tl.max(ms, 0), s_cur)
    w = tl.exp(ms - big) * ls  # weight of each split's probability mass
    w_cur = tl.exp(s_cur - big)
    mass = tl.sum(w, 0)
    past = tl.zeros((D,), tl.float32)
    for c0 in tl.static_range(0, NSPLIT, CH):
        j = c0 + tl.arange(0, CH)
        ok = j < NSPLIT
        mj = tl.load(m_ptr + first + j, mask=ok, other=-1.0e30, cache_modifier=CACHE)
        acc = tl.load(acc_ptr + (first + j)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0,
                      cache_modifier=CACHE)
        past += tl.sum(tl.exp(mj - big)[:, None] * acc, 0)
    num = tl.load(vscale_ptr + kh * D + d) * past + tl.load(vshift_ptr + kh * D + d) * mass + w_cur * v_cur
    return num / (mass + w_cur)


@triton.jit
def _attn_combine_kernel(q_ptr, kcur_ptr, vcur_ptr, m_ptr, l_ptr, acc_ptr, vscale_ptr, vshift_ptr, out_ptr,
                         sm_scale, qkv_ptr, cos_ptr, sin_ptr, pos_ptr, stride_qkv, HQ: tl.constexpr,
                         HKV: tl.constexpr, D: tl.constexpr, QG: tl.constexpr, NSPLIT: tl.constexpr,
                         PDL: tl.constexpr, ROPE: tl.constexpr, TRIGGER: tl.constexpr = False):
    overlap.launch_dependents(TRIGGER)
    overlap.wait_prior(PDL)  # everything read here is written by the kernels before
    _combine_head(tl.program_id(0), tl.program_id(1), q_ptr, kcur_ptr, vcur_ptr, m_ptr, l_ptr, acc_ptr, vscale_ptr,
                  vshift_ptr, out_ptr, sm_scale, qkv_ptr, cos_ptr, sin_ptr, pos_ptr, stride_qkv, HQ, HKV, D, QG,
                  NSPLIT, "", ROPE)


def num_splits(batch: int, heads: int, max_len: int, sms: int = 132, min_tokens: int = 256) -> int:
    """Power-of-two number of sequence splits that gives the GPU a few programs per multiprocessor (at most 64,
    about 8 programs per multiprocessor, and more than ``min_tokens`` cache slots per split)."""
    n = 1
    while n < 64 and batch * heads * n < 8 * sms and n * min_tokens < max_len:
        n *= 2
    return n


MAX_SPLITS = 256  # slices of the past per query head
COMBINE_CHUNK = tl.constexpr(16)  # the combine's partial sums, splits at a time (registers: 16 x D floats a head)
LOADS = ("late", "early", "prefetch")  # AttnConfig.loads -> the split kernel's LOADS 0, 1, 2
COPIES = ("mixed", "bulk", "lanes")  # AttnConfig.copies: how the tensor-core kernel's tiles reach shared memory
MMA_BAR_BYTES = 128  # the tensor-core kernel's stage mbarriers (8 bytes each, <= 16 stages) before its stages
MMA_STAGE_BYTES = 2 * 64 + 4 * 2  # its shared bytes a token of a stage: key and value codes, four float16 stats
MMA_SMEM_LIMIT = 48 << 10  # the static shared memory a kernel may declare


def mma_smem_bytes(tile: int, stages: int) -> int:
    """Shared memory of the tensor-core kernel's ring (:mod:`runtime.kernels.kv4_mma`)."""
    return MMA_BAR_BYTES + stages * tile * MMA_STAGE_BYTES


@dataclass(frozen=True)
class AttnConfig:
    """How :func:`decode_attention` runs (:func:`_attn_split_kernel`); the defaults are the kernel of rounds 2-6.

    ``splits``: slices of the past per query head (1..:data:`MAX_SPLITS`, any count), or 0 for :func:`num_splits`
    with more than ``min_tokens`` slots a slice. ``block_s``: tokens per step (a power of two, 8..256); ``num_warps`` of the split
    kernel; ``loads``: one of :data:`LOADS` (when a tile's loads are issued); ``row_max``: a running maximum per
    token row of the tile instead of one per program; ``l2_ahead``: L2 prefetches this many tiles ahead (0: none;
    Hopper GPUs only; ``WKVQ_ATTN_L2`` overrides it, :func:`attn_config`); ``combine``: the split kernel merges the
    splits itself (its last program per head) instead of a second kernel (``WKVQ_ATTN_COMBINE`` ``0``/``1``
    overrides it); ``mma``: the tensor-core kernel of :mod:`runtime.kernels.kv4_mma` where it takes the shape
    (:func:`runtime.kernels.kv4_mma.mma_attention_ok`; ``block_s``: tokens a shared-memory stage, 16-128,
    ``stages``: the ring's stages; ``copies``: one of :data:`COPIES` (bulk copies or every
    lane's ``cp.async``); ``keys_a``: the keys as the score MMAs' A operand, 16 tokens an MMA
    (:func:`runtime.kernels.kv4_mma._step_asm_ka`; ``WKVQ_ATTN_KEYS_A`` ``0``/``1`` overrides it);
    ``num_warps``, ``loads``, ``row_max``, ``l2_ahead`` unused), else the split kernel
    with :data:`ATTN_DEFAULT`'s tile."""

    splits: int = 0
    block_s: int = 32
    num_warps: int = 4
    loads: str = "late"
    row_max: bool = False
    min_tokens: int = 256
    l2_ahead: int = 0
    combine: bool = False
    mma: bool = False
    stages: int = 4
    copies: str = "mixed"
    keys_a: bool = False

    def __post_init__(self):
        pow2 = lambda n: isinstance(n, int) and n > 0 and n & (n - 1) == 0  # noqa: E731
        if not (isinstance(self.splits, int) and 0 <= self.splits <= MAX_SPLITS):
            raise ValueError(f"AttnConfig: splits must be 0 (num_splits) or 1..{MAX_SPLITS}, got {self.splits}")
        if not (pow2(self.block_s) and 8 <= self.block_s <= 256):
            raise ValueError(f"AttnConfig: block_s must be a power of two in 8..256, got {self.block_s}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"AttnConfig: num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if self.loads not in LOADS:
            raise ValueError(f"AttnConfig: loads must be one of {', '.join(LOADS)}, got {self.loads!r}")
        if not isinstance(self.row_max, bool):
            raise ValueError(f"AttnConfig: row_max must be a bool, got {self.row_max!r}")
        if not (isinstance(self.min_tokens, int) and self.min_tokens > 0):
            raise ValueError(f"AttnConfig: min_tokens must be a positive int, got {self.min_tokens!r}")
        if not (isinstance(self.l2_ahead, int) and 0 <= self.l2_ahead <= 64):
            raise ValueError(f"AttnConfig: l2_ahead must be an int in 0..64, got {self.l2_ahead!r}")
        if not isinstance(self.combine, bool):
            raise ValueError(f"AttnConfig: combine must be a bool, got {self.combine!r}")
        if not isinstance(self.mma, bool):
            raise ValueError(f"AttnConfig: mma must be a bool, got {self.mma!r}")
        if self.mma and self.block_s not in (16, 32, 64, 128):
            raise ValueError(f"AttnConfig: with mma, block_s must be 16, 32, 64 or 128, got {self.block_s}")
        if not isinstance(self.keys_a, bool):
            raise ValueError(f"AttnConfig: keys_a must be a bool, got {self.keys_a!r}")
        if self.copies not in COPIES:
            raise ValueError(f"AttnConfig: copies must be one of {', '.join(COPIES)}, got {self.copies!r}")
        if not (isinstance(self.stages, int) and 2 <= self.stages <= 16):
            raise ValueError(f"AttnConfig: stages must be an int in 2..16, got {self.stages!r}")
        if self.mma and mma_smem_bytes(self.block_s, self.stages) > MMA_SMEM_LIMIT:
            raise ValueError(f"AttnConfig: {self.stages} stages of {self.block_s} tokens exceed 48 KB of shared memory")

    def label(self) -> str:
        splits = f"sp{self.splits}" if self.splits else f"sp_auto{self.min_tokens}"
        l2 = (f"_l2a{self.l2_ahead}" if self.l2_ahead else "") + ("_comb" if self.combine else "")
        if self.mma:
            copies = ("" if self.copies == "mixed" else "_" + self.copies) + ("_ka" if self.keys_a else "")
            return f"{splits}_mma_s{self.block_s}_st{self.stages}{copies}{l2}"
        return f"{splits}_s{self.block_s}_w{self.num_warps}_{self.loads}{'_row' if self.row_max else ''}{l2}"


# (batch, context bucket) -> config, from the graph-timed sweep (benchmarks/attn_bench.py) at the 7B attention shape
# (32 heads, head_dim 128, per-token stats) on an H200 (eighth session, records benchmarks/results/r10/attn_b*.json;
# 300 configs a case, block_s 16..128). ATTN_DEFAULT: the tile that won all four cases (16 tokens, 1 warp, prefetch,
# per-row maximum) with the splits of num_splits, within 3% of each case's best in the same sweep (the kernel of
# rounds 2-6, AttnConfig(), was 1.5-1.8x slower). Until the thirty-second session every batch and context without an
# entry ran it; they now take the nearest entry (nearest_entry), and ATTN_DEFAULT only an empty table.
# combine: the splits merged by the split kernel's last program per head (twelfth session, no sweep: one launch
# fewer per layer; measured end to end in BENCHMARKS.md)
# mma: the tensor-core kernel (runtime/kernels/kv4_mma.py; fourteenth session: graph-timed sweeps of tokens a stage
# x stages x splits x copies, fused combine, records benchmarks/results/r17/attn_mma4_b1.json (b1) and
# attn_mma3_b8.json (b8)) won all four cases; shapes it does not take (head_dim != 128, KV groups, a GPU before
# sm_90, the interpreter; before the thirtieth session also > 4 query heads a KV head) run the split kernel with
# ATTN_DEFAULT's tile at the entry's splits. In brackets: the split kernel's table config (13th session's table, same
# sweep harness)
_TILE = {"block_s": 16, "num_warps": 1, "loads": "prefetch", "row_max": True, "combine": True}


def _mma(splits: int) -> AttnConfig:
    """The tensor-core config every table entry has (64-token tiles, two stages, the keys as A, the fused
    combine), at ``splits`` splits: the entries differ only there."""
    return AttnConfig(splits=splits, block_s=64, keys_a=True, mma=True, stages=2, combine=True)


# keys_a (eighteenth session, --rope at b1; records benchmarks/results/r21/attn_ka_b*.json): the keys as the score
# MMAs' A operand won every case; in brackets the query-as-A config of the fourteenth session's table, same run
ATTN_TABLE: dict[tuple[int, int], AttnConfig] = {
    (1, 2048): _mma(16),  # 9.54 us (sp16 s32 lanes: 10.08)
    (1, 32768): _mma(32),  # 43.67 us, 3267 GB/s (48.11)
    (8, 2048): _mma(4),  # 24.89 us, 2886 GB/s (27.36)
    (8, 32768): _mma(16),  # 293.72 us, 3886 GB/s (332.20)
}
# (batch, context bucket, KV heads, query heads) -> config: the step's own optimum for a model's heads, taken before
# ATTN_TABLE (whose entries were swept at the 7B's 32 and 32). Until the thirty-fifth session a key could name the KV
# heads only; the one such, (1, 32768, 8), measured on the 70B, is now keyed by the 70B's 64 query heads, and other
# models take placement_splits there.
# LLaMA-3-8B (8 KV heads, 4 query heads each; twenty-ninth session, records benchmarks/results/r32/), the step at b1
# p32768 beside the 8B projections' MMA_TABLE entries: 3.57-3.64 ms on the 7B entry (32 splits), 2.83-2.86 on 64
# splits (on the 7B projection configs 3.40 and 3.26; 128 and 256 splits slower, 3.70-3.76 and 5.32); at p2048
# 32 splits of 32-token tiles lost 0.08 ms beside those entries, so the 7B entry stays. LLaMA-2-70B (8 KV heads of
# 8 query heads: two programs of 4, query_parts; thirtieth session, r33/q8_*.json) at b1 p32768: 13.11-13.17 ms on
# this entry, 13.33 on 32 splits, 15.27 on 128. Keys by query heads too: with the merge in two levels (thirty-first
# session, r36, r37) the 8B at b1 p32768 took 2.314 ms twice on 128 splits against 2.422 / 2.473 on 64 (alternated; the attention alone was
# 20.5 µs on 64 and 22.0 on 128), while the 70B took 12.83 on 128 against 12.25 on 64. LLaMA-2-13B (40 KV heads,
# thirty-second session, r38/sp*_13b_*.json, alternated twice) at b1 p32768: 4.335 / 4.320 ms on 24 splits (960
# programs), 4.319 / 4.348 on 26, 5.157 / 5.124 on 28, 4.568 / 4.520 on ATTN_TABLE's 32 (1280 programs); the 7B's
# own entry stays at 32 (its step on 16 / 24 / 28 / 48 / 64 splits: 3.47 / 2.87-2.89 / 2.67-2.68 / 2.80 / 3.27-3.28
# against 2.61-2.65). The step's split count at two more record cells (thirty-third session, r39/spcells.txt,
# alternated twice): the 13B at b1 p2048 2.779 / 2.785 ms on 12 splits, 2.797 / 2.817 on 20, 2.771 / 2.817 on 24,
# 2.825 / 2.807 on ATTN_TABLE's 16; the 7B at b8 p32768 10.476 / 10.426 on 12, 12.305 / 12.213 on 8, 10.661 /
# 10.728 on 24, 10.636 / 10.577 on ATTN_TABLE's 16 (keyed by its 32 KV heads, so other models at b8 keep 16). At b1
# p8192, a context no entry had (the nearest, p2048's 16 splits; thirty-fourth session, r40/sp8k.txt, alternated
# twice, waited-for medians): the 7B 1.845-1.909 ms on 32 splits, 1.918-1.925 on 24, 1.937-1.970 on 48, 2.050-2.061
# on 16; the 8B 2.059-2.112 on 64, 2.076-2.123 on 128, 2.454-2.501 on 32, 2.681-2.732 on 16; the 13B 3.091-3.097
# on 24, 3.252-3.308 on 32, 3.279-3.303 on 16. At b1 p4096 and p16384 (thirty-fifth session, r41/ctx.txt once,
# r41/confirm.txt alternated twice, queued GPU times): p4096 the 7B 1.691-1.695 ms on 32 splits, 1.727 on 24,
# 1.793-1.797 on the nearest entry's 16; the 8B 1.984-1.990 on 64, 2.263 on 32, 2.311-2.321 on 16; the 13B
# 2.847-2.853 on 24, 2.998 on 12, 2.959-2.966 on 16. p16384: the 8B 2.142-2.147 on 128, 2.160-2.161 on 64,
# 2.777 on the nearest entry's 32; the 13B 3.473-3.476 on 24, 3.642-3.651 on 32; the 7B's nearest entry (32)
# is its optimum (2.079, against 2.202 on 24 and 2.188 on 48), so it has no key there
ATTN_KV_TABLE: dict[tuple[int, int, int, int], AttnConfig] = {
    (1, 32768, 8, 64): _mma(64),
    (1, 32768, 8, 32): _mma(128),
    (1, 32768, 40, 40): _mma(24),
    (1, 2048, 40, 40): _mma(12),
    (8, 32768, 32, 32): _mma(12),
    (1, 8192, 32, 32): _mma(32),
    (1, 8192, 8, 32): _mma(64),
    (1, 8192, 40, 40): _mma(24),
    (1, 4096, 32, 32): _mma(32),
    (1, 4096, 8, 32): _mma(64),
    (1, 4096, 40, 40): _mma(24),
    (1, 16384, 8, 32): _mma(128),
    (1, 16384, 40, 40): _mma(24),
}
ATTN_DEFAULT = AttnConfig(**_TILE)
# The split count at batches 1 to PLACEMENT_MAX_BATCH of a model no ATTN_KV_TABLE key names, from PLACEMENT_CONTEXT
# slots on (placement_splits). Every batch-1 optimum the step was timed at from 4096 tokens (7B, 8B, 13B at
# 4096-32768, 70B at 32768) is the largest multiple of 8 whose programs fit in one placement of RESIDENT_PROGRAMS a
# multiprocessor, at most one 64-token tile a split: 32 splits for 32 KV heads, 24 for 40, 128 for 8 (64 at 4096), 64
# for the 70B's 8 in two query parts (the 8B at p8192: 128, tied with its entry's 64). A grid past one placement runs a
# second wave: the 13B on 28 splits (1120 programs) started its last programs 43.5 µs late (thirty-fifth session,
# benchmarks/results/r41/stamps13.txt), 5.12 ms a step against 4.33 on 24. At 2048 tokens the optima are fewer
# splits (16 and 12: two tiles a split), and at batch 8 more programs (the 7B at p32768: 12 splits, 3072 programs).
# At batches 2 and 4 the same count over the batch's programs (thirty-sixth session, benchmarks/results/r42/, queued
# ms): the 7B at b2 16 splits (1024 programs) at p8192-p32768, 4.07-4.09 at p32768 against 5.01 on the nearest
# entry's 32, 4.10 on 15, 4.12 on 24; at b4 8 splits, 6.41-6.43 at p32768 against 7.70 on 16, 6.71-6.75 on 7,
# 6.39-6.41 on 12, and 2.48 at p4096 against 2.54 on the nearest entry's 4; the 13B at b2 p32768 6.36 on 13 against
# 6.92 on 32, the 8B 2.78 on 64 against 2.84 on 32; the 7B at b3 on 11, 5.19 at p32768 and 2.73 at p8192 against
# 5.31 and 3.04 on the nearest (b8) entries' 16 and 4. The append's programs (one a KV head and row) are not counted:
# at b2 15 splits and at b4 7, which would leave room for them, were slower than 16 and 8, and the 13B at b1 took 26
# splits (1040 programs and 40 appends) as fast as 24.
PLACEMENT_CONTEXT = 4096
PLACEMENT_MAX_BATCH = 4
RESIDENT_PROGRAMS = 8  # the tensor-core attention's programs (4 warps) a multiprocessor runs at once
# a sweep record (benchmarks/attn_bench.py --json) whose best configs take precedence over ATTN_TABLE
TABLE_ENV = "WKVQ_ATTN_TABLE"
L2_ENV = "WKVQ_ATTN_L2"  # a number of tiles: overrides AttnConfig.l2_ahead in attn_config
COMBINE_ENV = "WKVQ_ATTN_COMBINE"  # 0 / 1: overrides AttnConfig.combine in attn_config
KEYS_A_ENV = "WKVQ_ATTN_KEYS_A"  # 0 / 1: overrides AttnConfig.keys_a in attn_config
GROUP_ENV = "WKVQ_ATTN_GROUP"  # the fused combine's first-level group (group_of; 1: one level)


def context_bucket(max_len: int) -> int:
    """The table's context key of a cache of ``max_len`` slots: the nearest power of two in log scale
    (2076 -> 2048, 32808 -> 32768)."""
    return 1 << max(0, round(math.log2(max(1, max_len))))


def load_table(path: str | Path) -> dict[tuple[int, int], AttnConfig]:
    """The best config per ``(batch, context bucket)`` of a sweep record written by ``benchmarks/attn_bench.py``."""
    return sweep_table(path, lambda key, row: (tuple(int(v) for v in key.split("x")), AttnConfig(**row["config"])),
                       "an attention", "benchmarks/attn_bench.py")


def nearest_entry(table: dict[tuple[int, int], AttnConfig], key: tuple[int, int], max_len: int) -> AttnConfig | None:
    """The config of ``table``'s ``(batch, context bucket)`` entry nearest ``key`` in log scale, the batch first, then
    the context, then the smaller of each on a tie (None for an empty table), with its splits (unless 0, the
    policy's) cut to the tiles of a cache of ``max_len`` slots (at least one). The tensor-core kernel won every cell
    the tables were swept at, and beside the split kernel's default at cells no table has it took 16.6 µs against
    31.4 (b1 p8192), 7.5 against 10.8 (p512) and 6.0 against 8.8 (p64) (the attention alone, with rope, eighteenth
    session, ``benchmarks/results/r21/attn_fixed.json``): a neighbour's tensor-core config beats the split kernel's
    default."""
    if not table:
        return None
    b, c = (math.log2(max(1, v)) for v in key)
    near = min(table, key=lambda k: (abs(math.log2(k[0]) - b), abs(math.log2(k[1]) - c), k))
    cfg = table[near]
    if cfg.splits == 0:  # the policy's, resolved at the cache's length anyway
        return cfg
    return replace(cfg, splits=max(1, min(cfg.splits, -(-max_len // cfg.block_s))))


def placement_splits(heads: int, kv_heads: int, max_len: int, block_s: int, sms: int = 132, batch: int = 1) -> int:
    """Splits of a tensor-core attention at ``batch`` rows over ``max_len`` slots for ``heads`` query heads on
    ``kv_heads``: the most whose ``batch × kv_heads × query_parts × splits`` programs fit in one placement of
    :data:`RESIDENT_PROGRAMS` on each of ``sms`` multiprocessors, at most one ``block_s`` tile a split and
    :data:`MAX_SPLITS`, from 16 on rounded down to a multiple of 8 (see :data:`PLACEMENT_CONTEXT`)."""
    fit = sms * RESIDENT_PROGRAMS // (batch * kv_heads * query_parts(heads // kv_heads))
    splits = min(fit, MAX_SPLITS, -(-max_len // block_s))
    return max(1, splits // 8 * 8 if splits >= 16 else splits)


def attn_config(batch: int, heads: int, max_len: int, sms: int = 132, kv_heads: int | None = None) -> AttnConfig:
    """The config at ``batch`` and a cache of ``max_len`` slots for ``heads`` query heads on ``kv_heads`` KV heads
    (None: as many): the sweep records named by the environment variable ``WKVQ_ATTN_TABLE`` (:func:`load_table`;
    several separated by ``os.pathsep``), then :data:`ATTN_KV_TABLE` at ``kv_heads`` and ``heads``, then
    :data:`ATTN_TABLE`, at ``(batch, context_bucket(max_len))``, else :data:`ATTN_TABLE`'s nearest entry
    (:func:`nearest_entry`), else (an empty table) :data:`ATTN_DEFAULT`; at batches up to
    :data:`PLACEMENT_MAX_BATCH` from :data:`PLACEMENT_CONTEXT` slots a tensor-core config of either ATTN_TABLE way
    takes :func:`placement_splits`; ``l2_ahead`` from ``WKVQ_ATTN_L2`` where it is set to a number; ``splits``
    resolved by :func:`num_splits` (``sms`` multiprocessors) where left at 0."""
    key = (batch, context_bucket(max_len))
    env = env_tables(os.environ.get(TABLE_ENV), load_table)
    kv = kv_heads or heads
    cfg = env.get(key) or ATTN_KV_TABLE.get((*key, kv, heads))
    if cfg is None:
        cfg = ATTN_TABLE.get(key) or nearest_entry(ATTN_TABLE, key, max_len) or ATTN_DEFAULT
        if batch <= PLACEMENT_MAX_BATCH and key[1] >= PLACEMENT_CONTEXT and cfg.mma:
            cfg = replace(cfg, splits=placement_splits(heads, kv, max_len, cfg.block_s, sms, batch))
    ahead = os.environ.get(L2_ENV, "")
    if ahead.isdigit():
        cfg = replace(cfg, l2_ahead=int(ahead))
    fused = os.environ.get(COMBINE_ENV, "")
    if fused in ("0", "1"):
        cfg = replace(cfg, combine=fused == "1")
    keys_a = os.environ.get(KEYS_A_ENV, "")
    if keys_a in ("0", "1"):
        cfg = replace(cfg, keys_a=keys_a == "1")
    if cfg.splits == 0:
        cfg = replace(cfg, splits=num_splits(batch, heads, max_len, sms, cfg.min_tokens))
    return cfg


def decode_attention(q, k_cur, v_cur, store, length, kv_params, sm_scale: float, out_dtype,
                     splits: int | AttnConfig, block_s: int | None = None, num_warps: int | None = None):
    """POQ decode attention of ``q float32 [B, Hq, D]`` over the quantized past of ``store``
    (``length int32 [1]`` tokens, a device tensor) and the full-precision ``k_cur, v_cur [B, Hkv, D]``.

    Returns ``[B, Hq, D]`` in ``out_dtype``. ``splits``: an :class:`AttnConfig`, or a power-of-two number of
    splits with the other fields of :func:`attn_config` at this batch and cache size (the decode step passes
    ``FastLlama.splits_for``, chosen there from the same config). ``block_s``, ``num_warps``: override the config's.
    """
    b, hq, d = q.shape
    return _attention(b, hq, d, q, k_cur, v_cur, None, store, length, kv_params, sm_scale, out_dtype, splits, block_s,
                      num_warps)


def rope_attention(qkv, cos, sin, pos, store, kv_params, num_heads: int, sm_scale: float, out_dtype,
                   splits: int | AttnConfig, block_s: int | None = None, num_warps: int | None = None,
                   bits: int = 4, ready: tuple[torch.Tensor, torch.Tensor] | None = None):
    """:func:`rope_append` and :func:`decode_attention` in one kernel launch: the attention programs rope the
    token's query, key and value from the projection's output ``qkv [B, (Hq + 2 Hkv) D]`` (float32) at position
    ``pos`` (the number of cached tokens, a device tensor), attend over the ``pos`` past tokens and the current one
    (POQ), and one program per KV head appends the token's key and value at slot ``pos``, as :func:`rope_append`
    would (same stored bytes). ``qkv`` is only read (zero it afterwards where it accumulates).
    ``ready = (flags, epoch)``: ``int32 [B * Hkv * query_parts(Hq / Hkv)]`` flags (at least; one a KV head's part
    of its query heads, :func:`query_parts`), each set to the step's ``epoch`` (``int32 [1]``, a different value
    every step) once that part's output is stored (by the tensor-core kernel's combining program, else after the
    launch): the output projection may then start on a head without waiting for the whole
    attention (:func:`runtime.kernels.w4_mma.w4_mma_accumulate`). Returns ``[B, Hq, D]`` in ``out_dtype``; ``pos``
    is not advanced."""
    b, hkv, d = qkv.shape[0], store.k_codes.shape[1], 2 * store.k_codes.shape[-1]
    if bits != 4:
        raise ValueError(f"the KV kernels store 4-bit codes, got kv bits {bits}")
    if qkv.dim() != 2 or qkv.shape[1] != (num_heads + 2 * hkv) * d or qkv.stride(1) != 1 or qkv.dtype != torch.float32:
        raise ValueError(f"qkv must be float32 [{b}, {(num_heads + 2 * hkv) * d}] with unit stride, got {qkv.dtype} "
                         f"{list(qkv.shape)}")
    return _attention(b, num_heads, d, None, None, None, (qkv, cos, sin), store, pos, kv_params, sm_scale, out_dtype,
                      splits, block_s, num_warps, ready)


def _split_kernel(cfg: AttnConfig) -> AttnConfig:
    """``cfg`` for the split kernel: a tensor-core config (``mma``) becomes :data:`ATTN_DEFAULT`'s tile with its
    splits, combine and L2 prefetch."""
    if not cfg.mma:
        return cfg
    return replace(ATTN_DEFAULT, splits=cfg.splits, combine=cfg.combine, l2_ahead=cfg.l2_ahead)


def _attention(b, hq, d, q, k_cur, v_cur, rope, store, length, kv_params, sm_scale, out_dtype, splits, block_s,
               num_warps, ready=None):
    hkv, s, g = store.k_codes.shape[1], store.k_codes.shape[2], store.k_step.shape[-1]
    device = store.k_codes.device
    if isinstance(splits, AttnConfig):
        cfg = splits
    else:
        cfg = replace(attn_config(b, hq, s, kv_heads=hkv), splits=splits)
    if block_s or num_warps:  # the split kernel's tile asked for
        cfg = replace(_split_kernel(cfg), block_s=block_s or cfg.block_s, num_warps=num_warps or cfg.num_warps)
    if cfg.splits == 0:
        cfg = replace(cfg, splits=num_splits(b, hq, s, multiprocessors(device), cfg.min_tokens))
    qg = hq // hkv
    if not head_dim_ok(d) or store.k_codes.shape[-1] * 2 != d or (d // g) % 8:
        raise ValueError(f"the attention kernel needs a power-of-two head_dim and a KV group size that is a multiple "
                         f"of 8, got head_dim {d}, group size {d // g}; run the model without the kernels")
    from . import kv4_mma  # it imports this module: not at the top

    rows = (q,) if rope is None else rope
    mma = cfg.mma and kv4_mma.mma_attention_ok(store, d, g, qg, (*rows, *kv_params[:2]))
    if not mma:
        cfg = _split_kernel(cfg)  # a shape the tensor-core kernel does not take
    m = torch.empty(b, hq, cfg.splits, dtype=torch.float32, device=device)
    l_ = torch.empty_like(m)
    acc = torch.empty(b, hq, cfg.splits, d, dtype=torch.float32, device=device)
    out = torch.empty(b, hq, d, dtype=out_dtype, device=device)
    k_scale, k_shift, v_scale, v_shift = kv_params
    pdl = overlap.launch_options(device, "attn_mma" if mma else "attn")  # launched early
    # the attention's last kernel lets the next one launch early only with "attn_trigger"; a first kernel whose
    # splits the combine kernel merges lets that one launch early wherever the attention uses PDL
    trigger = overlap.pdl(device, "attn_trigger")
    first_trigger = trigger if cfg.combine else pdl["PDL"]
    if ready is not None and mma and cfg.combine:  # the output projection waits for the heads' flags: launch it
        first_trigger = first_trigger or pdl["PDL"]
    if rope is None:  # the rope arguments unused
        rope_args = (m, m, m, 0, store.k_codes, store.v_codes)
    else:
        qkv, cos, sin = rope
        rope_args = (qkv, cos, sin, qkv.stride(0), store.k_codes, store.v_codes)
        q = k_cur = v_cur = m  # unused: the kernel reads qkv
    n_parts = b * hkv * query_parts(qg)  # the KV heads' parts of their query heads: a count and a ready flag each
    if ready is not None and ready[0].numel() < n_parts:
        raise ValueError(f"ready needs {n_parts} flags (one a KV head's part of its query heads, query_parts), got "
                         f"{ready[0].numel()}")
    if mma:
        cnt = _head_counts(device, n_parts) if cfg.combine else m
        kv4_mma.launch(b, hq, q, k_cur, v_cur, rope, store, length, kv_params, sm_scale, m, l_, acc, out, cnt,
                       cfg.splits, cfg.block_s, cfg.stages, cfg.combine, cfg.copies, pdl["PDL"], first_trigger,
                       keys_a=cfg.keys_a, ready=ready if cfg.combine else None,
                       stamps_kind="attn")
    else:
        cnt = _head_counts(device, b * hq) if cfg.combine else m
        group, (gcnt, gm, gl, gacc) = merge_buffers(acc, b * hq, 1, cfg.splits, cfg.combine, cnt)
        _attn_split_kernel[(b * hq, cfg.splits)](
            q, store.k_codes.view(torch.int32), store.k_step, store.k_min, store.v_codes.view(torch.int32),
            store.v_step, store.v_min, k_scale, k_shift, length, m, l_, acc, s, sm_scale, cnt, k_cur, v_cur, v_scale,
            v_shift, out, *rope_args, HQ=hq, HKV=hkv, D=d, G=g, QG=qg, BLOCK_S=cfg.block_s, NSPLIT=cfg.splits,
            LOADS=LOADS.index(cfg.loads), ROW_MAX=cfg.row_max, num_warps=cfg.num_warps,
            L2_AHEAD=cfg.l2_ahead if s % 8 == 0 and overlap.hopper(device) else 0, COMBINE=cfg.combine,
            ROPE=rope is not None, TRIGGER=first_trigger, gcnt_ptr=gcnt, gm_ptr=gm, gl_ptr=gl, gacc_ptr=gacc,
            GROUP=group, **pdl)
    if not cfg.combine:
        _attn_combine_kernel[(b, hq)](q, k_cur, v_cur, m, l_, acc, v_scale, v_shift, out, sm_scale, rope_args[0],
                                      rope_args[1], rope_args[2], length, rope_args[3], HQ=hq, HKV=hkv, D=d, QG=qg,
                                      NSPLIT=cfg.splits, ROPE=rope is not None, TRIGGER=trigger, **pdl)
    if ready is not None and not (mma and cfg.combine):  # no kernel set the flags: every head is ready now
        ready[0].copy_(ready[1].expand_as(ready[0]))
    return out


def group_of(heads: int, splits: int) -> int:
    """The fused combine's first-level group (:func:`runtime.kernels.merge_group`) for programs of ``heads`` query
    heads, or ``WKVQ_ATTN_GROUP`` where set (1: one level; else a power of two dividing ``splits``, below it)."""
    env = os.environ.get(GROUP_ENV, "").strip()
    if not env:
        return merge_group(heads, splits)
    g = int(env) if env.isdigit() else 0
    if g != 1 and not (g > 1 and g & (g - 1) == 0 and splits % g == 0 and g < splits):
        raise ValueError(f"{GROUP_ENV}={env!r}: must be 1 (one merge level) or a power of two that divides the "
                         f"{splits} splits and is below it")
    return g


def merge_buffers(acc: torch.Tensor, rows: int, heads: int, splits: int, combine: bool, unused: torch.Tensor):
    """``(group, (counts, m, l, acc))`` for :func:`_combine_if_last` in a launch of ``rows`` count rows (KV heads'
    parts or query heads) of programs of ``heads`` query heads, whose splits' partials are ``acc [B, HQ, splits,
    D]``: the group (:func:`group_of`; 1 without ``combine``) and, for two levels, the zeroed group counts (the last
    of each group resets its count) and the groups' partials; else ``unused`` four times."""
    group = group_of(heads, splits) if combine else 1
    if group == 1:
        return 1, (unused,) * 4
    b, hq, _, d = acc.shape
    ng = splits // group
    gm = torch.empty(b, hq, ng, dtype=torch.float32, device=acc.device)
    gacc = torch.empty(b, hq, ng, d, dtype=torch.float32, device=acc.device)
    return group, (_group_counts(acc.device, rows * ng), gm, torch.empty_like(gm), gacc)


def _head_counts(device, n: int) -> torch.Tensor:
    """The fused combine's per-head counts (:func:`runtime.kernels.zeroed_counts`: the last program of each head
    resets its count)."""
    return zeroed_counts("attention heads", device, n)


def _group_counts(device, n: int) -> torch.Tensor:
    """The two-level merge's per-group counts (:func:`merge_buffers`; the last program of each group resets its
    count)."""
    return zeroed_counts("attention groups", device, n)
