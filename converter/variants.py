"""In-memory quantized variants of a full-precision LLaMA for the comparison table.

Built from the dense model without writing an artifact, with the same pieces an artifact loads
into: weights through :func:`converter.export.linear_tensors` into :class:`runtime.qlinear.QuantLinear`
(so a variant's W4 weights are bit-identical to an RTN artifact's), the KV cache through
:class:`runtime.kvquant.KVQuantizer` with ``s = 1, delta = 0`` (RTN). The W4A4 contrast wraps every
decoder Linear so its input is fake-quantized per token.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from runtime import quant
from runtime.artifact import DECODER_LINEARS
from runtime.kvquant import KVQuantConfig, KVQuantizer
from runtime.qlinear import QuantLinear

from .export import WeightQuantConfig, linear_tensors


@dataclass(frozen=True)
class VariantConfig:
    """Which parts of the model are quantized: weights (``None``: full precision), KV cache, activations."""

    weight: WeightQuantConfig | None = None
    kv: KVQuantConfig | None = None
    act_bits: int | None = None

    def __post_init__(self):
        if self.act_bits is not None:
            quant.check_bits(self.act_bits)

    def describe(self) -> str:
        parts = []
        if self.weight is not None:
            parts.append(f"W{self.weight.bits} g{self.weight.group_size} RTN (min-max)")
        if self.act_bits is not None:
            parts.append(f"A{self.act_bits} per-token asymmetric on every decoder Linear input")
        if self.kv is not None:
            poq = "POQ" if self.kv.poq else "no POQ"
            parts.append(f"KV{self.kv.bits} per-token RTN (s=1, delta=0), {poq}")
        return "; ".join(parts) or "full precision"


def quant_linear(linear: nn.Linear, cfg: WeightQuantConfig) -> QuantLinear:
    """A :class:`QuantLinear` holding exactly the codes/scales/zeros an RTN artifact stores for ``linear``."""
    t = linear_tensors("w", linear.weight, cfg)
    w = linear.weight
    q = QuantLinear(linear.in_features, linear.out_features, cfg.bits, cfg.group_size,
                    bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    q.qweight.copy_(t["w.qweight"])
    q.scales.copy_(t["w.scales"])
    q.zeros.copy_(t["w.zeros"])
    if linear.bias is not None:
        q.bias.copy_(linear.bias.detach())
    return q


def fake_quantize_tokens(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token asymmetric quantize-dequantize of ``x [..., D]`` (one group of ``D`` channels).

    The token-wise KV primitive with ``s = 1, delta = 0`` is exactly per-token activation
    quantization, so it is reused rather than re-implemented.
    """
    d = x.shape[-1]
    ones = torch.ones(1, d, device=x.device)
    zeros = torch.zeros(1, d, device=x.device)
    y = quant.kv_fake_quantize(x.reshape(1, 1, -1, d), ones, zeros, bits, d)
    return y.reshape(x.shape)


class ActQuantLinear(nn.Module):
    """``linear(fake_quantize_tokens(x))``: a Linear whose input is quantized per token (W4A4 contrast)."""

    def __init__(self, linear: nn.Module, bits: int):
        super().__init__()
        self.linear = linear
        self.bits = quant.check_bits(bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(fake_quantize_tokens(x, self.bits))

    def extra_repr(self) -> str:
        return f"act_bits={self.bits}"


def _replace(layer: nn.Module, name: str, module: nn.Module) -> None:
    parent, child = name.rsplit(".", 1)
    layer.get_submodule(parent).register_module(child, module)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def build_variant(base: nn.Module, cfg: VariantConfig) -> nn.Module:
    """A quantized copy of the dense LLaMA ``base`` (left unchanged), on ``base``'s device and dtype."""
    model = copy.deepcopy(base)
    config = model.config
    device = next(model.parameters()).device
    for layer in model.model.layers:
        for name in DECODER_LINEARS:
            lin = layer.get_submodule(name)
            if cfg.weight is not None:
                lin = quant_linear(lin, cfg.weight)
            if cfg.act_bits is not None:
                lin = ActQuantLinear(lin, cfg.act_bits)
            _replace(layer, name, lin)
        if cfg.kv is not None:
            kvq = KVQuantizer(config.num_key_value_heads, _head_dim(config), cfg.kv, device=device)
            layer.self_attn.register_module("kv_quant", kvq)
    return model.eval()


def dense_linear(q: QuantLinear, dtype: torch.dtype) -> nn.Linear:
    """An ``nn.Linear`` holding ``q``'s dequantized weight: the same ``F.linear`` as ``q.forward``
    computes, without unpacking the codes at every call (token-by-token decoding calls it T times)."""
    lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=q.qweight.device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(q.dequantized_weight(dtype))
        if q.bias is not None:
            lin.bias.copy_(q.bias.to(dtype))
    return lin


def materialize_weights(model: nn.Module) -> nn.Module:
    """Replace every :class:`QuantLinear` of ``model`` (in place) by :func:`dense_linear` in the model dtype."""
    dtype = model.dtype
    for layer in model.model.layers:
        for name in DECODER_LINEARS:
            q = layer.get_submodule(name)
            if isinstance(q, QuantLinear):
                _replace(layer, name, dense_linear(q, dtype))
    return model
