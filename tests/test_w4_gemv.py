"""The row-streaming INT4 GEMV (:mod:`runtime.kernels.w4_gemv`) against the float32 dequantized product.

Run on CUDA; on CPU only under Triton's interpreter (``TRITON_INTERPRET=1 pytest tests/test_w4_gemv.py``),
otherwise skipped, as ``tests/test_kernels.py`` (a CPU run, e.g. CI, runs both through
``tests/test_interpreted_kernels.py``). The interpreter tests use small shapes
(< 60 s in all); the LLaMA-2-7B shapes run on CUDA only.

Error bound: the kernel computes in float32 throughout (codes and ``x`` exact in float32, one scale per word's
partial sum), so against the float64 product of the same float16/uint8 parameters the relative error is
float32 rounding, ~1e-6 measured; asserted < 1e-5 on both devices (``x`` in float16 on CUDA is exact in float32).
"""

from __future__ import annotations

import pytest
import torch

from runtime import kernels, quant
from tests.helpers import quantized_weight
from tests.helpers import rel_error as _rel

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not kernels.available(DEV), reason="needs CUDA + Triton (or TRITON_INTERPRET=1)")
DTYPE = torch.float16 if DEV.type == "cuda" else torch.float32
TOL = 1e-5  # relative norm error against the float64 reference (module docstring)
HALF_TOL = 1e-3  # GemvConfig.half: float16 products (~3e-4 measured; _half_dot)
SHAPES_7B = ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008))  # qkv, o, gate_up, down


def _tol(m, n, k, dtype, group=128):
    """The bound for the default config of a shape: :data:`HALF_TOL` where it runs float16 products (a float16 ``x``
    at ``M = 1`` on CUDA), else :data:`TOL`."""
    from runtime.kernels.w4_gemv import default_config, half_input, half_math

    return HALF_TOL if half_math(default_config(n, k, m, group, half_input(dtype)), dtype) else TOL


def _weight(n, k, group, seed=0):
    """Packed codes, scales, zeros of a random weight and its dequantized float64 matrix, on the test device."""
    return quantized_weight(n, k, group, seed, DEV)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k,group", [(37, 576, 128), (20, 1408, 64), (9, 4096, 128)])
def test_accumulate_matches_reference(m, n, k, group):
    """``out += x @ W^T`` for 1..4 rows; ragged N (not a multiple of the rows per program), a ragged last group
    (576 = 4 x 128 + 64) and a K that is not a multiple of the step (1408 = 2.75 x 512)."""
    from runtime.kernels.w4_gemv import w4_gemv_accumulate

    qw, s, z, w = _weight(n, k, group)
    x, base = torch.randn(m, k, device=DEV, dtype=DTYPE), torch.randn(m, n, device=DEV)
    ref = base.double() + x.double() @ w.T
    out = w4_gemv_accumulate(x, qw, s, z, group, base.clone())
    assert out.dtype == torch.float32 and _rel(out, ref) < _tol(m, n, k, DTYPE, group)


def test_gemv_projection_accumulates_like_the_eager_weight():
    """``GemvW4`` (``FastLlama.with_projections("gemv")``): up to 4 rows on the GEMV, 5 rows on the split-K
    kernel, bias included; both against the eager path of the same tensors."""
    from runtime.fast import W4Weight
    from runtime.kernels.w4_gemv import GemvW4

    qw, s, z, w = _weight(24, 576, 128, seed=4)
    bias = torch.randn(24, device=DEV, dtype=DTYPE)
    proj = GemvW4.from_w4(W4Weight(qw, s, z, 576, 128, bias))
    for m in (1, 4, 5):
        x, base = torch.randn(m, 576, device=DEV, dtype=DTYPE), torch.randn(m, 24, device=DEV)
        ref = base.double() + x.double() @ w.T + bias.double()
        # split-K (m = 5) multiplies float16 codes on the tensor cores: its floor (runtime/kernels/NOTES.md)
        assert _rel(proj.accumulate(x, base.clone()), ref) < (_tol(m, 24, 576, DTYPE) if m <= 4 else 1e-3), m
    assert type(proj.plain()) is W4Weight and proj.plain().qweight is qw


CONFIGS = [  # (block_n, block_k, num_warps, num_stages, sub, prefetch): every code path of the kernel
    (8, 128, 2, 1, 1, False),  # one group per step
    (16, 256, 2, 1, 2, True),  # sub-tiles + prefetch
    (32, 512, 4, 1, 4, True),  # 4 sub-tiles, step longer than K at K = 384 (only the masked tail step)
    (12, 256, 4, 1, 3, False),  # 3 sub-tiles of 4 rows
    (8, 1024, 4, 1, 2, True),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("m,n,k", [(1, 45, 384), (3, 16, 1280)])
def test_configs_ragged(config, m, n, k):
    from runtime.kernels.w4_gemv import w4_gemv_accumulate

    qw, s, z, w = _weight(n, k, 128, seed=1)
    x, base = torch.randn(m, k, device=DEV, dtype=DTYPE), torch.randn(m, n, device=DEV)
    out = w4_gemv_accumulate(x, qw, s, z, 128, base.clone(), config=config)
    assert _rel(out, base.double() + x.double() @ w.T) < TOL


SPLIT_CASES = [  # (m, n, k, block_k): steps of K, ranges of each split
    (1, 45, 1408, 512),  # 3 steps, the last a tail (2.75 x 512): split 4 leaves one range empty
    (3, 37, 384, 512),  # 1 step, shorter than the step (masked): every split but range 0 empty
    (1, 20, 1024, 256),  # 4 steps, no tail: split 3 -> 2, 1, 1 (the prefetch clamp inside a range)
    (3, 16, 256, 256),  # 1 full step, no tail: empty ranges prefetch the last step of K, unmasked
]


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("split", [2, 3, 4])
@pytest.mark.parametrize("m,n,k,block_k", SPLIT_CASES)
def test_split_k_matches_reference(split, prefetch, m, n, k, block_k):
    """``split > 1``: programs over contiguous ranges of the ``K`` steps, partial sums added atomically into
    ``out``, the bias once (by range 0); ragged N, tails, empty ranges, with and without prefetch."""
    from runtime.kernels.w4_gemv import GemvConfig, w4_gemv_accumulate

    qw, s, z, w = _weight(n, k, 128, seed=5)
    x, base = torch.randn(m, k, device=DEV, dtype=DTYPE), torch.randn(m, n, device=DEV)
    bias = torch.randn(n, device=DEV, dtype=DTYPE)
    cfg = GemvConfig(16, block_k, 2, 1, 2 if m == 1 else 1, prefetch, split)
    out = w4_gemv_accumulate(x, qw, s, z, 128, base.clone(), config=cfg, bias=bias)
    assert _rel(out, base.double() + x.double() @ w.T + bias.double()) < TOL


@pytest.mark.parametrize("split,prefetch,sub", [(1, False, 1), (3, True, 2), (4, False, 2)])
@pytest.mark.parametrize("m,n,k,block_k", SPLIT_CASES)
def test_l2_prefetch_matches_reference(split, prefetch, sub, m, n, k, block_k, monkeypatch):
    """``GemvConfig.l2``: each program's bulk L2 prefetch of its code range (before the PDL wait) on Hopper GPUs;
    elsewhere the field is ignored, so the interpreter checks that it changes nothing. Ragged N, tails, empty
    ranges; ``WKVQ_GEMV_L2=1`` turns it on for a config without it."""
    from runtime.kernels.w4_gemv import GemvConfig, w4_gemv_accumulate
    from runtime.kernels.w4_gemv_config import L2_ENV

    qw, s, z, w = _weight(n, k, 128, seed=7)
    x, base = torch.randn(m, k, device=DEV, dtype=DTYPE), torch.randn(m, n, device=DEV)
    ref = base.double() + x.double() @ w.T
    cfg = GemvConfig(16, block_k, 2, 1, sub, prefetch, split)
    assert _rel(w4_gemv_accumulate(x, qw, s, z, 128, base.clone(), config=cfg._replace(l2=True)), ref) < TOL
    monkeypatch.setenv(L2_ENV, "1")
    assert _rel(w4_gemv_accumulate(x, qw, s, z, 128, base.clone(), config=cfg), ref) < TOL


def test_l2_flags():
    """The prefetch needs 16-byte row ranges (``K % 32 == 0``) on a Hopper GPU; ``WKVQ_GEMV_L2`` overrides the
    config's field only when it is 0 or 1; the label names it."""
    from runtime.kernels import overlap
    from runtime.kernels.w4_gemv import GemvConfig, l2_ok
    from runtime.kernels.w4_gemv_config import L2_ENV, l2_override

    hopper = overlap.hopper(DEV)
    assert l2_ok(_weight(8, 1024, 128)[0]) == hopper
    assert not l2_ok(_weight(8, 1000, 8)[0])  # 500-byte rows
    cfg = GemvConfig(16, 256, 2)
    assert GemvConfig(16, 256, 2, l2=True).label().endswith("_l2") and not cfg.label().endswith("_l2")
    with pytest.MonkeyPatch.context() as mp:
        for value, want in (("1", True), ("0", False), ("yes", False)):
            mp.setenv(L2_ENV, value)
            assert l2_override(cfg).l2 == want and l2_override(cfg._replace(l2=True)).l2 == (want or value == "yes")


HALF_CASES = [  # (m, n, k, group, config): every code path with float16 products
    (1, 37, 576, 128, (16, 256, 2, 1, 2, True, 1, True)),  # ragged last group, prefetch
    (2, 20, 1408, 64, (8, 512, 2, 1, 1, False, 2, True)),  # group 64, tail step, split 2
    (4, 45, 1280, 128, (32, 512, 4, 1, 4, True, 3, True)),  # 4 rows of x, 4 sub-tiles, split 3
    (3, 9, 4096, 128, (8, 1024, 4, 1, 1, False, 1, True)),
]


@pytest.mark.parametrize("m,n,k,group,config", HALF_CASES)
def test_half_products_match_reference(m, n, k, group, config):
    """``GemvConfig.half`` with a float16 ``x``: within the float16 floor of the float64 product, and not the float32
    form's result (the config is honoured); with a float32 ``x`` the same config runs the float32 form (exact)."""
    from runtime.kernels.w4_gemv import GemvConfig, half_math, w4_gemv_accumulate

    cfg = GemvConfig(*config)
    qw, s, z, w = _weight(n, k, group, seed=6)
    x, base = torch.randn(m, k, device=DEV, dtype=torch.float16), torch.randn(m, n, device=DEV)
    bias = torch.randn(n, device=DEV, dtype=torch.float16)
    ref = base.double() + x.double() @ w.T + bias.double()
    out = w4_gemv_accumulate(x, qw, s, z, group, base.clone(), config=cfg, bias=bias)
    assert half_math(cfg, x.dtype) and 1e-6 < _rel(out, ref) < HALF_TOL
    x32 = x.float()
    assert not half_math(cfg, x32.dtype)
    out = w4_gemv_accumulate(x32, qw, s, z, group, base.clone(), config=cfg, bias=bias)
    assert _rel(out, ref) < TOL


def test_half_products_large_inputs():
    """Inputs near the float16 range of the products (``|f - zh| < 0.5``: four products of a half under ``2 max|x|``)
    stay finite and within the floor."""
    from runtime.kernels.w4_gemv import GemvConfig, w4_gemv_accumulate

    qw, s, z, w = _weight(16, 512, 128, seed=7)
    x = (torch.rand(1, 512, device=DEV) * 2 - 1).mul(16000).half()
    out = w4_gemv_accumulate(x, qw, s, z, 128, torch.zeros(1, 16, device=DEV),
                             config=GemvConfig(16, 256, 2, 1, 2, False, 1, True))
    assert torch.isfinite(out).all() and _rel(out, x.double() @ w.T) < HALF_TOL


def test_split_config_fields_and_plain_gemv():
    """``split`` is the last field (six-field tuples stay valid, split 1); :func:`w4_gemv` (no accumulation,
    any output dtype) runs a split config with ``split = 1``."""
    from runtime.kernels.w4_gemv import GemvConfig, w4_gemv, w4_gemv_accumulate

    assert GemvConfig(16, 256, 2, 1, 2, True).split == 1 and GemvConfig(*CONFIGS[1]).label() == "n16/2_k256_w2_s1_pf"
    assert GemvConfig(16, 256, 2, 1, 2, True, 4).label() == "n16/2_k256_w2_s1_pf_x4"
    n, k = 24, 1408
    qw, s, z, w = _weight(n, k, 128, seed=6)
    x, bias = torch.randn(2, k, device=DEV, dtype=DTYPE), torch.randn(n, device=DEV, dtype=DTYPE)
    res = torch.randn(2, n, device=DEV, dtype=DTYPE)
    y = w4_gemv(x, qw, s, z, 128, bias=bias, residual=res, out_dtype=torch.float32,
                config=(16, 512, 2, 1, 2, True, 3))
    assert _rel(y, x.double() @ w.T + bias.double() + res.double()) < TOL
    with pytest.raises(ValueError):
        w4_gemv_accumulate(x, qw, s, z, 128, torch.zeros(2, n, device=DEV), config=(16, 512, 2, 1, 2, True, 0))


def test_gemv_bias_residual_and_strided_rows():
    """The non-accumulating variant (``y = x @ W^T + bias + residual``), x rows with a stride, codes that are a
    row slice of a larger (fused) weight."""
    from runtime.kernels.w4_gemv import w4_gemv

    n, k = 40, 576
    qw, s, z, w = _weight(2 * n, k, 128, seed=2)
    qw, s, z, w = qw[n:], s[n:], z[n:], w[n:]  # rows n.. of the fused weight: storage offset n * k / 2
    xs = torch.randn(2, 2 * k, device=DEV, dtype=DTYPE)
    x = xs[:, :k]  # row stride 2k
    bias, res = torch.randn(n, device=DEV, dtype=DTYPE), torch.randn(2, n, device=DEV, dtype=DTYPE)
    y = w4_gemv(x, qw, s, z, 128, bias=bias, residual=res, out_dtype=torch.float32)
    assert y.shape == (2, n) and _rel(y, x.double() @ w.T + bias.double() + res.double()) < TOL
    y16 = w4_gemv(x, qw, s, z, 128)
    assert y16.dtype == DTYPE and _rel(y16, x.double() @ w.T) < (TOL if DTYPE == torch.float32 else 1e-3)


def test_gemv_ok_and_errors():
    from runtime.kernels.w4_gemv import gemv_ok, w4_gemv_accumulate

    qw, s, z, _ = _weight(16, 256, 128)
    x = torch.randn(1, 256, device=DEV, dtype=DTYPE)
    assert gemv_ok(x, qw) and gemv_ok(x.expand(4, 256), qw)
    assert not gemv_ok(torch.randn(5, 256, device=DEV, dtype=DTYPE), qw)  # > 4 rows
    assert not gemv_ok(torch.randn(1, 252, device=DEV, dtype=DTYPE), _weight(16, 252, 128)[0])  # K % 8
    flat = torch.zeros(16 * 128 + 1, dtype=torch.uint8, device=DEV)
    assert not gemv_ok(x, flat[1:].view(16, 128))  # rows not 4-byte aligned
    with pytest.raises(ValueError):
        w4_gemv_accumulate(x, qw, s, z, 128, torch.zeros(1, 16, device=DEV, dtype=torch.float16))
    with pytest.raises(ValueError):
        w4_gemv_accumulate(x, qw, s[:, :1], z[:, :1], 128, torch.zeros(1, 16, device=DEV))


def test_candidate_configs_are_valid():
    """Every sweep candidate has power-of-two tiles and runs without shared memory at group 128."""
    from runtime.kernels.w4_gemv import GEMV_CONFIGS, shared_memory_free

    assert 20 <= len(GEMV_CONFIGS) <= 150 and len(set(GEMV_CONFIGS)) == len(GEMV_CONFIGS)
    assert {cfg.split for cfg in GEMV_CONFIGS} == {1, 2, 4}
    for cfg in GEMV_CONFIGS:
        sub_n = cfg.block_n // cfg.sub
        assert sub_n & (sub_n - 1) == 0 and cfg.block_k & (cfg.block_k - 1) == 0 and shared_memory_free(cfg)


def test_sweep_record_table(tmp_path, monkeypatch):
    """A sweep record named by WKVQ_GEMV_TABLE decides the config of its shapes (and of nothing else); a file
    that is not a record is a one-line ValueError."""
    import json

    from runtime.kernels import w4_gemv as gv

    record = {"best": {"4096x4096x1": {"config": [8, 512, 4, 1, 1, True, 2], "split": 2, "us": 9.0, "GBps": 1.0}}}
    (tmp_path / "sweep.json").write_text(json.dumps(record))
    assert gv.load_table(tmp_path / "sweep.json") == {(4096, 4096, 1): gv.GemvConfig(8, 512, 4, 1, 1, True, 2)}
    before = gv.default_config(4096, 11008, 1, 128)
    monkeypatch.setenv(gv.TABLE_ENV, str(tmp_path / "sweep.json"))
    assert gv.default_config(4096, 4096, 1, 128) == gv.GemvConfig(8, 512, 4, 1, 1, True, 2)
    assert gv.default_config(4096, 11008, 1, 128) == before
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a w4_gemv sweep record"):
        gv.load_table(tmp_path / "bad.json")


FUSED_CASES = [  # (m, n, k, config, dt): ragged N and K (K not a multiple of the step), splits, both roundings
    (1, 45, 1408, (16, 512, 2, 1, 2, False, 3), torch.float16),  # 3 steps (tail), split 3
    (2, 37, 576, (16, 256, 2, 1, 2, True), torch.float32),  # ragged last group, prefetch, one program per row block
    (3, 20, 1408, (8, 1024, 4, 1, 1, True, 2), torch.float16),
    (4, 16, 384, (16, 512, 2, 1, 1, False, 4), torch.float32),  # one masked step, empty ranges
]
# float32 rounding and atomic-add order (the test's docstring); rmsnorm rounded to float16: element flips
FUSED_TOL = {torch.float32: 1e-6, torch.float16: 1e-4}


@pytest.mark.parametrize("m,n,k,config,dt", FUSED_CASES)
def test_fused_inputs_match_unfused(m, n, k, config, dt):
    """The GEMV with its input made in the kernel (rmsnorm of the float32 residual; silu(gate) * up of the
    float32 gate_up) against ``misc.rmsnorm`` / ``misc.silu_mul`` then :func:`w4_gemv_accumulate`, same config.

    Error floor: the SiLU input is computed and rounded to ``dt`` exactly as ``misc.silu_mul`` does, so the two
    differ only in the order of the atomic adds (``split > 1``): asserted < 1e-6 relative. The norm's
    ``rsqrt(mean(x^2) + eps)`` is summed in another order (a few float32 ulps): with ``dt`` float32 that moves
    the input by ~1e-7 relative (asserted < 1e-6); rounded to float16 it may move an element whose ``x r`` lies
    within those ulps of a rounding boundary by one float16 ulp (2^-11 relative; ~1 element in 2^12), i.e.
    ~1e-5 relative of the output per flip at these ``K``: asserted < 1e-4."""
    from runtime.kernels import misc
    from runtime.kernels.w4_gemv import (
        w4_gemv_accumulate,
        w4_gemv_accumulate_rmsnorm,
        w4_gemv_accumulate_silu,
    )

    qw, s, z, _ = _weight(n, k, 128, seed=7)
    x, nw, base = 3 * torch.randn(m, k, device=DEV), torch.randn(k, device=DEV, dtype=dt), torch.randn(m, n, device=DEV)
    bias = torch.randn(n, device=DEV, dtype=DTYPE)
    ref = w4_gemv_accumulate(misc.rmsnorm(x, nw, 1e-5, dt), qw, s, z, 128, base.clone(), config, bias)
    out = w4_gemv_accumulate_rmsnorm(x, nw, 1e-5, dt, qw, s, z, 128, base.clone(), config, bias)
    assert _rel(out, ref) < FUSED_TOL[dt]
    gate_up = 2 * torch.randn(m, 2 * k, device=DEV)
    ref = w4_gemv_accumulate(misc.silu_mul(gate_up, dt), qw, s, z, 128, base.clone(), config, bias)
    kept = gate_up.clone()
    out = w4_gemv_accumulate_silu(gate_up, dt, qw, s, z, 128, base.clone(), config, bias)
    assert _rel(out, ref) < 1e-6 and torch.equal(gate_up, kept)


def test_fused_inputs_errors():
    from runtime.kernels.w4_gemv import (
        w4_gemv_accumulate_rmsnorm,
        w4_gemv_accumulate_silu,
    )

    qw, s, z, _ = _weight(16, 256, 128)
    x, nw, out = torch.randn(1, 256, device=DEV), torch.ones(256, device=DEV), torch.zeros(1, 16, device=DEV)
    bad_calls = [
        lambda: w4_gemv_accumulate_rmsnorm(x.half(), nw, 1e-5, torch.float16, qw, s, z, 128, out),  # x not float32
        lambda: w4_gemv_accumulate_rmsnorm(x, nw[:128], 1e-5, torch.float16, qw, s, z, 128, out),  # weight [K/2]
        lambda: w4_gemv_accumulate_rmsnorm(x, nw, 1e-5, torch.int8, qw, s, z, 128, out),  # dt
        lambda: w4_gemv_accumulate_rmsnorm(x.expand(5, 256), nw, 1e-5, torch.float16, qw, s, z, 128,
                                           torch.zeros(5, 16, device=DEV)),  # 5 rows
        lambda: w4_gemv_accumulate_silu(x, torch.float16, qw, s, z, 128, out),  # gate_up [1, K], not [1, 2K]
        lambda: w4_gemv_accumulate_silu(torch.zeros(1, 512, device=DEV), torch.float16, qw, s, z, 128,
                                        out.half()),  # out not float32
    ]
    for call in bad_calls:
        with pytest.raises(ValueError):
            call()


@pytest.mark.parametrize("fuse", ["norm", "silu", "norm,silu", "rope", "rope,silu", "norm,rope", "rope,heads"])
def test_decode_step_fused_inputs_match_unfused(tmp_path, monkeypatch, fuse):
    """Two layers of a tiny model (down: K = 192, a ragged group) on the gemv projections: the decode step with
    the norms and/or the SiLU product in the GEMVs (WKVQ_FUSE; with "silu", gate_up zeroed by rope_append between
    the layers), or the rope and the cache append in the attention kernel ("rope": qkv, and with "silu" gate_up,
    zeroed by the norms of the next layer; "heads" is dropped at heads of 32 channels) against the same step unfused (``misc.rmsnorm`` / ``misc.silu_mul`` /
    ``rope_append`` kernels; the default fuses the rope), and both
    against the eager path. A sweep record gives the tiny shapes few programs (the interpreter's time is per
    program), down split over K."""
    import json

    import runtime
    from converter.convert import ConvertConfig, convert
    from runtime.fast import FUSE_ENV, FastLlama
    from runtime.kernels.w4_gemv import TABLE_ENV, GemvW4
    from tests.helpers import fast_copy, make_tiny_llama

    configs = {"256x128x0": [64, 128, 4], "128x128x0": [128, 128, 4], "384x128x0": [128, 128, 4],
               "128x192x0": [128, 128, 4, 1, 1, False, 2]}  # qkv, o, gate_up, down
    (tmp_path / "gemv.json").write_text(json.dumps({"best": {key: {"config": c} for key, c in configs.items()}}))
    monkeypatch.setenv(TABLE_ENV, str(tmp_path / "gemv.json"))
    src = make_tiny_llama(tmp_path / "m", hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=192)
    art = convert(ConvertConfig(out=tmp_path / "q", model=str(src), method="rtn", device="cpu", dtype="float32"))
    model, _ = runtime.load(art, device=DEV, dtype=DTYPE)
    eager = FastLlama.from_hf(model, 8, use_kernels=False)
    assert not isinstance(eager.layers[0].qkv, GemvW4)
    # from_hf's default projections: "gemv" on CUDA, "triton" elsewhere (also under the interpreter)
    assert isinstance(FastLlama.from_hf(model, 8).layers[0].qkv, GemvW4) == (DEV.type == "cuda")
    fast = fast_copy(eager)
    monkeypatch.delenv(FUSE_ENV, raising=False)  # the default ("silu" where down's tensor-core GEMV takes it)
    silu = {"silu"} if fast.layers[0].down.silu_by_default(1, fast.embed.dtype) else set()
    assert fast._fused_inputs(1) == {"rope"} | silu and not fast._fused_inputs(2)
    monkeypatch.setenv(FUSE_ENV, fuse)
    named = set(fuse.split(","))
    # "rope" needs no GEMV (5 rows: the input transforms are off) and is dropped beside "norm"
    # "heads" only where a head is one group of 128 channels (here 32: dropped)
    assert fast._fused_inputs(2) == (named - {"rope"} if "norm" in named else named) - {"heads"}
    assert fast._fused_inputs(5) == named & {"rope"} and eager._fused_inputs(2) == named & {"rope"}
    ids = torch.randint(3, 300, (2, 2), device=DEV)
    ce, cf, cu = (eager.new_cache(2, 8) for _ in range(3))
    fused = [fast.decode_step(ids[:, i], cf) for i in range(2)]
    monkeypatch.setenv(FUSE_ENV, "none")
    assert not fast._fused_inputs(2)
    unfused = [fast.decode_step(ids[:, i], cu) for i in range(2)]
    ref = [eager.forward(ids[:, i:i + 1], ce) for i in range(2)]
    tol = 1e-5 if DTYPE == torch.float32 else 1e-3  # float16: the rmsnorm flips of test_fused_inputs_match_unfused
    for a, b, r in zip(fused, unfused, ref):
        assert _rel(a, b) < tol and _rel(a, r) < (2e-4 if DTYPE == torch.float32 else 4e-2)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="LLaMA-2-7B shapes: CUDA only")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("n,k", SHAPES_7B)
def test_7b_shapes(m, n, k):
    from converter.bench_kernels import random_weight
    from runtime.kernels.w4_gemv import w4_gemv_accumulate

    torch.manual_seed(0)
    qw, s, z = random_weight(n, k)
    w = quant.dequantize_weight(quant.unpack(qw, 4, k), s, z, 128, torch.float64)
    x, base = torch.randn(m, k, device=DEV, dtype=torch.float16), torch.randn(m, n, device=DEV)
    out = w4_gemv_accumulate(x, qw, s, z, 128, base.clone())
    assert _rel(out, base.double() + x.double() @ w.T) < _tol(m, n, k, torch.float16)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("n,k", SHAPES_7B)
def test_7b_shapes_half(n, k):
    """The float16-product form (inline PTX on the GPU) at the 7B shapes, M = 1, against the float64 product."""
    from converter.bench_kernels import random_weight
    from runtime.kernels.w4_gemv import GemvConfig, default_config, w4_gemv_accumulate

    torch.manual_seed(0)
    qw, s, z = random_weight(n, k)
    w = quant.dequantize_weight(quant.unpack(qw, 4, k), s, z, 128, torch.float64)
    x, base = torch.randn(1, k, device=DEV, dtype=torch.float16), torch.randn(1, n, device=DEV)
    for cfg in (default_config(n, k, 1, 128)._replace(half=True), GemvConfig(32, 512, 4, 1, 4, True, 2, True)):
        out = w4_gemv_accumulate(x, qw, s, z, 128, base.clone(), config=cfg)
        assert _rel(out, base.double() + x.double() @ w.T) < HALF_TOL, cfg


@pytest.mark.gpu
@gpu
def test_all_candidate_configs_cuda():
    """Every 4th config of the sweep compiles and is exact at a small ragged shape (M = 1 and 3); the bench
    (``benchmarks/w4_gemv_bench.py``) checks all of them at the 7B shapes."""
    from runtime.kernels.w4_gemv import GEMV_CONFIGS, w4_gemv_accumulate

    qw, s, z, w = _weight(300, 1408, 128, seed=3)
    for m in (1, 3):
        x = torch.randn(m, 1408, device=DEV, dtype=torch.float16)
        ref = x.double() @ w.T
        for cfg in GEMV_CONFIGS[::4]:
            out = w4_gemv_accumulate(x, qw, s, z, 128, torch.zeros(m, 300, device=DEV), config=cfg)
            assert _rel(out, ref) < TOL, cfg


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("env", [{}, {"WKVQ_PDL": "0"}, {"WKVQ_MMA": "0"}, {"WKVQ_PDL": "1"}, {"WKVQ_LAYOUT": "group"},
                                 {"WKVQ_LAYOUT": "group", "WKVQ_MMA": "0"},
                                 {"WKVQ_MMA": "0", "WKVQ_PDL": "1", "WKVQ_GEMV_L2": "1", "WKVQ_ATTN_L2": "2"}])
def test_decode_graph_with_gemv_matches_eager(tmp_path, monkeypatch, env):
    """One layer of a tiny converted model, every projection a :class:`GemvW4` (down: K = 320, a ragged group):
    on the tensor-core GEMV (default) or the row-streaming one (``WKVQ_MMA=0``); with the default PDL (projections,
    norms, SiLU), none, and with the L2 prefetches (:mod:`runtime.kernels.overlap`; all on: the kernels' order in a
    CUDA graph with every kernel launched early)."""
    from runtime.kernels.w4_gemv import GemvW4
    from tests.helpers import fast_decode_errors

    for name, value in env.items():
        monkeypatch.setenv(name, value)

    fast, errs = fast_decode_errors(tmp_path, "gemv")
    layer = fast.layers[0]
    assert all(isinstance(w, GemvW4) for w in (layer.qkv, layer.o, layer.gate_up, layer.down))
    assert max(errs) < 4e-2, errs  # float16 activations


def test_fuse_choice():
    """WKVQ_FUSE: unset or empty is the default ("rope", "heads" and "silu" at one row, none at more), 'none' is
    none, names are checked with a one-line error."""
    from runtime.fast import FUSE_DEFAULT, fuse_choice

    assert fuse_choice(None) == fuse_choice(" ") == set(FUSE_DEFAULT[1]) == {"rope", "heads", "silu"}
    assert fuse_choice(None, 8) == fuse_choice("", 2) == set()
    assert fuse_choice("none") == set() and fuse_choice("silu") == {"silu"}
    assert fuse_choice(" norm , silu ") == {"norm", "silu"}
    assert fuse_choice("rope,heads") == {"rope", "heads"}
    with pytest.raises(ValueError, match=r"WKVQ_FUSE='silu,gelu': unknown fusion gelu; use .*norm, silu, rope, heads, or none"):
        fuse_choice("silu,gelu")
