"""Decode memory of fp16 vs W4KV4 on random models of real shapes (weights, KV cache, peak).

Batch 1, a prompt of ``--prompt`` tokens then ``--new`` generated tokens, through ``generate()``:
fp16 = transformers LlamaForCausalLM with its DynamicCache; W4KV4 = the runtime's model
(packed INT4 QuantLinear, fp16 embeddings/norms/lm_head) with its POQ 4-bit cache. Weight values
are random (memory does not depend on them). Prints a table and writes JSON::

    python benchmarks/decode_memory.py --shape llama2-7b --shape llama2-13b --json mem.json
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import click
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from runtime.artifact import DECODER_LINEARS
from runtime.model import skeleton

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4),
}
GB = 1e9


def config_for(shape: str) -> LlamaConfig:
    s = SHAPES[shape]
    return LlamaConfig(vocab_size=32000, num_key_value_heads=s["num_attention_heads"], max_position_embeddings=4096,
                       tie_word_embeddings=False, **s)


def w4kv4_meta(config: LlamaConfig) -> dict:
    """The metadata fields runtime.model.skeleton reads, for a W4 g128 / KV4 model of ``config``."""
    head_dim = config.hidden_size // config.num_attention_heads
    shapes = {"self_attn.q_proj": (config.hidden_size, config.hidden_size),
              "self_attn.k_proj": (config.hidden_size, config.hidden_size),
              "self_attn.v_proj": (config.hidden_size, config.hidden_size),
              "self_attn.o_proj": (config.hidden_size, config.hidden_size),
              "mlp.gate_proj": (config.hidden_size, config.intermediate_size),
              "mlp.up_proj": (config.hidden_size, config.intermediate_size),
              "mlp.down_proj": (config.intermediate_size, config.hidden_size)}
    linears = {n: {"in_features": shapes[n][0], "out_features": shapes[n][1], "bias": False} for n in DECODER_LINEARS}
    return {"weight_quant": {"bits": 4, "group_size": 128}, "kv_quant": {"bits": 4, "group_size": head_dim},
            "layers": [{"index": i, "linears": linears, "kv": {"num_kv_heads": config.num_key_value_heads,
                                                             "head_dim": head_dim}}
                       for i in range(config.num_hidden_layers)]}


@torch.no_grad()
def random_fill(model: torch.nn.Module) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.dtype == torch.uint8:
            t.random_(0, 256) if name.endswith("qweight") else t.fill_(8)
        elif name.endswith(("k_scale", "v_scale")) or "norm" in name:
            t.fill_(1.0)
        elif name.endswith(("k_shift", "v_shift")):
            t.zero_()
        elif name.endswith(".scales"):
            t.fill_(0.002)
        elif t.is_floating_point():
            t.normal_(0, 0.02)


def build(kind: str, config: LlamaConfig, device) -> torch.nn.Module:
    if kind == "fp16":
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
    else:
        model = skeleton(config, w4kv4_meta(config))
    model = model.to_empty(device=device)
    for m in model.modules():  # fp16 everywhere except the packed integer / KV-quantizer buffers
        for n, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if t.is_floating_point() and not n.endswith(("scale", "shift", "scales")):
                t.data = t.data.half()
    random_fill(model)
    with torch.device(device):
        model.model.rotary_emb = LlamaRotaryEmbedding(config=config)
    return model.eval()


def cache_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):  # the runtime's PoqCache
        return cache.nbytes
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def measure(kind: str, shape: str, prompt: int, new: int, device) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    model = build(kind, config_for(shape), device)
    weights = torch.cuda.memory_allocated(device) - base
    torch.cuda.reset_peak_memory_stats(device)
    ids = torch.randint(0, 32000, (1, prompt), device=device)
    extra = {"past_key_values": DynamicCache(config=model.config)} if kind == "fp16" else {}  # w4kv4: POQ default
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, return_dict_in_generate=True, pad_token_id=0, **extra)
    kv = cache_bytes(out.past_key_values)
    peak = torch.cuda.max_memory_allocated(device) - base
    del model, out
    return {"shape": shape, "kind": kind, "prompt": prompt, "new_tokens": new, "weights_GB": weights / GB,
            "kv_cache_GB": kv / GB, "peak_GB": peak / GB}


@click.command()
@click.option("--shape", "shapes", multiple=True, type=click.Choice(list(SHAPES)), default=("llama2-7b", "llama2-13b"))
@click.option("--prompt", type=int, default=2048, show_default=True)
@click.option("--new", type=int, default=8, show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def main(shapes, prompt, new, json_path):
    if not torch.cuda.is_available():
        raise click.UsageError("decode_memory.py measures CUDA memory; run it on a GPU machine")
    device = torch.device("cuda")
    rows = [measure(kind, s, prompt, new, device) for s in shapes for kind in ("fp16", "w4kv4")]
    click.echo(f"| shape | path | weights GB | KV cache GB (len {prompt + new}) | peak GB |")
    click.echo("|---|---|---|---|---|")
    for r in rows:
        click.echo(f"| {r['shape']} | {r['kind']} | {r['weights_GB']:.2f} | {r['kv_cache_GB']:.3f} | {r['peak_GB']:.2f} |")
    if json_path:
        json_path.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
