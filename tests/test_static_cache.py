"""Static POQ cache and the eager FastLlama path against the dynamic cache and "wkvq_sim" (CPU)."""

from __future__ import annotations

import pytest
import torch

import runtime
from runtime.cache import CACHE_KWARG, new_cache
from runtime.fast import FastLlama
from runtime.kvquant import KVQuantizer
from runtime.static_cache import StaticPOQCache, poq_attention


@pytest.fixture(scope="module")
def tiny(tiny_rtn_artifact):
    model, _ = runtime.load(tiny_rtn_artifact, device="cpu")
    return model, FastLlama.from_hf(model, 64, use_kernels=False)


def _random_quantizer(h, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    kq = KVQuantizer(h, d)
    for name in ("k_scale", "v_scale"):
        getattr(kq, name).copy_(torch.rand(h, d, generator=g) + 0.5)
    for name in ("k_shift", "v_shift"):
        getattr(kq, name).copy_(torch.randn(h, d, generator=g))
    return kq


def test_write_read_equals_quantizer_roundtrip():
    kq = _random_quantizer(2, 40)
    cache = StaticPOQCache(1, 3, 16, 2, 40)
    k, v = torch.randn(3, 2, 5, 40), torch.randn(3, 2, 5, 40) * 3
    cache.write(0, kq, k, v, 4)
    rk, rv = cache.read(0, kq, 9, torch.float32)
    for which, x, r in (("k", k, rk), ("v", v, rv)):
        ref = kq.dequantize(which, *kq.quantize(which, x), torch.float32)
        assert torch.equal(r[:, :, 4:9], ref)
    assert cache.layers[0].k_step.dtype == torch.float16


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("past,new", [(0, 7), (0, 1), (5, 1), (5, 4)])
def test_poq_attention_against_softmax(heads, kv_heads, past, new):
    """Each branch of poq_attention (a prefill from nothing, one token, several after a past; MHA and GQA) against
    softmax attention written out: past slots all visible, the new tokens causal among themselves."""
    g = torch.Generator().manual_seed(past * 10 + new)
    d = 16
    q = torch.randn(2, heads, new, d, generator=g, dtype=torch.float64)
    k, v, pk, pv = (torch.randn(2, kv_heads, n, d, generator=g, dtype=torch.float64) for n in (new, new, past, past))
    rep = heads // kv_heads
    keys = torch.cat([pk, k], -2).repeat_interleave(rep, 1)
    values = torch.cat([pv, v], -2).repeat_interleave(rep, 1)
    scores = q @ keys.transpose(-1, -2) * d ** -0.5
    visible = torch.arange(past + new)[None, :] <= torch.arange(new)[:, None] + past
    ref = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ values
    out = poq_attention(q, k, v, pk, pv, d ** -0.5)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-12)


def test_overflow_is_refused():
    cache = StaticPOQCache(1, 1, 4, 1, 8)
    with pytest.raises(ValueError, match="overflows"):
        cache.write(0, KVQuantizer(1, 8), torch.zeros(1, 1, 5, 8), torch.zeros(1, 1, 5, 8), 0)
    cache.advance(4)
    with pytest.raises(ValueError, match="holds 4 tokens"):
        cache.advance(1)


def test_slots_padded_to_the_alignment_but_max_len_holds():
    """The buffers hold max_len rounded up to SLOT_ALIGN slots (aligned bulk copies per head), while writes and
    advances past max_len are still refused."""
    from runtime.static_cache import SLOT_ALIGN

    cache = StaticPOQCache(1, 2, 37, 3, 8)
    assert SLOT_ALIGN == 16 and cache.max_len == 37
    assert all(t.shape[2] == 48 for t in cache.layers[0].tensors())
    with pytest.raises(ValueError, match="overflows"):
        cache.write(0, KVQuantizer(3, 8), torch.zeros(2, 3, 38, 8), torch.zeros(2, 3, 38, 8), 0)
    assert StaticPOQCache(1, 1, 32, 1, 8).layers[0].k_codes.shape[2] == 32


def test_ready_flags_one_a_kv_heads_part():
    """The decode step's ready flags: one a KV head's part of its query heads (``query_parts``: the fewest parts of
    at most 4 query heads that divide them), at every layer and sequence; query heads that are no multiple of the
    KV heads are refused."""
    from runtime.kernels import MAX_QG, part_heads, query_parts

    assert [query_parts(qg) for qg in range(1, 13)] == [1, 1, 1, 1, 5, 2, 7, 2, 3, 5, 11, 3]
    assert [part_heads(qg) for qg in (1, 4, 6, 7, 8)] == [1, 4, 3, 1, 4]  # the heads a flag stands for
    assert all(qg % query_parts(qg) == 0 and qg // query_parts(qg) <= MAX_QG for qg in range(1, 65))
    with pytest.raises(ValueError, match="at least 1"):
        query_parts(0)
    assert StaticPOQCache(3, 2, 16, 8, 64).ready.shape == (3, 16)  # query heads default to the KV heads
    assert StaticPOQCache(3, 2, 16, 8, 64, query_heads=32).ready.shape == (3, 16)  # LLaMA-3-8B: 4 a program
    assert StaticPOQCache(3, 2, 16, 8, 64, query_heads=64).ready.shape == (3, 32)  # LLaMA-2-70B: 2 parts of 4
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        StaticPOQCache(1, 1, 16, 8, 64, query_heads=12)


def test_merge_group_levels():
    """The attention's fused combine: one merge level up to 64 rows (query heads a program x splits; 7B: 1 x 32),
    else groups of about the square root of the splits (LLaMA-3-8B and the 70B's parts: 4 x 64 in 8 groups of 8)
    where that divides them."""
    from runtime.kernels import merge_group

    assert [merge_group(h, s) for h, s in ((1, 32), (4, 16), (4, 64), (3, 64), (4, 32), (1, 128), (4, 44))] == [
        1, 1, 8, 8, 8, 16, 1]
    with pytest.raises(ValueError, match="at least 1"):
        merge_group(0, 8)


def test_token_by_token_equals_wkvq_sim(tiny):
    model, fast = tiny
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    model.set_attn_implementation("wkvq_sim")
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    model.set_attn_implementation("sdpa")
    cache = fast.new_cache(2, 16)
    got = torch.stack([fast.decode_step(ids[:, i], cache) for i in range(10)], dim=1)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert cache.length == 10 and int(cache.pos) == 10


def test_static_equals_dynamic_cache(tiny):
    model, fast = tiny
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(2))
    dyn = new_cache(model)
    static = fast.new_cache(2, 32)
    with torch.no_grad():
        ref = [model(ids[:, :6], use_cache=True, **{CACHE_KWARG: dyn}).logits[:, -1]]
        for i in range(6, 9):
            ref.append(model(ids[:, i:i + 1], use_cache=True, **{CACHE_KWARG: dyn}).logits[:, -1])
    got = [fast.forward(ids[:, :6], static)] + [fast.decode_step(ids[:, i], static) for i in range(6, 9)]
    torch.testing.assert_close(torch.stack(got), torch.stack(ref), atol=1e-4, rtol=1e-4)
    for layer, store in zip(dyn.layers, static.layers):
        assert torch.equal(layer.k.codes, store.k_codes[:, :, :9])
        assert torch.equal(layer.v.step, store.v_step[:, :, :9])
        assert torch.equal(layer.k.minimum, store.k_min[:, :, :9])


def test_bench_config_and_table():
    from converter.bench import BenchConfig, format_table

    with pytest.raises(ValueError, match="unknown shape"):
        BenchConfig(shapes=("65b",))
    assert BenchConfig(shapes=("8b", "70b")).shapes == ("8b", "70b")
    with pytest.raises(ValueError, match="unknown path"):
        BenchConfig(paths=("fp8",))
    result = {"device": "GPU", "copy_bandwidth_GBps": 4200.0, "date": "today", "rows": [
        {"shape": "7b", "path": "wkvq", "batch": 1, "prompt": 2048, "ms_per_token": 2.5, "queued_ms": 2.25,
         "peak_GB": 4.5, "bandwidth_fraction": 0.4, "status": "ok"},
        {"shape": "7b", "path": "fp16_eager", "batch": 8, "prompt": 32768, "status": "oom", "peak_GB": 140.0}]}
    lines = format_table(result).splitlines()
    assert "queued" in lines[1] and "2.500   2.250" in lines[2] and "0.40" in lines[2] and lines[3].endswith("oom")
    assert lines[3].split()[4:6] == ["-", "-"]  # no times in an oom row


def test_bench_fractions_and_speedups():
    """Each row's bytes over its waited-for and queued times as fractions of the copy rate; wkvq's speedup over
    fp16 compiled at each cell with both, by either time, beside the ratio of their bytes; printed under the table."""
    from converter.bench import bandwidth_fractions, format_table, speedups

    assert bandwidth_fractions({"bytes_per_step": 4e9, "ms_per_token": 2.0, "queued_ms": 1.0}, 4000.0) == {
        "bandwidth_fraction": 0.5, "queued_fraction": 1.0}
    assert bandwidth_fractions({"ms_per_token": 2.0}, 4000.0) == {}
    assert bandwidth_fractions({"bytes_per_step": 4e9, "status": "oom"}, 4000.0) == {}
    rows = [{"shape": "7b", "path": "wkvq", "batch": 1, "prompt": p, "ms_per_token": 2.0, "queued_ms": 1.9,
             "bytes_per_step": 8e9, "status": "ok"} for p in (2048, 32768)]
    rows += [{"shape": "7b", "path": "fp16_compiled", "batch": 1, "prompt": 32768, "ms_per_token": 9.0,
              "queued_ms": 7.6, "bytes_per_step": 30e9, "status": "ok"},
             {"shape": "7b", "path": "fp16_compiled", "batch": 1, "prompt": 2048, "status": "oom"},
             {"shape": "7b", "path": "int4_tinygemm", "batch": 1, "prompt": 32768, "ms_per_token": 4.0, "status": "ok"}]
    got = speedups({"rows": rows})
    assert len(got) == 1 and got[0]["prompt"] == 32768
    assert got[0]["speedup"] == pytest.approx(4.5) and got[0]["speedup_queued"] == pytest.approx(4.0)
    assert got[0]["bytes_ratio"] == pytest.approx(3.75)
    assert speedups({"rows": rows}, base="int4_tinygemm")[0] == {
        "shape": "7b", "batch": 1, "prompt": 32768, "path": "wkvq", "base": "int4_tinygemm", "speedup": 2.0}
    table = format_table({"device": "GPU", "copy_bandwidth_GBps": 4000.0, "date": "today", "rows": rows})
    assert table.splitlines()[-1] == "wkvq vs fp16_compiled at 7b b1 p32768: 4.50x, queued 4.00x; bytes ratio 3.75x"
    assert "   8.00" in table.splitlines()[2]  # GB a step


@pytest.mark.parametrize("tied", [False, True])
def test_bench_hf_bytes_per_step(monkeypatch, tied):
    """The bytes a transformers decode step must read: its parameters but the embedding table, the output head
    counted once even where tied to the embedding, and the keys and values of the context (GQA: 2 KV heads)."""
    from converter import bench_paths
    from converter.bench import llama_config

    monkeypatch.setattr(bench_paths, "DEV", "cpu")
    config = llama_config("tiny")
    config.tie_word_embeddings = tied
    model = bench_paths.random_hf(config, torch.float16)
    if tied:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    h, n, heads, kv, inter, vocab = 256, 2, 4, 2, 512, 1000
    layer = 2 * (h * h * 2 + 2 * h * (kv * h // heads) + 3 * h * inter + 2 * h)  # q o, k v, mlp, norms
    rotary = sum(b.numel() * b.element_size() for b in model.model.rotary_emb.buffers())  # inv_freq (1 or 2)
    assert 0 < rotary <= 2 * 4 * h // heads // 2
    weights = n * layer + 2 * h + 2 * vocab * h + rotary  # final norm, head
    kv_bytes = 2 * n * 3 * kv * (h // heads) * 100 * 2
    assert bench_paths.hf_bytes_per_step(model, 3, 100, 2) == weights + kv_bytes


def test_fast_llama_group_major_layout_matches_row_major(tiny_rtn_artifact, monkeypatch):
    """FastLlama.from_hf with the fused weights group-major (WKVQ_LAYOUT=group; the CUDA default) gives the same
    logits on the eager path as row-major; wrapping the same model again (its QuantLinears now views of the
    group-major weights) works in either layout, and the model's own forward still reads them."""
    model, _ = runtime.load(tiny_rtn_artifact, device="cpu")
    ids = torch.randint(3, 200, (2, 6))
    with torch.no_grad():
        ref_hf = model(ids).logits
    logits = {}
    for layout in ("group", "row", "group"):
        monkeypatch.setenv("WKVQ_LAYOUT", layout)
        fast = FastLlama.from_hf(model, 16, use_kernels=False)
        assert fast.layers[0].qkv.qweight.dim() == (3 if layout == "group" else 2)
        logits.setdefault(layout, []).append(fast.forward(ids, fast.new_cache(2, 16)))
    assert torch.allclose(logits["group"][0], logits["row"][0], atol=1e-5)
    assert torch.allclose(logits["group"][1], logits["row"][0], atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref_hf, atol=1e-5)


@pytest.mark.parametrize("static", [True, False])
def test_bench_hf_step_positions_made_on_the_device(monkeypatch, static):
    """The bench's transformers step with its positions made on the device beforehand (so steps can be queued)
    gives the same logits, step by step, as with each position made from a Python int (a wrong offset would move
    the rotary positions and the cache slots)."""
    from converter import bench_paths
    from converter.bench import llama_config

    monkeypatch.setattr(bench_paths, "DEV", "cpu")
    config = llama_config("tiny")
    runs = []
    for device_positions in (0, 7):
        torch.manual_seed(0)
        model, cache = bench_paths.hf_prefilled(config, 2, 9, 4, torch.float32, static=static)
        torch.manual_seed(1)
        step = bench_paths.hf_step(model, cache, 2, 9, config.vocab_size, False, device_positions=device_positions)
        runs.append([step().clone() for _ in range(3)])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(runs[0][0], runs[0][1])  # the steps move on


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA events: CUDA only")
def test_queued_steps_leave_the_host_time_out():
    """``queued_steps`` times the GPU's work a step where the host keeps ahead of it, ``median_steps`` each step
    waited for, host time included: a step of ~1 ms on the host before ~2-3 ms on the GPU takes the sum waited for
    and only the GPU's part queued (were each queued step waited for, as long as the median)."""
    import time

    from converter.bench_paths import median_steps, queued_steps

    cycles = 4_000_000  # ~2-3 ms at the SM clocks of current GPUs (1.4-2 GHz), longer than the host's 1 ms

    def step():
        time.sleep(1e-3)
        torch.cuda._sleep(cycles)

    waited, queued = median_steps(step, 10), queued_steps(step, 10)
    assert waited > queued + 0.6, (waited, queued)
    gpu_only = queued_steps(lambda: torch.cuda._sleep(cycles), 10)
    assert abs(queued - gpu_only) < 0.3 * gpu_only, (queued, gpu_only)
