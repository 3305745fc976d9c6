"""GPTQ rounding on a fixed grid (converter/gptq.py)."""

from __future__ import annotations

import pytest
import torch

from converter import gptq
from runtime import quant


def _problem(seed: int, out: int = 24, n: int = 200, tokens: int = 512):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) / n ** 0.5 + torch.eye(n)
    x = torch.randn(tokens, n, generator=g) @ mix  # correlated inputs, as in real activations
    w = torch.randn(out, n, generator=g)
    return x, w


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptq_beats_nearest_on_the_same_grid_and_decisions_reproduce_its_codes(seed):
    x, w = _problem(seed)
    acc = gptq.HessianAccumulator(w.shape[1], "cpu")
    acc.add(x[:300])
    acc.add(x[300:])
    assert acc.n == 512 and torch.allclose(acc.h, x.t() @ x, rtol=1e-4, atol=1e-2)
    scale, zero = quant.weight_qparams(w, 4, 64)
    codes = gptq.gptq_codes(w, acc.h, scale, zero, 4, 64)
    assert codes.min() >= 0 and codes.max() <= 15 and torch.equal(codes, codes.round())
    d = gptq.gptq_decisions(w, acc.h, scale, zero, 4, 64)
    q = quant.quantize_weight(w, scale, zero, 4, 64, rounding=d)
    assert torch.equal(q.float(), codes)
    nearest = quant.dequantize_weight(quant.quantize_weight(w, scale, zero, 4, 64), scale, zero, 64)
    rounded = quant.dequantize_weight(q, scale, zero, 64)
    err_nearest = (x @ (w - nearest).t()).norm()
    err_gptq = (x @ (w - rounded).t()).norm()
    assert err_gptq < 0.8 * err_nearest, (float(err_gptq), float(err_nearest))


def test_dead_inputs_and_identity_hessian_give_nearest_rounding():
    """With H = I (uncorrelated unit inputs) the error feedback vanishes only in the limit, but an
    all-zero input column must not break the factorisation and its weights are irrelevant."""
    x, w = _problem(3, n=128)
    x[:, 5] = 0.0
    h = x.t() @ x
    scale, zero = quant.weight_qparams(w, 4, 128)
    d = gptq.gptq_decisions(w, h, scale, zero, 4, 128)
    assert torch.isfinite(d.float()).all()
    eye = torch.eye(128) * 1e6  # a huge diagonal Hessian: no column influences another
    assert torch.equal(gptq.gptq_decisions(w, eye, scale, zero, 4, 128), torch.zeros_like(d))
