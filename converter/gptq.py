"""GPTQ rounding (Frantar et al., 2023) for fixed per-group scales and zero points.

Given a Linear's weight ``W [out, in]``, its quantization grid (``scale``/``zero`` per group of
input channels, e.g. from the learned clipping) and the Hessian proxy ``H = X^T X`` of its inputs,
the columns are quantized one at a time and each column's rounding error is spread over the
columns not yet quantized, weighted by the inverse Hessian, so that ``X W^T`` changes as little as
possible. The result is expressed as integer offsets to round-to-nearest (the artifact's
``rounding`` decisions, :func:`runtime.quant.quantize_weight`), so the grid and the export path stay
those of the clipping.
"""

from __future__ import annotations

import torch

from runtime import quant

DAMP = 0.01  # fraction of the mean Hessian diagonal added to the diagonal (GPTQ's default)
BLOCK = 128  # columns updated lazily together


class HessianAccumulator:
    """``H = sum_t x_t x_t^T`` (float32) over every row of the inputs it sees, and the count."""

    def __init__(self, features: int, device):
        self.h = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.h.addmm_(x.t(), x)
        self.n += x.shape[0]


def inverse_hessian_cholesky(h: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``; dead inputs get a unit diagonal."""
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(hinv, upper=True)


def gptq_codes(weight: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               bits: int = 4, group_size: int = 128, damp: float = DAMP) -> torch.Tensor:
    """Integer codes ``[out, in]`` (float) on the fixed grid ``(scale, zero)`` ``[out, G]``."""
    qmax = 2 ** quant.check_bits(bits) - 1
    w = weight.detach().float().clone()
    n = w.shape[1]
    s = quant.expand_groups(scale.float(), group_size, n)
    z = quant.expand_groups(zero.float(), group_size, n)
    w[:, torch.diag(h) == 0] = 0.0
    u = inverse_hessian_cholesky(h.float(), damp)
    q = torch.zeros_like(w)
    for i0 in range(0, n, BLOCK):
        i1 = min(i0 + BLOCK, n)
        wb, err = w[:, i0:i1].clone(), torch.zeros(w.shape[0], i1 - i0, device=w.device)
        ub = u[i0:i1, i0:i1]
        for j in range(i1 - i0):
            c = i0 + j
            qc = torch.clamp(torch.round(wb[:, j] / s[:, c]) + z[:, c], 0, qmax)
            q[:, c] = qc
            e = (wb[:, j] - (qc - z[:, c]) * s[:, c]) / ub[j, j]
            wb[:, j:] -= e[:, None] * ub[j, j:][None, :]
            err[:, j] = e
        w[:, i1:] -= err @ u[i0:i1, i1:]
    return q


def gptq_decisions(weight: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   bits: int = 4, group_size: int = 128, damp: float = DAMP) -> torch.Tensor:
    """GPTQ's codes as ``int8`` offsets to round-to-nearest of the original weight on the same grid."""
    q = gptq_codes(weight, h, scale, zero, bits, group_size, damp)
    s = quant.expand_groups(scale.float(), group_size, weight.shape[1])
    z = quant.expand_groups(zero.float(), group_size, weight.shape[1])
    d = q - z - torch.round(weight.detach().float() / s)
    return d.clamp(-127, 127).to(torch.int8)
