"""wkvq eval: perplexity against simple references, in-memory variants against artifacts, the
decode simulation against token-by-token decoding, the table and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, DynamicCache

import runtime
from cli import main
from converter import baselines, evaluate, plots, table, variants
from converter.evaluate import EvalConfig
from converter.export import WeightQuantConfig
from runtime.kvquant import KVQuantConfig
from tests.helpers import CORPUS

W4 = WeightQuantConfig(4, 128)
KV4 = KVQuantConfig(4)


@pytest.fixture(scope="module")
def dense(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(" ".join(CORPUS))
    return path


def ids(b=2, t=24, seed=0):
    return torch.randint(3, 320, (b, t), generator=torch.Generator().manual_seed(seed))


def reference_ppl(model, windows) -> float:
    """exp(mean NLL) from the full logits of plain forwards, no chunking."""
    with torch.no_grad():
        logits = model(windows, use_cache=False).logits.float()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return math.exp(nll.item())


# ----------------------------------------------------------------------------- perplexity


def test_perplexity_matches_reference(dense, monkeypatch):
    w = ids(3, 30)
    ref = reference_ppl(dense, w)
    res = evaluate.perplexity(dense, w, "prefill", batch_size=2, progress=False)
    assert res.ppl == pytest.approx(ref, rel=1e-5)
    assert (res.tokens, res.windows, res.seqlen) == (3 * 29, 3, 30)
    monkeypatch.setattr(evaluate, "LOGITS_CHUNK", 7)  # chunked lm_head: same sum
    assert evaluate.perplexity(dense, w, "decode", progress=False).ppl == pytest.approx(ref, rel=1e-5)


def test_kv_modes_differ_only_with_quantized_kv(dense):
    w = ids()
    kv = variants.build_variant(dense, variants.VariantConfig(kv=KV4))
    decode = evaluate.perplexity(kv, w, "decode", progress=False).ppl
    prefill = evaluate.perplexity(kv, w, "prefill", progress=False).ppl
    assert prefill == pytest.approx(reference_ppl(dense, w), rel=1e-5)  # prefill never reads K/V quantized
    assert decode != pytest.approx(prefill, rel=1e-6)
    no_poq = variants.build_variant(dense, variants.VariantConfig(kv=KVQuantConfig(4, poq=False)))
    assert evaluate.perplexity(no_poq, w, "decode", progress=False).ppl != pytest.approx(decode, rel=1e-6)
    with pytest.raises(ValueError, match="decode, prefill"):
        evaluate.set_kv_mode(kv, "sim")


def test_windows_are_consecutive_slices(tiny_llama_dir, text_file):
    from transformers import AutoTokenizer

    from converter import data

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    all_ids = data.tokenize(tok, text_file.read_text())
    w = evaluate.load_windows(tok, str(text_file), 16, max_windows=3)
    assert torch.equal(w, all_ids[:48].reshape(3, 16))


def test_long_windows_stay_within_articles(tiny_llama_dir, monkeypatch):
    from transformers import AutoTokenizer

    from converter import data

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    arts = [("A", CORPUS[0] * 6), ("B", "short"), ("C", CORPUS[1] * 6)]
    monkeypatch.setattr(data, "enwiki_split", lambda split: arts)
    w = evaluate.load_windows(tok, evaluate.LONG_DATA, 20)
    a = data.tokenize(tok, f"A\n\n{arts[0][1]}")
    c = data.tokenize(tok, f"C\n\n{arts[2][1]}")
    na, nc = a.numel() // 20, c.numel() // 20
    assert w.shape == (na + nc, 20)
    assert torch.equal(w[0], a[:20]) and torch.equal(w[na], c[:20])
    with pytest.raises(data.DataError, match="smaller --seqlen"):
        evaluate.load_windows(tok, evaluate.LONG_DATA, 10_000)


def test_eval_config_errors():
    with pytest.raises(ValueError, match="decode, prefill"):
        EvalConfig(kv_mode="fast")
    with pytest.raises(ValueError, match="seqlen"):
        EvalConfig(seqlen=1)
    with pytest.raises(ValueError, match="dtype"):
        EvalConfig(dtype="int8")


# ----------------------------------------------------------------------------- variants


def test_in_memory_w4kv4_equals_rtn_artifact(dense, tiny_rtn_artifact):
    mem = variants.build_variant(dense, variants.VariantConfig(weight=W4, kv=KV4))
    art, _ = runtime.load(tiny_rtn_artifact, device="cpu", dtype=torch.float32)
    for a, b in zip(mem.model.layers, art.model.layers):
        for name in ("self_attn.q_proj", "mlp.down_proj"):
            qa, qb = a.get_submodule(name), b.get_submodule(name)
            assert torch.equal(qa.qweight, qb.qweight) and torch.equal(qa.scales, qb.scales)
            assert torch.equal(qa.zeros, qb.zeros)
    w = ids()
    assert evaluate.perplexity(mem, w, progress=False).ppl == evaluate.perplexity(art, w, progress=False).ppl
    assert dense.model.layers[0].self_attn.q_proj.__class__ is torch.nn.Linear  # base left unchanged


def reference_token_quant(x, bits):
    """Per-token asymmetric min-max quantize-dequantize, written out plainly."""
    qmax = 2 ** bits - 1
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    step = ((hi - lo) / qmax).clamp(min=1e-8)
    return torch.clamp(torch.round((x - lo) / step), 0, qmax) * step + lo


def test_activation_quantization_matches_reference():
    x = torch.randn(2, 5, 33) * 3
    y = variants.fake_quantize_tokens(x, 4)
    assert torch.allclose(y, reference_token_quant(x, 4), atol=1e-6)
    assert len(torch.unique(y[0, 0])) <= 16
    lin = torch.nn.Linear(33, 7)
    wrapped = variants.ActQuantLinear(lin, 4)
    assert torch.allclose(wrapped(x), lin(reference_token_quant(x, 4)), atol=1e-5)


def test_materialized_weights_compute_the_same(dense):
    w = ids()
    q = variants.build_variant(dense, variants.VariantConfig(weight=W4, kv=KV4))
    with torch.no_grad():
        ref = q(w, use_cache=False).logits
        m = variants.materialize_weights(q)
        assert type(m.model.layers[0].mlp.gate_proj) is torch.nn.Linear
        assert torch.equal(m(w, use_cache=False).logits, ref)


def test_w4a4_is_w4kv4_plus_activation_quantization(dense):
    w = ids()
    w4kv4 = variants.build_variant(dense, variants.VariantConfig(weight=W4, kv=KV4))
    w4a4 = variants.build_variant(dense, variants.VariantConfig(weight=W4, kv=KV4, act_bits=4))
    inner = w4a4.model.layers[1].mlp.up_proj
    assert isinstance(inner, variants.ActQuantLinear) and inner.linear.bits == 4
    a, b = (evaluate.perplexity(m, w, progress=False).ppl for m in (w4kv4, w4a4))
    assert math.isfinite(b) and b != pytest.approx(a, rel=1e-6)


# ----------------------------------------------------------------------------- decoding


def stepwise_logits(model, seq, cache):
    outs = []
    with torch.no_grad():
        for t in range(seq.shape[1]):
            out = model(input_ids=seq[:, t:t + 1], use_cache=True, **{runtime.CACHE_KWARG: cache})
            outs.append(out.logits[:, -1].float())
    return torch.stack(outs, dim=1)


@pytest.mark.parametrize("poq", [True, False])
def test_decode_simulation_agrees_with_token_by_token_poq_cache(tiny_rtn_artifact, poq):
    model, _ = runtime.load(tiny_rtn_artifact, device="cpu", dtype=torch.float32, poq=poq)
    seq = ids(2, 20, seed=3)
    evaluate.set_kv_mode(model, "decode")
    with torch.no_grad():
        sim = model(seq, use_cache=False).logits.float()
    model.set_attn_implementation("sdpa")
    step = stepwise_logits(model, seq, runtime.new_cache(model))
    # Same quantizer, same values: only float32 summation order differs (and may flip a rare code).
    assert (sim.log_softmax(-1) - step.log_softmax(-1)).abs().max() < 2e-3
    evaluate.set_kv_mode(model, "prefill")  # and the simulation is not the prefill: the cache matters
    with torch.no_grad():
        pre = model(seq, use_cache=False).logits.float()
    assert (pre - step).abs().max() > 1e-3


def test_token_by_token_loop_equals_teacher_forcing(dense):
    w = ids(2, 16)
    res = baselines.decode_perplexity(dense, w, DynamicCache, batch_size=2, progress=False)
    assert res.ppl == pytest.approx(reference_ppl(dense, w), rel=1e-5)
    assert res.tokens == 2 * 15


@pytest.mark.skipif(baselines.backend_missing("hqq") is not None, reason="hqq is not installed")
def test_quantized_cache_peer_runs(dense):
    w = ids(2, 24)
    w4 = variants.build_variant(dense, variants.VariantConfig(weight=W4))
    cfg = baselines.PeerConfig(backend="hqq", windows=1, residual_length=4)
    res = baselines.peer_perplexity(w4, w, cfg, progress=False)
    ref = evaluate.perplexity(w4, w[:1], "prefill", progress=False).ppl
    assert res.windows == 1 and math.isfinite(res.ppl)
    assert res.ppl != ref and abs(math.log(res.ppl / ref)) < 0.5


def test_kv_cache_bytes_match_the_runtime_cache(tiny_rtn_artifact):
    model, _ = runtime.load(tiny_rtn_artifact, device="cpu", dtype=torch.float32)
    cache = runtime.new_cache(model)
    with torch.no_grad():
        model(ids(1, 13), use_cache=True, **{runtime.CACHE_KWARG: cache})
    shape = table.model_shape(model.config)
    assert plots.kv_cache_bytes(shape, 13, 4) - plots.kv_cache_bytes(shape, 0, 4) == cache.nbytes
    fp = 2 * 2 * 13 * shape["num_layers"] * shape["num_kv_heads"] * shape["head_dim"]
    assert plots.kv_cache_bytes(shape, 13) == fp


# ----------------------------------------------------------------------------- table and CLI


def test_table_rows(tiny_llama_dir, tiny_rtn_artifact, text_file):
    cfg = table.TableConfig(eval=EvalConfig(data=str(text_file), seqlen=32, max_windows=2, device="cpu",
                                            progress=False),
                            artifacts=(("wkvquant", str(tiny_rtn_artifact)),),
                            rows=("wkvquant:kv", "fp16", "w4", "kv4", "w4kv4-rtn", "wkvquant", "no-poq", "no-lwc",
                                  "wkvquant:w", "w4a4"),
                            long_seqlen=48, long_data=str(text_file), long_max_windows=1)
    t = table.run_table(str(tiny_llama_dir), cfg)
    rows = {r["name"]: r for r in t["rows"]}
    assert list(rows) == ["fp16", "w4", "kv4", "w4kv4-rtn", "wkvquant", "no-poq", "no-lwc", "wkvquant:w",
                          "wkvquant:kv", "w4a4"]
    assert rows["w4kv4-rtn"]["ppl"] == rows["wkvquant"]["ppl"]  # RTN artifact == in-memory RTN
    # the artifact's parts alone: its weights == in-memory W4 RTN, its KV quantization == in-memory KV4 RTN
    assert rows["wkvquant:w"]["ppl"] == rows["w4"]["ppl"] and rows["wkvquant:kv"]["ppl"] == rows["kv4"]["ppl"]
    assert len({rows[n]["ppl"] for n in ("fp16", "w4", "kv4", "wkvquant")}) == 4
    assert rows["wkvquant:w"]["details"]["part"] == "w" and "full-precision KV" in rows["wkvquant:w"]["setup"]
    assert rows["no-poq"]["ppl"] != rows["wkvquant"]["ppl"]
    assert rows["no-lwc"]["ppl"] is None and "--artifact no-lwc=DIR" in rows["no-lwc"]["note"]
    assert all(r["windows"] == 2 and r["long"]["seqlen"] == 48 for r in t["rows"] if r["ppl"] is not None)
    md = table.markdown(t)
    assert "| W4KV4 RTN |" in md and "PPL @48" in md and "| — | — |" in md


def test_table_config_errors(tiny_rtn_artifact):
    with pytest.raises(ValueError, match="unknown row 'w3'"):
        table.TableConfig(rows=("w3",))
    with pytest.raises(ValueError, match=r"unknown row 'b:w'.*NAME:w or NAME:kv of an --artifact NAME"):
        table.TableConfig(artifacts=(("a", "x"),), rows=("a:w", "b:w"))
    with pytest.raises(ValueError, match="unique"):
        table.TableConfig(artifacts=(("a", "x"), ("a", "y")))
    with pytest.raises(ValueError, match="full-precision model"):
        table.run_table(str(tiny_rtn_artifact), table.TableConfig())


def test_cli_eval_json(tiny_rtn_artifact, text_file, tmp_path):
    out = tmp_path / "r.json"
    args = ["eval", str(tiny_rtn_artifact), "--data", str(text_file), "--seqlen", "32", "--max-windows", "2",
            "--kv-mode", "prefill", "--json", str(out), "--device", "cpu", "--no-progress"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    for key in ("ppl", "tokens", "windows", "seqlen", "kv_mode", "poq", "target", "data"):
        assert key in r
    assert (r["windows"], r["tokens"], r["kv_mode"], r["poq"]) == (2, 62, "prefill", True)
    assert "never read quantized" in res.output and f"{r['ppl']:.4f}" in res.output


def test_cli_table_outputs(tiny_llama_dir, tiny_rtn_artifact, text_file, tmp_path):
    args = ["eval", str(tiny_llama_dir), "--table", "--data", str(text_file), "--seqlen", "32", "--max-windows", "1",
            "--artifact", f"wkvquant={tiny_rtn_artifact}", "--rows", "fp16,kv4,wkvquant", "--device", "cpu",
            "--json", str(tmp_path / "t.json"), "--markdown", str(tmp_path / "t.md"), "--no-progress"]
    if _has_matplotlib():
        args += ["--plots", str(tmp_path / "plots")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    t = json.loads((tmp_path / "t.json").read_text())
    assert [r["name"] for r in t["rows"]] == ["fp16", "kv4", "wkvquant"]
    assert (tmp_path / "t.md").read_text() in res.output
    if _has_matplotlib():
        for name in ("perplexity.png", "kv_cache_bytes.png"):
            assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def _has_matplotlib() -> bool:
    try:
        plots.require_matplotlib()
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("args, message", [
    (["--artifact", "nodir"], "NAME=DIR"),
    (["--markdown", "x.md"], "need --table"),
    (["--kv-mode", "fast"], "fast"),
])
def test_cli_errors(tiny_rtn_artifact, args, message):
    res = CliRunner().invoke(main, ["eval", str(tiny_rtn_artifact), *args])
    assert res.exit_code != 0 and message in res.output


@pytest.mark.slow
def test_smollm2_perplexity(smollm2_dir):
    """The real model: a sensible perplexity, W4KV4 RTN worse than full precision but not broken."""
    cfg = EvalConfig(seqlen=512, max_windows=2, device="cpu", progress=False)
    fp = evaluate.evaluate(str(smollm2_dir), cfg)
    assert 3 < fp["ppl"] < 40 and fp["tokens"] == 2 * 511
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    from transformers import AutoTokenizer

    w = evaluate.load_windows(AutoTokenizer.from_pretrained(smollm2_dir), cfg.data, 512, 2)
    q = variants.build_variant(base, variants.VariantConfig(weight=W4, kv=KV4))
    ppl = evaluate.perplexity(q, w, progress=False).ppl
    assert fp["ppl"] < ppl < 4 * fp["ppl"]  # RTN hurts a 135M model a lot; broken quantization gives 1000s
