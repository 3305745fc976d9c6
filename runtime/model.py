"""Build a transformers LLaMA from an artifact: packed INT4 Linears, KV quantizers, no fp16 copy.

The model is a :class:`WkvqLlamaForCausalLM`: the usual ``LlamaForCausalLM`` module tree whose
``generate()`` uses the Past-Only Quantization cache (:mod:`runtime.cache`) unless told otherwise.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from . import artifact
from .artifact import ArtifactError, WEIGHTS_FILE
from .cache import CACHE_KWARG, new_cache
from .kvquant import KVQuantConfig, KVQuantizer
from .qlinear import QuantLinear

log = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(device) -> torch.device:
    """``None`` (cuda if available, else cpu), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a torch.device."""
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but no CUDA GPU is available; use cpu")
    return dev


class WkvqLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` whose ``generate()`` brings a fresh POQ cache when the caller gives none.

    No injection when the caller passes a cache, ``use_cache=False`` or a ``cache_implementation``
    (their choice wins).
    """

    def generate(self, *args, **kwargs):
        if _wants_default_cache(self, kwargs):
            kwargs[CACHE_KWARG] = new_cache(self)
        return super().generate(*args, **kwargs)


def _wants_default_cache(model, kwargs: dict) -> bool:
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        return False
    gen = kwargs.get("generation_config") or model.generation_config
    use_cache = kwargs.get("use_cache", getattr(gen, "use_cache", True))
    implementation = kwargs.get("cache_implementation", getattr(gen, "cache_implementation", None))
    return use_cache is not False and implementation is None


def kv_config(meta: dict, poq: bool = True) -> KVQuantConfig:
    kv = meta["kv_quant"]
    return KVQuantConfig(bits=kv["bits"], group_size=kv["group_size"], poq=poq)


def skeleton(config: LlamaConfig, meta: dict, poq: bool = True) -> WkvqLlamaForCausalLM:
    """A LLaMA on the meta device with QuantLinear decoder projections and KV quantizers."""
    wq = meta["weight_quant"]
    with torch.device("meta"):
        model = WkvqLlamaForCausalLM(config)
        for entry in meta["layers"]:
            layer = model.model.layers[entry["index"]]
            for name, spec in entry["linears"].items():
                parent, child = name.rsplit(".", 1)
                q = QuantLinear(spec["in_features"], spec["out_features"], wq["bits"], wq["group_size"],
                                bias=spec["bias"])
                layer.get_submodule(parent).register_module(child, q)
            kv = entry["kv"]
            layer.self_attn.register_module("kv_quant", KVQuantizer(kv["num_kv_heads"], kv["head_dim"],
                                                                    kv_config(meta, poq)))
    return model


def _load_state(model: torch.nn.Module, path: Path, device, dtype) -> None:
    """Assign every tensor the model needs from ``path``; integer and KV tensors keep their dtype."""
    expected = model.state_dict(keep_vars=False)
    state = {}
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        for name, ref in expected.items():
            if name == "lm_head.weight" and model.config.tie_word_embeddings:
                continue
            t = f.get_tensor(name)
            if t.shape != ref.shape:
                raise ArtifactError(f"tensor {name} has shape {list(t.shape)}, the model needs {list(ref.shape)}")
            floating_model_param = t.is_floating_point() and ".kv_quant." not in name and not name.endswith(".scales")
            state[name] = t.to(dtype) if floating_model_param else t
    model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_word_embeddings:
        model.tie_weights()


def build(directory: str | Path, device=None, dtype=None, poq: bool = True, verify: bool = True):
    """``(model, tokenizer)`` from a local artifact directory."""
    directory = Path(directory)
    summary_or_meta = artifact.verify(directory) if verify else None
    meta = artifact.read_metadata(directory)
    device = parse_device(device)
    dtype = parse_dtype(dtype) or (torch.float32 if device.type == "cpu" else _DTYPES[meta["dtype"]])
    config = LlamaConfig.from_pretrained(directory)
    model = skeleton(config, meta, poq)
    _load_state(model, directory / WEIGHTS_FILE, device, dtype)
    with torch.device(device):  # rotary buffers are not in the artifact: compute them here
        model.model.rotary_emb = LlamaRotaryEmbedding(config=config)
    model.eval()
    model.wkvq_metadata = meta
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    log.info("loaded %s (%s)", directory, summary_or_meta.line() if summary_or_meta else meta["method"])
    return model, tokenizer


def prompt_inputs(tokenizer, prompt: str, chat: bool = False, device=None) -> dict:
    """``input_ids`` and ``attention_mask [1, T]`` of ``prompt`` on ``device``; with ``chat``, the
    prompt is a user turn of the tokenizer's chat template followed by the assistant's header."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat formatting needs a tokenizer with a chat template; this tokenizer has none")
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    return {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}


def sampling_kwargs(temperature: float, max_new_tokens: int) -> dict:
    """``generate()`` arguments: greedy for ``temperature == 0``, else sampling at that temperature."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
    if temperature == 0:
        return {"do_sample": False, "max_new_tokens": max_new_tokens}
    return {"do_sample": True, "temperature": temperature, "max_new_tokens": max_new_tokens}
