"""Past-Only Quantization KV cache: a transformers ``Cache`` whose past lives in 4 bits.

One :class:`PoqLayer` per decoder layer stores every token it has seen as packed codes plus a
per-token step and minimum in float16 (:class:`PackedKV`), quantized with that layer's
:class:`~runtime.kvquant.KVQuantizer` (static smoothing ``s`` and shift ``delta``, dynamic
per-token scales). At each forward, attention reads ``[deq(past) ; current]``: the tokens of the
current step in full precision (POQ), which are then quantized into the store. For a prompt of
``n`` tokens, the ``n`` tokens attend to each other in full precision. With ``poq=False`` (the
ablation) the current tokens are read back quantized too.

Numerics match the decode-simulated attention (:mod:`runtime.attention`): quantization in
float32 by ``KVQuantizer.quantize``, dequantization to the compute dtype.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from collections.abc import Callable

import torch
from transformers import LlamaForCausalLM
from transformers.cache_utils import Cache, DynamicLayer

from . import quant
from .kvquant import STATS_DTYPE, KVQuantizer

# transformers renamed the model's ``past_key_values`` argument (and output field) to ``cache``.
CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


@dataclass(frozen=True)
class PackedKV:
    """Quantized keys or values of ``T`` tokens, token axis ``-2`` everywhere.

    ``codes uint8 [B, H, T, packed_length(D)]`` (:func:`runtime.quant.pack`),
    ``step, minimum float16 [B, H, T, G]`` (per token, per group of channels).
    """

    codes: torch.Tensor
    step: torch.Tensor
    minimum: torch.Tensor

    @property
    def length(self) -> int:
        return self.codes.shape[-2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.step, self.minimum))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PackedKV:
        return PackedKV(fn(self.codes), fn(self.step), fn(self.minimum))

    def append(self, other: PackedKV) -> PackedKV:
        return PackedKV(*(torch.cat([a, b], dim=-2) for a, b in
                          zip((self.codes, self.step, self.minimum), (other.codes, other.step, other.minimum))))


class PoqLayer(DynamicLayer):
    """One decoder layer's cache: a 4-bit store of the past, the current step in full precision.

    ``keys``/``values`` (the full-precision tensors of transformers' layers) stay ``None``; the
    store is ``k``/``v`` (:class:`PackedKV`). Beam reordering and cropping act on the store
    directly and are exact, since every token is quantized on its own.
    """

    is_croppable = True

    def __init__(self, kv_quant: KVQuantizer):
        super().__init__()
        self.kv_quant = kv_quant
        self.k: PackedKV | None = None
        self.v: PackedKV | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _quantize(self, which: str, x: torch.Tensor) -> PackedKV:
        """``x [B, H, T, D]`` -> the store's representation of these ``T`` tokens."""
        codes, step, minimum = self.kv_quant.quantize(which, x)
        return PackedKV(quant.pack(codes, self.kv_quant.config.bits), step.to(STATS_DTYPE), minimum.to(STATS_DTYPE))

    def _dequantize(self, which: str, packed: PackedKV, dtype: torch.dtype) -> torch.Tensor:
        """The store's tokens read back as ``[B, H, T, D]`` in ``dtype``."""
        codes = quant.unpack(packed.codes, self.kv_quant.config.bits, self.kv_quant.head_dim)
        return self.kv_quant.dequantize(which, codes, packed.step, packed.minimum, dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Return ``[past ; current]`` keys and values (``[B, H, P + T, D]``), then store the current."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new_k, new_v = self._quantize("k", key_states), self._quantize("v", value_states)
        if self.kv_quant.config.poq:
            keys, values = key_states, value_states
        else:
            keys = self._dequantize("k", new_k, key_states.dtype)
            values = self._dequantize("v", new_v, value_states.dtype)
        if self.get_seq_length() > 0:
            keys = torch.cat([self._dequantize("k", self.k, key_states.dtype), keys], dim=-2)
            values = torch.cat([self._dequantize("v", self.v, value_states.dtype), values], dim=-2)
            new_k, new_v = self.k.append(new_k), self.v.append(new_v)
        self.k, self.v = new_k, new_v
        return keys, values

    def get_seq_length(self) -> int:
        return 0 if self.k is None else self.k.length

    def get_max_length(self) -> int:
        return -1

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors this layer holds."""
        return 0 if self.k is None else self.k.nbytes + self.v.nbytes

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.k is not None:
            self.k, self.v = self.k.map(fn), self.v.map(fn)

    def reset(self) -> None:
        self.k = self.v = None
        self.is_initialized = False

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized:
            self._map(lambda t: t.to(self.device, non_blocking=True))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (a negative count, as transformers passes it)."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop takes a negative number of tokens to remove, got {tokens_to_remove}; "
                f"use crop(-n) to drop the last n tokens"
            )
        keep = max(self.get_seq_length() + tokens_to_remove, 0)
        if tokens_to_remove < 0:
            self._map(lambda t: t[..., :keep, :])


class PoqCache(Cache):
    """A ``Cache`` of :class:`PoqLayer` objects, one per decoder layer (in order)."""

    def __init__(self, kv_quantizers: list[KVQuantizer]):
        super().__init__(layers=[PoqLayer(q) for q in kv_quantizers])

    @property
    def nbytes(self) -> int:
        """Bytes of all the tensors the cache holds."""
        return sum(layer.nbytes for layer in self.layers)


def new_cache(model) -> PoqCache:
    """A fresh POQ cache for ``model`` (loaded by :func:`runtime.load`), for callers running
    ``model(...)`` themselves: ``model(ids, **{CACHE_KWARG: cache})``."""
    quantizers = []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        if "kv_quant" not in attn._modules:
            raise ValueError(
                f"decoder layer {i} has no self_attn.kv_quant; new_cache needs a model loaded by runtime.load"
            )
        quantizers.append(attn.kv_quant)
    return PoqCache(quantizers)
