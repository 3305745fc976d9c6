"""A preallocated (static-shape) Past-Only-Quantization KV cache.

Every layer owns fixed buffers for ``max_len`` tokens (:class:`LayerStore`): packed per-token codes
(:func:`runtime.quant.pack`), ``step`` and ``minimum`` per token and group in float16, in the smoothed space of
the layer's :class:`runtime.kvquant.KVQuantizer` (``x~ = (x - delta) / s``). A forward over ``T``
new tokens attends to the *quantized* past (slots ``< start``) and to the new tokens in *full
precision* (causally among themselves), then stores the new tokens quantized: the same semantics as
the dynamic cache, and, fed one token at a time, as the one-pass ``"wkvq_sim"`` attention.
Nothing is concatenated or re-quantized per step, so a decode step has static shapes and can be
captured in a CUDA graph. This module is the eager reference; :mod:`runtime.kernels.kv4` reads and
writes the same buffers on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import kernels, quant
from .kernels import query_parts
from .kvquant import STATS_DTYPE

# buffers hold max_len rounded up to this many slots: every head's rows start 16-byte aligned in the stats, as the
# bulk copies of runtime.kernels.kv4_mma need (at most 15 unused slots a head)
SLOT_ALIGN = 16


@dataclass
class LayerStore:
    """One layer's buffers. ``codes uint8 [B, Hkv, S, packed(D)]``, ``step/min float16 [B, Hkv, S, G]``."""

    k_codes: torch.Tensor
    k_step: torch.Tensor
    k_min: torch.Tensor
    v_codes: torch.Tensor
    v_step: torch.Tensor
    v_min: torch.Tensor

    @classmethod
    def empty(cls, batch: int, kv_heads: int, max_len: int, head_dim: int, groups: int, bits: int,
              device=None) -> LayerStore:
        codes = (batch, kv_heads, max_len, quant.packed_length(head_dim, bits))
        params = (batch, kv_heads, max_len, groups)
        u8, f16 = dict(dtype=torch.uint8, device=device), dict(dtype=STATS_DTYPE, device=device)
        return cls(torch.zeros(codes, **u8), torch.zeros(params, **f16), torch.zeros(params, **f16),
                   torch.zeros(codes, **u8), torch.zeros(params, **f16), torch.zeros(params, **f16))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.k_codes, self.k_step, self.k_min, self.v_codes, self.v_step, self.v_min)


class StaticPOQCache:
    """Fixed buffers for ``num_layers`` layers, ``batch`` sequences of equal length, ``max_len`` tokens (the
    buffers' slot count rounded up to :data:`SLOT_ALIGN`).

    ``length`` (Python int) and ``pos`` (``int32 [1]`` on the device, for graph-captured steps) count
    the tokens stored so far. ``step`` (``int32 [1]``, next to ``pos``, so that one kernel advances both) counts the
    decode steps run on the cache from 1 and is never set back (a CUDA graph's warm-up restores ``pos`` only): the
    epoch of the per-layer ``ready`` flags (``int32 [layers, batch * kv_heads * parts]``, ``parts`` the
    :func:`runtime.kernels.query_parts` of ``query_heads / kv_heads``, ``query_heads`` defaulting to ``kv_heads``)
    with which a decode step's attention tells the output projection which heads are done
    (:func:`runtime.kernels.kv4.rope_attention`: one flag a KV head's part of its query heads).
    """

    def __init__(self, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
                 kv_group_size: int | None = None, bits: int = 4, device=None, query_heads: int | None = None):
        group = kv_group_size or head_dim
        if head_dim % group:
            raise ValueError(f"KV group size {group} must divide head_dim {head_dim}")
        if max_len <= 0 or batch <= 0:
            raise ValueError(f"batch and max_len must be positive, got batch={batch}, max_len={max_len}")
        self.bits, self.head_dim, self.group_size, self.max_len = quant.check_bits(bits), head_dim, group, max_len
        slots = -(-max_len // SLOT_ALIGN) * SLOT_ALIGN
        self.layers = [LayerStore.empty(batch, kv_heads, slots, head_dim, head_dim // group, bits, device)
                       for _ in range(num_layers)]
        self.counters = torch.tensor([0, 1], dtype=torch.int32, device=device)  # pos, step
        self.pos, self.step = self.counters[:1], self.counters[1:]
        if query_heads is not None and (query_heads < kv_heads or query_heads % kv_heads):
            raise ValueError(f"query heads ({query_heads}) must be a multiple of the KV heads ({kv_heads})")
        parts = query_parts((query_heads or kv_heads) // kv_heads)
        self.ready = torch.zeros(num_layers, batch * kv_heads * parts, dtype=torch.int32, device=device)
        self.length = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for store in self.layers for t in store.tensors())

    def advance(self, n: int) -> None:
        """Mark ``n`` more tokens as stored (after every layer wrote them)."""
        if self.length + n > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} tokens; {self.length} stored, {n} more asked")
        self.length += n
        self.pos.add_(n)

    def write(self, layer: int, kv_quant, key: torch.Tensor, value: torch.Tensor, start: int) -> None:
        """Quantize ``key, value [B, Hkv, T, D]`` into slots ``start .. start + T``."""
        t = key.shape[-2]
        if start + t > self.max_len:
            raise ValueError(f"writing {t} tokens at {start} overflows the cache of {self.max_len}")
        store = self.layers[layer]
        if t > 1 and kernels.available(key.device):
            from .kernels import kv4

            if kv4.quant_write_ok(store, key, value, self.bits):  # a prefill: one launch, the same bytes
                kv4.quant_write(key, value, store, kv_quant.kernel_params(), start)
                return
        for which, x, codes, step, minimum in (("k", key, store.k_codes, store.k_step, store.k_min),
                                               ("v", value, store.v_codes, store.v_step, store.v_min)):
            q, st, mn = kv_quant.quantize(which, x)
            codes[:, :, start:start + t] = quant.pack(q, self.bits)
            step[:, :, start:start + t] = st
            minimum[:, :, start:start + t] = mn

    def read(self, layer: int, kv_quant, end: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized ``(key, value) [B, Hkv, end, D]`` of slots ``0 .. end``."""
        store = self.layers[layer]
        if end == 0:
            b, h = store.k_codes.shape[:2]
            empty = torch.zeros(b, h, 0, self.head_dim, dtype=dtype, device=store.k_codes.device)
            return empty, empty
        out = []
        for which, codes, step, minimum in (("k", store.k_codes, store.k_step, store.k_min),
                                            ("v", store.v_codes, store.v_step, store.v_min)):
            q = quant.unpack(codes[:, :, :end], self.bits, self.head_dim)
            out.append(kv_quant.dequantize(which, q, step[:, :, :end], minimum[:, :, :end], dtype))
        return out[0], out[1]

    def attend(self, layer: int, kv_quant, query, key, value, scaling: float) -> torch.Tensor:
        """POQ attention of the new tokens (``query [B, Hq, T, D]``, ``key/value [B, Hkv, T, D]``)
        over the quantized past and themselves in full precision; then stores them. ``[B, Hq, T, D]``."""
        start = self.length
        past_k, past_v = self.read(layer, kv_quant, start, query.dtype)
        out = poq_attention(query, key, value, past_k, past_v, scaling)
        self.write(layer, kv_quant, key, value, start)
        return out


def poq_attention(query, key, value, past_key, past_value, scaling: float) -> torch.Tensor:
    """Attention over ``[past ; new]``: every past slot visible, the new tokens causal among themselves.

    No mask is materialized where none is needed: a prefill from an empty cache is plain causal attention (a fused
    kernel skips the masked blocks; grouped-query heads native) and a single new token sees everything. Only several
    new tokens after a past take a ``[T, past + T]`` mask, with grouped-query keys and values repeated per query head
    (SDPA's ``enable_gqa`` beside a mask may fall back to the math kernel, which materializes every head's scores).
    With the mask in every case an H200 spent 1744 ms of a 32768-token LLaMA-2-7B prefill in attention (cuDNN, every
    block computed), causal 481 (thirty-seventh session, benchmarks/prefill_bench.py)."""
    t, p = query.shape[-2], past_key.shape[-2]
    gqa = query.shape[1] != key.shape[1]
    if p == 0:
        return F.scaled_dot_product_attention(query, key, value, is_causal=t > 1, scale=scaling, enable_gqa=gqa)
    keys = torch.cat([past_key, key], dim=-2)
    values = torch.cat([past_value, value], dim=-2)
    if t == 1:
        return F.scaled_dot_product_attention(query, keys, values, scale=scaling, enable_gqa=gqa)
    idx = torch.arange(t, device=query.device)
    new = idx[None, :] <= idx[:, None]
    mask = torch.cat([torch.ones(t, p, dtype=torch.bool, device=query.device), new], dim=-1)
    if gqa:
        rep = query.shape[1] // key.shape[1]
        keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling)
