"""The decode paths timed by :mod:`converter.bench`, each ``runner(config, batch, prompt, steps) -> dict``."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from runtime import quant
from runtime.fast import (
    DecodeGraph,
    FastConfig,
    FastLayer,
    FastLlama,
    W4Weight,
    weight_layout,
)
from runtime.kvquant import KVQuantizer

DEV = "cuda"


@contextlib.contextmanager
def _default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# ----------------------------------------------------------------------------- wkvq


def random_w4(out_f: int, in_f: int, group: int = 128) -> W4Weight:
    """A random packed weight in the layout ``FastLlama.from_hf`` gives the fused weights on CUDA
    (:func:`runtime.fast.weight_layout`, ``WKVQ_LAYOUT``)."""
    g = -(-in_f // group)
    parts = (torch.randint(0, 256, (out_f, (in_f + 1) // 2), dtype=torch.uint8, device=DEV),
             (torch.rand(out_f, g, device=DEV) * 2e-3 + 1e-3).half(),
             torch.randint(0, 16, (out_f, g), dtype=torch.uint8, device=DEV))
    if weight_layout(DEV, True, group) == "group":
        parts = quant.group_major(*parts, group)
    return W4Weight(*parts, in_f, group)


def random_fast_llama(config, max_positions: int) -> FastLlama:
    h, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    d, inter = h // heads, config.intermediate_size
    fc = FastConfig(h, heads, kv, d, config.num_hidden_layers, config.rms_norm_eps)
    layers = []
    for _ in range(config.num_hidden_layers):
        kq = KVQuantizer(kv, d, device=DEV)
        kq.k_scale.uniform_(0.5, 1.5), kq.v_scale.uniform_(0.5, 1.5), kq.k_shift.normal_(), kq.v_shift.normal_()
        layers.append(FastLayer(torch.ones(h, dtype=torch.float16, device=DEV),
                                torch.ones(h, dtype=torch.float16, device=DEV),
                                random_w4((heads + 2 * kv) * d, h), random_w4(h, heads * d), random_w4(2 * inter, h),
                                random_w4(h, inter), kq))
    embed = torch.randn(config.vocab_size, h, dtype=torch.float16, device=DEV) * 0.02
    pos = torch.arange(max_positions, device=DEV, dtype=torch.float32)[:, None]
    inv = 10000.0 ** (-torch.arange(0, d, 2, device=DEV, dtype=torch.float32) / d)
    freqs = torch.cat([pos * inv, pos * inv], dim=-1)
    return FastLlama(fc, embed, layers, torch.ones(h, dtype=torch.float16, device=DEV),
                     torch.randn(config.vocab_size, h, dtype=torch.float16, device=DEV) * 0.02,
                     freqs.cos(), freqs.sin(), use_kernels=True)


def _fill_random(cache, length: int) -> None:
    for store in cache.layers:
        for t in store.tensors():
            if t.dtype == torch.uint8:
                t.random_(0, 256)
            else:
                t.uniform_(0.01, 0.1)
    cache.length = length
    cache.pos.fill_(length)


def _weight_bytes(model: FastLlama) -> int:
    n = model.lm_head.numel() * 2
    for layer in model.layers:
        for w in (layer.qkv, layer.o, layer.gate_up, layer.down):
            n += sum(t.numel() * t.element_size() for t in (w.qweight, w.scales, w.zeros))
    return n


def wkvq_decode_graph(config, batch: int, prompt: int, steps: int, projections: str = "gemv"):
    """``(model, cache, graph, ids)``: a random W4KV4 model of ``config`` on ``projections``, its cache filled with
    ``prompt`` random tokens and room for ``steps`` more (+ 8), the decode step captured, random token ids."""
    max_len = prompt + steps + 8
    model = random_fast_llama(config, max_len).with_projections(projections)
    cache = model.new_cache(batch, max_len)
    _fill_random(cache, prompt)
    graph = DecodeGraph(model, cache)
    return model, cache, graph, torch.randint(0, config.vocab_size, (batch,), device=DEV)


def run_wkvq(config, batch: int, prompt: int, steps: int, projections: str = "gemv") -> dict:
    """The W4KV4 decode step on ``projections`` (default "gemv": the tensor-core GEMV up to 8 rows, as
    ``FastLlama.from_hf`` chooses on CUDA)."""
    model, cache, graph, ids = wkvq_decode_graph(config, batch, prompt, 2 * steps, projections)
    start = cache.length
    times = step_times(lambda: graph.step(ids), steps)
    kv_bytes = cache.nbytes() * (start + steps // 2) // cache.max_len
    return {**times, "bytes_per_step": _weight_bytes(model) + kv_bytes,
            "weights_GB": _weight_bytes(model) / 1e9, "cache_GB": cache.nbytes() / 1e9}


def run_wkvq_gemlite(config, batch: int, prompt: int, steps: int) -> dict:
    """``wkvq`` with the projections on GemLite (optional package; runtime.kernels.gemlite_backend)."""
    return run_wkvq(config, batch, prompt, steps, projections="gemlite")


def run_wkvq_gemv(config, batch: int, prompt: int, steps: int) -> dict:
    """``wkvq`` under its name of the seventh to eleventh sessions (the "gemv" projections, now the default)."""
    return run_wkvq(config, batch, prompt, steps, projections="gemv")


def run_wkvq_splitk(config, batch: int, prompt: int, steps: int) -> dict:
    """``wkvq`` with the split-K ``tl.dot`` projections (runtime.kernels.w4; ``wkvq`` until the eleventh session)."""
    return run_wkvq(config, batch, prompt, steps, projections="triton")


def median_steps(fn, steps: int) -> float:
    """The median ms of ``steps`` calls of ``fn`` (a decode step) after one untimed call."""
    from .bench import _time_ms

    fn()
    return _time_ms(fn, steps)


def queued_steps(fn, steps: int) -> float:
    """The mean ms of ``steps`` calls of ``fn`` queued back to back, one wait at the end (after one untimed call):
    the GPU's time a step where the host keeps ahead of it, against :func:`median_steps`, which waits for every
    step and so also counts the host's time before the step's first kernel."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / steps


def step_times(fn, steps: int) -> dict:
    """``ms_per_token`` (:func:`median_steps`, each step waited for) then ``queued_ms`` (:func:`queued_steps`) of
    ``fn``: the two times the bench gives every path, ``2 * (steps + 1)`` calls in all."""
    return {"ms_per_token": median_steps(fn, steps), "queued_ms": queued_steps(fn, steps)}


# ----------------------------------------------------------------------------- transformers baselines


class TinyGemmLinear(nn.Module):
    """int4 g128 weight-only Linear through ``aten._weight_int4pack_mm`` (random weights, bf16)."""

    def __init__(self, in_features: int, out_features: int, group: int = 128, inner_k_tiles: int = 8):
        super().__init__()
        self.in_features, self.out_features, self.group, self.tiles = in_features, out_features, group, inner_k_tiles

    def materialize(self) -> None:
        packed = torch.randint(0, 256, (self.out_features, self.in_features // 2), dtype=torch.uint8, device=DEV)
        self.register_buffer("w", torch.ops.aten._convert_weight_to_int4pack(packed, self.tiles))
        sz = torch.rand(self.in_features // self.group, self.out_features, 2, device=DEV) * 2e-3
        self.register_buffer("sz", sz.to(torch.bfloat16))

    def forward(self, x):
        y = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, x.shape[-1]), self.w, self.group, self.sz)
        return y.reshape(*x.shape[:-1], self.out_features)


def random_hf(config, dtype, int4: bool = False):
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with _default_dtype(dtype), torch.device("meta"):
        model = LlamaForCausalLM(config)
        if int4:
            for layer in model.model.layers:
                for parent in (layer.self_attn, layer.mlp):
                    for name, child in list(parent.named_children()):
                        if isinstance(child, nn.Linear):
                            setattr(parent, name, TinyGemmLinear(child.in_features, child.out_features))
    model = model.to_empty(device=DEV)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    for m in model.modules():
        if isinstance(m, TinyGemmLinear):
            m.materialize()
    with torch.device(DEV):  # its buffers, left empty by to_empty; transformers 5.2x takes no device argument
        model.model.rotary_emb = LlamaRotaryEmbedding(config=config)
    return model.eval()


def _prefill(model, cache, batch, prompt, vocab):
    from runtime.cache import CACHE_KWARG

    ids = torch.randint(0, vocab, (batch, prompt), device=DEV)
    with torch.no_grad():
        for s in range(0, prompt, 4096):  # chunks bound the activation memory of long prompts
            model(ids[:, s:s + 4096], use_cache=True, logits_to_keep=1, **{CACHE_KWARG: cache})


def warmup_calls(compiled: bool) -> int:
    """The calls :func:`hf_step` makes before it returns (compiled: compile, record the CUDA graph, replay it)."""
    return 3 if compiled else 1


def hf_step(model, cache, batch, prompt, vocab, compiled: bool, device_positions: int = 0):
    """A decode step of the transformers ``model`` on ``cache`` (filled to ``prompt`` tokens) that returns the
    logits, each call one position further; ``compiled``: through ``torch.compile(mode="reduce-overhead")``, warmed
    up (compiled and its CUDA graph recorded) before it is returned. Each call makes its position from a Python
    int (a host-to-device copy, which waits for the stream: the bench's step), or with ``device_positions`` > 0
    takes it from that many positions made on the device beforehand (no wait: steps can be queued back to back)."""
    from runtime.cache import CACHE_KWARG

    fwd = torch.compile(model, mode="reduce-overhead", fullgraph=True) if compiled else model
    tok = torch.randint(0, vocab, (batch, 1), device=DEV)
    state = {"pos": prompt}
    made = torch.arange(prompt, prompt + device_positions, device=DEV)

    def step():
        i = state["pos"]
        pos = made[i - prompt:i - prompt + 1] if device_positions else torch.tensor([i], device=DEV)
        with torch.no_grad():
            out = fwd(tok, use_cache=True, cache_position=pos, position_ids=pos[None].expand(batch, 1),
                      **{CACHE_KWARG: cache})
        state["pos"] += 1
        return out.logits

    for _ in range(warmup_calls(compiled)):
        step()
    return step


def hf_prefilled(config, batch, prompt, steps, dtype, int4=False, static=True):
    """A random transformers model of ``config`` in ``dtype`` (``int4``: tinygemm projections) and its cache
    (``static``: a StaticCache with room for ``steps`` more tokens and a few of warm-up; else a DynamicCache),
    prefilled with ``prompt`` random tokens at ``batch``."""
    from transformers import DynamicCache, StaticCache

    model = random_hf(config, dtype, int4)
    n = steps + 8
    cache = StaticCache(config=config, max_cache_len=prompt + n) if static else DynamicCache(config=config)
    _prefill(model, cache, batch, prompt, config.vocab_size)
    return model, cache


def hf_stepper(config, batch, prompt, steps, dtype, int4=False, static=True):
    """``(model, cache, step)``: :func:`hf_prefilled` with room for ``steps`` calls of its :func:`hf_step`
    (compiled where ``static``, the positions made on the device)."""
    model, cache = hf_prefilled(config, batch, prompt, steps, dtype, int4, static)
    return model, cache, hf_step(model, cache, batch, prompt, config.vocab_size, static, device_positions=steps + 8)


def hf_bytes_per_step(model, batch: int, context: int, kv_element_size: int) -> int:
    """The bytes a decode step of the transformers ``model`` must read at ``context`` cached tokens: every parameter
    and buffer but the embedding table (a step reads one row of it), the output head counted even where it is tied
    to the embedding, and the keys and values of ``context`` tokens at ``kv_element_size`` bytes. A lower bound on
    what it reads: a StaticCache's attention also reads its empty slots (the bench's ~2 × steps + 8 beyond the
    prompt), and activations are left out, as in ``wkvq``'s count."""
    head = model.get_output_embeddings().weight
    seen = {model.get_input_embeddings().weight.data_ptr(), head.data_ptr()}
    n = head.numel() * head.element_size()
    for t in (*model.parameters(), *model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    return n + hf_kv_bytes(model.config, batch, context, kv_element_size)


def hf_kv_bytes(config, batch: int, tokens: int, element_size: int) -> int:
    """The bytes of the keys and values of ``tokens`` tokens at ``batch`` in a transformers cache of ``config``."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * batch * config.num_key_value_heads * head_dim * tokens * element_size


def _run_hf(config, batch, prompt, steps, dtype, int4=False, static=True):
    """The median step (each waited for: what a loop that reads every token sees, the host's time before the
    step's first kernel included), the queued one (:func:`queued_steps`: the GPU's time a step) and the bytes a
    step reads (:func:`hf_bytes_per_step`, at the context in the middle of the timed steps)."""
    model, _, step = hf_stepper(config, batch, prompt, 2 * steps, dtype, int4, static)
    out = step_times(step, steps)
    # the context in the middle of median_steps' timed steps: after hf_step's warm-up and median_steps' untimed call
    context = prompt + warmup_calls(static) + 1 + steps // 2
    out["bytes_per_step"] = hf_bytes_per_step(model, batch, context, torch.finfo(dtype).bits // 8)
    return out


def run_fp16_eager(config, batch, prompt, steps):
    return _run_hf(config, batch, prompt, min(steps, 5), torch.float16, static=False)


def run_fp16_compiled(config, batch, prompt, steps):
    return _run_hf(config, batch, prompt, steps, torch.float16)


def run_int4_tinygemm(config, batch, prompt, steps):
    return _run_hf(config, batch, prompt, steps, torch.bfloat16, int4=True)


RUNNERS = {"fp16_eager": run_fp16_eager, "fp16_compiled": run_fp16_compiled, "int4_tinygemm": run_int4_tinygemm,
           "wkvq": run_wkvq, "wkvq-gemlite": run_wkvq_gemlite, "wkvq-gemv": run_wkvq_gemv,
           "wkvq-splitk": run_wkvq_splitk}
