"""Triton kernels against the reference path on random inputs.

Run on CUDA; on CPU only under Triton's interpreter (``TRITON_INTERPRET=1 pytest tests/test_kernels.py``),
otherwise skipped (CI installs no Triton).
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F

from runtime import kernels, quant
from runtime.kvquant import KVQuantConfig, KVQuantizer
from runtime.static_cache import StaticPOQCache, poq_attention

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not kernels.available(DEV), reason="needs CUDA + Triton (or TRITON_INTERPRET=1)")
DTYPE = torch.float16 if DEV.type == "cuda" else torch.float32
TOL = 2e-3 if DEV.type == "cuda" else 1e-5  # relative error floor: fp16 operands on GPU, fp32 in the interpreter


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _packed(rows, k, group, layout):
    """A random weight of ``rows`` rows quantized at ``group``: its codes ``q`` and the packed ``(qweight, scales,
    zeros)`` in ``layout`` ("row": the artifact's, "group": quant.group_major)."""
    w = torch.randn(rows, k, device=DEV)
    scale, zero = quant.weight_qparams(w, 4, group)
    q = quant.quantize_weight(w, scale, zero, 4, group)
    qw, s, z = quant.pack(q, 4), scale.half(), zero.to(torch.uint8)
    if layout == "group":
        qw, s, z = quant.group_major(qw, s, z, group)
    return q, qw, s, z


@pytest.mark.parametrize("layout", ["row", "group"])
@pytest.mark.parametrize("m,n,k", [(1, 48, 160), (1, 24, 100), (5, 40, 576), (12, 40, 100), (17, 64, 256),
                                   (33, 64, 256), (70, 24, 128), (300, 40, 576)])
def test_w4_linear(m, n, k, layout):
    """Every kernel of w4_linear (one row, K % 8 != 0: the GEMV; up to 16: split-K, or the GEMM where K % 8 != 0;
    from DEQUANT_MIN_ROWS, 17, the dequantized weight on cuBLAS) on the artifact's row-major layout and on the
    group-major one (quant.group_major; ragged groups padded)."""
    from runtime.kernels.w4 import w4_linear

    q, qw, s, z = _packed(n, k, 128, layout)
    x, bias, res = (torch.randn(m, k, device=DEV, dtype=DTYPE), torch.randn(n, device=DEV, dtype=DTYPE),
                    torch.randn(m, n, device=DEV, dtype=DTYPE))
    ref = x.double() @ quant.dequantize_weight(q, s, z, 128).double().T + bias.double() + res.double()
    assert _rel(w4_linear(x, qw, s, z, 128, bias, res), ref) < TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("layout,group,k", [("row", 128, 576), ("group", 128, 576), ("group", 64, 200),
                                           ("row", 32, 100)])
def test_w4_dequantize_is_exact(layout, group, k, dtype):
    """The prefill's dequantization equals the reference's, element for element, on both layouts, ragged last
    groups included, and on a row slice of a group-major weight (the fused projections' views)."""
    from runtime.kernels.w4 import DEQUANT_MIN_ROWS, w4_dequantize

    n = 72
    q, qw, s, z = _packed(n + 8, k, group, layout)
    out = w4_dequantize(qw[8:], s[8:], z[8:], k, group, dtype)
    assert out.dtype == dtype and out.shape == (n, k)
    assert torch.equal(out, quant.dequantize_weight(q[8:], s[8:], z[8:], group, dtype))
    assert DEQUANT_MIN_ROWS == 17  # right above the split-K kernel's rows


@pytest.mark.parametrize("layout,group", [("row", 128), ("group", 128), ("group", 64)])
@pytest.mark.parametrize("config", [(16, 2, 4), (16, 4, 4), (32, 1, 4)])
@pytest.mark.parametrize("m,k", [(1, 576), (3, 1024)])
def test_w4_accumulate_configs_and_ragged_groups(config, m, k, layout, group):
    """Every program shape of the split-K kernel (groups per program 1/2/4, groups past K masked), on both
    layouts (quant.group_major: a row slice of it too, as the fused weights' views)."""
    from runtime.kernels.w4 import w4_accumulate

    n = 40
    q, qw, s, z = _packed(n + 8, k, group, layout)
    qw, s, z, q = qw[8:], s[8:], z[8:], q[8:]
    x, base = torch.randn(m, k, device=DEV, dtype=DTYPE), torch.randn(m, n, device=DEV)
    ref = base.double() + x.double() @ quant.dequantize_weight(q, s, z, group).double().T
    out = w4_accumulate(x, qw, s, z, group, base.clone(), config=config)
    assert out.dtype == torch.float32 and _rel(out, ref) < TOL


def _quantizer(h, d, group=None):
    kq = KVQuantizer(h, d, KVQuantConfig(group_size=group)).to(DEV)
    kq.k_scale.uniform_(0.5, 1.5), kq.v_scale.uniform_(0.5, 1.5), kq.k_shift.normal_(), kq.v_shift.normal_()
    return kq


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


@pytest.mark.parametrize("group", [None, 16])
def test_rope_append_matches_cache_write(group):
    from runtime.kernels.kv4 import rope_append

    b, hq, hkv, d, s, pos = 2, 6, 2, 32, 8, 5
    kq = _quantizer(hkv, d, group)
    qkv = torch.randn(b, (hq + 2 * hkv) * d, device=DEV, dtype=DTYPE)
    cos, sin = torch.randn(s, d, device=DEV), torch.randn(s, d, device=DEV)
    fast, ref = (StaticPOQCache(1, b, s, hkv, d, group, device=DEV) for _ in range(2))
    fast.pos.fill_(pos)
    params = kq.kernel_params()
    q, k_cur, v_cur = rope_append(qkv, cos, sin, fast.pos, fast.layers[0], params, hq)
    x = qkv.float().view(b, hq + 2 * hkv, d)
    k_ref = _rope(x[:, hq:hq + hkv], cos[pos], sin[pos])
    assert _rel(q, _rope(x[:, :hq], cos[pos], sin[pos])) < 1e-6 and _rel(k_cur, k_ref) < 1e-6
    assert torch.equal(v_cur, x[:, hq + hkv:])
    ref.write(0, kq, k_cur[:, :, None], v_cur[:, :, None], pos)  # same inputs: stored bytes must agree
    for a, r in zip(fast.layers[0].tensors(), ref.layers[0].tensors()):
        assert torch.equal(a[:, :, pos], r[:, :, pos])


@pytest.mark.parametrize("group,hkv,t,start", [(None, 2, 37, 3), (8, 3, 200, 0)])
def test_prefill_write_matches_torch_write(group, hkv, t, start):
    """A prefill's write (several tokens: kv4.quant_write, one launch) stores the bytes of the torch path
    (quant.kv_quantize, float16 stats) at every slot (4800 groups: with Triton's approximate float32 division one
    minimum in a few hundred came out a float16 step off on the H200), from float16 keys and a strided view of
    values (as the eager forward's qkv split gives), and leaves the other slots alone."""
    from runtime.kernels import kv4

    b, d, s = 2, 32, 208
    kq = _quantizer(hkv, d, group)
    key = torch.randn(b, hkv, t, d, device=DEV, dtype=torch.float16) * 3
    value = torch.randn(b, t, 2 * hkv, d, device=DEV, dtype=torch.float16).transpose(1, 2)[:, hkv:]
    fast, ref = (StaticPOQCache(1, b, s, hkv, d, group, device=DEV) for _ in range(2))
    assert kv4.quant_write_ok(fast.layers[0], key, value, 4)
    strided = torch.randn(b, hkv, t, 2 * d, device=DEV, dtype=torch.float16)[..., ::2]  # channels 2 apart
    assert not kv4.quant_write_ok(fast.layers[0], key, strided, 4) and not kv4.quant_write_ok(fast.layers[0], strided,
                                                                                              value, 4)
    fast.write(0, kq, key, value, start)
    for which, x, tensors in (("k", key, (0, 1, 2)), ("v", value, (3, 4, 5))):
        codes, step, lo = kq.quantize(which, x)
        stored = [fast.layers[0].tensors()[i] for i in tensors]
        assert torch.equal(stored[0][:, :, start:start + t], quant.pack(codes, 4))
        assert torch.equal(stored[1][:, :, start:start + t].float(), step)
        assert torch.equal(stored[2][:, :, start:start + t].float(), lo)
    for a, r in zip(fast.layers[0].tensors(), ref.layers[0].tensors()):  # slots outside start .. start + t
        assert torch.equal(a[:, :, :start], r[:, :, :start]) and torch.equal(a[:, :, start + t:], r[:, :, start + t:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares CUDA's division with the CPU's")
def test_kv_stats_divide_the_same_on_cuda_and_cpu():
    """The torch path's step (range / qmax) is a true division on CUDA too, as on the CPU and in the kernels
    (div.rn): CUDA divides by a Python number as a product with its reciprocal, one float32 ulp off in most cases
    (which left one float16 step in thousands unlike the kernels' on the H200, thirty-eighth session)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 4096, 32, generator=g) * 3
    scale, shift = torch.rand(2, 32, generator=g) + 0.5, torch.zeros(2, 32)
    cpu = quant._kv_stats(x, scale, shift, 4, 8, None)[3]
    gpu = quant._kv_stats(x.cuda(), scale.cuda(), shift.cuda(), 4, 8, None)[3]
    assert torch.equal(gpu.cpu(), cpu)


def test_rope_append_clears_an_extra_buffer():
    """``clear_extra`` (the decode step's gate_up when the down GEMV computes its SiLU input itself): each row is
    zeroed by its ``Hq + Hkv`` programs in parts of ``cdiv(n, 8)`` (1126 here: two blocks of 1024 a part, the
    last part shorter); a column slice of a wider buffer (row stride > n) keeps its other columns, and q, k, v
    and the cache are those of the call without it."""
    from runtime.kernels.kv4 import rope_append

    b, hq, hkv, d, s, pos, n = 2, 6, 2, 32, 8, 3, 9001
    kq = _quantizer(hkv, d)
    params = kq.kernel_params()
    qkv = torch.randn(b, (hq + 2 * hkv) * d, device=DEV, dtype=DTYPE)
    cos, sin = torch.randn(s, d, device=DEV), torch.randn(s, d, device=DEV)
    caches = [StaticPOQCache(1, b, s, hkv, d, None, device=DEV) for _ in range(2)]
    wide = torch.randn(b, n + 7, device=DEV)
    rest = wide[:, n:].clone()
    outs = [rope_append(qkv, cos, sin, c.pos.fill_(pos), c.layers[0], params, hq, clear_extra=e)
            for c, e in zip(caches, (None, wide[:, :n]))]
    assert not wide[:, :n].any() and torch.equal(wide[:, n:], rest)
    assert all(torch.equal(a, r) for a, r in zip(outs[1], outs[0]))
    assert all(torch.equal(a, r) for a, r in zip(caches[1].layers[0].tensors(), caches[0].layers[0].tensors()))
    with pytest.raises(ValueError, match="clear_extra"):
        rope_append(qkv, cos, sin, caches[0].pos, caches[0].layers[0], params, hq, clear_extra=wide[:1])


def _attention_case(hq, hkv, group, length, key_scale, b=2, d=32, s=160):
    """Inputs of :func:`decode_attention` over ``length`` cached tokens (of ``s`` slots) and the reference output."""
    kq = _quantizer(hkv, d, group)
    cache = StaticPOQCache(1, b, s, hkv, d, group, device=DEV)
    if length:
        ramp = torch.linspace(0.1, 1, length, device=DEV)[:, None]  # the running maximum keeps growing
        keys = torch.randn(b, hkv, length, d, device=DEV) * key_scale * ramp
        cache.write(0, kq, keys, torch.randn(b, hkv, length, d, device=DEV), 0)
    cache.advance(length)
    q = torch.randn(b, hq, d, device=DEV)
    k_cur, v_cur = torch.randn(b, hkv, d, device=DEV), torch.randn(b, hkv, d, device=DEV)
    params = kq.kernel_params()
    pk, pv = cache.read(0, kq, length, torch.float32)
    ref = poq_attention(q[:, :, None], k_cur[:, :, None], v_cur[:, :, None], pk, pv, d ** -0.5)[:, :, 0]
    return (q, k_cur, v_cur, cache.layers[0], cache.pos, params, d ** -0.5, torch.float32), ref


@pytest.mark.parametrize("hq,hkv,group,length,key_scale", [(6, 2, None, 37, 2), (4, 4, 16, 130, 2), (8, 2, None, 0, 2),
                                                         (4, 2, None, 150, 40)])  # scores spread: rescales
def test_decode_attention_matches_reference(hq, hkv, group, length, key_scale):
    from runtime.kernels.kv4 import decode_attention

    args, ref = _attention_case(hq, hkv, group, length, key_scale)
    assert _rel(decode_attention(*args, splits=4, block_s=16), ref) < 1e-4


@pytest.mark.parametrize("loads,row_max", [("late", True), ("early", False), ("early", True), ("prefetch", False),
                                           ("prefetch", True)])
@pytest.mark.parametrize("hq,hkv,group,length,key_scale,splits,b", [
    (4, 2, None, 150, 40, 2, 2),  # rescales; 3 tiles a split
    (6, 2, None, 37, 2, 8, 1),  # 3 of 8 splits hold tokens (empty ones: no tile), ragged last tile
    (2, 2, 16, 130, 2, 1, 1)])  # 8 groups a head; one split of 9 tiles
def test_decode_attention_options_match_reference(loads, row_max, hq, hkv, group, length, key_scale, splits, b):
    """Every load order and the per-row maximum of the split kernel (:class:`AttnConfig`) against the reference."""
    from runtime.kernels.kv4 import AttnConfig, decode_attention

    args, ref = _attention_case(hq, hkv, group, length, key_scale, b)
    for block_s, warps in ((16, 2), (8, 1)):
        cfg = AttnConfig(splits=splits, block_s=block_s, num_warps=warps, loads=loads, row_max=row_max)
        assert _rel(decode_attention(*args, cfg), ref) < 1e-4, cfg


@pytest.mark.parametrize("loads", ["late", "prefetch"])
@pytest.mark.parametrize("ahead", [1, 3])
@pytest.mark.parametrize("hq,hkv,group,length,key_scale,splits,b", [
    (4, 2, None, 150, 40, 2, 2), (6, 2, None, 37, 2, 8, 1), (2, 2, 16, 130, 2, 1, 1)])
def test_decode_attention_l2_prefetch_matches_reference(loads, ahead, hq, hkv, group, length, key_scale, splits, b):
    """``AttnConfig.l2_ahead`` (bulk L2 prefetches of tiles ahead, before the PDL wait and in the loop, on Hopper
    GPUs; ignored elsewhere): the same output as the reference, including ranges that end inside a tile."""
    from runtime.kernels.kv4 import AttnConfig, decode_attention

    args, ref = _attention_case(hq, hkv, group, length, key_scale, b)
    cfg = AttnConfig(splits=splits, block_s=16, num_warps=1, loads=loads, row_max=True, l2_ahead=ahead)
    assert _rel(decode_attention(*args, cfg), ref) < 1e-4, cfg


@pytest.mark.parametrize("hq,hkv,group,length,key_scale,splits,b", [
    (4, 2, None, 150, 40, 2, 2), (6, 2, None, 37, 2, 8, 1), (2, 2, 16, 130, 2, 1, 1), (8, 2, None, 0, 2, 4, 1),
    (4, 2, None, 150, 40, 3, 1),  # a split count that is no power of two (the combine pads it)
    (2, 1, None, 150, 4, 40, 1)])  # more splits than the combine takes at once (COMBINE_CHUNK): three chunks
def test_decode_attention_fused_combine_matches_reference(hq, hkv, group, length, key_scale, splits, b, monkeypatch):
    """``AttnConfig.combine``: the last program of each head merges the splits (no combine kernel); the per-head
    counts are left at zero, so a second launch (as the next layer's) gives the same result; ``WKVQ_ATTN_COMBINE``
    switches it in attn_config (and ``WKVQ_ATTN_KEYS_A`` the tensor-core kernel's ``keys_a``)."""
    from runtime.kernels import kv4

    args, ref = _attention_case(hq, hkv, group, length, key_scale, b)
    for loads in ("late", "prefetch"):
        cfg = kv4.AttnConfig(splits=splits, block_s=16, num_warps=1, loads=loads, row_max=True, combine=True)
        for _ in range(2):
            assert _rel(kv4.decode_attention(*args, cfg), ref) < 1e-4, cfg
        assert not kv4._head_counts(DEV, b * hq)[:b * hq].any()
    monkeypatch.setenv(kv4.COMBINE_ENV, "1")
    assert kv4.attn_config(1, 32, 2048).combine and kv4.AttnConfig(combine=True).label().endswith("_comb")
    monkeypatch.setenv(kv4.COMBINE_ENV, "0")
    assert not kv4.attn_config(1, 32, 2048).combine
    for v in ("1", "0"):
        monkeypatch.setenv(kv4.KEYS_A_ENV, v)
        assert kv4.attn_config(1, 32, 32768).keys_a == (v == "1")


MMA_OK = DEV.type == "cuda" and torch.cuda.get_device_capability(DEV)[0] >= 9


@pytest.mark.parametrize("hq,hkv,length,key_scale,splits,group,b", [
    (2, 1, 150, 40, 8, 2, 2),  # scores spread: the groups rescale against each other
    (6, 2, 37, 2, 8, 4, 1),  # the second group's splits hold no tokens
    (4, 2, 0, 2, 4, 2, 1),  # no past: every group empty, only the current token
    (8, 1, 300, 10, 16, 4, 1),  # 8 query heads a KV head: each of the tensor-core kernel's two parts
    (4, 1, 900, 10, 128, 16, 1)])  # LLaMA-3-8B's 4 on 1 at its b1 p32768 entry: 128 splits, 8 groups of 16
def test_attention_two_level_merge_matches_reference(hq, hkv, length, key_scale, splits, group, b, monkeypatch):
    """The fused combine in two levels (``WKVQ_ATTN_GROUP``, else :func:`runtime.kernels.merge_group` above 64
    rows): the last program of each group of splits merges the group, the last group the groups. The split kernel
    (under the interpreter too) and, on sm_90, the tensor-core kernel against the float32 reference, twice (the
    group counts are left at zero for the next launch)."""
    from runtime.kernels import kv4, kv4_mma

    monkeypatch.setenv(kv4.GROUP_ENV, str(group))
    groups, original = [], kv4.merge_buffers

    def merge_buffers(*a):  # the group each launch took
        out = original(*a)
        groups.append(out[0])
        return out

    monkeypatch.setattr(kv4, "merge_buffers", merge_buffers)
    monkeypatch.setattr(kv4_mma, "merge_buffers", merge_buffers)
    d, s = (128, 1030) if MMA_OK else (32, 1030)
    args, ref = _attention_case(hq, hkv, None, length, key_scale, b, d=d, s=s)
    cfgs = [kv4.AttnConfig(splits=splits, block_s=16, num_warps=1, combine=True)]
    if MMA_OK:
        cfgs.append(kv4.AttnConfig(splits=splits, block_s=64, mma=True, stages=2, combine=True, keys_a=True))
    for cfg in cfgs:
        for _ in range(2):
            assert _rel(kv4.decode_attention(*args, cfg), ref) < 1e-4, cfg
        assert not kv4._group_counts(DEV, 1)[:b * hq * splits].any()
    assert groups == [group] * 2 * len(cfgs)


def test_merge_group_override(monkeypatch):
    """``WKVQ_ATTN_GROUP`` overrides :func:`runtime.kernels.merge_group`; a value the kernel cannot take (no power
    of two, not dividing the splits, not below them) is a one-line error."""
    from runtime.kernels import kv4

    assert kv4.group_of(4, 64) == 8
    monkeypatch.setenv(kv4.GROUP_ENV, "1")
    assert kv4.group_of(4, 64) == 1
    monkeypatch.setenv(kv4.GROUP_ENV, "4")
    assert kv4.group_of(1, 32) == 4
    for bad in ("3", "8", "0", "x", "16"):
        monkeypatch.setenv(kv4.GROUP_ENV, bad)
        with pytest.raises(ValueError, match="WKVQ_ATTN_GROUP"):
            kv4.group_of(1, 8)


@pytest.mark.skipif(not MMA_OK, reason="the tensor-core attention needs an sm_90+ GPU")
@pytest.mark.parametrize("tile,stages,bulk", [(16, 2, "mixed"), (32, 4, "mixed"), (64, 3, "mixed"),
                                             (128, 2, "mixed"), (64, 2, "bulk"), (32, 2, "lanes"), (128, 2, "lanes")])
@pytest.mark.parametrize("hq,hkv,length,key_scale,splits,b", [
    (2, 2, 150, 40, 2, 2),  # scores spread: rescales; several tiles a split
    (3, 1, 37, 2, 8, 1),  # 3 query heads a KV head; empty splits; a ragged last tile
    (4, 1, 1000, 4, 1, 1),  # one split: the ring of stages wraps many times
    (2, 1, 0, 2, 4, 1),  # no past: only the current token
    (8, 8, 333, 10, 4, 2),
    (2, 1, 1000, 4, 44, 1),  # no power of two, and more than COMBINE_CHUNK splits (the combine in chunks)
    (4, 2, 150, 40, 3, 2),
    (8, 1, 300, 10, 4, 2),  # 8 query heads a KV head (LLaMA-2-70B): two programs of 4 share each split
    (12, 2, 150, 40, 3, 1),  # 6: two parts of 3
    (7, 1, 90, 4, 2, 1)])  # 7: seven parts of 1
@pytest.mark.parametrize("keys_a", [False, True])
def test_mma_attention_matches_reference(hq, hkv, length, key_scale, splits, b, tile, stages, bulk, keys_a):
    """:mod:`runtime.kernels.kv4_mma` (``AttnConfig.mma``: bulk copies into shared memory, the stats by each lane's
    ``cp.async`` or by bulk copies, tensor-core scores and values with float16 hi/lo splits; the query or the keys
    as the score MMAs' A operand) against the float32 reference, with the fused and the separate combine; the
    fused one leaves the per-head counts at zero."""
    from runtime.kernels import kv4, kv4_mma

    args, ref = _attention_case(hq, hkv, None, length, key_scale, b, d=128, s=1030)
    assert kv4_mma.mma_attention_ok(args[3], 128, 1, hq // hkv)
    for combine in (False, True, True):
        cfg = kv4.AttnConfig(splits=splits, block_s=tile, mma=True, stages=stages, combine=combine, copies=bulk,
                             keys_a=keys_a)
        assert _rel(kv4.decode_attention(*args, cfg), ref) < 1e-4, cfg
    assert not kv4._head_counts(DEV, b * hq)[:b * hq].any()


def _rope_case(hq, hkv, group, length, b, d, s, copies, key_scale=1.0):
    """Inputs of :func:`rope_attention`: the four static KV parameters, ``copies`` caches of ``s`` slots holding
    the same ``length`` past tokens, ``qkv [b, (hq + 2 hkv) d]`` and random ``cos``, ``sin [s, d]``."""
    kq = _quantizer(hkv, d, group)
    caches = [StaticPOQCache(1, b, s, hkv, d, group, device=DEV) for _ in range(copies)]
    keys, values = torch.randn(b, hkv, length, d, device=DEV) * key_scale, torch.randn(b, hkv, length, d, device=DEV)
    for c in caches:
        if length:
            c.write(0, kq, keys, values, 0)
        c.advance(length)
    qkv = torch.randn(b, (hq + 2 * hkv) * d, device=DEV)
    return (kq.kernel_params(), caches, qkv, torch.randn(s, d, device=DEV),
            torch.randn(s, d, device=DEV))


@pytest.mark.skipif(not MMA_OK, reason="the tensor-core attention needs an sm_90+ GPU")
@pytest.mark.parametrize("tile,stages,copies", [(32, 2, "lanes"), (64, 2, "mixed"), (16, 3, "bulk")])
@pytest.mark.parametrize("hq,hkv,length,splits,b", [(2, 2, 150, 4, 2), (3, 1, 37, 8, 1), (4, 2, 0, 2, 1),
                                                    (1, 1, 700, 1, 1), (2, 1, 900, 48, 1), (16, 2, 300, 4, 2)])
@pytest.mark.parametrize("keys_a", [False, True])
def test_mma_rope_attention_matches_rope_append_then_attention(hq, hkv, length, splits, b, tile, stages, copies,
                                                               keys_a):
    """The tensor-core kernel's ``ROPE`` form (:func:`rope_attention`: it ropes the query from ``qkv`` itself, one
    extra program per KV head appends the token) against :func:`rope_append` then the same kernel on a copy of the
    cache: the same output (to 1e-5: the rope's FMA contraction is each kernel's compiler's) and the same stored
    bytes at every slot, with the fused and the separate combine; ``qkv`` is left as it was, the counts at zero."""
    from runtime.kernels import kv4, kv4_mma

    d = 128
    params, caches, qkv, cos, sin = _rope_case(hq, hkv, None, length, b, d, 1040, 3, key_scale=4)
    assert kv4_mma.mma_attention_ok(caches[0].layers[0], d, 1, hq // hkv, (qkv, cos, sin, *params[:2]))
    before = qkv.clone()
    for combine, cache in ((True, caches[1]), (False, caches[2])):
        cfg = kv4.AttnConfig(splits=splits, block_s=tile, mma=True, stages=stages, combine=combine, copies=copies,
                             keys_a=keys_a)
        q, k_cur, v_cur = kv4.rope_append(qkv, cos, sin, caches[0].pos, caches[0].layers[0], params, hq)
        ref = kv4.decode_attention(q, k_cur, v_cur, caches[0].layers[0], caches[0].pos, params, d ** -0.5,
                                   torch.float32, cfg)
        out = kv4.rope_attention(qkv, cos, sin, cache.pos, cache.layers[0], params, hq, d ** -0.5, torch.float32, cfg)
        assert _rel(out, ref) < 1e-5 and torch.equal(qkv, before), cfg
        for a, r in zip(cache.layers[0].tensors(), caches[0].layers[0].tensors()):
            assert torch.equal(a, r)
    assert not kv4._head_counts(DEV, b * hq)[:b * hq].any()


def test_rope_attention_refuses_too_few_ready_flags():
    """``ready`` needs one flag a KV head's part of its query heads (:func:`runtime.kernels.query_parts`): 8 query
    heads on one KV head need two; one is refused in one line before anything is launched, two are taken."""
    from runtime.kernels import kv4

    params, caches, qkv, cos, sin = _rope_case(8, 1, None, 10, 1, 32, 64, 1)
    epoch = torch.ones(1, dtype=torch.int32, device=DEV)
    store = caches[0].layers[0]
    before = [t.clone() for t in store.tensors()]
    with pytest.raises(ValueError, match="ready needs 2 flags"):
        kv4.rope_attention(qkv, cos, sin, caches[0].pos, store, params, 8, 32 ** -0.5, torch.float32, 2,
                           ready=(torch.zeros(1, dtype=torch.int32, device=DEV), epoch))
    assert all(torch.equal(a, b) for a, b in zip(store.tensors(), before))  # nothing appended
    flags = torch.zeros(2, dtype=torch.int32, device=DEV)
    kv4.rope_attention(qkv, cos, sin, caches[0].pos, store, params, 8, 32 ** -0.5, torch.float32, 2,
                       ready=(flags, epoch))
    assert (flags == 1).all()


def test_mma_config_checks_and_fallback():
    """``AttnConfig.mma`` fields are checked; where the tensor-core kernel does not take the shape (here head_dim 32,
    and on CPU the interpreter) the split kernel runs ATTN_DEFAULT's tile at the config's splits: the reference's
    output; a block_s / num_warps override asks for the split kernel."""
    from runtime.kernels import kv4, kv4_mma

    for bad in (dict(block_s=8), dict(stages=1), dict(stages=17), dict(block_s=128, stages=3)):
        with pytest.raises(ValueError, match="AttnConfig"):
            kv4.AttnConfig(mma=True, **bad)
    assert kv4.AttnConfig(splits=4, block_s=64, mma=True, stages=2).label() == "sp4_mma_s64_st2"
    assert kv4.AttnConfig(splits=4, block_s=64, mma=True, stages=2, keys_a=True).label() == "sp4_mma_s64_st2_ka"
    with pytest.raises(ValueError, match="keys_a"):
        kv4.AttnConfig(mma=True, keys_a=1)
    assert kv4._split_kernel(kv4.AttnConfig(splits=4, block_s=64, mma=True, combine=True)) == dataclasses.replace(
        kv4.ATTN_DEFAULT, splits=4, combine=True)
    args, ref = _attention_case(4, 2, None, 150, 40, 2)
    assert not kv4_mma.mma_attention_ok(args[3], 32, 1, 2)
    for combine in (False, True):
        cfg = kv4.AttnConfig(splits=2, block_s=64, mma=True, stages=2, combine=combine)
        assert _rel(kv4.decode_attention(*args, cfg), ref) < 1e-4
        assert _rel(kv4.decode_attention(*args, cfg.splits, block_s=8), ref) < 1e-4


@pytest.mark.parametrize("combine,loads", [(True, "prefetch"), (False, "late")])
@pytest.mark.parametrize("hq,hkv,group,length,splits,b", [(6, 2, None, 37, 4, 2), (4, 4, 16, 130, 2, 1),
                                                          (8, 2, None, 0, 2, 1)])
def test_rope_attention_matches_rope_append_then_attention(hq, hkv, group, length, splits, b, combine, loads):
    """The fused decode attention (:func:`rope_attention`: rope, append and attention in one launch) against
    :func:`rope_append` then :func:`decode_attention` on a copy of the cache: the same output (the same float32
    operations in the same order: equal under the interpreter; on a GPU each kernel's FMA contraction is its
    compiler's, so within 1e-6) and the same stored bytes at every slot, over a past of ``length`` tokens (none,
    one split holding all of it, several); ``qkv`` is left as it was."""
    from runtime.kernels.kv4 import (
        AttnConfig,
        decode_attention,
        rope_append,
        rope_attention,
    )

    d = 32
    params, caches, qkv, cos, sin = _rope_case(hq, hkv, group, length, b, d, 160, 2)
    cfg = AttnConfig(splits=splits, block_s=16, num_warps=1, loads=loads, row_max=True, combine=combine)
    q, k_cur, v_cur = rope_append(qkv, cos, sin, caches[0].pos, caches[0].layers[0], params, hq)
    ref = decode_attention(q, k_cur, v_cur, caches[0].layers[0], caches[0].pos, params, d ** -0.5, torch.float32, cfg)
    before = qkv.clone()
    out = rope_attention(qkv, cos, sin, caches[1].pos, caches[1].layers[0], params, hq, d ** -0.5, torch.float32, cfg)
    assert (torch.equal(out, ref) if DEV.type == "cpu" else _rel(out, ref) < 1e-6) and torch.equal(qkv, before)
    for a, r in zip(caches[1].layers[0].tensors(), caches[0].layers[0].tensors()):
        assert torch.equal(a, r)
    with pytest.raises(ValueError, match="qkv must be float32"):
        rope_attention(qkv[:, :-1], cos, sin, caches[1].pos, caches[1].layers[0], params, hq, d ** -0.5,
                       torch.float32, cfg)


def test_overlap_flags(monkeypatch):
    """PDL and the L2 prefetches only on Hopper GPUs outside the interpreter; ``WKVQ_PDL`` names the kernel kinds
    (unset: the projections, norms, SiLU and the tensor-core attention, ``0`` none, ``1`` all, a list, a one-line
    error otherwise); ``WKVQ_ATTN_L2`` sets ``l2_ahead`` where it is a number."""
    from benchmarks.overlap_bench import VARIANTS
    from runtime.kernels import kv4, overlap

    monkeypatch.setenv(overlap.PDL_ENV, "1")
    assert not overlap.hopper("cpu") and overlap.launch_options("cpu", "gemv") == {"PDL": False}
    assert (overlap.pdl_kinds(None) == overlap.pdl_kinds(" ") == overlap.PDL_DEFAULT
            == {"gemv", "norm", "silu", "attn_mma"})
    assert overlap.pdl_kinds("0") == frozenset()
    assert overlap.pdl_kinds("1") == frozenset(overlap.KINDS)
    assert overlap.pdl_kinds(VARIANTS["pdl-default"]["WKVQ_PDL"]) == overlap.PDL_DEFAULT  # the bench's default
    assert overlap.pdl_kinds("gemv, attn") == {"gemv", "attn"}
    with pytest.raises(ValueError, match="WKVQ_PDL='gemm': use 0, 1 or"):
        overlap.pdl_kinds("gemm")
    assert overlap.pdl(DEV, "gemv") == (overlap.hopper(DEV) and overlap._triton_has_pdl())
    monkeypatch.setenv(overlap.PDL_ENV, "attn")
    assert not overlap.pdl(DEV, "gemv") and overlap.launch_options(DEV, "gemv") == {"PDL": False}
    monkeypatch.setenv(kv4.L2_ENV, "3")
    assert kv4.attn_config(1, 32, 2048).l2_ahead == 3
    monkeypatch.setenv(kv4.L2_ENV, "off")
    assert kv4.attn_config(1, 32, 2048).l2_ahead == kv4.ATTN_TABLE[1, 2048].l2_ahead
    assert kv4.AttnConfig(l2_ahead=2).label().endswith("_l2a2")
    with pytest.raises(ValueError, match="AttnConfig: l2_ahead"):
        kv4.AttnConfig(l2_ahead=-1)


def test_attn_config_policy_and_table(tmp_path, monkeypatch):
    """AttnConfig checks its fields; a (batch, context) the table lacks takes its nearest entry; with no table the
    policy of rounds 2-6 decides; a sweep record named by WKVQ_ATTN_TABLE decides its (batch, context bucket) keys
    and nothing else; splits 0 resolves by the policy; the heads' own table comes before the 32-KV-head one; at batch 1
    from 4096 slots a model without its own entry takes the placement rule's split count."""
    import json

    from runtime.kernels import kv4

    monkeypatch.delenv(kv4.TABLE_ENV, raising=False)
    assert kv4.attn_config(1, 32, 2076) == kv4.ATTN_TABLE[1, 2048]  # the measured table
    policy16 = dataclasses.replace(kv4.ATTN_DEFAULT, splits=16)
    # not in it: the nearest entry in log scale, the batch first (b2 -> b1, b3 and b4 -> b8, b32 -> b8), then the
    # context (p8192: as near 2048 as 32768, the smaller), splits cut to the cache's tiles (p100: 2 tiles of 64)
    assert kv4.attn_config(2, 32, 2076) == kv4.ATTN_TABLE[1, 2048]
    assert kv4.attn_config(3, 32, 2076) == kv4.attn_config(4, 32, 2076) == kv4.ATTN_TABLE[8, 2048]
    assert kv4.attn_config(32, 32, 32808) == kv4.ATTN_TABLE[8, 32768]
    # p8192 is as near p2048 as p32768 in log scale: the smaller (at batches 1-4 the split count is the placement
    # rule's: 1056 programs over 2 x 64 heads, or 64)
    assert kv4.attn_config(8, 64, 8200) == kv4.ATTN_TABLE[8, 2048] and kv4.ATTN_TABLE[1, 2048].mma
    assert kv4.attn_config(2, 64, 8200) == dataclasses.replace(kv4.ATTN_TABLE[1, 2048], splits=8)
    assert kv4.attn_config(1, 64, 8200) == dataclasses.replace(kv4.ATTN_TABLE[1, 2048], splits=16)
    assert kv4.attn_config(1, 32, 16400) == kv4.ATTN_TABLE[1, 32768]
    assert kv4.attn_config(2, 32, 65600) == dataclasses.replace(kv4.ATTN_TABLE[1, 32768], splits=16)
    assert kv4.attn_config(1, 32, 100) == dataclasses.replace(kv4.ATTN_TABLE[1, 2048], splits=2)
    assert kv4.attn_config(1, 32, 1) == dataclasses.replace(kv4.ATTN_TABLE[1, 2048], splits=1)
    assert kv4.nearest_entry({}, (1, 2048), 2048) is None
    assert kv4.nearest_entry({(1, 2048): kv4.AttnConfig(splits=0)}, (2, 64), 70).splits == 0  # the policy's, kept
    # head counts other than the table's: their own entries first (LLaMA-3-8B: 32 on 8 takes 128 splits at b1 p32768,
    # LLaMA-2-70B's 64 on 8 in two query parts 64), else the table's config on the placement rule's splits
    assert kv4.attn_config(1, 64, 32808, kv_heads=8) == kv4.ATTN_KV_TABLE[1, 32768, 8, 64] != kv4.ATTN_TABLE[1, 32768]
    assert kv4.attn_config(1, 32, 32808, kv_heads=8) == kv4.ATTN_KV_TABLE[1, 32768, 8, 32]
    assert kv4.ATTN_KV_TABLE[1, 32768, 8, 32].splits == 128 and kv4.ATTN_KV_TABLE[1, 32768, 8, 64].splits == 64
    # LLaMA-3.2-3B (24 on 8, one query part) has no entry: 1056 / 8 = 132 programs a KV head -> 128 splits
    assert kv4.attn_config(1, 24, 32808, kv_heads=8) == dataclasses.replace(kv4.ATTN_TABLE[1, 32768], splits=128)
    assert kv4.attn_config(1, 32, 32808) == kv4.attn_config(1, 32, 32808, kv_heads=32) == kv4.ATTN_TABLE[1, 32768]
    # LLaMA-2-13B's 40 heads at b1 p32768 on fewer splits than the 7B's 32 (960 programs, not 1280); p2048 the table's
    assert kv4.attn_config(1, 40, 32808).splits == kv4.attn_config(1, 40, 32808, kv_heads=40).splits == 24
    # and at p2048 on 12 splits; the 7B's 32 heads at b8 p32768 on 12 (a key of its own: 40 heads keep the table's 16)
    assert kv4.attn_config(1, 40, 2076).splits == 12 and kv4.attn_config(8, 32, 32808).splits == 12
    assert kv4.attn_config(8, 40, 32808) == kv4.ATTN_TABLE[8, 32768] and kv4.ATTN_TABLE[8, 32768].splits == 16
    assert kv4.attn_config(1, 40, 2076) == kv4.attn_config(1, 40, 2076, kv_heads=40) != kv4.ATTN_TABLE[1, 2048]
    assert kv4.attn_config(1, 32, 2076, kv_heads=8) == kv4.ATTN_TABLE[1, 2048]
    assert kv4.attn_config(8, 32, 32808, kv_heads=8) == kv4.ATTN_TABLE[8, 32768]  # 8 KV heads: not the 7B's key
    # b1 p8192, between the table's contexts, on the step's own split counts: 7B 32, 8B 64, 13B 24; the 70B (64 query
    # heads on 8) on the placement rule's 64, other batches on the nearest entry's 16
    assert [kv4.attn_config(1, h, 8200, kv_heads=kv).splits for h, kv in ((32, 32), (32, 8), (40, 40), (64, 8))] == [
        32, 64, 24, 64]
    assert kv4.attn_config(2, 32, 8200).splits == kv4.ATTN_TABLE[1, 2048].splits == 16
    # b1 p4096 and p16384 likewise: 7B 32 and 32 (the latter the placement rule's), 8B 64 and 128, 13B 24 and 24; the
    # 70B on the rule's 64 at both
    assert [[kv4.attn_config(1, h, n, kv_heads=kv).splits for h, kv in ((32, 32), (32, 8), (40, 40), (64, 8))]
            for n in (4104, 16392)] == [[32, 64, 24, 64], [32, 128, 24, 64]]
    assert kv4.attn_config(1, 32, 16392) == kv4.ATTN_TABLE[1, 32768]
    # the rule gives every measured batch-1 entry from 4096 tokens but one tie (the 8B at p8192: 64 and 128 within
    # the spread, r40); cut to one 64-token tile a split (the 8B at p4096: 65 tiles of a 4124-slot cache, then 64);
    # fewer multiprocessors, fewer splits; a count below 16 as it is (64 KV heads: 15), MAX_SPLITS at most
    for (b, ctx, kv, h), cfg in kv4.ATTN_KV_TABLE.items():
        if b == 1 and ctx >= kv4.PLACEMENT_CONTEXT:
            assert kv4.placement_splits(h, kv, ctx + 8, cfg.block_s) == (128 if (ctx, kv, h) == (8192, 8, 32)
                                                                          else cfg.splits), (ctx, kv, h)
    assert kv4.placement_splits(32, 8, 4124, 64) == 64 and kv4.placement_splits(32, 32, 32808, 64, sms=108) == 24
    assert kv4.placement_splits(64, 64, 32808, 64) == 16 and kv4.placement_splits(32, 1, 1 << 20, 64) == 128
    assert kv4.placement_splits(32, 1, 1 << 20, 64, sms=1000) == kv4.MAX_SPLITS
    # batches 2 to 4 from 4096 tokens take the rule too, the programs counted over the batch (measured, r42: the 7B at
    # b2 on 16 splits and at b4 on 8, 1024 programs each, where the nearest entries gave 32 and 16, or 4 at b4 below
    # p16384; the 13B at b2 on 13, the 8B at b2 on 64); batch 8 and p2048 keep the tables
    assert [kv4.attn_config(b, 32, n).splits for b in (2, 4) for n in (4104, 32808)] == [16, 16, 8, 8]
    assert [kv4.placement_splits(32, 32, 32808, 64, batch=b) for b in (1, 2, 3, 4)] == [32, 16, 11, 8]
    assert kv4.attn_config(2, 40, 32808).splits == 13 and kv4.attn_config(2, 32, 32808, kv_heads=8).splits == 64
    assert kv4.attn_config(3, 32, 8200).splits == 11 and kv4.attn_config(8, 32, 8200) == kv4.ATTN_TABLE[8, 2048]
    monkeypatch.setattr(kv4, "ATTN_TABLE", {})
    monkeypatch.setattr(kv4, "ATTN_KV_TABLE", {})
    for bad in ({"splits": -1}, {"splits": kv4.MAX_SPLITS + 1}, {"block_s": 4}, {"num_warps": 3},
                {"loads": "eager"}, {"row_max": 1}, {"min_tokens": 0}):
        with pytest.raises(ValueError, match="AttnConfig: " + next(iter(bad))):
            kv4.AttnConfig(**bad)
    assert kv4.num_splits(1, 32, 2076) == 16 and kv4.num_splits(1, 32, 2076, min_tokens=128) == 32
    assert kv4.num_splits(1, 32, 32808) == 64 and kv4.num_splits(8, 32, 32808) == 8
    assert [kv4.context_bucket(n) for n in (1, 100, 2076, 3000, 32808)] == [1, 128, 2048, 4096, 32768]
    assert kv4.attn_config(1, 32, 2076) == policy16
    cfg = kv4.AttnConfig(splits=32, block_s=16, num_warps=2, loads="prefetch", row_max=True)
    record = {"best": {"1x2048": {"config": dataclasses.asdict(cfg), "us": 9.0},
                       "1x32768": {"config": dataclasses.asdict(kv4.AttnConfig(min_tokens=4096)), "us": 9.0}}}
    (tmp_path / "sweep.json").write_text(json.dumps(record))
    assert kv4.load_table(tmp_path / "sweep.json") == {(1, 2048): cfg, (1, 32768): kv4.AttnConfig(min_tokens=4096)}
    (tmp_path / "b8.json").write_text(json.dumps({"best": {"8x2048": {"config": {"splits": 4}}}}))
    monkeypatch.setenv(kv4.TABLE_ENV, f"{tmp_path / 'sweep.json'}{os.pathsep}{tmp_path / 'b8.json'}")
    assert kv4.attn_config(1, 32, 2076) == cfg and kv4.attn_config(1, 32, 3000) == policy16  # ATTN_TABLE empty
    assert kv4.attn_config(8, 32, 2076) == kv4.AttnConfig(splits=4)
    assert kv4.attn_config(1, 32, 32808).splits == 16  # the record's policy: 4096 tokens a split at least (was 64)
    (tmp_path / "bad.json").write_text(json.dumps({"best": {"1x2048": {"config": {"loads": "eager"}}}}))
    with pytest.raises(ValueError, match="not an attention sweep record"):
        kv4.load_table(tmp_path / "bad.json")
    args, ref = _attention_case(4, 2, None, 150, 40, b=1)  # splits 0: num_splits at decode time
    assert _rel(kv4.decode_attention(*args, kv4.AttnConfig(row_max=True, loads="early", min_tokens=32)), ref) < 1e-4


def test_attn_bench_dry_run(tmp_path, capsys):
    """benchmarks/attn_bench.py end to end on CPU (--dry: interpreter, tiny shape): every config checked and
    timed, and its record's best table readable by kv4.load_table; with --rope the rope-attention kernel against
    the torch-roped reference, also with grouped-query heads; bad flags and no CUDA are one-line exits."""
    if DEV.type == "cuda":
        pytest.skip("--dry is the interpreter's path")
    from benchmarks import attn_bench
    from runtime.kernels import kv4

    with pytest.raises(SystemExit, match="needs a CUDA device"):
        attn_bench.main(["--json", str(tmp_path / "r.json")])
    with pytest.raises(SystemExit):
        attn_bench.parse_args(["--json", "r.json", "--loads", "eager"])
    attn_bench.main(["--dry", "--quick", "--splits", "2", "--json", str(tmp_path / "r.json")])
    record = json.loads((tmp_path / "r.json").read_text())
    assert len(record["rows"]) == 1 + len(attn_bench.QUICK) and all(r["ok"] and r["us"] > 0 for r in record["rows"])
    assert set(kv4.load_table(tmp_path / "r.json")) == {(1, 128)}
    assert "ATTN_TABLE = {" in capsys.readouterr().out
    attn_bench.main(["--dry", "--quick", "--splits", "2", "--rope", "--json", str(tmp_path / "rope.json")])
    rows = json.loads((tmp_path / "rope.json").read_text())["rows"]
    assert len(rows) == 1 + len(attn_bench.QUICK) and all(r["ok"] and r["rope"] and r["us"] > 0 for r in rows)
    # grouped-query heads (--heads, --kv-heads): 4 query heads on 2 KV heads, checked against the same reference
    with pytest.raises(SystemExit):
        attn_bench.parse_args(["--json", "r.json", "--heads", "4", "--kv-heads", "3"])
    attn_bench.main(["--dry", "--quick", "--splits", "2", "--rope", "--heads", "4", "--kv-heads", "2",
                     "--json", str(tmp_path / "gqa.json")])
    record = json.loads((tmp_path / "gqa.json").read_text())
    assert (record["heads"], record["kv_heads"]) == (4, 2)
    assert len(record["rows"]) == 1 + len(attn_bench.QUICK) and all(r["ok"] for r in record["rows"])


def test_rmsnorm_and_silu_mul():
    from runtime.kernels.misc import rmsnorm, silu_mul

    x, w = torch.randn(3, 200, device=DEV, dtype=DTYPE), torch.randn(200, device=DEV, dtype=DTYPE)
    h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    assert _rel(rmsnorm(x, w, 1e-5), w * h.to(DTYPE)) < TOL
    wide = torch.randn(3, 700, device=DEV)  # clear: columns 0..599 of each row (three blocks of 256), not 600..
    y = rmsnorm(x, w, 1e-5, clear=wide[:, :600])
    assert _rel(y, w * h.to(DTYPE)) < TOL and not wide[:, :600].any() and wide[:, 600:].all()
    with pytest.raises(ValueError, match="clear must be"):
        rmsnorm(x, w, 1e-5, clear=wide[:2])
    gu = torch.randn(3, 2 * 1500, device=DEV, dtype=DTYPE)
    g, u = gu.float().chunk(2, -1)
    assert _rel(silu_mul(gu), F.silu(g) * u) < TOL


@pytest.mark.parametrize("layout", ["row", "group"])
def test_fast_decode_kernels_match_eager(tiny_llama_dir, tmp_path, layout, monkeypatch):
    """A 1-layer model with power-of-two heads: kernel decode steps vs the eager reference path, with the fused
    weights in either layout (WKVQ_LAYOUT; the eager path reads the group-major one through row_major_codes)."""
    monkeypatch.setenv("WKVQ_LAYOUT", layout)
    import runtime
    from converter.convert import ConvertConfig, convert
    from runtime.fast import DecodeGraph, FastLlama
    from tests.helpers import make_tiny_llama

    src = make_tiny_llama(tmp_path / "m", hidden_size=192, num_attention_heads=6, num_key_value_heads=2,
                          num_hidden_layers=1)
    art = convert(ConvertConfig(out=tmp_path / "q", model=str(src), method="rtn", device="cpu", dtype="float32"))
    model, _ = runtime.load(art, device=DEV, dtype=DTYPE)
    eager = FastLlama.from_hf(model, 32, use_kernels=False)
    assert eager.layers[0].qkv.qweight.dim() == (3 if layout == "group" else 2)
    fast = FastLlama(eager.config, eager.embed, eager.layers, eager.norm, eager.lm_head, eager.cos, eager.sin, True)
    ids = torch.randint(3, 300, (2, 8), device=DEV)
    ce, cf = eager.new_cache(2, 16), fast.new_cache(2, 16)
    eager.forward(ids[:, :5], ce), fast.forward(ids[:, :5], cf)
    for i in range(5, 7):
        assert _rel(fast.decode_step(ids[:, i], cf), eager.forward(ids[:, i:i + 1], ce)) < 20 * TOL
    if DEV.type == "cuda":
        graph = DecodeGraph(fast, cf)
        ref = eager.forward(ids[:, 7:8], ce)
        assert _rel(graph.step(ids[:, 7]), ref) < 20 * TOL and cf.length == 8


def _two_layers_of_128_channel_heads(tmp_path, dtype=torch.float16, art=None, heads: int = 4, kv_heads: int = 2):
    """The two-layer model with heads of 128 channels (:func:`tests.helpers.heads128_rtn_artifact` of ``heads`` and
    ``kv_heads``, converted into ``tmp_path`` unless ``art`` is given) in ``dtype``: its eager ``FastLlama`` and a
    kernel one on the gemv projections."""
    import runtime
    from runtime.fast import FastLlama
    from tests.helpers import fast_copy, heads128_rtn_artifact

    model, _ = runtime.load(art or heads128_rtn_artifact(tmp_path, heads, kv_heads), device=DEV, dtype=dtype)
    eager = FastLlama.from_hf(model, 128, use_kernels=False)
    return eager, fast_copy(eager)


def _mma_attention_table(tmp_path, monkeypatch, batch: int, cache) -> None:
    """An attention table (``WKVQ_ATTN_TABLE``) that puts ``cache``'s size at ``batch`` on the tensor-core attention
    with 2 splits and the fused combine (where the GPU takes it)."""
    from runtime.kernels import kv4

    key = f"{batch}x{kv4.context_bucket(cache.layers[0].k_codes.shape[2])}"
    cfg = {"splits": 2, "block_s": 16, "keys_a": True, "mma": True, "stages": 2, "combine": True}
    (tmp_path / "attn.json").write_text(json.dumps({"best": {key: {"config": cfg}}}))
    monkeypatch.setenv(kv4.TABLE_ENV, str(tmp_path / "attn.json"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tensor-core attention and GEMV: CUDA only")
@pytest.mark.parametrize("batch", [1, 2])
def test_decode_heads_ready_matches_eager(tmp_path, monkeypatch, batch):
    """Two layers of heads of 128 channels (the tensor-core attention; 2 query heads a KV head) on the gemv
    projections, ``WKVQ_FUSE=rope,heads``: the attention flags each KV head when its output is stored and the output
    projection (one row: its programs wait for their heads' flags, not the whole attention) launched at once.
    Decode steps and CUDA-graph replays against the eager path and against the same steps without "heads"; every
    layer's flags hold the epoch of the last step, which advances with each step (warm-ups included). Unset, the
    default takes "heads" at one row where the output projection's shape is in ``HEADS_DEFAULT_SHAPES``."""
    from runtime import fast as fast_module
    from runtime.fast import FUSE_ENV, DecodeGraph
    from runtime.kernels import kv4

    eager, fast = _two_layers_of_128_channel_heads(tmp_path)
    monkeypatch.delenv(FUSE_ENV, raising=False)  # the default: "heads" only at HEADS_DEFAULT_SHAPES
    assert fast._fused_inputs(1) == {"rope", "silu"}  # "silu": the tensor-core GEMV takes down's input
    monkeypatch.setattr(fast_module, "HEADS_DEFAULT_SHAPES", frozenset({(512, 512)}))
    assert fast._fused_inputs(1) == {"rope", "heads", "silu"} and not fast._fused_inputs(2)
    monkeypatch.setenv(FUSE_ENV, "rope,heads")
    assert fast._fused_inputs(batch) == {"rope", "heads"} and eager._fused_inputs(batch) == {"rope"}
    ids = torch.randint(3, 300, (batch, 56), device=DEV)
    ce, cf, cu = eager.new_cache(batch, 64), fast.new_cache(batch, 64), fast.new_cache(batch, 64)
    _mma_attention_table(tmp_path, monkeypatch, batch, cf)
    assert kv4.attn_config(batch, 4, cf.layers[0].k_codes.shape[2]).mma
    for c, m in ((ce, eager), (cf, fast), (cu, fast)):
        m.forward(ids[:, :48], c)
    steps = [fast.decode_step(ids[:, 48], cf)]
    assert (cf.ready == 1).all() and cf.step.item() == 2
    graph = DecodeGraph(fast, cf)  # two warm-up steps, then the replays
    steps += [graph.step(ids[:, i]).clone() for i in range(49, 53)]
    assert cf.step.item() == 8 and (cf.ready == 7).all() and cf.pos.item() == cf.length == 53
    monkeypatch.setenv(FUSE_ENV, "rope")
    plain = [fast.decode_step(ids[:, i], cu) for i in range(48, 53)]
    ref = [eager.forward(ids[:, i:i + 1], ce) for i in range(48, 53)]
    for a, b, r in zip(steps, plain, ref):
        assert _rel(a, b) < 1e-3 and _rel(a, r) < 4e-2
    # WKVQ_STAMPS=1: the attention's and o's programs time their points, in order (runtime.kernels.stamps)
    from runtime.kernels import stamps

    monkeypatch.setenv(stamps.STAMPS_ENV, "1")
    monkeypatch.setenv(FUSE_ENV, "rope,heads")
    fast.decode_step(ids[:, 53], cf)
    torch.cuda.synchronize()
    for kind, rows in (("attn", batch * 2 * 3), ("o", None)):  # 2 KV heads, 2 splits and the append
        t = stamps.read(DEV, kind)
        t = t[:rows] if rows else t[(t != 0).all(dim=1)]
        assert len(t) and (t > 0).all() and (t.diff(dim=1) >= 0).all(), (kind, t)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tensor-core attention and GEMV: CUDA only")
@pytest.mark.parametrize("heads,kv_heads", [(8, 1), (12, 2)])
def test_decode_heads_ready_with_query_parts(tmp_path, monkeypatch, heads, kv_heads):
    """More query heads a KV head than a tensor-core attention program takes (8 as LLaMA-2-70B, 6): the KV head's
    splits are shared by :func:`runtime.kernels.query_parts` programs, each merging and flagging its own part, and the
    output projection waits for each part's flag (``WKVQ_FUSE=rope,heads``, one row). Each decode step (the first
    eager, then CUDA-graph replays) against the step without "heads" from a copy of the same cache (a head read
    before its part's flag would be a different token's output: errors of 1e-1 and more), and the
    sequence against the eager path; every flag (one a part) holds the last step's epoch.

    Not between two whole runs: at these shapes the GEMVs' float32 atomics add in a varying order, so a stored 4-bit
    code may flip and two runs of the same path drift apart (H200: up to 1.7e-2 at 12 on 2 heads, with either
    attention kernel; the attention itself is bit-identical from call to call)."""
    from runtime.fast import FUSE_ENV, DecodeGraph
    from runtime.kernels import kv4, query_parts
    from tests.helpers import copy_cache

    def plain_step(i, cache):
        copy_cache(cu, cache)
        monkeypatch.setenv(FUSE_ENV, "rope")
        out = fast.decode_step(ids[:, i], cu)
        monkeypatch.setenv(FUSE_ENV, "rope,heads")
        return out

    eager, fast = _two_layers_of_128_channel_heads(tmp_path, heads=heads, kv_heads=kv_heads)
    monkeypatch.setenv(FUSE_ENV, "rope,heads")
    assert fast._fused_inputs(1) == {"rope", "heads"}
    ids = torch.randint(3, 300, (1, 56), device=DEV)
    ce, cf, cu = eager.new_cache(1, 64), fast.new_cache(1, 64), fast.new_cache(1, 64)
    assert cf.ready.shape == (2, kv_heads * query_parts(heads // kv_heads)) == (2, 2 * kv_heads)
    _mma_attention_table(tmp_path, monkeypatch, 1, cf)
    assert kv4.attn_config(1, heads, cf.layers[0].k_codes.shape[2]).mma
    for c, m in ((ce, eager), (cf, fast)):
        m.forward(ids[:, :48], c)
    plain = [plain_step(48, cf)]
    steps = [fast.decode_step(ids[:, 48], cf)]
    graph = DecodeGraph(fast, cf)  # two warm-up steps, then the replays
    for i in range(49, 53):
        plain.append(plain_step(i, cf))
        steps.append(graph.step(ids[:, i]).clone())
    assert cf.step.item() == 8 and (cf.ready == 7).all() and cf.pos.item() == cf.length == 53
    ref = [eager.forward(ids[:, i:i + 1], ce) for i in range(48, 53)]
    for a, b, r in zip(steps, plain, ref):  # within one step the atomics' order alone gave 1.1e-3 (H200, 12 on 2)
        assert _rel(a, b) < 5e-3 and _rel(a, r) < 6e-2, (_rel(a, b), _rel(a, r))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tensor-core GEMV: CUDA only")
@pytest.mark.parametrize("fuse", ["rope,heads,silu", "rope,silu"])
def test_decode_silu_input_matches_eager(tmp_path, monkeypatch, fuse):
    """Two layers (down: K = 640, five groups) on the gemv projections at one row, ``WKVQ_FUSE`` with "silu": the
    down projection's tensor-core programs build ``silu(gate) * up`` in shared memory (no SiLU launch; the norm
    before gate_up zeroes gate_up). Decode steps and CUDA-graph replays against the same steps without "silu" and
    against the eager path."""
    from runtime.fast import FUSE_ENV, DecodeGraph
    from runtime.kernels import misc

    eager, fast = _two_layers_of_128_channel_heads(tmp_path)
    monkeypatch.setenv(FUSE_ENV, fuse)
    assert fast._fused_inputs(1) == set(fuse.split(",")) and fast.layers[0].down._mma_silu(1)
    ids = torch.randint(3, 300, (1, 56), device=DEV)
    ce, cf, cu = eager.new_cache(1, 64), fast.new_cache(1, 64), fast.new_cache(1, 64)
    for c, m in ((ce, eager), (cf, fast), (cu, fast)):
        m.forward(ids[:, :48], c)
    silu_calls = []
    monkeypatch.setattr(misc, "silu_mul", lambda *a, **kw: silu_calls.append(1))  # must not run
    steps = [fast.decode_step(ids[:, 48], cf)]
    graph = DecodeGraph(fast, cf)
    steps += [graph.step(ids[:, i]).clone() for i in range(49, 53)]
    assert not silu_calls
    monkeypatch.undo()
    monkeypatch.setenv(FUSE_ENV, fuse.replace(",silu", ""))
    plain = [fast.decode_step(ids[:, i], cu) for i in range(48, 53)]
    ref = [eager.forward(ids[:, i:i + 1], ce) for i in range(48, 53)]
    for a, b, r in zip(steps, plain, ref):
        assert _rel(a, b) < 1e-3 and _rel(a, r) < 4e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the decode step's kernels: CUDA only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_in_bfloat16_and_float32(tmp_path, monkeypatch, dtype):
    """A model loaded in bfloat16 or float32 on CUDA (``runtime.load(..., dtype=...)``): a prefill, a decode step and
    CUDA-graph replays with the default fusions ("heads" as at 7B; no SiLU input, which the tensor-core GEMV builds
    in float16 only, so the projections run the split-K kernel on the group-major weight). float32: the eager path's
    logits to float32's precision (the split-K kernel's products in IEEE float32: with Triton's default TF32 they
    were 5-9% off, the 4-bit cache turning ~1e-3 differences in K and V into other codes; a float32 step used to
    fail outright in down's row GEMV). bfloat16: the eager path rounds K and V to bfloat16 before quantizing them
    and the kernels quantize float32 sums, so their codes differ; each is held to the float32 eager path instead,
    the kernels no further from it than the eager path in bfloat16 (measured: at most 1.05 times as far)."""
    from runtime import fast as fast_module
    from runtime.fast import FUSE_ENV, DecodeGraph

    def steps(model, kernels):
        c = model.new_cache(1, 64)
        out = [model.forward(ids[:, :48], c)]
        if not kernels:
            return out + [model.forward(ids[:, i:i + 1], c) for i in range(48, 53)]
        out.append(model.decode_step(ids[:, 48], c))
        graph = DecodeGraph(model, c)
        return out + [graph.step(ids[:, i]).clone() for i in range(49, 53)]

    monkeypatch.delenv(FUSE_ENV, raising=False)
    monkeypatch.setattr(fast_module, "HEADS_DEFAULT_SHAPES", frozenset({(512, 512)}))
    from tests.helpers import heads128_rtn_artifact

    art = heads128_rtn_artifact(tmp_path)
    eager, fast = _two_layers_of_128_channel_heads(tmp_path, dtype, art)
    assert fast.embed.dtype == dtype and fast._fused_inputs(1) == {"rope", "heads"}
    ids = torch.randint(3, 300, (1, 56), device=DEV)
    got, ref = steps(fast, True), steps(eager, False)
    if dtype == torch.float32:
        for a, r in zip(got, ref):
            assert _rel(a, r) < 1e-4, _rel(a, r)
        return
    ref32 = steps(_two_layers_of_128_channel_heads(tmp_path, torch.float32, art)[0], False)
    for a, r, r32 in zip(got, ref, ref32):
        assert _rel(a, r32) <= 1.25 * _rel(r, r32) + 1e-2, (_rel(a, r32), _rel(r, r32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the decode step's kernels: CUDA only")
@pytest.mark.parametrize("batch", [1, 2])
def test_decode_on_the_ampere_path_matches_eager(tmp_path, monkeypatch, batch):
    """The decode step as an A100 runs it, on this GPU: the kernels' choices see compute capability 8
    (``runtime.kernels._major``), so no PDL and no L2 prefetch, the split attention kernel where this GPU (sm_90) runs
    the tensor-core one, and the default fusions, "heads" included (its flags then set after the attention by
    ``kv4.decode_attention``, as no attention program sets them). Decode steps and CUDA-graph replays against the
    eager path and against the same steps on this GPU's own path. Only the choices are emulated: the kernels still
    compile for this GPU (``test_mma_table_configs_compile_for_other_gpus`` compiles the GEMV's for sm_80)."""
    from runtime import fast as fast_module
    from runtime import kernels
    from runtime.fast import FUSE_ENV, DecodeGraph
    from runtime.kernels import kv4_mma, overlap

    eager, fast = _two_layers_of_128_channel_heads(tmp_path)
    monkeypatch.delenv(FUSE_ENV, raising=False)
    monkeypatch.delenv(overlap.PDL_ENV, raising=False)
    monkeypatch.setattr(fast_module, "HEADS_DEFAULT_SHAPES", frozenset({(512, 512)}))
    ids = torch.randint(3, 300, (batch, 56), device=DEV)
    ce, cn, ca = eager.new_cache(batch, 64), fast.new_cache(batch, 64), fast.new_cache(batch, 64)
    _mma_attention_table(tmp_path, monkeypatch, batch, cn)
    for c, m in ((ce, eager), (cn, fast), (ca, fast)):
        m.forward(ids[:, :48], c)
    launches, launch = [], kv4_mma.launch
    monkeypatch.setattr(kv4_mma, "launch", lambda *a, **kw: (launches.append(1), launch(*a, **kw))[1])
    native = [fast.decode_step(ids[:, i], cn) for i in range(48, 53)]
    assert bool(launches) == overlap.hopper(DEV)
    launches.clear()
    monkeypatch.setattr(kernels, "_major", lambda index: 8)
    assert not overlap.hopper(DEV) and not overlap.pdl(DEV, "gemv") and kernels.cuda_major(DEV) == 8
    fused = fast._fused_inputs(batch)
    assert fused == ({"rope", "heads", "silu"} if batch == 1 else set()), fused
    steps = [fast.decode_step(ids[:, 48], ca)]
    graph = DecodeGraph(fast, ca)  # two warm-up steps, then the replays
    steps += [graph.step(ids[:, i]).clone() for i in range(49, 53)]
    assert not launches and ca.length == 53
    if batch == 1:  # the flags, set by the copy after the split attention: the epoch of the last step
        assert (ca.ready == ca.step.item() - 1).all()
    ref = [eager.forward(ids[:, i:i + 1], ce) for i in range(48, 53)]
    for a, b, r in zip(steps, native, ref):
        assert _rel(a, b) < 1e-2 and _rel(a, r) < 4e-2, (_rel(a, b), _rel(a, r))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="QuantLinear dispatches to the kernel on CUDA only")
def test_quantlinear_cuda_dispatch_matches_dequantized():
    from runtime.qlinear import QuantLinear

    w = torch.randn(96, 576)
    scale, zero = quant.weight_qparams(w, 4, 128)
    m = QuantLinear.from_codes(quant.quantize_weight(w, scale, zero, 4, 128), scale, zero, 4, 128).to(DEV)
    x = torch.randn(3, 1, 576, device=DEV, dtype=torch.float16)
    ref = x.double() @ m.dequantized_weight(torch.float64).T
    assert m._fused_ok(x) and _rel(m(x), ref) < TOL



def test_attention_pdl_arguments(monkeypatch):
    """What the decode attention passes the tensor-core launch (host side only: the launches are recorded, not
    run): launched early with the PDL kind "attn_mma" (the default; "attn" is the split kernel's); its kernel lets
    the next one launch early with "attn_trigger", or, when a separate combine kernel merges its splits, wherever it
    is launched early itself."""
    from runtime.kernels import kv4, kv4_mma, overlap

    calls, combines = [], []

    class _Combine:  # stands for the separate combine kernel: records its PDL arguments
        def __getitem__(self, grid):
            return lambda *a, **kw: combines.append((kw["PDL"], kw["TRIGGER"]))

    monkeypatch.setattr(kv4_mma, "mma_attention_ok", lambda *a: True)
    monkeypatch.setattr(kv4_mma, "launch", lambda *a, **kw: calls.append(a[-2:]))
    monkeypatch.setattr(kv4, "_attn_combine_kernel", _Combine())
    monkeypatch.setattr(overlap, "hopper", lambda device: True)
    monkeypatch.setattr(overlap, "_triton_has_pdl", lambda: True)
    args, _ = _attention_case(2, 2, None, 10, 1, 1, d=128, s=64)
    for env, combine, want, want_combine in (("0", True, (False, False), None),
                                             ("attn_mma", True, (True, False), None),
                                             ("", True, (True, False), None), ("attn", True, (False, False), None),
                                             ("attn_mma,attn_trigger", True, (True, True), None),
                                             ("attn_mma", False, (True, True), (True, False)),
                                             ("attn_mma,attn_trigger", False, (True, True), (True, True))):
        monkeypatch.setenv(overlap.PDL_ENV, env)
        cfg = kv4.AttnConfig(splits=2, block_s=64, mma=True, stages=2, combine=combine)
        kv4.decode_attention(*args, cfg)
        assert calls.pop() == want and (combines.pop() if combines else None) == want_combine, (env, combine)
