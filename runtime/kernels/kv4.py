"""4-bit POQ KV cache kernels: fused rope + quantize-and-append, and split-K decode attention.

Cache layout (see :mod:`runtime.static_cache`): codes ``uint8 [B, Hkv, S, D/2]`` packed with
:func:`runtime.quant.pack` (channel ``2j`` in the low nibble), ``step`` and ``minimum``
``float16 [B, Hkv, S, G]`` over ``G`` groups of ``D / G`` channels of the smoothed vector
``x~ = (x - delta) / s``. The decode step's own key/value stay in full precision (POQ).

The static smoothing is folded into the query and the output instead of dequantizing the cache:
``q . (s * k~ + delta) = (q * s) . k~ + q . delta`` and
``sum_j p_j (s * v~_j + delta) = s * sum_j p_j v~_j + delta * sum_j p_j``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
def _quant_store(xe, xo, jj, scale_ptr, shift_ptr, codes_ptr, step_ptr, min_ptr, G: tl.constexpr,
                 QMAX: tl.constexpr):
    """Token-wise asymmetric quantization of one head (even/odd channels ``[G, GSH]``), stored packed."""
    ye = (xe - tl.load(shift_ptr + 2 * jj)) / tl.load(scale_ptr + 2 * jj)
    yo = (xo - tl.load(shift_ptr + 2 * jj + 1)) / tl.load(scale_ptr + 2 * jj + 1)
    lo = tl.minimum(tl.min(ye, 1), tl.min(yo, 1))
    hi = tl.maximum(tl.max(ye, 1), tl.max(yo, 1))
    # step and minimum are rounded to the float16 the cache stores (as KVQuantizer.quantize does)
    step = tl.minimum(tl.maximum(tl.maximum((hi - lo) / QMAX, 1e-8), 6.103515625e-05), 65504.0)
    step = step.to(tl.float16).to(tl.float32)
    lo = tl.minimum(tl.maximum(lo, -65504.0), 65504.0).to(tl.float16).to(tl.float32)
    ce = tl.minimum(tl.maximum(_round_half_even((ye - lo[:, None]) / step[:, None]), 0.0), QMAX)
    co = tl.minimum(tl.maximum(_round_half_even((yo - lo[:, None]) / step[:, None]), 0.0), QMAX)
    tl.store(codes_ptr + jj, (ce.to(tl.uint8) | (co.to(tl.uint8) << 4)))
    g = tl.arange(0, G)
    tl.store(step_ptr + g, step.to(tl.float16))
    tl.store(min_ptr + g, lo.to(tl.float16))


@triton.jit
def _clear(base, jj, like):
    """Zero the head vector at ``base`` after every thread of the program has read it."""
    tl.debug_barrier()
    zero = tl.zeros_like(like).to(base.dtype.element_ty)
    tl.store(base + 2 * jj, zero)
    tl.store(base + 2 * jj + 1, zero)


@triton.jit
def _rope_append_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, kcur_ptr, vcur_ptr,
                        kc_ptr, ks_ptr, km_ptr, vc_ptr, vs_ptr, vm_ptr,
                        kscale_ptr, kshift_ptr, vscale_ptr, vshift_ptr, stride_qkv, S,
                        HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
                        QMAX: tl.constexpr, CLEAR: tl.constexpr):
    HALF: tl.constexpr = D // 2
    GSH: tl.constexpr = HALF // G
    b, h = tl.program_id(0), tl.program_id(1)
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
        ke = _rope(row + h * D, 2 * jj, cos_row, sin_row, HALF, D)
        ko = _rope(row + h * D, 2 * jj + 1, cos_row, sin_row, HALF, D)
        vrow = row + (HQ + HKV + kh) * D
        ve = tl.load(vrow + 2 * jj).to(tl.float32)
        vo = tl.load(vrow + 2 * jj + 1).to(tl.float32)
        cur = (b * HKV + kh) * D
        tl.store(kcur_ptr + cur + 2 * jj, ke)
        tl.store(kcur_ptr + cur + 2 * jj + 1, ko)
        tl.store(vcur_ptr + cur + 2 * jj, ve)
        tl.store(vcur_ptr + cur + 2 * jj + 1, vo)
        if CLEAR:
            _clear(row + h * D, jj, ke)
            _clear(vrow, jj, ve)
        slot = (b * HKV + kh) * S + pos
        _quant_store(ke, ko, jj, kscale_ptr + kh * D, kshift_ptr + kh * D, kc_ptr + slot * HALF,
                     ks_ptr + slot * G, km_ptr + slot * G, G, QMAX)
        _quant_store(ve, vo, jj, vscale_ptr + kh * D, vshift_ptr + kh * D, vc_ptr + slot * HALF,
                     vs_ptr + slot * G, vm_ptr + slot * G, G, QMAX)


def rope_append(qkv, cos, sin, pos, store, kv_params, num_heads: int, bits: int = 4, clear: bool = False):
    """Rope the decode token's q/k, append its quantized k/v to ``store`` at slot ``pos``.

    ``qkv [B, (Hq + 2 Hkv) * D]`` (fused projection output), ``cos, sin float32 [S, D]``,
    ``pos int32 [1]`` (device tensor: the token's position = number of cached tokens),
    ``store``: a :class:`runtime.static_cache.LayerStore`; ``kv_params``: the four
    ``[Hkv, D]`` float32 tensors ``(k_scale, k_shift, v_scale, v_shift)``.
    Returns ``q float32 [B, Hq, D]``, ``k_cur, v_cur float32 [B, Hkv, D]`` (full precision).
    ``clear``: zero ``qkv`` after reading it (an accumulation buffer of the split-K projection).
    """
    b, hkv, s, half = store.k_codes.shape
    d, g = 2 * half, store.k_step.shape[-1]
    if bits != 4:
        raise ValueError(f"the KV kernels store 4-bit codes, got kv bits {bits}")
    q = torch.empty(b, num_heads, d, dtype=torch.float32, device=qkv.device)
    k_cur = torch.empty(b, hkv, d, dtype=torch.float32, device=qkv.device)
    v_cur = torch.empty_like(k_cur)
    _rope_append_kernel[(b, num_heads + hkv)](
        qkv, cos, sin, pos, q, k_cur, v_cur, store.k_codes, store.k_step, store.k_min,
        store.v_codes, store.v_step, store.v_min, *kv_params, qkv.stride(0), s,
        HQ=num_heads, HKV=hkv, D=d, G=g, QMAX=15, CLEAR=clear)
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
def _attn_split_kernel(q_ptr, kc_ptr, ks_ptr, km_ptr, vc_ptr, vs_ptr, vm_ptr, kscale_ptr, kshift_ptr,
                       len_ptr, m_ptr, l_ptr, acc_ptr, S, sm_scale,
                       HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
                       QG: tl.constexpr, BLOCK_S: tl.constexpr, NSPLIT: tl.constexpr):
    """One query head and one slice of the past per program (query heads of a KV head are adjacent
    programs, so they share the K/V tiles in L2). Codes are read as int32 words (``kc_ptr``/``vc_ptr``:
    ``int32 [.., S, D/8]``, channel ``8w + i`` at bits ``4i``) in ``[BLOCK_S, D/8]`` tiles walked slot by
    slot, never dequantized per channel: ``score = step . (qs . c) + minimum . sum(qs)`` per group, values
    accumulate ``p * step * c`` and ``p * minimum`` separately. Online softmax in float32.

    With ``f = 1 + c / 16`` (:func:`_slot`): ``sum_i a_i c_i = 16 (sum_i a_i f_i - sum_i a_i)``, so a code costs
    a shift, a ``lop3`` and one FMA, for the scores and for the values. Per word and token the scores take
    ``16 step (part - qs_w) + minimum qs_w``; the value sums stay per token and word until the end of the
    slice. The accumulators are rescaled only when the running maximum grows by more than 8 (exp(8) bounds
    the unscaled weights)."""
    NW: tl.constexpr = D // 8
    GS: tl.constexpr = D // G
    bh, sp = tl.program_id(0), tl.program_id(1)
    b, h = bh // HQ, bh % HQ
    kh = h // QG
    length = tl.load(len_ptr)
    chunk = tl.cdiv(tl.cdiv(length, NSPLIT), BLOCK_S) * BLOCK_S
    start = sp * chunk
    end = tl.minimum(start + chunk, length)
    wi = tl.arange(0, NW)
    gw = (wi * 8) // GS  # group of each word
    q_row, sc_row, sh_row = q_ptr + bh * D + wi * 8, kscale_ptr + kh * D + wi * 8, kshift_ptr + kh * D + wi * 8
    qs0 = tl.load(q_row) * tl.load(sc_row) * sm_scale
    qs1 = tl.load(q_row + 1) * tl.load(sc_row + 1) * sm_scale
    qs2 = tl.load(q_row + 2) * tl.load(sc_row + 2) * sm_scale
    qs3 = tl.load(q_row + 3) * tl.load(sc_row + 3) * sm_scale
    qs4 = tl.load(q_row + 4) * tl.load(sc_row + 4) * sm_scale
    qs5 = tl.load(q_row + 5) * tl.load(sc_row + 5) * sm_scale
    qs6 = tl.load(q_row + 6) * tl.load(sc_row + 6) * sm_scale
    qs7 = tl.load(q_row + 7) * tl.load(sc_row + 7) * sm_scale
    qsw = qs0 + qs1 + qs2 + qs3 + qs4 + qs5 + qs6 + qs7  # [NW]
    d8 = tl.arange(0, 8)
    const = tl.sum(tl.sum(tl.load(q_row[:, None] + d8[None, :]) * tl.load(sh_row[:, None] + d8[None, :]), 1), 0)
    const = const * sm_scale
    m_i = tl.max(tl.full((BLOCK_S,), float("-inf"), tl.float32), 0)
    l_i = tl.sum(tl.zeros((BLOCK_S,), tl.float32), 0)
    zero = tl.zeros((BLOCK_S, NW), tl.float32)
    a0, a1, a2, a3, a4, a5, a6, a7, spv, smin = zero, zero, zero, zero, zero, zero, zero, zero, zero, zero
    head = (b * HKV + kh) * S
    for s0 in range(start, end, BLOCK_S):
        rows = head + s0 + tl.arange(0, BLOCK_S)
        smask = (s0 + tl.arange(0, BLOCK_S)) < end
        kw = tl.load(kc_ptr + rows[:, None] * NW + wi[None, :], mask=smask[:, None], other=0)
        vw = tl.load(vc_ptr + rows[:, None] * NW + wi[None, :], mask=smask[:, None], other=0)
        part = _slot(kw, 0) * qs0[None, :] + _slot(kw, 1) * qs1[None, :]
        part += _slot(kw, 2) * qs2[None, :] + _slot(kw, 3) * qs3[None, :]
        part += _slot(kw, 4) * qs4[None, :] + _slot(kw, 5) * qs5[None, :]
        part += _slot(kw, 6) * qs6[None, :] + _slot(kw, 7) * qs7[None, :]
        kst, kmn = _group_stats(ks_ptr, rows, gw, smask, G), _group_stats(km_ptr, rows, gw, smask, G)
        sc = tl.sum(16.0 * kst * (part - qsw[None, :]) + kmn * qsw[None, :], 1) + const
        sc = tl.where(smask, sc, float("-inf"))
        m_blk = tl.max(sc, 0)
        if m_blk > m_i + 8.0:  # lazy rescale
            alpha = tl.exp(m_i - m_blk)
            a0, a1, a2, a3 = a0 * alpha, a1 * alpha, a2 * alpha, a3 * alpha
            a4, a5, a6, a7 = a4 * alpha, a5 * alpha, a6 * alpha, a7 * alpha
            spv, smin, l_i, m_i = spv * alpha, smin * alpha, l_i * alpha, m_blk
        p = tl.exp(sc - m_i)
        l_i += tl.sum(p, 0)
        pv = p[:, None] * _group_stats(vs_ptr, rows, gw, smask, G)
        smin += p[:, None] * _group_stats(vm_ptr, rows, gw, smask, G)
        spv += pv
        a0 += pv * _slot(vw, 0)
        a1 += pv * _slot(vw, 1)
        a2 += pv * _slot(vw, 2)
        a3 += pv * _slot(vw, 3)
        a4 += pv * _slot(vw, 4)
        a5 += pv * _slot(vw, 5)
        a6 += pv * _slot(vw, 6)
        a7 += pv * _slot(vw, 7)
    part_id = bh * NSPLIT + sp
    tl.store(m_ptr + part_id, m_i)
    tl.store(l_ptr + part_id, l_i)
    base = tl.sum(smin, 0) - 16.0 * tl.sum(spv, 0)  # [NW]
    out = acc_ptr + part_id * D + wi * 8
    tl.store(out, 16.0 * tl.sum(a0, 0) + base)
    tl.store(out + 1, 16.0 * tl.sum(a1, 0) + base)
    tl.store(out + 2, 16.0 * tl.sum(a2, 0) + base)
    tl.store(out + 3, 16.0 * tl.sum(a3, 0) + base)
    tl.store(out + 4, 16.0 * tl.sum(a4, 0) + base)
    tl.store(out + 5, 16.0 * tl.sum(a5, 0) + base)
    tl.store(out + 6, 16.0 * tl.sum(a6, 0) + base)
    tl.store(out + 7, 16.0 * tl.sum(a7, 0) + base)


@triton.jit
def _attn_combine_kernel(q_ptr, kcur_ptr, vcur_ptr, m_ptr, l_ptr, acc_ptr, vscale_ptr, vshift_ptr, out_ptr,
                         sm_scale, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, QG: tl.constexpr,
                         NSPLIT: tl.constexpr):
    b, h = tl.program_id(0), tl.program_id(1)
    kh = h // QG
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (b * HQ + h) * D + d)
    k_cur = tl.load(kcur_ptr + (b * HKV + kh) * D + d)
    v_cur = tl.load(vcur_ptr + (b * HKV + kh) * D + d)
    s_cur = tl.sum(q * k_cur, 0) * sm_scale
    part = (b * HQ + h) * NSPLIT + tl.arange(0, NSPLIT)
    ms = tl.load(m_ptr + part)
    big = tl.maximum(tl.max(ms, 0), s_cur)
    w = tl.exp(ms - big) * tl.load(l_ptr + part)  # weight of each split's probability mass
    w_cur = tl.exp(s_cur - big)
    acc = tl.load(acc_ptr + part[:, None] * D + d[None, :])
    scale = tl.exp(ms - big)
    past = tl.sum(scale[:, None] * acc, 0)
    mass = tl.sum(w, 0)
    num = tl.load(vscale_ptr + kh * D + d) * past + tl.load(vshift_ptr + kh * D + d) * mass + w_cur * v_cur
    tl.store(out_ptr + (b * HQ + h) * D + d, (num / (mass + w_cur)).to(out_ptr.dtype.element_ty))


def num_splits(batch: int, heads: int, max_len: int, sms: int = 132) -> int:
    """Power-of-two number of sequence splits that gives the GPU a few programs per multiprocessor."""
    n = 1
    while n < 64 and batch * heads * n < 8 * sms and n * 256 < max_len:
        n *= 2
    return n


BLOCK_S = 32  # tokens per step of the split kernel (NOTES.md)


def decode_attention(q, k_cur, v_cur, store, length, kv_params, sm_scale: float, out_dtype,
                     splits: int, block_s: int | None = None, num_warps: int = 4):
    """POQ decode attention of ``q float32 [B, Hq, D]`` over the quantized past of ``store``
    (``length int32 [1]`` tokens, a device tensor) and the full-precision ``k_cur, v_cur [B, Hkv, D]``.

    Returns ``[B, Hq, D]`` in ``out_dtype``. ``splits`` must be a power of two.
    """
    b, hq, d = q.shape
    hkv, s, g = store.k_codes.shape[1], store.k_codes.shape[2], store.k_step.shape[-1]
    block_s = block_s or BLOCK_S
    if splits & (splits - 1):
        raise ValueError(f"splits must be a power of two, got {splits}")
    qg = hq // hkv
    m = torch.empty(b, hq, splits, dtype=torch.float32, device=q.device)
    l_ = torch.empty_like(m)
    acc = torch.empty(b, hq, splits, d, dtype=torch.float32, device=q.device)
    k_scale, k_shift, v_scale, v_shift = kv_params
    if d % 8 or store.k_codes.shape[-1] * 2 != d or (d // g) % 8:
        raise ValueError(f"the attention kernel needs head_dim and the KV group size multiples of 8, got "
                         f"head_dim {d}, group size {d // g}")
    k_words, v_words = store.k_codes.view(torch.int32), store.v_codes.view(torch.int32)
    _attn_split_kernel[(b * hq, splits)](
        q, k_words, store.k_step, store.k_min, v_words, store.v_step, store.v_min, k_scale, k_shift,
        length, m, l_, acc, s, sm_scale, HQ=hq, HKV=hkv, D=d, G=g, QG=qg, BLOCK_S=block_s, NSPLIT=splits,
        num_warps=num_warps)
    out = torch.empty(b, hq, d, dtype=out_dtype, device=q.device)
    _attn_combine_kernel[(b, hq)](q, k_cur, v_cur, m, l_, acc, v_scale, v_shift, out, sm_scale,
                                  HQ=hq, HKV=hkv, D=d, QG=qg, NSPLIT=splits)
    return out
