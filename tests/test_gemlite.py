"""The optional GemLite projection backend (runtime.kernels.gemlite_backend).

Shape rules, config lookup and the opt-in's errors run everywhere; the matmuls need CUDA and the
gemlite package and are skipped otherwise. Error floors of the GemLite products: against the
float32 matmul of the float16-rounded dequantized weights (the values GemLite multiplies) 2e-5
(float32 accumulation, atomic split order); against the float32 dequantized weights 1e-3 (adds the
float16 rounding of each weight, relative <= 2**-11).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from runtime import quant
from runtime.fast import FastConfig, FastLlama, W4Weight
from runtime.kernels import gemlite_backend as gb

GPU = pytest.mark.skipif(not gb.available("cuda"), reason="needs CUDA and the optional gemlite package")
SHAPES_7B = ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008))  # qkv, o, gate_up, down
FLOOR_F16W, FLOOR_F32W = 2e-5, 1e-3


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _w4(n, k, group=128, device="cpu", bias=False):
    g = -(-k // group)
    gen = torch.Generator().manual_seed(n * 7 + k)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    s = (torch.rand(n, g, generator=gen) * 2e-3 + 1e-3).half()
    z = torch.randint(0, 16, (n, g), dtype=torch.uint8, generator=gen)
    b = torch.randn(n, generator=gen).half() if bias else None
    w = W4Weight(quant.pack(q, 4), s, z, k, group, b)
    return dataclasses.replace(w, **{f: getattr(w, f).to(device) for f in ("qweight", "scales", "zeros")},
                               bias=None if b is None else b.to(device))


def _dequant(w, dtype):
    return quant.dequantize_weight(quant.unpack(w.qweight, 4, w.in_features), w.scales, w.zeros, w.group_size, dtype)


# ----------------------------------------------------------------------------- everywhere


@pytest.mark.parametrize("k,group,dtype,ok", [(4096, 128, torch.float16, True), (11008, 128, torch.bfloat16, True),
                                              (256, 64, torch.float16, True), (160, 128, torch.float16, False),
                                              (320, 128, torch.float16, False), (256, 16, torch.float16, False),
                                              (256, 128, torch.float32, False)])
def test_supported_shapes(k, group, dtype, ok):
    assert gb.supported(_w4(24, k, group), dtype) is ok


def test_nearest_config_same_rows_group_and_packing():
    table = {"(1, 4096, 4096, 128, 8, 104)": {"BLOCK_SIZE_N": 128},
             "(1, 28672, 4096, 128, 8, 104)": {"BLOCK_SIZE_N": 512},
             "(1, 4096, 14336, 128, 8, 104)": {"BLOCK_SIZE_N": 256},
             "(8, 22016, 4096, 128, 8, 104)": {"BLOCK_SIZE_N": 64},
             "(1, 22016, 4096, 64, 8, 104)": {"BLOCK_SIZE_N": 32},
             "not a key": {"BLOCK_SIZE_N": 1}}
    assert gb.nearest_config(table, 1, 22016, 4096, 128, 8, 104) == {"BLOCK_SIZE_N": 512}
    assert gb.nearest_config(table, 1, 4096, 11008, 128, 8, 104) == {"BLOCK_SIZE_N": 256}
    assert gb.nearest_config(table, 1, 4096, 4096, 128, 8, 204) is None
    assert gb.nearest_config(table, 2, 4096, 4096, 128, 8, 104) == {"BLOCK_SIZE_N": 128}  # rows before shape
    got = gb.nearest_config(table, 8, 12288, 4096, 128, 8, 104)
    got["BLOCK_SIZE_N"] = 0  # a copy: the table is not changed
    assert table["(8, 22016, 4096, 128, 8, 104)"] == {"BLOCK_SIZE_N": 64}


def test_with_projections_rejects_unknown_and_cpu():
    c = FastConfig(hidden=64, heads=2, kv_heads=1, head_dim=32, layers=0, eps=1e-5)
    m = FastLlama(c, torch.zeros(10, 64), [], torch.ones(64), torch.zeros(10, 64), torch.ones(8, 32),
                  torch.zeros(8, 32), use_kernels=False)
    with pytest.raises(ValueError, match="allowed: triton, gemlite, gemv"):
        m.with_projections("marlin")
    with pytest.raises(ValueError, match="CUDA"):
        m.with_projections("gemlite")
    with pytest.raises(ValueError, match="kernel path"):
        m.with_projections("gemv")
    assert m.with_projections("triton") is m


def test_bench_accepts_the_gemlite_path_but_not_by_default():
    from converter.bench import BenchConfig

    assert "wkvq-gemlite" not in BenchConfig().paths
    assert BenchConfig(paths=("wkvq", "wkvq-gemlite")).paths[1] == "wkvq-gemlite"
    with pytest.raises(ValueError, match="wkvq-gemlite"):
        BenchConfig(paths=("gemlite",))


# ----------------------------------------------------------------------------- CUDA + gemlite


@GPU
def test_pack_layout_is_the_artifact_layout_transposed():
    w = _w4(256, 1024, device="cuda")
    lin = gb.to_gemlite(w, torch.float16)
    assert torch.equal(lin.W_q, w.qweight.view(torch.int32).t())
    g = w.scales.shape[1]
    assert torch.equal(lin.scales[:g], w.scales.t()) and torch.equal(lin.zeros[:g], w.zeros.half().t())
    assert not lin.scales[g:].any() and not lin.zeros[g:].any()  # zero rows read past K by GEMM_SPLITK


@GPU
@pytest.mark.parametrize("n,k", SHAPES_7B)
@pytest.mark.parametrize("m,direct", [(1, True), (1, False), (8, True)])
def test_accumulate_7b_shapes(n, k, m, direct):
    w = _w4(n, k, device="cuda")
    lin = gb.to_gemlite(w, torch.float16)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    base = torch.randn(m, n, device="cuda")
    out = gb.accumulate(lin, x, base.clone(), direct=direct)
    prod = out.double() - base.double()
    assert _rel(prod, x.double() @ _dequant(w, torch.float16).double().T) < FLOOR_F16W
    assert _rel(prod, x.double() @ _dequant(w, torch.float32).double().T) < FLOOR_F32W


def test_tuned_table_matches_gpu_name_and_is_a_gemlite_table():
    assert gb.tuned_table("NVIDIA A100-SXM4-80GB") is None
    path = gb.tuned_table("NVIDIA H200")
    if path is None:
        pytest.skip("no tuned H200 table shipped")
    import json

    table = json.load(open(path))
    assert set(table) == {gb.DIRECT_TYPE} and table[gb.DIRECT_TYPE]
    for sig, cfg in table[gb.DIRECT_TYPE].items():
        m, n, k, group, eps, type_id = gb.parse_signature(sig)
        assert (m, eps, type_id) == (1, 8, 104) and cfg["BLOCK_SIZE_K"] * 2 <= group
        assert {"BLOCK_SIZE_N", "BLOCK_SIZE_K", "num_warps", "num_stages", "A_load_order"} <= set(cfg)


@GPU
@pytest.mark.parametrize("n,k", [(4096, 4096), (4096, 11008), (200, 1024)])
@pytest.mark.parametrize("cfg", [dict(BLOCK_SIZE_N=1024, BLOCK_SIZE_K=64, num_warps=8, num_stages=2, A_load_order=1),
                                 dict(BLOCK_SIZE_N=128, BLOCK_SIZE_K=8, num_warps=1, num_stages=1, A_load_order=0)])
def test_direct_launch_with_an_explicit_config(n, k, cfg):
    """The tuner's launch (benchmarks/gemlite_tune.py): any block sizes, even or ragged N and K tiles."""
    w = _w4(n, k, device="cuda")
    lin = gb.to_gemlite(w, torch.float16)
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    out = torch.zeros(1, n, device="cuda")
    gb._launch_direct(lin, x, out, dict(cfg, BLOCK_SIZE_M=1, dot_prod_mode=0))
    assert _rel(out, x.double() @ _dequant(w, torch.float16).double().T) < FLOOR_F16W


@GPU
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_bias_dtypes_and_k_below_one_split(m, dtype):
    """K = 256 is below BLOCK_SIZE_K * SPLIT_K of the 8-row config (the padded scale rows are read)."""
    w = _w4(96, 256, group=64, device="cuda", bias=True)
    g = gb.GemLiteW4.from_w4(w, dtype)
    x = torch.randn(m, 256, device="cuda", dtype=dtype)
    out = g.accumulate(x, torch.zeros(m, 96, device="cuda"))
    ref = x.double() @ _dequant(w, torch.float16).double().T + w.bias.double()
    assert g.linear is not None and g.takes(x) == (m <= 4 or dtype == torch.float16)
    assert _rel(out, ref) < (FLOOR_F16W if g.takes(x) else 2e-3)  # else: the split-K kernel, fp16 products


@GPU
def test_ragged_k_stays_on_the_split_k_kernel():
    from runtime.kernels import w4

    w = _w4(64, 320, device="cuda")
    g = gb.GemLiteW4.from_w4(w, torch.float16)
    x = torch.randn(2, 320, device="cuda", dtype=torch.float16)
    assert g.linear is None
    got, ref = g.accumulate(x, torch.zeros(2, 64, device="cuda")), torch.zeros(2, 64, device="cuda")
    w4.w4_accumulate(x, w.qweight, w.scales, w.zeros, 128, ref)
    assert _rel(got, ref) < 1e-6


@GPU
def test_decode_graph_with_gemlite_matches_eager(tmp_path):
    """One layer: qkv, o, gate_up on GemLite (K = 256), down on the split-K kernel (K = 320, ragged)."""
    from tests.helpers import fast_decode_errors

    fast, errs = fast_decode_errors(tmp_path, "gemlite")
    layer = fast.layers[0]
    assert [w.linear is not None for w in (layer.qkv, layer.o, layer.gate_up, layer.down)] == [True] * 3 + [False]
    assert max(errs) < 4e-2, errs  # float16 activations
