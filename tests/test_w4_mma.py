"""The tensor-core INT4 GEMV (:mod:`runtime.kernels.w4_mma`) against the float64 product of the dequantized weight.

Its work is inline PTX (``mma.sync``), which Triton's interpreter cannot run: the kernel tests need a CUDA GPU
(sm_80+) and skip otherwise; the host-side checks run everywhere. Error bound: the products ``(q - z) x`` are exact
(small integers times float16), sums and scales in float32: < 1e-4 relative (``benchmarks/w4_mma_bench.py``
records the measured error of every config).
"""

from __future__ import annotations

import functools

import pytest
import torch

from runtime import quant
from tests.helpers import quantized_weight, sm90_sass
from tests.helpers import rel_error as _rel

CUDA = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
gpu = pytest.mark.skipif(not CUDA, reason="the tensor-core GEMV is inline PTX: CUDA sm_80+ only")
TOL = 1e-4
MMA_PTRS = {"x_ptr": "*fp16", "qw_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*u8", "y_ptr": "*fp32"}  # sm90_sass kinds


def _weight(n, k, seed=0, device="cuda"):
    return quantized_weight(n, k, 128, seed, device)


def test_mma_ok_off_cuda_and_config_guess(monkeypatch):
    """No tensor-core path on CPU tensors (the interpreter cannot run PTX); the measured table, else a guess: two
    tiles split until there are about 8 programs per multiprocessor (WKVQ_MMA_GUESS=1: one tile, about 4)."""
    from runtime.kernels.w4_mma import (
        GUESS_ENV,
        MMA_TABLE,
        MmaConfig,
        default_mma_config,
        guess_mma_config,
        mma_ok,
    )

    monkeypatch.delenv(GUESS_ENV, raising=False)
    qw, s, z, _ = _weight(64, 256, device="cpu")
    assert not mma_ok(torch.randn(1, 256, dtype=torch.float16), qw, s, z, 128)
    assert default_mma_config(4096, 4096, 1) == MMA_TABLE[4096, 4096, 1]
    assert default_mma_config(4096, 4096, 2) == MmaConfig(4, 2, 16)  # 32 row blocks x 16
    assert default_mma_config(22016, 4096, 2) == MmaConfig(4, 2, 8)  # 172 x 8 = 1376 >= 1056
    assert default_mma_config(64, 256, 1).split == 1  # 2 groups: no split
    assert guess_mma_config(4096, 4096) == default_mma_config(4096, 4096, 2)
    # four blocks of rows (25-32) take the 32-row entry; 9-24 rows the guess
    assert default_mma_config(12288, 4096, 27) == MMA_TABLE[12288, 4096, 32] == MmaConfig(4, 2, 1, persist=4)
    assert default_mma_config(12288, 4096, 24) == guess_mma_config(12288, 4096)
    # the first rule (WKVQ_MMA_GUESS=1): one tile, ~4 programs a multiprocessor, up to 8 ranges
    assert guess_mma_config(4096, 4096, rule="1") == MmaConfig(4, 1, 8)  # 64 row blocks x 8 = 512 programs
    assert guess_mma_config(22016, 4096, rule="1") == MmaConfig(4, 1, 2)  # 344 x 2 = 688 >= 528
    monkeypatch.setenv(GUESS_ENV, "1")
    assert default_mma_config(4096, 4096, 2) == MmaConfig(4, 1, 8)
    assert default_mma_config(4096, 4096, 1) == MMA_TABLE[4096, 4096, 1]  # the table first
    monkeypatch.setenv(GUESS_ENV, "3")
    with pytest.raises(ValueError, match="the rules are 1"):
        default_mma_config(4096, 4096, 2)
    assert MmaConfig(2, 2, 4).label() == "w2_t2_x4" and MmaConfig(2, 2, 4, 2).label() == "w2_t2_x4_d2"
    assert MmaConfig(2, 2, 1, persist=8).label() == "w2_t2_x1_p8"


@pytest.mark.parametrize("bad,match", [({"stages": 3}, "were removed"), ({"bulk": 4}, "were removed"),
                                       ({"warps": 3}, "warps 1, 2, 4 or 8"), ({"persist": 40}, "persist 0-32")])
def test_mma_bad_configs_are_a_one_line_error(bad, match):
    """The launch plan (what every launch and the SASS tests go through) refuses a config out of range, or one
    naming the cp.async stages or the bulk ring, which are gone (twenty-fourth session; a sweep record from before),
    in one line, instead of a silent register-path launch."""
    from runtime.kernels.w4_mma import MmaConfig, launch_plan

    with pytest.raises(ValueError, match=match) as e:
        launch_plan(MmaConfig(4, 1, 4)._replace(**bad), 4096, 4096, 1, (2048, 64, 32), (64, 2, 1), 132, False, False)
    assert "\n" not in str(e.value)


def test_mma_sweep_record_table(tmp_path, monkeypatch):
    """A sweep record named by WKVQ_MMA_TABLE decides its shapes; a broken one is a one-line error."""
    import json

    from runtime.kernels import w4_mma

    rec = tmp_path / "mma.json"
    rec.write_text(json.dumps({"best": {"4096x4096x1": {"config": [8, 2, 16, 2], "us": 5.0}}}))
    monkeypatch.setenv(w4_mma.TABLE_ENV, str(rec))
    assert w4_mma.default_mma_config(4096, 4096, 1) == w4_mma.MmaConfig(8, 2, 16, 2)
    assert w4_mma.default_mma_config(4096, 4096, 8) == w4_mma.MMA_TABLE[4096, 4096, 8]  # not in the record
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    monkeypatch.setenv(w4_mma.TABLE_ENV, str(bad))
    with pytest.raises(ValueError, match="not a w4_mma sweep record"):
        w4_mma.default_mma_config(4096, 4096, 1)


@gpu
@pytest.mark.parametrize("config", [(4, 1, 1), (2, 2, 3), (1, 1, 8), (8, 2, 2), (4, 2, 3, 2), (2, 1, 8, 2),
                                    (4, 2, 3, 1, True, 2), (2, 1, 8, 2, True, 1), (2, 2, 1, 1, False, 1, 0, 8),
                                    (1, 1, 1, 1, False, 1, 0, 1), (4, 1, 1, 1, False, 1, 0, 2),
                                    (1, 2, 1, 1, True, 1, 0, 16), (2, 2, 1, 1, True, 1, 0, 3), None])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("n,k", [(37, 576), (64, 1408), (300, 4096), (96, 320)])
def test_mma_matches_reference(n, k, m, config):
    """Ragged N (rows past N read row N - 1, not written), ragged last groups (576 = 4.5 groups, 320 = 2.5),
    1..8 rows of x, splits over the groups with atomics, one or two 16-row tiles a warp, one or two groups loaded
    ahead, the L2 prefetch (Hopper; stream-K shares too), two accumulator chains, stream-K grids (1, 2, 3, 8 and 16
    programs a multiprocessor: shares of one group, and shares across row blocks)."""
    from runtime.kernels.w4_mma import mma_ok, w4_mma_accumulate

    qw, s, z, w = _weight(n, k, seed=n + k)
    x, base = torch.randn(m, k, device="cuda", dtype=torch.float16), torch.randn(m, n, device="cuda")
    assert mma_ok(x, qw, s, z, 128)
    out = w4_mma_accumulate(x, qw, s, z, 128, base.clone(), config=config)
    assert _rel(out, base.double() + x.double() @ w.T) < TOL


@gpu
@pytest.mark.parametrize("m", [1, 8])
@pytest.mark.parametrize("n,k", [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)])
def test_mma_7b_shapes(n, k, m):
    from converter.bench_kernels import random_weight
    from runtime.kernels.w4_mma import w4_mma_accumulate

    torch.manual_seed(0)
    qw, s, z = random_weight(n, k)
    w = quant.dequantize_weight(quant.unpack(qw, 4, k), s, z, 128, torch.float64)
    x, base = torch.randn(m, k, device="cuda", dtype=torch.float16), torch.randn(m, n, device="cuda")
    assert _rel(w4_mma_accumulate(x, qw, s, z, 128, base.clone()), base.double() + x.double() @ w.T) < TOL


@gpu
@pytest.mark.parametrize("config", [(4, 1, 1), (2, 2, 3), (1, 2, 1, 1, False, 1, 0, 3), (1, 1, 1, 2, False, 2, 0, 16),
                                    None])
@pytest.mark.parametrize("m", [1, 8])
@pytest.mark.parametrize("n,k", [(37, 576), (300, 4096), (96, 320)])
def test_mma_group_major_layout(n, k, m, config):
    """The group-major copy of a weight (quant.group_major: each group's rows contiguous) gives the same products
    as the artifact's row-major layout: ragged N and K, split and stream-K grids; the L2 prefetch, which reads
    rows, refuses it in one line."""
    from runtime.kernels.w4_mma import mma_ok, w4_mma_accumulate

    qw, s, z, w = _weight(n, k, seed=n + k)
    gq, gs, gz = quant.group_major(qw, s, z)
    x, base = torch.randn(m, k, device="cuda", dtype=torch.float16), torch.randn(m, n, device="cuda")
    assert mma_ok(x, gq, gs, gz, 128)
    row = w4_mma_accumulate(x, qw, s, z, 128, base.clone(), config=config)
    grp = w4_mma_accumulate(x, gq, gs, gz, 128, base.clone(), config=config)
    assert _rel(grp, base.double() + x.double() @ w.T) < TOL and _rel(grp, row) < 1e-6
    with pytest.raises(ValueError, match="row-major layout only"):
        w4_mma_accumulate(x, gq, gs, gz, 128, base.clone(), config=(4, 1, 1, 1, True, 1))


@gpu
@pytest.mark.parametrize("config", [(4, 1, 1), (2, 2, 3), (4, 2, 1, 1, False, 1, 0, 4), None])
@pytest.mark.parametrize("m", [9, 16, 17, 32])
@pytest.mark.parametrize("layout", ["row", "group"])
@pytest.mark.parametrize("n,k", [(37, 576), (300, 4096)])
def test_mma_several_row_blocks(n, k, m, layout, config):
    """9-32 rows of x (decode batches 9-32) in one launch: the weight words loaded once a group and multiplied with
    each block of 8 rows; the same products as the float64 reference with ragged N and K, a partial last block,
    split and stream-K grids; ``GemvW4`` takes that path."""
    from runtime.kernels.w4_gemv import GemvW4
    from runtime.kernels.w4_mma import mma_ok, w4_mma_accumulate

    qw, s, z, w = _weight(n, k, seed=n + m)
    if layout == "group":
        qw, s, z = quant.group_major(qw, s, z)
    x, base = torch.randn(m, k, device="cuda", dtype=torch.float16), torch.randn(m, n, device="cuda")
    assert mma_ok(x, qw, s, z, 128)
    want = base.double() + x.double() @ w.T
    assert _rel(w4_mma_accumulate(x, qw, s, z, 128, base.clone(), config=config), want) < TOL
    assert _rel(GemvW4(qw, s, z, k, 128, None).accumulate(x, base.clone()), want) < TOL


def test_row_launches(monkeypatch):
    """33-80 rows: launches of at most 32 (GemvW4's decode batches 33-80, the last launch ragged); above, or with
    WKVQ_MMA_ROWS below 32 (the old path), none."""
    from runtime.kernels import w4_mma

    monkeypatch.delenv(w4_mma.ROWS_ENV, raising=False)
    assert w4_mma.row_launches(20) == [(0, 20)]
    assert w4_mma.row_launches(33) == [(0, 32), (32, 33)]
    assert w4_mma.row_launches(64) == [(0, 32), (32, 64)]
    assert w4_mma.row_launches(65) == [(0, 32), (32, 64), (64, 65)]
    assert w4_mma.row_launches(80) == [(0, 32), (32, 64), (64, 80)]
    assert w4_mma.row_launches(81) is None and w4_mma.row_launches(0) is None
    monkeypatch.setenv(w4_mma.ROWS_ENV, "8")
    assert w4_mma.row_launches(40) is None


@pytest.mark.parametrize("m,launches", [(20, [(0, 20)]), (40, [(0, 32), (32, 40)]), (64, [(0, 32), (32, 64)]),
                                        (72, [(0, 32), (32, 64), (64, 72)]), (81, [])])
def test_gemv_w4_launch_rows(m, launches, monkeypatch):
    """Without a GPU, the kernel stubbed: GemvW4 gives each launch its rows of ``x`` and of ``out`` (views, so the
    launches add into the caller's ``out``), one launch up to 32 rows, two up to 64, three up to 80; above, the
    split-K / dequantization path."""
    from runtime.kernels import w4_gemv, w4_mma

    calls = []

    def fake(x, qw, s, z, group, out, **kw):
        calls.append((x.data_ptr(), out.data_ptr(), x.shape[0], out.shape[0]))
        return out.add_(1.0)

    monkeypatch.delenv(w4_mma.ROWS_ENV, raising=False)
    monkeypatch.setattr(w4_mma, "mma_ok", lambda x, *a, **k: x.shape[0] <= w4_mma.MMA_MAX_ROWS)
    monkeypatch.setattr(w4_mma, "w4_mma_accumulate", fake)
    monkeypatch.setattr(w4_gemv.W4Weight, "accumulate", lambda self, x, out: out.sub_(1.0))
    qw, s, z, _ = _weight(64, 256, device="cpu")
    x, out = torch.randn(m, 256, dtype=torch.float16), torch.zeros(m, 64)
    w4_gemv.GemvW4(qw, s, z, 256, 128, None).accumulate(x, out)
    assert calls == [(x[lo:].data_ptr(), out[lo:].data_ptr(), hi - lo, hi - lo) for lo, hi in launches]
    assert torch.equal(out, torch.full_like(out, 1.0 if launches else -1.0))


@gpu
@pytest.mark.parametrize("m", [33, 48, 64, 65, 80])
def test_gemv_w4_in_launches(m):
    """GemvW4 at 33-80 rows: two or three launches of the tensor-core GEMV, each adding into its rows of ``out``; the
    float64 reference's products."""
    from runtime.kernels.w4_gemv import GemvW4

    n, k = 300, 4096
    qw, s, z, w = _weight(n, k, seed=m)
    gq, gs, gz = quant.group_major(qw, s, z)
    x, base = torch.randn(m, k, device="cuda", dtype=torch.float16), torch.randn(m, n, device="cuda")
    assert _rel(GemvW4(gq, gs, gz, k, 128, None).accumulate(x, base.clone()), base.double() + x.double() @ w.T) < TOL


def test_mma_rows_setting(monkeypatch):
    """WKVQ_MMA_ROWS bounds the rows the tensor-core GEMV takes (8: batches 9-32 on the split-K kernel, as before
    the thirty-eighth session); a bad value is a one-line error naming the variable."""
    from runtime.kernels import w4_mma

    monkeypatch.delenv(w4_mma.ROWS_ENV, raising=False)
    assert w4_mma.max_rows() == w4_mma.MMA_MAX_ROWS == 32
    monkeypatch.setenv(w4_mma.ROWS_ENV, "8")
    assert w4_mma.max_rows() == 8
    for bad in ("0", "33", "many"):
        monkeypatch.setenv(w4_mma.ROWS_ENV, bad)
        with pytest.raises(ValueError, match=f"WKVQ_MMA_ROWS='{bad}'") as e:
            w4_mma.max_rows()
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="takes 1..32 rows"):
        w4_mma.launch_plan(w4_mma.MmaConfig(4, 1, 4), 4096, 4096, 33, (2048, 64, 32), (64, 2, 1), 132, False, False)


@gpu
def test_mma_rejects_what_it_cannot_take():
    """float32 x, 33 rows, K % 32 != 0, a bias, group 64: not taken (one-line error when called anyway)."""
    from runtime.kernels.w4_mma import mma_ok, w4_mma_accumulate

    qw, s, z, _ = _weight(64, 256)
    x = torch.randn(1, 256, device="cuda", dtype=torch.float16)
    assert mma_ok(x, qw, s, z, 128)
    assert not mma_ok(x.float(), qw, s, z, 128)
    assert not mma_ok(torch.randn(33, 256, device="cuda", dtype=torch.float16), qw, s, z, 128)
    assert not mma_ok(x, qw, s, z, 128, bias=torch.zeros(64, device="cuda"))
    assert not mma_ok(x, qw, s, z, 64)
    q2, s2, z2, _ = _weight(64, 240)
    assert not mma_ok(torch.randn(1, 240, device="cuda", dtype=torch.float16), q2, s2, z2, 128)
    with pytest.raises(ValueError, match="w4_mma needs CUDA sm_80"):
        w4_mma_accumulate(x.float(), qw, s, z, 128, torch.zeros(1, 64, device="cuda"))


def _mma_sass(tmp_path, *, warps, tiles, ragged=False, depth=1, persist=False, strides=None, gstrides=(64, 2, 1),
              pdl=False, pre=False, l2=False, nb=1):
    """The sm_90 SASS and resource usage of the GEMV kernel compiled without a GPU (:func:`tests.helpers.sm90_sass`)
    with the PTX the launch would give it: ``strides`` (row strides in bytes, the ``FIXED`` loads) or None, the
    weight preload (``pre``)."""
    from runtime.kernels import w4_mma

    pro, pro_cons, load, load_cons, comp, comp_cons, pf = w4_mma._asm(tiles, ragged, 1, strides, gstrides)
    split = (w4_mma._split_load_asm(tiles, ragged, strides, gstrides) if pre else
             w4_mma._split_load_asm(tiles, ragged, strides, gstrides, coherent=False) if nb > 1 else ("", "r", "", "r"))
    consts = {"WARPS": warps, "TILES": tiles, "SPLIT": 4, "PRO": pro, "PRO_CONS": pro_cons, "LOAD": load,
              "LOAD_CONS": load_cons, "COMP": comp, "COMP_CONS": comp_cons, "EPI": w4_mma.EPILOGUE_ASM,
              "DEPTH": depth, "L2": l2, "PF": pf, "PERSIST": persist, "FIXED": strides is not None, "PDL": pdl,
              "LOADW": split[0], "LOADW_CONS": split[1], "LOADX": split[2], "LOADX_CONS": split[3], "PRE": pre,
              "RQG": 0, "STAMPS": False, "SILU": False, "XS": "", "GMAX": 1, "NB": nb}
    return sm90_sass(w4_mma._w4_mma_kernel, consts, MMA_PTRS, "i32", warps, tmp_path)


@pytest.mark.parametrize("tiles,ragged,depth,warps,persist,fixed,pre", [
    (1, False, 1, 4, False, False, False), (2, True, 2, 4, False, True, False), (1, True, 1, 4, False, False, False),
    (2, False, 1, 2, False, False, False), (2, False, 1, 2, True, True, False), (1, True, 1, 4, True, False, False),
    (1, False, 1, 1, True, True, False), (2, False, 1, 1, True, True, True), (1, True, 1, 4, False, False, True),
    (2, False, 1, 4, False, True, True)])
def test_mma_kernel_compiles_for_sm90(tiles, ragged, depth, warps, persist, fixed, pre, tmp_path):
    """Without a GPU: the kernel compiles for sm_90 with Triton's bundled ptxas (the PTX is valid), every thread
    holds one element of the ``[32 * warps]``
    tensors (8 HMMA per tile and group, not a multiple of that), no local memory (spills); ``fixed``: the rows' loads
    at immediate offsets; ``pre``: the weight preload before the PDL wait (its range's first iteration peeled); with
    PDL no load but the preload's above the wait."""
    pytest.importorskip("triton")
    from runtime.kernels import overlap

    pdl = overlap._triton_has_pdl()
    if pre and not pdl:
        pytest.skip("this Triton has no grid dependency control")
    # fixed: the launch's row strides in the loads' immediates (K = 11008: codes 5504 bytes a row)
    sass, usage = _mma_sass(tmp_path, warps=warps, tiles=tiles, ragged=ragged, depth=depth, persist=persist,
                            strides=(5504, 172, 86) if fixed else None, pdl=pdl, pre=pre, l2=True)
    # one group's 8 MMAs a tile; depth 1: the loop runs two groups an iteration, plus an odd last one;
    # pre: the peeled first iteration's two groups too, and (stream-K) a second copy of the range without them
    # (whose tail ptxas may merge with the first's)
    hmma = sass.count("HMMA.16816.F32")
    if pre and persist:
        assert hmma % (8 * tiles) == 0 and 7 <= hmma // (8 * tiles) <= 8
    else:
        assert hmma == 8 * tiles * (5 if pre else 3 if depth == 1 else 1)
    assert "LOCAL:0" in usage
    if pdl:  # pre: the two groups' weight loads (codes, scales, zeros: 12 a tile), then the wait (ACQBULK), then
        # x; else the wait before every load (ptxas moves .nc loads across the wait: none may end up above it)
        before = sass[:sass.index("ACQBULK")]
        assert before.count("LDG") == (12 * tiles if pre else 0) and ".CONSTANT" not in before
    if fixed:  # the rows' code loads at immediate offsets from one pointer (row g + 8: 8 x 5504 bytes on)
        assert "+0xac00]" in sass


@pytest.mark.parametrize("rows", [9, 16, 24, 32])
@pytest.mark.parametrize("tiles,persist,fixed", [(1, False, False), (2, False, True), (2, True, True)])
def test_mma_row_blocks_compile_for_sm90(rows, tiles, persist, fixed, tmp_path):
    """Without a GPU: 9-32 rows (2-4 blocks of 8) compile for sm_90 with PDL: 8 MMAs a tile, group and block, the
    codes dequantized once a group for all blocks, no load above the PDL wait, no spills."""
    pytest.importorskip("triton")
    from runtime.kernels import overlap, w4_mma

    pdl = overlap._triton_has_pdl()
    cfg = w4_mma.MmaConfig(4, tiles, 1 if persist else 4, persist=8 if persist else 0)
    n = 4096
    _, consts = w4_mma.launch_plan(cfg, n, 4096, rows, (2048, 64, 32) if fixed else (64, 2, 1),
                                   (64 * n, 2 * n, n), 132, pdl, True)
    nb = -(-rows // 8)
    assert consts["NB"] == nb and not consts["PRE"]
    sass, usage = sm90_sass(w4_mma._w4_mma_kernel, {**consts, "PDL": pdl}, MMA_PTRS, "i32", cfg.warps, tmp_path)
    # the loop runs two groups an iteration plus an odd last one: 3 groups' bodies (stream-K: per range)
    hmma = sass.count("HMMA.16816.F32")
    assert hmma % (8 * tiles * nb) == 0 and hmma // (8 * tiles * nb) == 3, hmma
    # the codes dequantized once for all blocks: 32 LOP3 a tile and group (4 words, two halves, 4 each), a few more
    assert sass.count("LOP3") < 1.25 * 32 * tiles * 3 * (hmma // (24 * tiles * nb)), sass.count("LOP3")
    assert "LOCAL:0" in usage, usage
    if pdl:
        before = sass[:sass.index("ACQBULK")]
        assert before.count("LDG") == 0 and ".CONSTANT" not in before


@pytest.mark.parametrize("aligned", [False, True])  # as launched on unaligned views / on aligned tensors
def test_mma_table_configs_keep_x_loads_below_the_wait(aligned, tmp_path):
    """Every config of the table, and of the variant tables the benchmark scripts put in the step
    (``benchmarks/variants/mma_*.json``), as the decode step launches it (group-major weight, PDL on an H200's 132
    multiprocessors; :func:`launch_plan`), compiled for sm_90: no load above the PDL wait but the preload's weights
    (at one row), no spills. ptxas may move ``.nc`` loads across ``griddepcontrol.wait``, and ``x`` is what the
    kernel before writes: a load of it above the wait would be a race that no numeric test reliably sees."""
    pytest.importorskip("triton")
    from pathlib import Path

    from runtime.kernels import overlap, w4_mma

    if not overlap._triton_has_pdl():
        pytest.skip("this Triton has no grid dependency control")
    configs = set(w4_mma.MMA_TABLE.items())
    for path in sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "variants").glob("mma_*.json")):
        configs |= set(w4_mma.load_table(path).items())
    assert len(configs) > len(w4_mma.MMA_TABLE)
    for (n, k, m), cfg in sorted(configs):
        grid, consts = w4_mma.launch_plan(cfg, n, k, m, (64, 2, 1), (64 * n, 2 * n, n), 132, True, True)
        assert grid[0] * grid[1] >= 132 and consts["PRE"] == (m == 1 and cfg.depth == 1)
        sass, usage = sm90_sass(w4_mma._w4_mma_kernel, {**consts, "PDL": True}, MMA_PTRS, "i32", cfg.warps,
                                tmp_path, aligned=aligned)
        before = sass[:sass.index("ACQBULK")]
        preload = 12 * cfg.tiles if consts["PRE"] else 0
        assert before.count("LDG") == preload and ".CONSTANT" not in before, (n, k, m, cfg)
        assert "LOCAL:0" in usage, (n, k, m, cfg)


@pytest.mark.parametrize("arch,sms", [(80, 108), (100, 148), (120, 170)])
def test_mma_table_configs_compile_for_other_gpus(arch, sms, tmp_path):
    """Every config of the table as the decode step launches it on an A100 (sm_80: no PDL, no L2 prefetch, no
    preload), a B200 (sm_100) or an RTX 5090 (sm_120; both with PDL and the preload, as on Hopper), and the one-row
    down projection with its SiLU input (the step's default there too), compiled for that GPU: ptxas takes the
    inline PTX (nothing of sm_90 on the sm_80 path), the grid dependency wait only with PDL, the MMAs there, no
    spills. The H200 runs and tests the sm_90 build only; this keeps the others compiling."""
    pytest.importorskip("triton")
    from runtime.kernels import w4_mma

    hopper = arch >= 90
    launches = [(cfg, n, k, m, False) for (n, k, m), cfg in sorted(w4_mma.MMA_TABLE.items())]
    launches.append((w4_mma.MMA_TABLE[(4096, 11008, 1)], 4096, 11008, 1, True))
    for cfg, n, k, m, silu in launches:
        _, consts = w4_mma.launch_plan(cfg, n, k, m, (64, 2, 1), (64 * n, 2 * n, n), sms, hopper, hopper, silu=silu)
        assert consts["PRE"] == (hopper and m == 1) and not consts["L2"] and consts["SILU"] == silu
        kinds = {**MMA_PTRS, "x_ptr": "*fp32"} if silu else MMA_PTRS
        sass, usage = sm90_sass(w4_mma._w4_mma_kernel, {**consts, "PDL": hopper}, kinds, "i32", cfg.warps, tmp_path,
                                arch=arch)
        assert "HMMA" in sass and ("ACQBULK" in sass) == hopper and "LOCAL:0" in usage, (n, k, m, cfg, silu)


@pytest.mark.parametrize("cfg", [(4, 2, 16), (1, 2, 16), (2, 2, 16), (1, 2, 1, 1, False, 1, 0, 4)])
@pytest.mark.parametrize("aligned", [False, True])  # as launched on unaligned views / on aligned tensors
def test_mma_ready_flags_replace_the_wait(cfg, aligned, tmp_path):
    """With ``ready`` flags (the output projection after the attention, one row, the weight preload): each program
    loads its first weights, the epoch, then spins on its groups' flags (acquire loads, a sleep between) before any
    ``x``; every load coherent (``x`` changes while the kernel runs: no ``.nc`` load may be moved above the spin);
    the PDL wait only after the last MMA. Without the preload (8 rows) the launch keeps the PDL wait (``RQG`` 0)."""
    pytest.importorskip("triton")
    from runtime.kernels import overlap, w4_mma

    if not overlap._triton_has_pdl():
        pytest.skip("this Triton has no grid dependency control")
    cfg = w4_mma.MmaConfig(*cfg)
    n = k = 4096
    plan = functools.partial(w4_mma.launch_plan, cfg, n, k, row_strides=(64, 2, 1), gstrides=(64 * n, 2 * n, n),
                             sms=132, pdl=True, hopper=True)
    assert plan(m=8, ready_qg=1)[1]["RQG"] == 0 and plan(m=1)[1]["RQG"] == 0
    consts = plan(m=1, ready_qg=2)[1]
    assert consts["RQG"] == 2 and consts["PRE"]
    sass, usage = sm90_sass(w4_mma._w4_mma_kernel, {**consts, "PDL": True},
                            {**MMA_PTRS, "rdy_ptr": "*i32", "ep_ptr": "*i32"}, "i32", cfg.warps, tmp_path,
                            aligned=aligned)
    spin = sass.index("LDG.E.STRONG.GPU")
    assert sass[:spin].count("LDG") == 12 * cfg.tiles + 1  # the preload's weights and the epoch
    assert spin < sass.index("BAR.SYNC", spin) < sass.index("LDG.E.128", spin)  # thread 0 spins, then the barrier
    assert ".CONSTANT" not in sass and "NANOSLEEP" in sass and "LOCAL:0" in usage
    assert sass.index("ACQBULK") > sass.rindex("HMMA")
    # WKVQ_STAMPS: %globaltimer at the start, once the flags are there (after the barrier, before x), at the end
    consts = plan(m=1, ready_qg=2, stamps=True)[1]
    sass, usage = sm90_sass(w4_mma._w4_mma_kernel, {**consts, "PDL": True},
                            {**MMA_PTRS, "rdy_ptr": "*i32", "ep_ptr": "*i32", "stamp_ptr": "*i64"}, "i32", cfg.warps,
                            tmp_path, aligned=aligned)
    spin, timer = sass.index("LDG.E.STRONG.GPU"), [i for i in range(len(sass)) if sass.startswith("GLOBALTIMER", i)]
    assert "LOCAL:0" in usage and len(timer) >= 3 and timer[0] < spin
    assert any(sass.index("BAR.SYNC", spin) < t < sass.index("LDG.E.128", spin) for t in timer)
    assert timer[-1] > sass.rindex("HMMA")


def _silu_reference(gate_up):
    """``misc.silu_mul``'s float16 product, computed with torch (the same roundings: the SiLU, then the product)."""
    k = gate_up.shape[1] // 2
    g, u = gate_up[:, :k], gate_up[:, k:]
    return ((g / (1 + torch.exp(-g))).half().float() * u).half()


@gpu
@pytest.mark.parametrize("config", [(4, 1, 1), (2, 2, 3), (4, 2, 16), (1, 2, 1, 1, False, 1, 0, 16),
                                    (4, 2, 1, 1, False, 1, 0, 4), (1, 1, 1, 2, False, 1, 0, 3), None])
@pytest.mark.parametrize("layout", ["row", "group"])
@pytest.mark.parametrize("n,k", [(37, 576), (300, 1408), (96, 320), (4096, 11008)])
def test_mma_silu_input_matches_silu_mul(n, k, layout, config):
    """``x = silu(gate) * up`` built by the GEMV's programs in shared memory (w4_mma_accumulate_silu) against the
    same GEMV on ``misc.silu_mul``'s output: the same float16 ``x`` bit for bit, so the same products up to the
    order of the split and stream-K atomics; and against float64. Ragged K (576, 320: half groups), split grids,
    stream-K shares within a row block and across row blocks (the prologue again for each range), depth 2, both
    weight layouts; ``gate_up`` is left as it was."""
    from runtime.kernels import misc
    from runtime.kernels.w4_mma import (
        MmaConfig,
        default_mma_config,
        silu_ok,
        w4_mma_accumulate,
        w4_mma_accumulate_silu,
    )

    qw, s, z, w = _weight(n, k, seed=n + k)
    if layout == "group":
        qw, s, z = quant.group_major(qw, s, z)
    gate_up = 4 * torch.randn(1, 2 * k, device="cuda")
    kept, base = gate_up.clone(), torch.randn(1, n, device="cuda")
    cfg = MmaConfig(*config) if config is not None else default_mma_config(n, k, 1)
    if not silu_ok(gate_up, qw, s, z, 128, config=cfg):  # a range too long for the prologue: one-line error
        with pytest.raises(ValueError, match="SiLU input needs"):
            w4_mma_accumulate_silu(gate_up, qw, s, z, 128, base.clone(), config=cfg)
        assert cfg.warps * 32 * 32 < 128 * -(-k // 128) // (cfg.split if not cfg.persist else 1)
        return
    x = misc.silu_mul(gate_up, torch.float16)
    assert _rel(x, _silu_reference(gate_up)) < 1e-3  # float16 roundings of an approximate division apart
    fused = w4_mma_accumulate_silu(gate_up, qw, s, z, 128, base.clone(), config=cfg)
    plain = w4_mma_accumulate(x, qw, s, z, 128, base.clone(), config=cfg)
    assert torch.equal(gate_up, kept)
    assert _rel(fused, plain) < 1e-6 and _rel(fused, base.double() + x.double() @ w.T) < TOL


@gpu
def test_mma_silu_input_checks():
    """What the SiLU input does not take (8 rows, a float16 or strided gate_up, K not that of the weight) is refused
    by ``silu_ok`` and a one-line error; off CUDA nothing is taken."""
    from runtime.kernels.w4_mma import silu_ok, w4_mma_accumulate_silu

    qw, s, z, _ = _weight(64, 256)
    ok = torch.zeros(1, 512, device="cuda")
    assert silu_ok(ok, qw, s, z, 128) and not silu_ok(ok.cpu(), qw, s, z, 128)
    for bad in (torch.zeros(8, 512, device="cuda"), ok.half(), torch.zeros(1, 1024, device="cuda")[:, ::2],
                torch.zeros(1, 384, device="cuda")):
        assert not silu_ok(bad, qw, s, z, 128)
        with pytest.raises(ValueError, match="SiLU input needs"):
            w4_mma_accumulate_silu(bad, qw, s, z, 128, torch.zeros(1, 64, device="cuda"))


def test_mma_silu_plan_limits():
    """The SiLU input's plan (no GPU): one row only, no ready flags, and at most SILU_MAX_PER_THREAD channels a thread
    a range (a one-line error otherwise); the shared copy holds every group, at most 48 KB; the ranges' group counts as the grid
    gives them (split grid: cdiv(G, split); stream-K: at most a share)."""
    pytest.importorskip("triton")
    from runtime.kernels import w4_mma
    from runtime.kernels.w4_mma import MmaConfig

    plan = functools.partial(w4_mma.launch_plan, n=4096, k=11008, row_strides=(64, 2, 1),
                             gstrides=(64 * 4096, 2 * 4096, 4096), sms=132, pdl=True, hopper=True, silu=True)
    _, consts = plan(MmaConfig(4, 2, 16), m=1)
    assert consts["SILU"] and consts["GMAX"] == 8 and f"[{256 * 86}]" in consts["XS"]
    assert plan(MmaConfig(1, 2, 1, persist=16), m=1)[1]["GMAX"] == 8  # 128 row blocks x 86 groups, 2112 programs
    assert plan(MmaConfig(4, 2, 1, persist=16), m=1)[1]["GMAX"] == 2  # 32 row blocks x 86 groups, 2112 programs
    for cfg, m, match in ((MmaConfig(4, 2, 16), 8, "one row"), (MmaConfig(1, 2, 1), 1, "86 groups a range"),
                          (MmaConfig(2, 2, 2), 1, "43 groups")):
        with pytest.raises(ValueError, match=match):
            plan(cfg, m=m)
    with pytest.raises(ValueError, match="ready flags"):
        w4_mma.launch_plan(MmaConfig(4, 2, 16), 4096, 4096, 1, (64, 2, 1), (64, 2, 1), 132, True, True, ready_qg=1,
                           silu=True)
    # the shared copy is declared statically, at most 48 KB: 192 groups (70B's down, K = 28672, is 224)
    big = functools.partial(plan, n=8192, gstrides=(64 * 8192, 2 * 8192, 8192), m=1)
    assert f"[{256 * 192}]" in big(MmaConfig(4, 2, 32), k=192 * 128)[1]["XS"]
    with pytest.raises(ValueError, match="57344 bytes, over the 49152"):
        big(MmaConfig(4, 2, 32), k=28672)


@pytest.mark.parametrize("cfg,n,k", [((4, 2, 16), 4096, 11008), ((1, 2, 1, 1, False, 1, 0, 16), 4096, 11008),
                                     ((4, 2, 1, 1, False, 1, 0, 4), 5120, 13824), ((4, 1, 4), 300, 576)])
@pytest.mark.parametrize("aligned", [False, True])  # as launched on unaligned views / on aligned tensors
def test_mma_silu_input_reads_gate_up_below_the_wait(cfg, n, k, aligned, tmp_path):
    """The SiLU input as the decode step launches it (PDL, group-major weight, one row), compiled for sm_90: above the
    PDL wait only the preload's weights; ``gate_up`` (the kernel before writes it) is read after it, coherently, and
    the product goes through shared memory (stores, a barrier, then the ``x`` loads from there: no global ``x``
    loads); no spills."""
    pytest.importorskip("triton")
    from runtime.kernels import overlap, w4_mma

    if not overlap._triton_has_pdl():
        pytest.skip("this Triton has no grid dependency control")
    cfg = w4_mma.MmaConfig(*cfg)
    consts = w4_mma.launch_plan(cfg, n, k, 1, (64, 2, 1), (64 * n, 2 * n, n), 132, True, True, silu=True)[1]
    assert consts["PRE"] and consts["SILU"]
    sass, usage = sm90_sass(w4_mma._w4_mma_kernel, {**consts, "PDL": True}, {**MMA_PTRS, "x_ptr": "*fp32"}, "i32",
                            cfg.warps, tmp_path, aligned=aligned)
    wait = sass.index("ACQBULK")
    assert sass[:wait].count("LDG") == 12 * cfg.tiles and ".CONSTANT" not in sass[:wait] and "LOCAL:0" in usage
    first_sts = sass.index("STS", wait)
    assert sass.index("LDG", wait) < first_sts < sass.index("BAR.SYNC", first_sts) < sass.index("LDS", first_sts)
    assert "LDG.E.128" not in sass[wait:sass.index("HMMA")]  # x from shared memory; the weights are LDG.E.128...


def test_silu_input_choice_is_kept_per_setting(monkeypatch, tmp_path):
    """``GemvW4._mma_silu`` (what the decode step asks every step, ``fuses_silu`` / ``accumulate_silu``): the weight's
    part once per value of ``WKVQ_MMA`` / ``WKVQ_MMA_TABLE`` / ``WKVQ_MMA_GUESS``; a ``gate_up`` that is not float32 ``[1, 2K]`` on the
    weight's device is refused without it; more than one row or ``WKVQ_MMA=0``: not taken."""
    from runtime.kernels import w4_mma
    from runtime.kernels.w4_gemv import GemvW4

    calls = []
    monkeypatch.setattr(w4_mma, "silu_weight_ok", lambda *a: calls.append(a[1]) or True)
    monkeypatch.delenv(w4_mma.MMA_ENV, raising=False)
    monkeypatch.delenv(w4_mma.TABLE_ENV, raising=False)
    monkeypatch.delenv(w4_mma.GUESS_ENV, raising=False)
    qw, s, z = torch.zeros(64, 128, dtype=torch.uint8), torch.zeros(64, 2, dtype=torch.float16), \
        torch.zeros(64, 2, dtype=torch.uint8)
    w = GemvW4(qw, s, z, 256, 128, None)
    assert w._mma_silu(1) and w._mma_silu(1) and w._mma_silu(1, torch.zeros(1, 512)) and calls == [256]
    assert not w._mma_silu(1, torch.zeros(1, 512, dtype=torch.float64)) and not w._mma_silu(1, torch.zeros(2, 512))
    assert not w._mma_silu(1, torch.zeros(1, 256)) and not w._mma_silu(2) and calls == [256]
    (tmp_path / "elsewhere.json").write_text('{"best": {}}')  # another sweep record: the choice is made again
    monkeypatch.setenv(w4_mma.TABLE_ENV, str(tmp_path / "elsewhere.json"))
    assert w._mma_silu(1) and calls == [256, 256]
    monkeypatch.setenv(w4_mma.GUESS_ENV, "1")  # another guess for shapes no table has: again
    assert w._mma_silu(1) and calls == [256, 256, 256]
    monkeypatch.setenv(w4_mma.MMA_ENV, "0")
    assert not w._mma_silu(1) and calls == [256, 256, 256]


def test_silu_input_only_in_float16(monkeypatch):
    """The tensor-core GEMV builds the SiLU input in float16 only, so a model in float32 or bfloat16 does not take
    it (``fuses_silu`` / ``silu_by_default``: what the decode step's fusions ask, with its dtype); with the
    group-major weight the step uses on CUDA the row GEMV cannot either, so the step keeps the SiLU kernel. (The
    full GPU suite found `generate --fast` of a float32 model failing in the row GEMV: the choice was made without
    the dtype, the call with it.)"""
    from runtime import quant
    from runtime.kernels import w4_mma
    from runtime.kernels.w4_gemv import GemvW4

    monkeypatch.setattr(w4_mma, "silu_weight_ok", lambda *a: True)
    monkeypatch.delenv(w4_mma.MMA_ENV, raising=False)
    monkeypatch.delenv(w4_mma.TABLE_ENV, raising=False)
    qw, s, z = quant.group_major(torch.zeros(64, 128, dtype=torch.uint8), torch.zeros(64, 2, dtype=torch.float16),
                                 torch.zeros(64, 2, dtype=torch.uint8))
    w = GemvW4(qw, s, z, 256, 128, None)
    assert w.fuses_silu(1, torch.float16) and w.silu_by_default(1, torch.float16)
    for dt in (torch.float32, torch.bfloat16):
        assert not w.fuses_silu(1, dt) and not w.silu_by_default(1, dt)
        assert not w._mma_silu(1, torch.zeros(1, 512), dt)
