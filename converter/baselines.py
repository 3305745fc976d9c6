"""The ecosystem's peer: transformers' ``QuantizedCache`` (quanto or HQQ backend), evaluated honestly.

``QuantizedCache`` is a decode-time cache (KIVI-style: a full-precision residual window of the
most recent ``residual_length`` tokens, everything older re-quantized group-wise when the window
fills), so its perplexity is measured **token by token**: every window is fed one token per step
through a fresh cache and the next token's NLL is taken from that step's logits. All windows of
a batch step together (``[B, 1]`` per step), so the Python loop runs ``T - 1`` times per batch.
This is slow by nature; the table bounds it to a few windows and says so.

The backends are optional packages (``pip install wkvquant[eval]``), imported only here.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from runtime import CACHE_KWARG

from .evaluate import PPLResult, result_from_nll

log = logging.getLogger(__name__)

BACKENDS = {"quanto": "optimum.quanto", "hqq": "hqq"}
PACKAGES = {"quanto": "optimum-quanto", "hqq": "hqq"}


@dataclass(frozen=True)
class PeerConfig:
    """transformers ``QuantizedCache`` settings (their defaults, 4 bits) and how many windows to run."""

    backend: str = "hqq"
    nbits: int = 4
    q_group_size: int | None = None  # None: min(64, head_dim), transformers' default for head_dim >= 64
    residual_length: int = 128
    windows: int = 2
    batch_size: int = 8

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"peer backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.windows < 1 or self.batch_size < 1:
            raise ValueError(f"peer windows and batch size must be positive, got {self.windows}, {self.batch_size}")

    def group_size(self, head_dim: int) -> int:
        return self.q_group_size or min(64, head_dim)

    def describe(self, head_dim: int = 64) -> str:
        return (f"transformers QuantizedCache({self.backend}, {self.nbits}-bit, group {self.group_size(head_dim)}, "
                f"full-precision residual of {self.residual_length} tokens), token-by-token decoding")

    def to_dict(self) -> dict:
        return asdict(self)


def backend_missing(backend: str) -> str | None:
    """Why ``backend`` cannot be used here (a one-line reason), or None when its package imports."""
    module = BACKENDS[backend]
    root = module.split(".")[0]
    if importlib.util.find_spec(root) is None or importlib.util.find_spec(module) is None:
        return f"{PACKAGES[backend]} is not installed (pip install 'wkvquant[eval]')"
    return None


def quantized_cache_factory(model, cfg: PeerConfig):
    """A function returning a fresh ``QuantizedCache`` for ``model`` (one per window batch)."""
    reason = backend_missing(cfg.backend)
    if reason is not None:
        raise ImportError(reason)
    from transformers import QuantizedCache

    c = model.config
    group = cfg.group_size(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)

    def make():
        return QuantizedCache(backend=cfg.backend, config=model.config, nbits=cfg.nbits,
                              q_group_size=group, residual_length=cfg.residual_length)

    return make


@torch.inference_mode()
def token_by_token_nll(model, ids: torch.Tensor, cache) -> float:
    """Summed NLL of tokens ``1..T-1`` of ``ids [B, T]``, feeding one token per step through ``cache``."""
    total = torch.zeros((), dtype=torch.float64, device=ids.device)
    for t in range(ids.shape[1] - 1):
        out = model(input_ids=ids[:, t:t + 1], use_cache=True, **{CACHE_KWARG: cache})
        logits = out.logits[:, -1].float()  # [B, V]
        total += F.cross_entropy(logits, ids[:, t + 1], reduction="sum").double()
    return float(total)


def decode_perplexity(model, windows: torch.Tensor, make_cache, batch_size: int = 8,
                      desc: str = "decode", progress: bool = True) -> PPLResult:
    """Token-by-token perplexity over ``windows [W, T]``, a fresh ``make_cache()`` per batch."""
    model.set_attn_implementation("sdpa")
    device = next(model.parameters()).device
    start, total = time.perf_counter(), 0.0
    for batch in tqdm(windows.split(batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        total += token_by_token_nll(model, batch.to(device), make_cache())
    w, t = windows.shape
    return result_from_nll(total, w * (t - 1), w, t, time.perf_counter() - start)


def peer_perplexity(model, windows: torch.Tensor, cfg: PeerConfig, progress: bool = True) -> PPLResult:
    """The QuantizedCache row: the first ``cfg.windows`` windows, decoded token by token."""
    make = quantized_cache_factory(model, cfg)
    return decode_perplexity(model, windows[: cfg.windows], make, cfg.batch_size,
                             desc=f"QuantizedCache({cfg.backend})", progress=progress)
