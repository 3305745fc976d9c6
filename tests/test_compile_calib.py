"""``--compile``: the training's fake quantization through torch.compile (converter/lwc.py
``fake_quant_fns``) computes what the eager path computes — the same forward values (float16
round trips kept, ragged groups), gradients up to summation order — and a compiled calibration
lands where the eager one does."""

from __future__ import annotations

import json

import pytest
import torch

from converter import calibrate as C
from converter import lwc
from converter.convert import ConvertConfig, convert
from converter.export import WeightQuantConfig
from runtime.kvquant import KVQuantConfig
from tests.helpers import CORPUS, make_tiny_llama


# torch 2.11 (the GPU machine's) computed different values compiled; calibration refuses --compile there
COMPILED = pytest.mark.skipif(not lwc.compile_supported(), reason=f"--compile is not exact on torch {torch.__version__}")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def _pair(make):
    a, b = make(False), make(True)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for pa, pb in zip(a.parameters(), b.parameters()):
            pa.add_(torch.randn(pa.shape, generator=gen).to(pa.device) * 0.3)
            pb.copy_(pa)
    return a, b


def _grads_close(a, b):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-4, atol=1e-5 * pa.grad.abs().max()), name  # summation order


@COMPILED
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("in_features", [256, 300])  # 300: a ragged last group of 44
@pytest.mark.parametrize("rounding", [False, True])
def test_compiled_lwc_linear_matches_eager(in_features, rounding, device):
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_features, 48, device=device)
    a, b = _pair(lambda c: lwc.LWCLinear(lin, WeightQuantConfig(), True, rounding=rounding, compiled=c))
    x = torch.randn(4, in_features, device=device)
    ya, yb = a(x), b(x)
    assert torch.equal(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    _grads_close(a, b)


@COMPILED
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_smoothed_kv_matches_eager(device):
    gen = torch.Generator().manual_seed(0)
    init = {k: (torch.rand(2, 16, generator=gen) + 0.5 if "scale" in k else torch.randn(2, 16, generator=gen) * 0.1).to(device)
            for k in ("k_scale", "k_shift", "v_scale", "v_shift")}
    a, b = _pair(lambda c: lwc.SmoothedKV(init, KVQuantConfig(), compiled=c))
    x = torch.randn(1, 2, 10, 16, generator=gen).to(device)
    for which in ("k", "v"):
        fa, fb = a.fake(which, x), b.fake(which, x)
        assert torch.equal(fa, fb)
        (fa * x).sum().backward()
        (fb * x).sum().backward()
    _grads_close(a, b)


@COMPILED
def test_compiled_calibration_lands_where_the_eager_one_does(tmp_path):
    (tmp_path / "calib.txt").write_text(" ".join(CORPUS) * 4)
    model = make_tiny_llama(tmp_path / "model")
    metas = {}
    for compiled in (False, True):
        calib = C.CalibConfig(nsamples=4, seqlen=32, epochs=2, crr_k=1, batch_size=2, progress=False,
                              calib_data=str(tmp_path / "calib.txt"), e2e_epochs=1, compile=compiled,
                              rounding="nearest")  # the stage lowers the KL from nearest-rounded blocks
        out = convert(ConvertConfig(out=tmp_path / f"q{compiled}", model=str(model), method="wkvquant", device="cpu",
                                    dtype="float32", calibration=calib))
        metas[compiled] = json.loads((out / "wkvq.json").read_text())
    eager, comp = (metas[c]["calibration"] for c in (False, True))
    assert "compile" not in metas[True]["recipe"]["calibration"]  # a run control, not part of the recipe
    assert comp["losses"] == pytest.approx(eager["losses"], rel=1e-2)  # Adam amplifies summation-order noise
    # the blocks' noise reaches the stage's starting KL: 1.01% apart on an AMD EPYC CPU, < 1% on the earlier machines
    assert comp["end_to_end"]["kl_initial"] == pytest.approx(eager["end_to_end"]["kl_initial"], rel=3e-2)
    assert comp["end_to_end"]["kl_final"] < comp["end_to_end"]["kl_initial"]


@COMPILED
def test_train_step_benchmark_counts_fewer_operations_compiled(tmp_path, monkeypatch):
    """benchmarks/train_step.py: a table and JSON; the compiled step dispatches fewer operations."""
    from click.testing import CliRunner

    from tests.helpers import load_benchmark

    bench = load_benchmark("train_step", monkeypatch)
    out = tmp_path / "t.json"
    result = CliRunner().invoke(bench.main, ["--shape", "tiny", "--tokens", "16", "--steps", "1", "--device", "cpu",
                                             "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = {(r["rounding"], r["compiled"]): r for r in json.loads(out.read_text())}
    assert len(rows) == 4 and all(r["ms_per_step"] > 0 for r in rows.values())
    for rounding in (False, True):
        assert rows[rounding, True]["top_level_ops"] < rows[rounding, False]["top_level_ops"] / 2


@COMPILED
def test_compiled_fake_quantization_keeps_compiling_past_eight_shapes():
    """Dynamo's default is 8 graphs per function, then eager without a word; a model has more
    (shapes x grad mode x offsets), so fake_quant_fns raises the limit."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    for i in range(10):
        lin = lwc.LWCLinear(torch.nn.Linear(16 + i, 8), WeightQuantConfig(), True, compiled=True)
        x = torch.randn(2, 16 + i)
        lin(x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        lin(x)
    compiled_ops = sum(1 for e in prof.events() if e.cpu_parent is None)
    eager = lwc.LWCLinear(torch.nn.Linear(25, 8), WeightQuantConfig(), True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        eager(x)
    assert compiled_ops < sum(1 for e in prof.events() if e.cpu_parent is None) / 2


@pytest.mark.parametrize("version,ok", [("2.11.0+cu130", False), ("2.12.1", False), ("2.13.0+cpu", True),
                                        ("2.14.0.dev20270101", True), ("3.0.0", True)])
def test_compile_needs_a_torch_where_it_is_exact(version, ok, monkeypatch):
    assert lwc.compile_supported(version) is ok
    monkeypatch.setattr(torch, "__version__", version)
    if ok:
        C.CalibConfig(compile=True)
    else:
        with pytest.raises(ValueError, match="--compile needs torch >= 2.13"):
            C.CalibConfig(compile=True)
