"""The runtime: packed INT4 linears, the Past-Only Quantization cache, generate() and `wkvq generate`.

Cached decoding is checked against an independent one-pass reference that recomputes attention
from the same quantized values (``KVQuantizer.fake``): query ``i`` sees key ``j <= i`` in full
precision when ``j`` came in the same forward as ``i`` (POQ) and quantized when it came earlier.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AttentionInterface, DynamicCache

import runtime
from runtime import CACHE_KWARG, PoqCache, new_cache
from runtime.artifact import ArtifactError
from runtime.cache import PackedKV, PoqLayer
from runtime.qlinear import QuantLinear
from tests.helpers import kernel_rtn_artifact, tiny_config

REF_ATTENTION = "poq_segment_reference"


# ----------------------------------------------------------------------------- helpers


def _segment_attention(segments: torch.Tensor):
    """Reference attention for a teacher-forced pass; ``segments[j]``: the forward that brought token j."""

    def attend(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        kvq = module.kv_quant
        rep = query.shape[1] // key.shape[1]
        q = query.float()
        k, v = key.float().repeat_interleave(rep, 1), value.float().repeat_interleave(rep, 1)
        kq = kvq.fake("k", key).float().repeat_interleave(rep, 1)
        vq = kvq.fake("v", value).float().repeat_interleave(rep, 1)
        seg = segments.to(query.device)
        t = q.shape[-2]
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        full = (seg[:, None] == seg[None, :]) & causal & kvq.config.poq  # [T, T]: read in full precision
        scores = torch.where(full, q @ k.transpose(-1, -2), q @ kq.transpose(-1, -2)) * scaling
        p = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        out = (p * full) @ v + (p * ~full) @ vq
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    return attend


def reference_logits(model, ids: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Logits ``[B, T, V]`` of one pass where the tokens come in forwards of ``chunks`` tokens."""
    segments = torch.repeat_interleave(torch.arange(len(chunks)), torch.tensor(chunks))
    AttentionInterface.register(REF_ATTENTION, _segment_attention(segments))
    model.set_attn_implementation(REF_ATTENTION)
    try:
        with torch.no_grad():
            return model(ids, use_cache=False).logits.float()
    finally:
        model.set_attn_implementation("sdpa")


def cached_logits(model, ids: torch.Tensor, chunks: list[int], cache=None) -> torch.Tensor:
    """Logits ``[B, T, V]`` of running ``model`` forward by forward with a POQ cache."""
    cache = new_cache(model) if cache is None else cache
    out, start = [], 0
    with torch.no_grad():
        for n in chunks:
            out.append(model(ids[:, start:start + n], use_cache=True, **{CACHE_KWARG: cache}).logits.float())
            start += n
    return torch.cat(out, dim=1)


def held_tensors(cache) -> list[torch.Tensor]:
    """Every tensor the cache's layer objects hold (independent of ``nbytes``)."""
    found = []
    for layer in cache.layers:
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor):
                found.append(value)
            elif isinstance(value, PackedKV):
                found += [value.codes, value.step, value.minimum]
    return found


def randomize_smoothing(model, seed: int = 0) -> None:
    """Give every layer a non-trivial static smoothing s > 0 and shift delta (RTN has s=1, delta=0)."""
    g = torch.Generator().manual_seed(seed)
    for layer in model.model.layers:
        kvq = layer.self_attn.kv_quant
        for name in ("k_scale", "v_scale"):
            getattr(kvq, name).copy_(torch.rand(getattr(kvq, name).shape, generator=g) + 0.5)
        for name in ("k_shift", "v_shift"):
            getattr(kvq, name).copy_(torch.randn(getattr(kvq, name).shape, generator=g) * 0.3)


def decoder_weight_bytes(model) -> tuple[int, int]:
    """(bytes held by the decoder Linears, bytes of their weights in fp16)."""
    held = fp16 = 0
    for module in model.model.layers.modules():
        if isinstance(module, QuantLinear):
            held += sum(b.numel() * b.element_size() for b in module.buffers())
            fp16 += module.in_features * module.out_features * 2
    return held, fp16


@pytest.fixture(scope="module")
def tiny(tiny_rtn_artifact):
    model, tok = runtime.load(tiny_rtn_artifact, device="cpu", dtype="float32")
    randomize_smoothing(model)
    return model, tok


def _ids(vocab: int, n: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- packed linear


@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_dequantized_reference(bias):
    g = torch.Generator().manual_seed(0)
    out_f, in_f, group = 24, 160, 128  # ragged last group of 32
    q = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8)
    scales = torch.rand(out_f, 2, generator=g) * 0.1 + 0.01
    zeros = torch.randint(0, 16, (out_f, 2), generator=g).float()
    b = torch.randn(out_f, generator=g) if bias else None
    lin = QuantLinear.from_codes(q, scales, zeros, 4, group, bias=b)
    assert lin.qweight.dtype == torch.uint8 and lin.qweight.shape == (out_f, in_f // 2)
    idx = torch.arange(in_f) // group  # reference: element by element, no grouping helpers
    w_ref = (q.float() - zeros[:, idx]) * scales.half().float()[:, idx]
    assert torch.equal(lin.dequantized_weight(), w_ref)
    x = torch.randn(3, 5, in_f, generator=g)
    y_ref = x @ w_ref.T + (b if bias else 0)
    torch.testing.assert_close(lin(x), y_ref, rtol=1e-5, atol=1e-5)
    for dtype in (torch.float16, torch.bfloat16):
        assert lin(x.to(dtype)).dtype == dtype


def test_loaded_linears_keep_int4_and_match_the_source(tiny, tiny_llama_dir):
    from transformers import LlamaForCausalLM

    model, _ = tiny
    dense = LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    for name, module in model.model.layers.named_modules():
        if isinstance(module, QuantLinear):
            w = dense.model.layers.get_submodule(name).weight
            step = module.scales.float().repeat_interleave(module.group_size, 1)[:, :module.in_features]
            # half a step inside the range; up to one at its ends (integer zero point, clamping)
            assert ((module.dequantized_weight() - w).abs() <= step + 1e-6).all(), name
    # no floating-point [out, in] weight anywhere in the decoder: only packed codes
    for name, t in list(model.model.layers.named_parameters()) + list(model.model.layers.named_buffers()):
        assert not (t.is_floating_point() and t.dim() == 2 and min(t.shape) > 8), name
    held, fp16 = decoder_weight_bytes(model)
    assert held / fp16 <= 0.30


# ----------------------------------------------------------------------------- cache numerics


@pytest.mark.parametrize("poq", [True, False])
def test_cached_decoding_matches_reference(tiny_rtn_artifact, poq):
    model, _ = runtime.load(tiny_rtn_artifact, device="cpu", dtype="float32", poq=poq)
    randomize_smoothing(model, seed=1)
    ids = _ids(model.config.vocab_size, 15, batch=2)
    chunks = [7, 1, 1, 3, 1, 1, 1]  # a prompt, decode steps, and a multi-token step
    got = cached_logits(model, ids, chunks)
    want = reference_logits(model, ids, chunks)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the quantization matters: a full-precision cache gives other logits
    with torch.no_grad():
        dense = model(ids, use_cache=False).logits.float()
    assert (dense[:, 7:] - got[:, 7:]).abs().max() > 1e-2


def test_poq_reads_the_current_tokens_in_full_precision(tiny):
    model, _ = tiny
    kvq = model.model.layers[0].self_attn.kv_quant
    layer = PoqLayer(kvq)
    g = torch.Generator().manual_seed(0)
    k1, v1 = torch.randn(1, 2, 4, 40, generator=g), torch.randn(1, 2, 4, 40, generator=g)
    keys, values = layer.update(k1, v1)
    assert torch.equal(keys, k1) and torch.equal(values, v1)  # the prompt attends in full precision
    k2, v2 = torch.randn(1, 2, 1, 40, generator=g), torch.randn(1, 2, 1, 40, generator=g)
    keys, values = layer.update(k2, v2)
    assert torch.equal(keys[:, :, :4], kvq.fake("k", k1)) and torch.equal(values[:, :, :4], kvq.fake("v", v1))
    assert torch.equal(keys[:, :, 4:], k2) and torch.equal(values[:, :, 4:], v2)
    assert layer.get_seq_length() == 5
    assert layer.k.codes.dtype == torch.uint8 and layer.k.step.dtype == torch.float16


def test_cache_holds_under_32_percent_of_fp16_after_1024_tokens(tiny):
    model, _ = tiny
    ids = _ids(model.config.vocab_size, 1024)
    cache = new_cache(model)
    cached_logits(model, ids, [1000] + [1] * 24, cache)
    dense = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, use_cache=True, **{CACHE_KWARG: dense})
    fp16_bytes = sum(t.numel() * 2 for t in held_tensors(dense))
    held = held_tensors(cache)
    held_bytes = sum(t.numel() * t.element_size() for t in held)
    assert cache.get_seq_length() == 1024 and fp16_bytes > 0
    assert held_bytes == cache.nbytes
    assert {t.dtype for t in held} == {torch.uint8, torch.float16}
    assert held_bytes / fp16_bytes <= 0.32, held_bytes / fp16_bytes


def test_crop_and_beam_reorder_are_exact(tiny):
    model, _ = tiny
    ids = _ids(model.config.vocab_size, 12, seed=3, batch=3)
    cache = new_cache(model)
    first = cached_logits(model, ids[:, :12], [8, 1, 1, 1, 1], cache)
    cache.crop(-3)
    assert cache.get_seq_length() == 9
    again = cached_logits(model, ids[:, 9:12], [1, 1, 1], cache)
    assert torch.equal(again, first[:, 9:12])
    layer = cache.layers[0]
    before = layer._dequantize("k", layer.k, torch.float32)
    beam_idx = torch.tensor([2, 0, 0])
    cache.reorder_cache(beam_idx)
    assert torch.equal(layer._dequantize("k", layer.k, torch.float32), before[beam_idx])
    with pytest.raises(ValueError, match="negative"):
        cache.crop(4)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes == 0


@pytest.mark.parametrize("dtype, floor", [("float16", 0.02), ("bfloat16", 0.05)])
def test_half_precision_decoding(tiny_rtn_artifact, dtype, floor):
    """Error floor: ``floor`` x max|logit| (measured: 1.2% fp16, 3.1% bf16 on CPU), and well below
    the difference that quantizing the cache makes."""
    model, _ = runtime.load(tiny_rtn_artifact, device="cpu", dtype=dtype)
    randomize_smoothing(model, seed=2)
    ids = _ids(model.config.vocab_size, 10)
    chunks = [6, 1, 1, 1, 1]
    got = cached_logits(model, ids, chunks)[:, 6:]
    want = reference_logits(model, ids, chunks)[:, 6:]
    with torch.no_grad():
        dense = model(ids, use_cache=False).logits.float()[:, 6:]
    err = (got - want).abs().max()
    assert err <= floor * want.abs().max()
    assert err <= 0.25 * (dense - want).abs().max()
    layer = new_cache(model).layers[0]
    keys, _ = layer.update(*(torch.randn(1, 2, 3, 40, dtype=getattr(torch, dtype)),) * 2)
    assert keys.dtype == getattr(torch, dtype) and layer.k.step.dtype == torch.float16


# ----------------------------------------------------------------------------- generate


def test_generate_uses_poq_cache_and_greedy_matches_a_manual_loop(tiny):
    model, _ = tiny
    ids = _ids(model.config.vocab_size, 6, seed=5)
    out = model.generate(ids, max_new_tokens=8, do_sample=False, return_dict_in_generate=True,
                         eos_token_id=None, pad_token_id=0)
    assert isinstance(getattr(out, CACHE_KWARG), PoqCache)
    seq, cache = ids, new_cache(model)
    with torch.no_grad():
        step = ids
        for _ in range(8):
            nxt = model(step, use_cache=True, **{CACHE_KWARG: cache}).logits[:, -1].argmax(-1, keepdim=True)
            seq, step = torch.cat([seq, nxt], dim=1), nxt
    assert torch.equal(out.sequences, seq)
    # the caller's choice wins: an explicit cache, or none
    dense = DynamicCache(config=model.config)
    model.generate(ids, max_new_tokens=2, do_sample=False, eos_token_id=None, pad_token_id=0,
                   **{CACHE_KWARG: dense})
    assert dense.get_seq_length() > 0


def test_sampled_generation(tiny):
    model, _ = tiny
    ids = _ids(model.config.vocab_size, 5, seed=6, batch=2)
    kw = dict(max_new_tokens=10, do_sample=True, temperature=0.9, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    a = model.generate(ids, **kw)
    torch.manual_seed(0)
    b = model.generate(ids, **kw)
    assert torch.equal(a, b) and a.shape == (2, 15) and int(a.max()) < model.config.vocab_size
    greedy = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    top1 = model.generate(ids, max_new_tokens=10, do_sample=True, top_k=1, eos_token_id=None, pad_token_id=0)
    assert torch.equal(top1, greedy)


def test_beam_search_runs_on_the_poq_cache(tiny):
    model, _ = tiny
    ids = _ids(model.config.vocab_size, 5, seed=7)
    out = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.shape == (1, 11) and torch.equal(out[:, :5], ids)


# ----------------------------------------------------------------------------- loading and CLI


def test_new_cache_needs_a_wkvq_model():
    from transformers import LlamaForCausalLM

    with pytest.raises(ValueError, match="kv_quant"):
        new_cache(LlamaForCausalLM(tiny_config()))


def test_load_errors(tiny_rtn_artifact, tmp_path):
    with pytest.raises(ArtifactError, match="not a directory"):
        runtime.load(tiny_rtn_artifact / "wkvq.json")
    with pytest.raises(ValueError, match="Hub ids only"):
        runtime.load(tiny_rtn_artifact, revision="main")
    with pytest.raises(ValueError, match="device must be"):
        runtime.load(tiny_rtn_artifact, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            runtime.load(tiny_rtn_artifact, device="cuda")


def test_cli_generate_streams_the_greedy_completion(tiny_rtn_artifact):
    from cli import main

    model, tok = runtime.load(tiny_rtn_artifact, device="cpu")
    enc = tok("The quick brown fox", return_tensors="pt")
    ids = model.generate(**enc, max_new_tokens=12, do_sample=False)
    want = tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    res = CliRunner().invoke(main, ["generate", str(tiny_rtn_artifact), "The quick brown fox",
                                    "--max-new-tokens", "12", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == want.strip() and want.strip()
    res = CliRunner().invoke(main, ["generate", str(tiny_rtn_artifact), "x", "--temperature", "0.7", "--seed", "1",
                                    "--max-new-tokens", "4", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["generate", str(tiny_rtn_artifact), "x", "--chat", "--device", "cpu"])
    assert res.exit_code == 1 and "chat template" in res.output and len(res.output.strip().splitlines()) == 1
    res = CliRunner().invoke(main, ["generate", str(tiny_rtn_artifact), "x", "--temperature", "-1"])
    assert res.exit_code == 2


# ----------------------------------------------------------------------------- SmolLM2


def test_smollm2_end_to_end(smollm2_rtn_artifact):
    """The real model: INT4 weights and a 4-bit cache in memory, token-by-token cached decoding
    equals the decode-simulated attention, and a chat answer is right.

    The equality is checked in float64: in float32, rounding noise of ~1e-7 between a one-pass and
    an incremental computation flips a few 4-bit codes, and 30 layers amplify the flips (two one-pass
    implementations differ just as much); in float64 the same values quantize identically.
    """
    from runtime.model import prompt_inputs

    model, tok = runtime.load(smollm2_rtn_artifact, device="cpu")
    held, fp16 = decoder_weight_bytes(model)
    assert held / fp16 <= 0.30
    enc = prompt_inputs(tok, "What is the capital of France?", chat=True)
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])

    model.double()
    ids = tok("The Eiffel Tower is a wrought-iron lattice tower in Paris.", return_tensors="pt")["input_ids"][:, :6]
    cache = new_cache(model)
    got = cached_logits(model, ids, [1] * ids.shape[1], cache)  # token by token: what wkvq_sim simulates
    model.set_attn_implementation(runtime.attention.NAME)
    try:
        with torch.no_grad():
            sim = model(ids, use_cache=False).logits.float()
    finally:
        model.set_attn_implementation("sdpa")
    torch.testing.assert_close(got, sim, rtol=0, atol=1e-6)
    c = model.config
    fp16_cache = 2 * c.num_hidden_layers * c.num_key_value_heads * ids.shape[1] * c.head_dim * 2
    assert cache.nbytes / fp16_cache <= 0.32  # (32 B of codes + 4 B of stats) / 128 B per token and head


def test_decode_profile_timeline(capsys):
    """benchmarks/decode_profile.py's step timeline (pure, no GPU): the last of equal steps in start order, gaps
    against the latest end so far (idle when positive, PDL's early start when negative), per-name sums, and the
    one-layer window around the anchor's middle call."""
    from benchmarks import decode_profile as dp

    step = [("norm", 0.0, 2.0), ("gemv", 1.5, 10.0), ("attn", 12.0, 20.0), ("gemv", 21.0, 25.0), ("norm", 22.0, 24.0)]
    events = step + [(n, a + 100.0, b + 100.0) for n, a, b in step]
    rows = dp.step_timeline(events[::-1], 2)  # any order in
    assert [(r["name"], r["start"], r["dur"], r["gap"], r["adds"]) for r in rows] == [
        ("norm", 0.0, 2.0, 0.0, 2.0), ("gemv", 1.5, 8.5, -0.5, 8.0), ("attn", 12.0, 8.0, 2.0, 8.0),
        ("gemv", 21.0, 4.0, 1.0, 4.0), ("norm", 22.0, 2.0, -3.0, 0.0)]
    assert sum(r["adds"] for r in rows) + 3.0 == 25.0  # the span: what the kernels add plus the idle gaps
    summary = {o["name"]: o for o in dp.timeline_summary(rows)}
    assert summary["gemv"]["calls"] == 2 and summary["gemv"]["us"] == 12.5 and summary["gemv"]["adds"] == 12.0
    assert summary["norm"]["adds"] == 2.0 and summary["norm"]["overlap"] == 3.0
    assert summary["gemv"]["idle_before"] == 1.0 and summary["gemv"]["overlap"] == 0.5
    assert dp.timeline_summary(rows)[0]["name"] == "attn"  # most idle before it
    with pytest.raises(ValueError, match="do not split into 3 equal steps"):
        dp.step_timeline(events, 3)
    dp.print_timeline(rows, "attn", width=3)
    out = capsys.readouterr().out
    assert "span 25.0 us, idle 3.0 us" in out and out.rstrip().splitlines()[-1].split()[:4] == ["12.0", "8.0", "2.0",
                                                                                                "8.0"]


def test_decode_profile_layer_roles():
    """benchmarks/decode_profile.py's per-part sums: the projections by their order in the layer (qkv, o, gate_up,
    down, whatever their kernel), the attention, norms, SiLU and rope by name, the rest "other"; per layer."""
    from benchmarks import decode_profile as dp

    layer = [("_rmsnorm_kernel", 1.0), ("_w4_mma_kernel", 8.0), ("_attn_mma_kernel", 40.0), ("_w4_mma_kernel", 6.0),
             ("_rmsnorm_kernel", 1.0), ("_w4_splitk_kernel", 14.0), ("_silu_mul_kernel", 1.5), ("_w4_mma_kernel", 7.5)]
    rows = [{"name": n, "adds": a} for n, a in [("index_elementwise_kernel", 5.0)] + layer * 2 + [("nvjet", 66.0)]]
    roles = {o["role"]: o for o in dp.layer_roles(rows, 2)}
    assert list(roles) == ["norm", "qkv", "attention", "o", "gate_up", "silu", "down", "other"]
    assert roles["qkv"]["per_layer"] == 8.0 and roles["o"]["per_layer"] == 6.0 and roles["gate_up"]["calls"] == 2
    assert roles["down"]["adds"] == 15.0 and roles["norm"]["per_layer"] == 2.0 and roles["other"]["adds"] == 71.0
    assert dp.role_of("_rope_append_kernel", 0) == "rope" and dp.role_of("_attn_combine_kernel", 0) == "attention"


def test_decode_profile_compare(tmp_path, capsys):
    """``decode_profile.py --compare``: records of earlier runs side by side, what each part adds a layer recomputed
    from each record's timeline (records without the ``adds`` column too), the layer's sum, other and wall; the
    table's last column the last record's difference to the first. Without ``--json`` or ``--compare``: a one-line
    usage error."""
    import json
    import subprocess
    import sys

    from benchmarks import decode_profile as dp

    def record(o_dur):  # a 2-layer "tiny" step, back to back, then an lm_head
        kernels, t = [], 0.0
        for _ in range(2):
            for name, dur in (("_rmsnorm_kernel", 1.0), ("_w4_mma_kernel", 8.0), ("_attn_mma_kernel", 40.0),
                              ("_w4_mma_kernel", o_dur), ("_rmsnorm_kernel", 1.0), ("_w4_mma_kernel", 14.0),
                              ("_silu_mul_kernel", 1.5), ("_w4_mma_kernel", 7.5)):
                kernels.append({"name": name, "start": t, "dur": dur, "gap": 0.0})
                t += dur
        kernels.append({"name": "nvjet_lm_head", "start": t, "dur": 60.0, "gap": 0.0})
        return {"shape": "tiny", "wall_us": t + 70.0, "timeline": kernels}

    records = {"a/prof.json": record(6.0), "b/prof.json": record(4.0)}
    rows = dict(dp.compare(records))
    assert rows["o"] == [6.0, 4.0] and rows["attention"] == [40.0, 40.0] and rows["qkv"] == [8.0, 8.0]
    assert rows["gate_up"] == [14.0, 14.0] and rows["norm"] == [2.0, 2.0] and "rope" not in rows  # not in the steps
    assert rows["layer"] == [79.0, 77.0] and rows["other"] == [60.0, 60.0] and rows["wall"] == [228.0, 224.0]
    dp.print_compare(records)
    out = capsys.readouterr().out
    assert "a/prof.json" in out and "b/prof.json" in out
    assert [line.split()[-1] for line in out.splitlines() if line.split()[0] in ("o", "wall")] == ["-2.00", "-4.00"]
    for name, rec in records.items():
        (tmp_path / name.replace("/", "_")).write_text(json.dumps(rec))
    script = str(Path(dp.__file__))
    proc = subprocess.run([sys.executable, script, "--compare", *sorted(str(p) for p in tmp_path.glob("*.json"))],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "last - first" in proc.stdout
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "--json is required (or --compare RECORD ...)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_fp16_probe_compare(tmp_path, capsys):
    """``benchmarks/fp16_probe.py --compare``: the step's median first, then the kernels whose time a step differs
    most between the records (0 where a record lacks one), largest spread first, ``top`` of them; without a GPU
    the probe itself exits in one line."""
    import json
    import subprocess
    import sys

    from benchmarks import fp16_probe as fp

    fast = {"ms_per_token": 9.5, "kernels": [{"name": "gemv", "us": 6000.0, "calls": 224},
                                             {"name": "fmha_cutlassF", "us": 3000.0, "calls": 32}]}
    slow = {"ms_per_token": 10.4, "kernels": [{"name": "gemv", "us": 6050.0, "calls": 224},
                                              {"name": "flash_fwd_splitkv", "us": 3850.0, "calls": 32}]}
    records = {"fast.json": fast, "slow.json": slow}
    rows = fp.compare(records)
    assert rows[0] == ("step ms", [9.5, 10.4])
    assert rows[1:] == [("flash_fwd_splitkv", [0.0, 3850.0]), ("fmha_cutlassF", [3000.0, 0.0]),
                        ("gemv", [6000.0, 6050.0])]
    assert fp.compare(records, top=1)[1:] == [("flash_fwd_splitkv", [0.0, 3850.0])]
    fp.print_compare(records)
    assert "flash_fwd_splitkv" in capsys.readouterr().out
    for name, rec in records.items():
        (tmp_path / name).write_text(json.dumps(rec))
    script = str(Path(fp.__file__))
    proc = subprocess.run([sys.executable, script, "--compare", str(tmp_path / "fast.json"),
                           str(tmp_path / "slow.json")], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "fmha_cutlassF" in proc.stdout
    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, script, "--json", str(tmp_path / "x.json")], capture_output=True,
                              text=True, check=False)
        assert proc.returncode == 1 and proc.stderr.strip() == "fp16_probe: needs a CUDA device"
        assert not (tmp_path / "x.json").exists()


def test_inproc_probe_counts_the_fp16_baselines_bytes(monkeypatch):
    """``benchmarks/inproc_probe.py`` holds as many bytes beside the W4KV4 step as the fp16 baseline would: its
    count equals a built tiny model's parameters and its static cache's keys and values, filled (GQA: 2 KV heads)."""
    from transformers import StaticCache

    from benchmarks import inproc_probe
    from converter import bench_paths
    from converter.bench import llama_config

    monkeypatch.setattr(bench_paths, "DEV", "cpu")
    config = llama_config("tiny")
    model, cache = bench_paths.hf_prefilled(config, 1, 5, 3, torch.float16)
    assert isinstance(cache, StaticCache)
    kv = sum(t.numel() * t.element_size() for t in (*(lay.keys for lay in cache.layers),
                                                    *(lay.values for lay in cache.layers)))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert inproc_probe.fp16_bytes(config, 5 + 3 + 8) == params + kv


def test_stamps_buffers_and_summary(monkeypatch):
    """:mod:`runtime.kernels.stamps` on the host: ``WKVQ_STAMPS=1`` turns them on; a buffer per device and kind, kept
    and grown; the summary per point in µs after the earliest start, rows of programs that did not run (zeros) left
    out."""
    pytest.importorskip("triton")
    from runtime.kernels import stamps

    monkeypatch.delenv(stamps.STAMPS_ENV, raising=False)
    assert not stamps.enabled()
    monkeypatch.setenv(stamps.STAMPS_ENV, "1")
    assert stamps.enabled()
    a = stamps.buffer("cpu", "o", 4)
    assert a.shape == (4, 3) and a.dtype == torch.int64 and stamps.buffer("cpu", "o", 2) is a
    b = stamps.buffer("cpu", "o", 8)
    assert b.shape == (8, 3) and stamps.read("cpu", "o").shape == (8, 3) and stamps.read("cpu", "none") is None
    ns = torch.tensor([[1000, 3000, 9000], [2000, 5000, 7000], [0, 0, 0]])  # the third program did not run
    out = stamps.summary(ns, stamps.POINTS["o"])
    assert out["start"]["first"] == 0.0 and out["start"]["last"] == 1.0
    assert out["ready"]["p50"] == 3.0 and out["end"]["first"] == 6.0 and out["end"]["last"] == 8.0
    assert stamps.summary(ns, stamps.POINTS["o"], base=0)["end"]["last"] == 9.0
    assert stamps.summary(torch.zeros(2, 3, dtype=torch.int64), stamps.POINTS["o"]) == {}


def test_stamps_probe_layer_report(monkeypatch):
    """benchmarks/stamps_probe.py's report of one layer (pure, no GPU): the attention programs' rows split from the
    append programs' (the last split), each KV head's latest end ("heads done"), the output projection's points, all
    in µs after the first attention program started."""
    pytest.importorskip("triton")
    from tests.helpers import load_benchmark

    probe = load_benchmark("stamps_probe", monkeypatch)
    kv_rows, splits = 2, 2  # rows: kv_row + split * kv_rows; split 2: the append programs
    attn = torch.tensor([[1000, 2000, 9000, 10000], [1500, 2000, 8000, 12000],  # split 0, KV rows 0 and 1
                         [1200, 2000, 9500, 9600], [1100, 2000, 7000, 7100],  # split 1
                         [1300, 2000, 2500, 2500], [1300, 2000, 2600, 2600],  # the append programs
                         [0, 0, 0, 0]])  # a row of a larger buffer: left out
    o = torch.tensor([[1400, 10500, 13000], [1600, 12500, 14000]])
    rep = probe.layer_report(attn, o, kv_rows, splits)
    assert rep["attention"]["start"]["first"] == 0.0 and rep["attention"]["end"]["last"] == 11.0
    assert rep["append"]["end"]["last"] == 1.6 and rep["heads done"]["end"]["first"] == 9.0
    assert rep["heads done"]["end"]["last"] == 11.0 and rep["o"]["ready"]["first"] == 9.5
    assert rep["o"]["end"]["last"] == 13.0


def test_weight_layout(monkeypatch):
    """The fused weights' layout: group-major on CUDA with the kernels at group 128, row-major elsewhere;
    WKVQ_LAYOUT overrides, an unknown value is a one-line error."""
    from runtime.fast import weight_layout

    monkeypatch.delenv("WKVQ_LAYOUT", raising=False)
    assert weight_layout("cuda", True, 128) == "group"
    assert weight_layout("cuda", False, 128) == weight_layout("cuda", True, 64) == weight_layout("cpu", True, 128) == "row"
    monkeypatch.setenv("WKVQ_LAYOUT", "group")
    assert weight_layout("cpu", False, 64) == "group"
    monkeypatch.setenv("WKVQ_LAYOUT", "row")
    assert weight_layout("cuda", True, 128) == "row"
    monkeypatch.setenv("WKVQ_LAYOUT", "tiled")
    with pytest.raises(ValueError, match="WKVQ_LAYOUT='tiled': use one of row, group"):
        weight_layout("cuda", True, 128)


def test_quantlinear_reads_group_major_buffers():
    """A QuantLinear re-pointed to row slices of a group-major fused weight (as FastLlama.from_hf leaves the model's
    projections on CUDA) gives the same codes and outputs as with its own row-major buffers."""
    from runtime import quant
    from runtime.qlinear import QuantLinear

    w = torch.randn(24, 320)
    scale, zero = quant.weight_qparams(w, 4, 128)
    m = QuantLinear.from_codes(quant.quantize_weight(w, scale, zero, 4, 128), scale, zero, 4, 128)
    x = torch.randn(3, 320)
    ref, codes = m(x), m.codes()
    other = torch.zeros(8, m.qweight.shape[1], dtype=torch.uint8)
    fused = quant.group_major(torch.cat([other, m.qweight]), torch.cat([torch.ones(8, 3).half(), m.scales]),
                              torch.cat([torch.zeros(8, 3, dtype=torch.uint8), m.zeros]))
    m.qweight, m.scales, m.zeros = (t[8:] for t in fused)
    assert m.qweight.dim() == 3 and torch.equal(m.codes(), codes) and torch.equal(m(x), ref)


def test_pick_tokens():
    """Greedy at temperature 0; top_k 1 or a tiny top_p is greedy too; samples stay inside the top_k / top_p sets;
    bad arguments are one-line errors."""
    from runtime.fast import pick_tokens

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    best = logits.argmax(-1)
    assert torch.equal(pick_tokens(logits), best)
    assert torch.equal(pick_tokens(logits, 1.0, top_k=1, generator=g), best)
    assert torch.equal(pick_tokens(logits, 1.0, top_p=1e-6, generator=g), best)
    top3 = logits.topk(3, -1).indices
    for _ in range(20):
        tok = pick_tokens(logits, 2.0, top_k=3, generator=g)
        assert (top3 == tok[:, None]).any(-1).all()
    probs = logits.softmax(-1)
    sorted_p, order = probs.sort(-1, descending=True)
    keep = (sorted_p.cumsum(-1) - sorted_p) <= 0.5  # the nucleus of 0.5
    for _ in range(20):
        tok = pick_tokens(logits, 1.0, top_p=0.5, generator=g)
        rank = (order == tok[:, None]).float().argmax(-1)
        assert keep.gather(-1, rank[:, None]).all()
    for bad in ({"temperature": -1.0}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError, match="temperature must be"):
            pick_tokens(logits, **{"temperature": 1.0, **bad})


def test_fast_generate_matches_hf_greedy_and_stops_at_eos(tiny_rtn_artifact):
    """runtime.fast.generate (the static POQ cache; eager on CPU) decodes the same greedy tokens as the model's
    generate() with the dynamic POQ cache, streams them, and stops once every sequence produced an eos token (a
    finished sequence repeats it)."""
    from runtime.fast import FastLlama
    from runtime.fast import generate as fast_generate

    model, tok = runtime.load(tiny_rtn_artifact, device="cpu")
    ids = torch.cat([tok("The quick brown fox", return_tensors="pt")["input_ids"]] * 2)
    ids[1, -1] = (ids[1, -1] + 7) % 200 + 3  # a second, different prompt of the same length
    want = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
    fast = FastLlama.from_hf(model, ids.shape[1] + 8, use_kernels=False)
    seen = []
    got = fast_generate(fast, ids, 8, on_token=seen.append)
    assert torch.equal(got, want) and torch.equal(torch.stack(seen, 1), got)
    eos = int(want[0, 2])
    ends = [int((row == eos).nonzero()[0]) + 1 if (row == eos).any() else 8 for row in want]
    got = fast_generate(fast, ids, 8, eos_token_id=eos)
    assert got.shape[1] == max(ends)
    for row, ref, end in zip(got, want, ends):
        assert torch.equal(row[:end], ref[:end]) and (row[end:] == eos).all()


def test_cli_generate_fast_streams_the_same_completion(tiny_rtn_artifact):
    """`wkvq generate --fast` (runtime.fast; eager on CPU) streams the completion of the default path; with
    --no-poq it is a usage error."""
    from cli import main

    args = ["generate", str(tiny_rtn_artifact), "The quick brown fox", "--max-new-tokens", "10", "--device", "cpu"]
    slow = CliRunner().invoke(main, args)
    fast = CliRunner().invoke(main, [*args, "--fast"])
    assert slow.exit_code == 0 and fast.exit_code == 0, fast.output
    assert fast.output.strip() == slow.output.strip() and fast.output.strip()
    res = CliRunner().invoke(main, [*args, "--fast", "--temperature", "0.8", "--seed", "3"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, [*args, "--fast", "--no-poq"])
    assert res.exit_code == 2 and "--no-poq" in res.output


def test_fast_llama_takes_the_kernels_only_at_a_power_of_two_head_dim(tiny_rtn_artifact):
    """The attention kernels tile a head's channels (tl.arange): at the tiny model's head_dim 40 FastLlama runs
    without them where it chooses, and asking for them is a one-line error."""
    from runtime.fast import FastLlama

    model, _ = runtime.load(tiny_rtn_artifact, device="cpu")
    assert model.config.hidden_size // model.config.num_attention_heads == 40
    assert not FastLlama.from_hf(model, 16).use_kernels
    with pytest.raises(ValueError, match="power-of-two head_dim, this model has 40"):
        FastLlama.from_hf(model, 16, use_kernels=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph decode needs a GPU")
def test_fast_generate_on_cuda_matches_its_eager_steps_and_the_cli_runs(tmp_path):
    """On CUDA, runtime.fast.generate replays a captured CUDA graph each step: the same greedy tokens as the same
    model's eager decode steps (the kernels either way; head_dim 64), and `wkvq generate --fast --device cuda`
    exits 0 with a completion."""
    from cli import main
    from runtime.fast import FastLlama
    from runtime.fast import generate as fast_generate

    art = kernel_rtn_artifact(tmp_path, layers=2)
    model, tok = runtime.load(art, device="cuda")
    ids = tok("The quick brown fox", return_tensors="pt")["input_ids"].cuda()
    fast = FastLlama.from_hf(model, ids.shape[1] + 12)
    assert fast.use_kernels
    graph = fast_generate(fast, ids, 12)
    eager = fast_generate(fast, ids, 12, use_graph=False)
    assert graph.shape == (1, 12) and torch.equal(graph, eager)
    res = CliRunner().invoke(main, ["generate", str(art), "The quick brown fox", "--max-new-tokens", "12",
                                    "--device", "cuda", "--fast"])
    assert res.exit_code == 0 and res.output.strip(), res.output
