"""The pure primitives: weight quantization with ragged groups, packing, token-wise KV quantization."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from runtime import quant

BITS = st.integers(2, 8)
settings.register_profile("ci", max_examples=60, deadline=None)
settings.load_profile("ci")


def _seeded(seed, *shape):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


@given(bits=BITS, rows=st.integers(1, 5), n=st.integers(1, 300), seed=st.integers(0, 10**6))
def test_pack_unpack_round_trip_is_exact(bits, rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (rows, n), generator=g, dtype=torch.uint8)
    p = quant.pack(q, bits)
    assert p.dtype == torch.uint8
    assert p.shape == (rows, quant.packed_length(n, bits))
    assert torch.equal(quant.unpack(p, bits, n), q)


def test_int4_packing_layout_is_low_nibble_first():
    q = torch.tensor([[1, 2, 3, 4, 5]], dtype=torch.uint8)
    assert quant.pack(q, 4).tolist() == [[0x21, 0x43, 0x05]]
    assert quant.pack(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2).tolist() == [[1 | 2 << 2 | 3 << 4]]


@given(bits=BITS, out=st.integers(1, 6), n=st.integers(1, 400), group=st.sampled_from([16, 32, 64, 128, 100]),
       seed=st.integers(0, 10**6))
def test_weight_dequantized_within_half_step(bits, out, n, group, seed):
    w = _seeded(seed, out, n)
    scale, zero = quant.weight_qparams(w, bits, group)
    assert scale.shape == zero.shape == (out, math.ceil(n / group))
    q = quant.quantize_weight(w, scale, zero, bits, group)
    assert int(q.max()) <= 2**bits - 1
    deq = quant.dequantize_weight(q, scale, zero, group)
    step = quant.expand_groups(scale, group, n)
    assert torch.all((deq - w).abs() <= step / 2 + 1e-6)
    # the fake-quant (STE) path gives the same values
    assert torch.allclose(quant.fake_quantize_weight(w, bits, group), deq, atol=1e-6)


def test_ragged_last_group_uses_only_its_own_channels():
    w = torch.zeros(1, 576)
    w[0, 512:] = torch.linspace(-1, 1, 64)  # the ragged group (576 = 4 x 128 + 64)
    w[0, :512] = 100.0
    scale, zero = quant.weight_qparams(w, 4, 128)
    assert scale.shape == (1, 5)
    assert scale[0, 4].item() == pytest.approx(2 / 15, rel=1e-6)
    deq = quant.dequantize_weight(quant.quantize_weight(w, scale, zero, 4, 128), scale, zero, 128)
    assert (deq[0, 512:] - w[0, 512:]).abs().max() <= scale[0, 4] / 2 + 1e-6


def test_clipping_factors_shrink_the_range():
    w = _seeded(0, 8, 256)
    s_full, _ = quant.weight_qparams(w, 4, 128)
    half = torch.full((8, 2), 0.5)
    s_clip, _ = quant.weight_qparams(w, 4, 128, half, half)
    assert torch.allclose(s_clip, s_full * 0.5, rtol=1e-5)


def test_lwc_gradient_reaches_clipping_factors():
    w = _seeded(1, 4, 128)
    hi = torch.full((4, 1), 0.9, requires_grad=True)
    lo = torch.full((4, 1), 0.9, requires_grad=True)
    loss = (quant.fake_quantize_weight(w, 4, 128, hi, lo) - w).abs().sum()
    loss.backward()
    assert hi.grad is not None and hi.grad.abs().sum() > 0 and lo.grad.abs().sum() > 0


@given(bits=BITS, heads=st.integers(1, 3), t=st.integers(1, 9), d=st.sampled_from([8, 16, 64]),
       groups=st.sampled_from([1, 2, 4]), seed=st.integers(0, 10**6))
def test_kv_quantization_within_half_step_after_smoothing(bits, heads, t, d, groups, seed):
    x = _seeded(seed, 2, heads, t, d) * 3 + 1
    scale = _seeded(seed + 1, heads, d).abs() + 0.5
    shift = _seeded(seed + 2, heads, d)
    g = d // groups
    codes, step, minimum = quant.kv_quantize(x, scale, shift, bits, g)
    assert codes.shape == x.shape and codes.dtype == torch.uint8 and step.shape == (2, heads, t, groups)
    deq = quant.kv_dequantize(codes, step, minimum, scale, shift, g)
    # half a step in the smoothed domain, mapped back through s
    bound = quant.expand_groups(step, g, d) / 2 * scale[:, None, :] + 1e-5
    assert torch.all((deq - x).abs() <= bound)
    assert torch.allclose(quant.kv_fake_quantize(x, scale, shift, bits, g), deq, atol=1e-5)


def test_kv_smoothing_changes_the_error():
    """A channel-wise outlier inflates every token's step; smoothing it away reduces the error."""
    x = _seeded(3, 1, 1, 64, 64)
    x[..., 5] += 40.0
    ones, zeros = torch.ones(1, 64), torch.zeros(1, 64)
    err_plain = (quant.kv_fake_quantize(x, ones, zeros) - x).abs().mean()
    shift = zeros.clone()
    shift[0, 5] = 40.0
    err_shift = (quant.kv_fake_quantize(x, ones, shift) - x).abs().mean()
    assert err_shift < err_plain / 3


@pytest.mark.parametrize("bad", [1, 9, 0, 4.0])
def test_bits_outside_range_are_refused(bad):
    with pytest.raises(ValueError, match="bits must be"):
        quant.check_bits(bad)


def test_group_size_must_be_positive():
    with pytest.raises(ValueError, match="group size"):
        quant.weight_qparams(torch.ones(2, 8), 4, 0)


@pytest.mark.parametrize("seed", [0, 1])
def test_learned_rounding_decisions_reproduce_the_offset_fake_quant(seed):
    """``quantize_weight(..., rounding=rounding_decisions(w, s, v))`` dequantizes to exactly the
    weight that ``fake_quantize_weight(..., offset=v)`` trains with; offsets beyond +-0.5 are clamped."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(12, 200, generator=g)
    v = (torch.rand(12, 200, generator=g) - 0.5) * 1.6
    scale, zero = quant.weight_qparams(w, 4, 64)
    d = quant.rounding_decisions(w, scale, v, 64)
    assert d.dtype == torch.int8 and set(d.unique().tolist()) <= {-1, 0, 1} and (d != 0).any()
    q = quant.quantize_weight(w, scale, zero, 4, 64, rounding=d)
    fq = quant.fake_quantize_weight(w, 4, 64, offset=v)
    assert torch.allclose(quant.dequantize_weight(q, scale, zero, 64), fq, atol=1e-6)
    assert torch.equal(quant.rounding_decisions(w, scale, torch.zeros_like(w), 64), torch.zeros_like(d))
    assert torch.equal(quant.quantize_weight(w, scale, zero, 4, 64, rounding=torch.zeros_like(d)),
                       quant.quantize_weight(w, scale, zero, 4, 64))


def test_rounding_offset_gets_the_straight_through_gradient():
    w = torch.randn(4, 128)
    v = torch.zeros(4, 128, requires_grad=True)
    quant.fake_quantize_weight(w, 4, 128, offset=v).sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


@pytest.mark.parametrize("n,k,group", [(40, 320, 128), (24, 256, 128), (8, 200, 64)])
def test_group_major_layout_round_trip(n, k, group):
    """quant.group_major: codes [N, G, group/2] with each group's rows contiguous (a ragged group padded with zero
    bytes), scales and zeros transposed in memory; row_major_codes gives back the packed rows (and the padding),
    row slices stay views; group_strides names both layouts' strides."""
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    packed = quant.pack(q, 4)
    s, z = torch.rand(n, -(-k // group)).half(), torch.randint(0, 16, (n, -(-k // group)), dtype=torch.uint8)
    gq, gs, gz = quant.group_major(packed, s, z, group)
    g = -(-k // group)
    assert gq.shape == (n, g, group // 2) and gq.stride() == (group // 2, n * group // 2, 1)
    assert gs.stride() == gz.stride() == (1, n) and torch.equal(gs, s) and torch.equal(gz, z)
    rows = quant.row_major_codes(gq)
    assert torch.equal(rows[:, :packed.shape[1]], packed) and not rows[:, packed.shape[1]:].any()
    assert torch.equal(quant.unpack(rows, 4, k), q)
    assert gq[5:9].data_ptr() == gq.data_ptr() + 5 * group // 2  # a row slice is a view
    assert quant.group_strides(packed, s, z, group) == (packed.shape[1], group // 2, g, 1, g, 1)
    assert quant.group_strides(gq, gs, gz, group) == (group // 2, n * group // 2, 1, n, 1, n)
    assert quant.row_major_codes(packed) is packed
