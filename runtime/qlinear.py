"""A Linear layer whose weight stays packed (INT4 by default) in memory."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import quant


class QuantLinear(nn.Module):
    """``y = x @ W^T (+ b)`` with ``W`` stored as packed codes, per-group scales and zero points.

    Buffers: ``qweight uint8 [out, packed_length(in)]``, ``scales float16 [out, G]``,
    ``zeros uint8 [out, G]``, optional ``bias``. ``forward`` dequantizes the weight for the
    duration of the call only on CPU; on CUDA with Triton, 4-bit weights go through the fused
    kernel of :mod:`runtime.kernels.w4` (read straight from the packed layout).
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 128,
                 bias: bool = False, device=None, dtype=torch.float16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = quant.check_bits(bits), quant.check_group_size(group_size)
        g = quant.num_groups(in_features, group_size)
        packed = quant.packed_length(in_features, bits)
        self.register_buffer("qweight", torch.zeros(out_features, packed, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, g, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, g, dtype=torch.uint8, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_codes(cls, q: torch.Tensor, scales, zeros, bits: int, group_size: int, bias=None) -> QuantLinear:
        """Build from integer codes ``uint8 [out, in]`` and per-group ``scales``/``zeros``."""
        out_f, in_f = q.shape
        m = cls(in_f, out_f, bits, group_size, bias=bias is not None, device=q.device)
        m.qweight.copy_(quant.pack(q, bits))
        m.scales.copy_(scales.to(torch.float16))
        m.zeros.copy_(zeros.to(torch.uint8))
        if bias is not None:
            m.bias = bias.detach().clone()
        return m

    def codes(self) -> torch.Tensor:
        return quant.unpack(quant.row_major_codes(self.qweight), self.bits, self.in_features)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return quant.dequantize_weight(self.codes(), self.scales, self.zeros, self.group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if x.is_cuda and self._fused_ok(x):
            from .kernels.w4 import w4_linear

            return w4_linear(x, self.qweight, self.scales, self.zeros, self.group_size, bias)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def _fused_ok(self, x: torch.Tensor) -> bool:
        """Whether the Triton INT4 kernel (:mod:`runtime.kernels.w4`) serves this call (CUDA only)."""
        from . import kernels

        return (self.bits == 4 and x.dtype in (torch.float16, torch.bfloat16) and kernels.available(x.device)
                and self.group_size in (32, 64, 128, 256))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}")
