"""Decode-simulated attention: what token-by-token generation with a quantized cache sees.

Registered with transformers as ``"wkvq_sim"``. In one teacher-forced pass over ``T`` tokens,
query ``i`` attends to the *quantized* keys/values of tokens ``j < i`` and, with Past-Only
Quantization, to its *own* key/value in full precision (without POQ, to its own quantized
K/V too). Implemented exactly with one SDPA call over ``[K~ ; K]`` (2T keys) and a boolean mask
``[strictly-lower(T) | identity(T)]``. Layers without a ``kv_quant`` quantizer (full-precision
blocks during calibration) get plain causal attention.

Only for unpadded batches starting at position 0 (evaluation windows, calibration samples).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

NAME = "wkvq_sim"


def poq_mask(t: int, device) -> torch.Tensor:
    """``bool [T, 2T]``: query i sees quantized keys j < i and its own full-precision key."""
    idx = torch.arange(t, device=device)
    past = idx[None, :] < idx[:, None]
    own = idx[None, :] == idx[:, None]
    return torch.cat([past, own], dim=-1)


def simulated_attention(query, key, value, kv_quant, scaling: float) -> torch.Tensor:
    """``query [B, Hq, T, D]``, ``key/value [B, Hkv, T, D]`` -> ``[B, Hq, T, D]``.

    ``kv_quant``: a :class:`runtime.kvquant.KVQuantizer` or None (full precision).
    """
    t = query.shape[-2]
    gqa = query.shape[1] != key.shape[1]
    if kv_quant is None:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa)
    kq, vq = kv_quant.fake("k", key), kv_quant.fake("v", value)
    if not kv_quant.config.poq:
        return F.scaled_dot_product_attention(query, kq, vq, is_causal=True, scale=scaling, enable_gqa=gqa)
    keys = torch.cat([kq, key], dim=-2)
    values = torch.cat([vq, value], dim=-2)
    mask = poq_mask(t, query.device)
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=gqa)


def wkvq_sim_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers attention-interface adapter around :func:`simulated_attention`."""
    if key.shape[-2] != query.shape[-2]:
        raise ValueError(
            "decode-simulated attention runs one teacher-forced pass without a cache; "
            "call the model with use_cache=False"
        )
    kv_quant = module.get_submodule("kv_quant") if "kv_quant" in module._modules else None
    out = simulated_attention(query, key, value, kv_quant, scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, wkvq_sim_attention)
