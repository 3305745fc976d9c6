"""Triton kernels against the reference path on random inputs.

Run on CUDA; on CPU only under Triton's interpreter (``TRITON_INTERPRET=1 pytest tests/test_kernels.py``),
otherwise skipped (CI installs no Triton).
"""

from __future__ import annotations

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


@pytest.mark.parametrize("m,n,k", [(1, 48, 160), (1, 24, 100), (5, 40, 576), (33, 64, 256), (70, 24, 128)])
def test_w4_linear(m, n, k):
    from runtime.kernels.w4 import w4_linear

    w = torch.randn(n, k, device=DEV)
    scale, zero = quant.weight_qparams(w, 4, 128)
    q = quant.quantize_weight(w, scale, zero, 4, 128)
    qw, s, z = quant.pack(q, 4), scale.half(), zero.to(torch.uint8)
    x, bias, res = (torch.randn(m, k, device=DEV, dtype=DTYPE), torch.randn(n, device=DEV, dtype=DTYPE),
                    torch.randn(m, n, device=DEV, dtype=DTYPE))
    ref = x.double() @ quant.dequantize_weight(q, s, z, 128).double().T + bias.double() + res.double()
    assert _rel(w4_linear(x, qw, s, z, 128, bias, res), ref) < TOL


@pytest.mark.parametrize("config", [(16, 2, 4), (16, 4, 4), (32, 1, 4)])
@pytest.mark.parametrize("m,k", [(1, 576), (3, 1024)])
def test_w4_accumulate_configs_and_ragged_groups(config, m, k):
    """Every program shape of the split-K kernel (groups per program 1/2/4, groups past K masked)."""
    from runtime.kernels.w4 import w4_accumulate

    n = 40
    w = torch.randn(n, k, device=DEV)
    scale, zero = quant.weight_qparams(w, 4, 128)
    q = quant.quantize_weight(w, scale, zero, 4, 128)
    qw, s, z = quant.pack(q, 4), scale.half(), zero.to(torch.uint8)
    x, base = torch.randn(m, k, device=DEV, dtype=DTYPE), torch.randn(m, n, device=DEV)
    ref = base.double() + x.double() @ quant.dequantize_weight(q, s, z, 128).double().T
    out = w4_accumulate(x, qw, s, z, 128, base.clone(), config=config)
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
    params = (kq.k_scale, kq.k_shift, kq.v_scale, kq.v_shift)
    q, k_cur, v_cur = rope_append(qkv, cos, sin, fast.pos, fast.layers[0], params, hq)
    x = qkv.float().view(b, hq + 2 * hkv, d)
    k_ref = _rope(x[:, hq:hq + hkv], cos[pos], sin[pos])
    assert _rel(q, _rope(x[:, :hq], cos[pos], sin[pos])) < 1e-6 and _rel(k_cur, k_ref) < 1e-6
    assert torch.equal(v_cur, x[:, hq + hkv:])
    ref.write(0, kq, k_cur[:, :, None], v_cur[:, :, None], pos)  # same inputs: stored bytes must agree
    for a, r in zip(fast.layers[0].tensors(), ref.layers[0].tensors()):
        assert torch.equal(a[:, :, pos], r[:, :, pos])


@pytest.mark.parametrize("hq,hkv,group,length,key_scale", [(6, 2, None, 37, 2), (4, 4, 16, 130, 2), (8, 2, None, 0, 2),
                                                         (4, 2, None, 150, 40)])  # scores spread: rescales
def test_decode_attention_matches_reference(hq, hkv, group, length, key_scale):
    from runtime.kernels.kv4 import decode_attention

    b, d, s = 2, 32, 160
    kq = _quantizer(hkv, d, group)
    cache = StaticPOQCache(1, b, s, hkv, d, group, device=DEV)
    if length:
        ramp = torch.linspace(0.1, 1, length, device=DEV)[:, None]  # the running maximum keeps growing
        keys = torch.randn(b, hkv, length, d, device=DEV) * key_scale * ramp
        cache.write(0, kq, keys, torch.randn(b, hkv, length, d, device=DEV), 0)
    cache.advance(length)
    q = torch.randn(b, hq, d, device=DEV)
    k_cur, v_cur = torch.randn(b, hkv, d, device=DEV), torch.randn(b, hkv, d, device=DEV)
    params = (kq.k_scale, kq.k_shift, kq.v_scale, kq.v_shift)
    out = torch.full((b, hq, d), float("nan"), device=DEV)
    out = decode_attention(q, k_cur, v_cur, cache.layers[0], cache.pos, params, d ** -0.5, torch.float32, splits=4,
                           block_s=16)
    pk, pv = cache.read(0, kq, length, torch.float32)
    ref = poq_attention(q[:, :, None], k_cur[:, :, None], v_cur[:, :, None], pk, pv, d ** -0.5)[:, :, 0]
    assert _rel(out, ref) < 1e-4


def test_rmsnorm_and_silu_mul():
    from runtime.kernels.misc import rmsnorm, silu_mul

    x, w = torch.randn(3, 200, device=DEV, dtype=DTYPE), torch.randn(200, device=DEV, dtype=DTYPE)
    h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    assert _rel(rmsnorm(x, w, 1e-5), w * h.to(DTYPE)) < TOL
    gu = torch.randn(3, 2 * 1500, device=DEV, dtype=DTYPE)
    g, u = gu.float().chunk(2, -1)
    assert _rel(silu_mul(gu), F.silu(g) * u) < TOL


def test_fast_decode_kernels_match_eager(tiny_llama_dir, tmp_path):
    """A 1-layer model with power-of-two heads: kernel decode steps vs the eager reference path."""
    import runtime
    from converter.convert import ConvertConfig, convert
    from runtime.fast import DecodeGraph, FastLlama
    from tests.helpers import make_tiny_llama

    src = make_tiny_llama(tmp_path / "m", hidden_size=192, num_attention_heads=6, num_key_value_heads=2,
                          num_hidden_layers=1)
    art = convert(ConvertConfig(out=tmp_path / "q", model=str(src), method="rtn", device="cpu", dtype="float32"))
    model, _ = runtime.load(art, device=DEV, dtype=DTYPE)
    eager = FastLlama.from_hf(model, 32, use_kernels=False)
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="QuantLinear dispatches to the kernel on CUDA only")
def test_quantlinear_cuda_dispatch_matches_dequantized():
    from runtime.qlinear import QuantLinear

    w = torch.randn(96, 576)
    scale, zero = quant.weight_qparams(w, 4, 128)
    m = QuantLinear.from_codes(quant.quantize_weight(w, scale, zero, 4, 128), scale, zero, 4, 128).to(DEV)
    x = torch.randn(3, 1, 576, device=DEV, dtype=torch.float16)
    ref = x.double() @ m.dequantized_weight(torch.float64).T
    assert m._fused_ok(x) and _rel(m(x), ref) < TOL
