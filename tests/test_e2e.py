"""The end-to-end stage of the calibration (converter/e2e.py, ``--e2e-epochs``) on tiny random LLaMAs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file

from converter import calibrate as C
from converter import e2e, lwc
from converter.calib_state import WorkDir, work_dir_for
from converter.convert import ConvertConfig, convert
from converter.export import WeightQuantConfig
from runtime import quant
from runtime.artifact import WEIGHTS_FILE
from runtime.kvquant import KVQuantConfig
from tests.helpers import CORPUS, make_tiny_llama

# nearest-rounded blocks: the stage is measured and tuned on those (from learned ones its default lr raises the KL)
TINY = dict(nsamples=8, seqlen=32, epochs=2, crr_k=1, batch_size=2, progress=False, rounding="nearest")


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    (d / "calib.txt").write_text(" ".join(CORPUS) * 4)
    return make_tiny_llama(d / "model", num_hidden_layers=3), str(d / "calib.txt")


def _cfg(out, tiny3, **kw):
    model, text = tiny3
    return ConvertConfig(out=out, model=str(model), method="wkvquant", device="cpu", dtype="float32",
                         calibration=C.CalibConfig(**{**TINY, "calib_data": text, **kw}))


def _tensors(path):
    return load_file(str(path / WEIGHTS_FILE))


@pytest.mark.parametrize("kw, match", [
    (dict(e2e_epochs=-1), "e2e_epochs"),
    (dict(e2e_epochs=1, rounding="gptq"), "needs it off"),
    (dict(rounding="gptq"), "add --e2e-epochs 0"),  # the stage is on by default
    (dict(e2e_lr=0.0), "e2e_lr"),
    (dict(e2e_schedule="linear"), "e2e_schedule"),
    (dict(e2e_round_lr=0.0), "e2e_round_lr"),
])
def test_config_rejects(kw, match):
    with pytest.raises(ValueError, match=match):
        C.CalibConfig(**kw)


def test_kl_loss_is_the_token_mean_of_kl_divergence():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    ref = (p * (p.log() - q.log())).sum(-1).mean()
    assert torch.allclose(e2e.kl_loss(s, t), ref, atol=1e-6)
    assert float(e2e.kl_loss(t, t)) == pytest.approx(0.0, abs=1e-6)


def test_lr_factor_schedules():
    assert [C.lr_factor("constant", i, 4) for i in range(4)] == [1.0] * 4
    cos = [C.lr_factor("cosine", i, 4) for i in range(5)]
    assert cos[0] == 1.0 and cos[2] == pytest.approx(0.5) and cos[4] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(cos, cos[1:]))
    with pytest.raises(ValueError, match="schedule"):
        C.lr_factor("step", 0, 4)


def test_train_epochs_follows_the_schedule():
    """Every group's learning rate is the base rate times the schedule's factor at each step."""
    w = torch.nn.Parameter(torch.zeros(3))
    opt = C.adamw((([w], 0.1),), 0.0)
    setup = C.BlockSetup(None, None, C.CalibConfig(nsamples=4, batch_size=2, progress=False), torch.device("cpu"),
                         torch.float32)
    seen = []

    def step_loss(idx):
        seen.append(opt.param_groups[0]["lr"])
        return ((w - 1) ** 2).sum()

    C.train_epochs(opt, step_loss, 4, 2, setup, torch.Generator().manual_seed(0), "t", "cosine")
    assert seen == [0.1 * C.lr_factor("cosine", i, 4) for i in range(4)]


def test_logit_inverts_sigmoid_and_stays_finite_at_one():
    x = torch.linspace(-6, 6, 13)
    assert torch.allclose(e2e.logit(torch.sigmoid(x)), x, atol=1e-4)
    assert torch.isfinite(e2e.logit(torch.tensor([0.0, 1.0]))).all()


def test_student_starts_where_the_blockwise_result_is(tiny3):
    """A student block built from folded parameters computes exactly the artifact's weights, and the
    block's output (float32) up to summation order; folding it again gives the same parameters."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny3[0], dtype=torch.float32).eval()
    setup = C.BlockSetup(WeightQuantConfig(), KVQuantConfig(), C.CalibConfig(**TINY), torch.device("cpu"),
                         torch.float32)
    config = lwc.calib_model_config(model.config)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    params = lwc.BlockParams(
        clips={n: ((torch.rand(o, g, generator=gen) * 0.5 + 0.5).half().float(),
                   (torch.rand(o, g, generator=gen) * 0.5 + 0.5).half().float())
               for n, o, g in [(n, model.model.layers[0].get_submodule(n).out_features,
                                -(-model.model.layers[0].get_submodule(n).in_features // 128)) for n in lwc.DECODER_LINEARS]},
        kv={"k_scale": torch.rand(2, 40) + 0.5, "k_shift": torch.randn(2, 40) * 0.1,
            "v_scale": torch.rand(2, 40) + 0.5, "v_shift": torch.randn(2, 40) * 0.1})
    student = e2e.student_block(model.model.layers[0], config, 0, params, setup)
    applied = lwc.applied_block(model.model.layers[0], config, 0, params, setup.weight, setup.kv, "cpu", torch.float32)
    x = model.get_input_embeddings()(torch.randint(0, 300, (2, 32))).detach()
    pe = C.rope(model.model.rotary_emb, 32, "cpu")
    for name in lwc.DECODER_LINEARS:
        lin = student.get_submodule(name)
        w = quant.fake_quantize_weight(lin.weight, 4, 128, *lin.clips(), params_dtype=torch.float16)
        assert torch.equal(w, applied.get_submodule(name).weight), name
    with torch.no_grad():
        a, b = student(x, position_embeddings=pe), applied(x, position_embeddings=pe)
    assert (a - b).norm() / (b - x).norm() < 1e-5
    folded = lwc.fold_block(student)
    for n, (hi, lo) in params.clips.items():
        assert torch.allclose(folded.clips[n][0], hi, atol=1e-3) and torch.allclose(folded.clips[n][1], lo, atol=1e-3)
    for k, v in params.kv.items():
        assert torch.allclose(folded.kv[k], v, atol=1e-6)
    # tuned RMSNorm weights (--tune-norms) are where the student starts, and fold back unchanged
    norms = {f"{n}.weight": torch.rand(model.config.hidden_size, generator=gen) + 0.5 for n in lwc.NORMS}
    tuned = lwc.BlockParams(clips=params.clips, norms=norms, kv=params.kv)
    setup = C.BlockSetup(setup.weight, setup.kv, C.CalibConfig(**TINY, tune_norms=True), setup.device, setup.dtype)
    student = e2e.student_block(model.model.layers[0], config, 0, tuned, setup)
    assert all(torch.equal(student.get_submodule(n.removesuffix(".weight")).weight, t) for n, t in norms.items())
    assert all(torch.equal(lwc.fold_block(student).norms[n], t) for n, t in norms.items())
    # the optimizer's groups: quantization parameters at e2e_lr, offsets at e2e_round_lr, norms at norm_lr
    ccfg = C.CalibConfig(**TINY, tune_norms=True, e2e_epochs=1, e2e_rounding=True, e2e_lr=3e-2, e2e_round_lr=2e-3,
                         round_lr=5e-1, norm_lr=1e-4)
    setup = C.BlockSetup(setup.weight, setup.kv, ccfg, setup.device, setup.dtype)
    student = e2e.student_block(model.model.layers[0], config, 0, tuned, setup)
    groups = e2e.make_optimizer([student], ccfg).param_groups
    assert [(g["lr"], sum(p.numel() for p in g["params"])) for g in groups] == [
        (3e-2, sum(p.numel() for p in (*lwc.lwc_parameters(student), *lwc.smooth_parameters(student)))),
        (2e-3, sum(m.weight.numel() for m in student.modules() if isinstance(m, lwc.LWCLinear))),
        (1e-4, 2 * model.config.hidden_size)]


def test_held_weights_give_the_same_block_output_and_quantize_once(tiny3, monkeypatch):
    """lwc.held_weights (the KL passes): a block's output exactly as without it, each weight fake-quantized once on
    entry rather than once a call, nothing held afterwards."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny3[0], dtype=torch.float32).eval()
    config = lwc.calib_model_config(model.config)
    blk = lwc.quant_block(model.model.layers[0], config, 0, WeightQuantConfig(), True, "cpu", rounding=True)
    lwc.set_kv_quantizer(blk, KVQuantConfig(), False)
    with torch.no_grad():
        for p in blk.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    xs = [model.get_input_embeddings()(torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(i)))
          for i in range(3)]
    pe = C.rope(model.model.rotary_emb, 16, "cpu")
    lins = [m for m in blk.modules() if isinstance(m, lwc.LWCLinear)]
    calls = []
    for m in lins:
        monkeypatch.setattr(m, "weight_fn", lambda *a, f=m.weight_fn: calls.append(1) or f(*a))
    with torch.no_grad():
        plain = [blk(x, position_embeddings=pe) for x in xs]
        assert len(calls) == 3 * len(lins)
        calls.clear()
        with lwc.held_weights(blk):
            held = [blk(x, position_embeddings=pe) for x in xs]
    assert len(calls) == len(lins) and all(m.held is None for m in lins)
    assert all(torch.equal(a, b) for a, b in zip(plain, held))


def test_e2e_lowers_kl_moves_parameters_and_resumes_from_kept_blocks(tiny3, tmp_path):
    """--e2e-epochs: the KL to the full-precision model falls; LWC and s/delta move; --keep-work
    keeps the block results, and --resume with other end-to-end settings reuses them (no block is
    retrained: 0 epochs gives exactly the artifact of a run without the stage)."""
    plain = convert(_cfg(tmp_path / "plain", tiny3, e2e_epochs=0))
    # with rounding offsets: the clips alone hardly move this tiny model's KL (on some CPUs it rose a little)
    tuned = convert(_cfg(tmp_path / "tuned", tiny3, e2e_epochs=3, e2e_lr=1e-2, e2e_rounding=True, keep_work=True))
    meta = json.loads((tuned / "wkvq.json").read_text())
    info = meta["calibration"]["end_to_end"]
    assert info["kl_final"] < info["kl_initial"] and len(info["kl_epochs"]) == 3
    from converter.card import render_card

    assert f"end-to-end stage: KL to the full-precision model {info['kl_initial']:.4g}" in render_card(meta, "me/x")
    a, b = _tensors(plain), _tensors(tuned)
    moved = [k for k in a if not torch.equal(a[k], b[k])]
    assert any(k.endswith("clip_hi") for k in moved) and any(k.endswith("clip_lo") for k in moved)
    assert any(k.endswith("k_scale") for k in moved) and any(k.endswith("v_shift") for k in moved)
    assert not any("embed" in k or "norm" in k for k in moved)  # without --tune-norms only quantization params
    work = work_dir_for(tuned)
    assert WorkDir(work).done() == [0, 1, 2]
    again = tmp_path / "again"
    shutil.copytree(work, work_dir_for(again))
    with pytest.raises(ValueError, match="different model, data or recipe"):  # the blocks' own settings must match
        convert(_cfg(again, tiny3, lwc_lr=5e-2, resume=True))
    redo = convert(_cfg(again, tiny3, e2e_epochs=0, round_lr=1e-2, norm_lr=1e-2, resume=True))  # unused by the blocks
    meta = json.loads((redo / "wkvq.json").read_text())
    assert meta["calibration"]["resumed_blocks"] == 3 and "end_to_end" not in meta["calibration"]
    c = _tensors(redo)
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert not work_dir_for(redo).exists()


def test_cli_flags_reach_the_recipe(tiny3, tmp_path):
    from cli import main

    model, text = tiny3
    out = tmp_path / "q"
    result = CliRunner().invoke(main, [
        "convert", str(model), "--out", str(out), "--device", "cpu", "--dtype", "float32", "--calib-data", text,
        "--nsamples", "4", "--seqlen", "32", "--epochs", "1", "--batch-size", "2", "--crr-k", "0",
        "--e2e-epochs", "1", "--e2e-lr", "5e-3", "--tune-norms", "--norm-lr", "1e-2",
        "--e2e-schedule", "cosine", "--no-e2e-rounding", "--e2e-offload"])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "wkvq.json").read_text())
    rec = meta["recipe"]["calibration"]
    assert rec["e2e_epochs"] == 1 and rec["e2e_lr"] == 5e-3 and rec["e2e_schedule"] == "cosine"
    assert rec["e2e_rounding"] is False
    assert "keep_work" not in rec and "e2e_offload" not in rec  # run controls
    assert "end_to_end" in meta["calibration"]
    result = CliRunner().invoke(main, ["convert", str(model), "--out", str(tmp_path / "r"), "--e2e-epochs", "1",
                                       "--rounding", "gptq", "--calib-data", text])
    assert result.exit_code == 1 and "needs it off" in result.output


def test_lwc_linear_keeps_float16_exact_weights_in_float16():
    """The whole model sits on the device in the end-to-end stage: float16-exact weights (float16
    source models) are stored in float16, with exactly the float32 path's output; others stay float32."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 48)
    with torch.no_grad():
        lin.weight.copy_(lin.weight.half().float())
    m = lwc.LWCLinear(lin, WeightQuantConfig())
    assert m.weight.dtype == torch.float16
    x = torch.randn(3, 256)
    hi, lo = m.clips()
    ref = F.linear(x, quant.fake_quantize_weight(lin.weight.detach(), 4, 128, hi, lo, params_dtype=torch.float16),
                   lin.bias)
    assert torch.equal(m(x), ref)
    with torch.no_grad():
        lin.weight[0, 0] += 1e-6
    assert lwc.LWCLinear(lin, WeightQuantConfig()).weight.dtype == torch.float32


def test_e2e_rounding_learns_offsets_and_keeps_blockwise_decisions(tiny3, tmp_path):
    """--e2e-rounding: the stage learns rounding offsets (codes differ from nearest rounding on the
    artifact's own clips); blocks calibrated with --rounding learned keep their decisions through a
    stage without --e2e-rounding."""
    from transformers import AutoModelForCausalLM

    from converter import export

    out = convert(_cfg(tmp_path / "r", tiny3, e2e_epochs=3, e2e_lr=1e-2, e2e_rounding=True, e2e_round_lr=2e-3))
    meta = json.loads((out / "wkvq.json").read_text())
    assert meta["recipe"]["calibration"]["e2e_rounding"]
    info = meta["calibration"]["end_to_end"]
    assert info["kl_final"] < info["kl_initial"]
    t, model = _tensors(out), AutoModelForCausalLM.from_pretrained(tiny3[0], dtype=torch.float32)
    changed = 0
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}.mlp.down_proj"
        nearest = export.linear_tensors(p, layer.mlp.down_proj.weight, WeightQuantConfig(),
                                        t[f"{p}.clip_hi"].float(), t[f"{p}.clip_lo"].float())
        changed += int((nearest[f"{p}.qweight"] != t[f"{p}.qweight"]).sum())
    assert changed > 0
    # learned block-wise decisions survive a stage that does not train offsets
    setup = C.BlockSetup(WeightQuantConfig(), KVQuantConfig(), C.CalibConfig(**TINY, e2e_epochs=1, e2e_rounding=False),
                         torch.device("cpu"),
                         torch.float32)
    layer = model.model.layers[0]
    gen = torch.Generator().manual_seed(0)
    decisions = {n: torch.randint(-1, 2, layer.get_submodule(n).weight.shape, generator=gen, dtype=torch.int8)
                 for n in lwc.DECODER_LINEARS}
    student = e2e.student_block(layer, lwc.calib_model_config(model.config), 0,
                                lwc.BlockParams(clips={}, rounding=decisions), setup)
    assert not any(p.requires_grad for p in lwc.rounding_parameters(student))
    folded = lwc.fold_block(student)
    for n, d in decisions.items():
        # d = +1 needs a fractional part >= 0, d = -1 one < 0: compare where the decision is reachable
        w = layer.get_submodule(n).weight.detach()
        hi, lo = folded.clips[n]
        _, _, scale, _ = export.export_qparams(w, WeightQuantConfig(), hi, lo)
        x = w / quant.expand_groups(scale.float(), 128, w.shape[1])
        frac = x - torch.round(x)
        reachable = ((d == 1) & (frac > 0)) | ((d == -1) & (frac < 0)) | (d == 0)
        assert torch.equal(folded.rounding[n][reachable], d[reachable]), n


def test_stage_on_learned_blocks_without_offsets_warns(tiny3, tmp_path, caplog):
    """From learned-rounding blocks a stage that only moves the clips raised the KL (BENCHMARKS.md): say so."""
    import logging

    with caplog.at_level(logging.WARNING, logger="converter.calibrate"):
        convert(_cfg(tmp_path / "w", tiny3, rounding="learned", e2e_epochs=1, e2e_rounding=False))
    assert any("--e2e-rounding" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="converter.calibrate"):
        convert(_cfg(tmp_path / "n", tiny3, rounding="learned", e2e_epochs=1, e2e_rounding=True))
    assert not any("--e2e-rounding" in r.getMessage() for r in caplog.records)


def test_memory_floor_and_check():
    """The stage's memory floor at the LLaMA-2-7B shape (6.48 B Linear weights). In place, on the device: 18 bytes a
    weight with trained offsets, 2.25 with the learned blocks' frozen (2-bit) decisions, 2 with nearest rounding (the
    teacher states stay on the host). Paged: 3 of the 32 blocks of that and the samples' states (KL passes) on the device, and on the host all of it
    without the offsets' gradients (14 bytes a weight). The check refuses what cannot fit (a one-line error naming
    the fix) and lets the rest through; CPU devices are not checked, their host memory is when paged."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32)
    weights = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert e2e.linear_weights(cfg) == weights == 6_476_005_376
    offsets = C.CalibConfig(e2e_epochs=2, e2e_rounding=True, e2e_offload=False)
    learned = C.CalibConfig(e2e_epochs=2, e2e_rounding=False, e2e_offload=False)
    nearest = C.CalibConfig(e2e_epochs=2, rounding="nearest", e2e_rounding=False, e2e_offload=False)
    assert e2e.memory_floor(cfg, offsets) == (18 * weights, 0)
    assert e2e.memory_floor(cfg, learned) == (9 * weights // 4, 0)
    assert e2e.memory_floor(cfg, nearest) == (2 * weights, 0)
    states = 128 * 2048 * 4096 * 2  # every sample's states (bfloat16) for the paged KL passes
    assert e2e.memory_floor(cfg, offsets, paged=True) == (int(3 * 18 * weights / 32) + states, 14 * weights)
    assert e2e.memory_floor(cfg, learned, paged=True) == (int(3 * 2.25 * weights / 32) + states, 9 * weights // 4)
    gib = 2 ** 30
    with pytest.raises(ValueError, match=r"needs at least 108\.6 GiB on cuda \(80\.0 GiB there\).*--e2e-offload or drop "
                       "--e2e-rounding"):
        e2e.check_memory(cfg, offsets, "cuda", total=80 * gib)
    with pytest.raises(ValueError, match="--rounding nearest"):
        e2e.check_memory(cfg, learned, "cuda", total=12 * gib)
    e2e.check_memory(cfg, learned, "cuda", total=24 * gib)
    e2e.check_memory(cfg, offsets, "cuda", total=141 * 10 ** 9)
    e2e.check_memory(cfg, nearest, "cuda", total=24 * gib)
    e2e.check_memory(cfg, offsets, "cpu")  # not checked
    e2e.check_memory(cfg, C.CalibConfig(e2e_epochs=0), "cuda", total=1)  # no stage, nothing to check
    paged = C.CalibConfig(e2e_epochs=2, e2e_rounding=True)  # the default on CUDA: paged
    assert e2e.offloaded(paged, "cuda") and not e2e.offloaded(paged, "cpu") and e2e.offloaded(offsets.__class__(
        e2e_epochs=1, e2e_offload=True), "cpu")
    e2e.check_memory(cfg, paged, "cuda", total=20 * 10 ** 9, host_total=128 * gib)  # the 7B target device
    with pytest.raises(ValueError, match=r"needs at least 84\.4 GiB of host memory \(64\.0 GiB there\).*drop --e2e-rounding"):
        e2e.check_memory(cfg, paged, "cuda", total=20 * 10 ** 9, host_total=64 * gib)
    # the source model (float32 on the host: 25.1 GiB at 7B) and the teacher's states held there all the while
    with pytest.raises(ValueError, match=r"needs at least 111\.5 GiB of host memory \(96\.0 GiB there, 27\.1 GiB of it "
                       r"the source model and its states\)"):
        e2e.check_memory(cfg, paged, "cuda", total=20 * 10 ** 9, host_total=96 * gib, host_resident=int(27.1 * gib))
    e2e.check_memory(cfg, paged, "cuda", total=20 * 10 ** 9, host_total=128 * gib, host_resident=int(27.1 * gib))
    with pytest.raises(ValueError, match=r"needs at least 12\.2 GiB on cuda.*use a device with more memory"):
        e2e.check_memory(cfg, paged, "cuda", total=8 * gib, host_total=128 * gib)


def test_cli_refuses_a_stage_that_cannot_fit_before_any_work(tiny3, tmp_path, monkeypatch):
    """A stage past the device's memory stops before the blocks: one line, exit code 1, nothing under --out."""
    from cli import main

    check = e2e.check_memory
    monkeypatch.setattr(e2e, "check_memory", lambda config, ccfg, device, **kw: check(config, ccfg, "cuda", total=1024, **kw))
    model, text = tiny3
    out = tmp_path / "q"
    result = CliRunner().invoke(main, [
        "convert", str(model), "--out", str(out), "--device", "cpu", "--dtype", "float32", "--calib-data", text,
        "--nsamples", "4", "--seqlen", "32", "--epochs", "1", "--e2e-epochs", "1", "--e2e-rounding", "--no-e2e-offload"])
    assert result.exit_code == 1
    assert "the end-to-end stage needs at least" in result.output and "drop --e2e-rounding" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists() and not work_dir_for(out).exists()
    # paged (the default on CUDA; asked for here on CPU), the host's memory is what must hold the blocks
    monkeypatch.setattr(e2e, "check_memory", check)
    monkeypatch.setattr(e2e, "host_memory", lambda: 1024)
    result = CliRunner().invoke(main, [
        "convert", str(model), "--out", str(out), "--device", "cpu", "--dtype", "float32", "--calib-data", text,
        "--nsamples", "4", "--seqlen", "32", "--epochs", "1", "--e2e-offload"])
    assert result.exit_code == 1 and "of host memory (0.0 GiB there, " in result.output
    assert "GiB of it the source model and its states)" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists() and not work_dir_for(out).exists()


@pytest.mark.parametrize("lwc_on", [True, False])
def test_frozen_decisions_are_the_float_offsets_in_two_bits(tiny3, lwc_on):
    """Without ``e2e_rounding`` the student holds the blocks' rounding decisions in 2 bits (no float32 offsets) and
    computes exactly what float32 offsets ``d / 2`` compute (the former layout), folding to the same decisions;
    with ``--no-lwc`` too (the weights stay unquantized for them)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny3[0], dtype=torch.float32).eval()
    layer = model.model.layers[0]
    config = lwc.calib_model_config(model.config)
    gen = torch.Generator().manual_seed(3)
    shapes = {n: (layer.get_submodule(n).out_features, layer.get_submodule(n).in_features) for n in lwc.DECODER_LINEARS}
    clips = {n: ((torch.rand(o, -(-i // 128), generator=gen) * 0.5 + 0.5).half().float(),
                 (torch.rand(o, -(-i // 128), generator=gen) * 0.5 + 0.5).half().float()) for n, (o, i) in shapes.items()}
    params = lwc.BlockParams(clips=clips if lwc_on else {},
                             rounding={n: torch.randint(-1, 2, s, generator=gen).to(torch.int8) for n, s in shapes.items()},
                             kv={"k_scale": torch.rand(2, 40) + 0.5, "k_shift": torch.randn(2, 40) * 0.1,
                                 "v_scale": torch.rand(2, 40) + 0.5, "v_shift": torch.randn(2, 40) * 0.1})

    def student(**kw):
        ccfg = C.CalibConfig(**{**TINY, "lwc": lwc_on, "e2e_epochs": 1, "e2e_rounding": False, **kw})
        setup = C.BlockSetup(WeightQuantConfig(), KVQuantConfig(), ccfg, torch.device("cpu"), torch.float32)
        return e2e.student_block(layer, config, 0, params, setup)

    frozen, trained = student(), student(e2e_rounding=True)
    x = model.get_input_embeddings()(torch.randint(0, 300, (2, 32))).detach()
    pe = C.rope(model.model.rotary_emb, 32, "cpu")
    for name in lwc.DECODER_LINEARS:
        a, b = frozen.get_submodule(name), trained.get_submodule(name)
        assert a.offset is None and a.decisions.dtype == torch.uint8 and a.decisions.numel() * 4 >= b.offset.numel()
        assert a.decisions.numel() < b.offset.numel() / 3 and torch.equal(a.current_offset(), b.offset)
    assert not lwc.rounding_parameters(frozen) and lwc.rounding_parameters(trained)
    with torch.no_grad():
        assert torch.equal(frozen(x, position_embeddings=pe), trained(x, position_embeddings=pe))
    fa, fb = lwc.fold_block(frozen), lwc.fold_block(trained)
    assert fa.rounding.keys() == fb.rounding.keys() == shapes.keys()
    assert all(torch.equal(fa.rounding[n], fb.rounding[n]) for n in shapes)
    with pytest.raises(ValueError, match="without learnable offsets"):
        trained.get_submodule("mlp.up_proj").freeze_decisions(params.rounding["mlp.up_proj"])
    with pytest.raises(ValueError, match="-1, 0 or \\+1"):
        lwc.LWCLinear(torch.nn.Linear(8, 4), WeightQuantConfig()).freeze_decisions(torch.full((4, 8), 2))


@pytest.mark.parametrize("kw", [dict(e2e_rounding=True), dict(rounding="learned", tune_norms=True),
                                dict(e2e_rounding=True, compute_dtype="bfloat16", e2e_schedule="constant")])
def test_paged_stage_is_the_in_place_stage(tiny3, tmp_path, kw):
    """--e2e-offload (the blocks on the host, paged onto the device one at a time, each block's AdamW stepped as its
    backward pass finishes) computes exactly what the stage with every block in place computes: the same artifact,
    the same KL before, per epoch and after."""
    runs = [convert(_cfg(tmp_path / str(paged), tiny3, e2e_epochs=2, e2e_lr=1e-2, e2e_offload=paged, **kw))
            for paged in (False, True)]
    metas = [json.loads((r / "wkvq.json").read_text())["calibration"]["end_to_end"] for r in runs]
    for m in metas:
        m.pop("seconds")
        assert set(m.pop("phase_seconds")) == {"setup", "kl", "train", "fold"}
    assert metas[0] == metas[1] and len(metas[0]["kl_epochs"]) == 2
    a, b = (_tensors(r) for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_paged_stage_holds_float16_source_weights_in_float16_and_changes_nothing(tmp_path, caplog):
    """With the paged stage the source model's float16-valued decoder weights are held in float16 on the host (half
    the memory) from the start; the artifact is exactly the in-place stage's (which keeps them float32), and the
    resume digest is unchanged (it reads the weights as float32), so blocks kept by either run resume in the other."""
    from transformers import AutoModelForCausalLM

    (tmp_path / "calib.txt").write_text(" ".join(CORPUS) * 4)
    tiny = (make_tiny_llama(tmp_path / "model", num_hidden_layers=2, half_exact=True), str(tmp_path / "calib.txt"))
    with caplog.at_level("INFO", logger="converter.calibrate"):
        paged = convert(_cfg(tmp_path / "paged", tiny, e2e_epochs=1, e2e_offload=True))
    assert "held in float16 on the host (exact)" in caplog.text
    in_place = convert(_cfg(tmp_path / "in_place", tiny, e2e_epochs=1, e2e_offload=False))
    a, b = _tensors(paged), _tensors(in_place)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    model = AutoModelForCausalLM.from_pretrained(tiny[0], dtype=torch.float32)
    cfg, samples = _cfg(tmp_path / "x", tiny), torch.arange(64).reshape(2, 32)
    before = C.resume_recipe(model, cfg, samples, torch.float32)
    q = model.model.layers[0].self_attn.q_proj.weight
    ref = q.detach().clone()
    assert lwc.compact_linears(model.model.layers) == 2 * sum(
        model.model.layers[0].get_submodule(n).weight.numel() for n in lwc.DECODER_LINEARS) * 2
    assert q.dtype == torch.float16 and torch.equal(q.float(), ref)
    assert model.model.norm.weight.dtype == torch.float32  # only the decoder Linears
    assert C.resume_recipe(model, cfg, samples, torch.float32) == before
    assert lwc.compact_linears(model.model.layers) == 0  # nothing left to halve


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_paged_stage_on_cuda_matches_the_in_place_stage(tiny3, tmp_path):
    """On CUDA (where paging is the default: pinned host arena, copies on their own streams) the stage from the
    same kept blocks reaches the in-place stage's result (tolerances for the GPU's nondeterministic reductions)."""
    import dataclasses

    def cfg(out, **kw):
        return dataclasses.replace(_cfg(out, tiny3, e2e_epochs=2, e2e_lr=1e-2, e2e_rounding=True, **kw), device="cuda")

    first = convert(cfg(tmp_path / "place", e2e_offload=False, keep_work=True))
    shutil.copytree(work_dir_for(first), work_dir_for(tmp_path / "paged"))
    second = convert(cfg(tmp_path / "paged", resume=True))
    a, b = (json.loads((r / "wkvq.json").read_text())["calibration"]["end_to_end"] for r in (first, second))
    assert b["kl_final"] == pytest.approx(a["kl_final"], rel=1e-3)
    assert b["kl_epochs"] == pytest.approx(a["kl_epochs"], rel=1e-3)
    ta, tb = _tensors(first), _tensors(second)
    for k in ta:
        if k.endswith("qweight"):
            assert (ta[k] != tb[k]).float().mean() < 1e-3, k
        else:
            assert torch.allclose(ta[k].float(), tb[k].float(), rtol=1e-2, atol=1e-3), k


def test_cli_defaults_are_the_config_defaults():
    """Every calibration option of ``wkvq-convert`` defaults to its CalibConfig field's default (the default recipe,
    the end-to-end stage with rounding offsets included, is one recipe whichever way it is started)."""
    import dataclasses

    from cli import main

    fields = {f.name: f.default for f in dataclasses.fields(C.CalibConfig)}
    import click

    cmd = main.commands["convert"]
    ctx = click.Context(cmd)
    params = {p.name: p.get_default(ctx) for p in cmd.params}
    shared = sorted(set(fields) & set(params))
    assert {"e2e_epochs", "e2e_lr", "e2e_rounding", "e2e_round_lr", "e2e_offload", "epochs", "rounding"} <= set(shared)
    assert {n: params[n] for n in shared} == {n: fields[n] for n in shared}
    assert (fields["e2e_epochs"], fields["e2e_lr"], fields["e2e_rounding"]) == (2, 3e-3, True)

