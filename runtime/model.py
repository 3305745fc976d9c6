"""Build a transformers LLaMA from an artifact: packed INT4 Linears, KV quantizers, no fp16 copy."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from . import artifact
from .artifact import ArtifactError, DECODER_LINEARS, WEIGHTS_FILE
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


def kv_config(meta: dict, poq: bool = True) -> KVQuantConfig:
    kv = meta["kv_quant"]
    return KVQuantConfig(bits=kv["bits"], group_size=kv["group_size"], poq=poq)


def skeleton(config: LlamaConfig, meta: dict, poq: bool = True) -> LlamaForCausalLM:
    """A LLaMA on the meta device with QuantLinear decoder projections and KV quantizers."""
    wq = meta["weight_quant"]
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
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
    device = torch.device(device) if device is not None else default_device()
    dtype = parse_dtype(dtype) or (torch.float32 if device.type == "cpu" else _DTYPES[meta["dtype"]])
    config = LlamaConfig.from_pretrained(directory)
    model = skeleton(config, meta, poq)
    _load_state(model, directory / WEIGHTS_FILE, device, dtype)
    with torch.device(device):  # rotary buffers are not in the artifact: compute them here
        model.model.rotary_emb = LlamaRotaryEmbedding(config=config)
    model.eval()
    model.wkvq_metadata = meta
    tokenizer = AutoTokenizer.from_pretrained(directory)
    log.info("loaded %s (%s)", directory, summary_or_meta.line() if summary_or_meta else meta["method"])
    return model, tokenizer
