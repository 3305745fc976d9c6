"""Two-dimensional KV quantization: static per-channel smoothing/shift + dynamic per-token scales.

:class:`KVQuantizer` lives at ``self_attn.kv_quant`` of every decoder layer of a WKVQuant model.
It holds the static ``s`` and ``delta`` for keys and values (``[num_kv_heads, head_dim]``) and
applies :mod:`runtime.quant`'s token-wise primitives. The runtime cache reads it when it stores
and reads the past; the decode-simulated attention (:mod:`runtime.attention`) uses its
fake-quantization for evaluation and calibration.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import quant

# The cache stores each token's step and minimum in float16; quantization rounds them to it first,
# so the fake-quantization (simulation, calibration) and the cache read back the same values.
STATS_DTYPE = torch.float16


@dataclass(frozen=True)
class KVQuantConfig:
    """How the KV cache is quantized. ``group_size=None`` means one group per head (head_dim)."""

    bits: int = 4
    group_size: int | None = None
    poq: bool = True

    def __post_init__(self):
        quant.check_bits(self.bits)
        if self.group_size is not None:
            quant.check_group_size(self.group_size)

    def to_dict(self) -> dict:
        return asdict(self)


class KVQuantizer(nn.Module):
    """Static smoothing ``s`` / shift ``delta`` for K and V of one attention layer.

    Buffers (or parameters with ``learnable=True``): ``k_scale, k_shift, v_scale, v_shift``,
    each ``[num_kv_heads, head_dim]`` float32. RTN is ``s = 1, delta = 0``.
    """

    def __init__(self, num_kv_heads: int, head_dim: int, config: KVQuantConfig = KVQuantConfig(),
                 learnable: bool = False, device=None):
        super().__init__()
        if config.group_size is not None and head_dim % config.group_size:
            raise ValueError(
                f"KV group size {config.group_size} must divide head_dim {head_dim}; "
                f"use a divisor of {head_dim} or leave it unset for one group per head"
            )
        self.config = config
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        for name, fill in (("k_scale", 1.0), ("k_shift", 0.0), ("v_scale", 1.0), ("v_shift", 0.0)):
            t = torch.full((num_kv_heads, head_dim), fill, dtype=torch.float32, device=device)
            if learnable:
                self.register_parameter(name, nn.Parameter(t))
            else:
                self.register_buffer(name, t)

    @property
    def group_size(self) -> int:
        return self.config.group_size or self.head_dim

    def params(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, shift)`` for ``which`` in ``{"k", "v"}``."""
        if which == "k":
            return self.k_scale, self.k_shift
        if which == "v":
            return self.v_scale, self.v_shift
        raise ValueError(f"which must be 'k' or 'v', got {which!r}")

    def kernel_params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(k_scale, k_shift, v_scale, v_shift)``: the order the KV kernels take them (``kv_params`` of
        :func:`runtime.kernels.kv4.rope_append` and the attention launches)."""
        return (*self.params("k"), *self.params("v"))

    def quantize(self, which: str, x: torch.Tensor):
        """``x [B, H, T, D] -> (codes uint8 [B,H,T,D], step [B,H,T,G], minimum [B,H,T,G])``;
        step and minimum are float32 holding float16 values (:data:`STATS_DTYPE`)."""
        return quant.kv_quantize(x, *self.params(which), self.config.bits, self.group_size, STATS_DTYPE)

    def dequantize(self, which: str, codes, step, minimum, dtype) -> torch.Tensor:
        return quant.kv_dequantize(codes, step, minimum, *self.params(which), self.group_size, dtype)

    def fake(self, which: str, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize with straight-through rounding (same values as the cache reads)."""
        return quant.kv_fake_quantize(x, *self.params(which), self.config.bits, self.group_size, STATS_DTYPE)

    def extra_repr(self) -> str:
        return f"heads={self.num_kv_heads}, head_dim={self.head_dim}, {self.config}"
