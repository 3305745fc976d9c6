"""Perplexity of an artifact or a plain model on consecutive non-overlapping windows.

Perplexity = ``exp(sum of NLL / number of predicted tokens)`` over every predicted token of
every window (a window of ``T`` tokens predicts ``T - 1``).

KV modes (:data:`KV_MODES`):

* ``decode`` — decode-simulated: one teacher-forced pass per window with the ``wkvq_sim``
  attention (:mod:`runtime.attention`): each query attends to the quantized K/V of earlier
  tokens and, with POQ, to its own K/V in full precision. This is what token-by-token
  generation through the runtime's quantized cache computes.
* ``prefill`` — plain SDPA attention: the cache is never read quantized (weights still are).

Data: any name :func:`converter.data.load_text` accepts, plus :data:`LONG_DATA`
(``enwiki-sample:eval-long``): each held-back article tokenized on its own, windows taken within
articles only, so a long window never spans two articles.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import runtime
from runtime import artifact
from runtime.attention import NAME as SIM_ATTENTION
from runtime.model import parse_dtype

from . import data, source

log = logging.getLogger(__name__)

KV_MODES = ("decode", "prefill")
KV_MODE_LABELS = {"decode": "decode-simulated", "prefill": "prefill (KV cache never read quantized)"}
DEFAULT_DATA = "enwiki-sample:eval"
LONG_DATA = "enwiki-sample:eval-long"
LOGITS_CHUNK = 1024  # tokens per lm_head chunk: bounds the float32 logits to chunk x vocab


@dataclass(frozen=True)
class EvalConfig:
    """What ``wkvq eval`` measures. ``dtype=None``: float16 on CUDA, float32 on CPU."""

    data: str = DEFAULT_DATA
    seqlen: int = 2048
    max_windows: int | None = None
    kv_mode: str = "decode"
    poq: bool = True
    device: str | None = None
    dtype: str | None = None
    batch_size: int = 1
    progress: bool = True

    def __post_init__(self):
        if self.kv_mode not in KV_MODES:
            raise ValueError(f"kv_mode must be one of {', '.join(KV_MODES)}, got {self.kv_mode!r}")
        if self.seqlen < 2:
            raise ValueError(f"seqlen must be at least 2 (one predicted token), got {self.seqlen}")
        if self.max_windows is not None and self.max_windows < 1:
            raise ValueError(f"max_windows must be a positive integer, got {self.max_windows}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size}")
        parse_dtype(self.dtype)

    def torch_device(self) -> torch.device:
        from .convert import resolve_device

        return resolve_device(self.device)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return parse_dtype(self.dtype)
        return torch.float16 if self.torch_device().type == "cuda" else torch.float32


@dataclass(frozen=True)
class PPLResult:
    ppl: float
    nll: float  # mean NLL per predicted token (nats)
    tokens: int  # predicted tokens
    windows: int
    seqlen: int
    seconds: float

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "nll": self.nll, "tokens": self.tokens, "windows": self.windows,
                "seqlen": self.seqlen, "seconds": round(self.seconds, 3)}


# ----------------------------------------------------------------------------- data


def long_article_windows(tokenizer, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """``[W, seqlen]`` windows from the held-back articles with at least ``seqlen`` tokens, each
    article tokenized on its own (``title\\n\\ntext``, as :func:`data.load_text` joins them)."""
    rows = []
    for title, text in data.enwiki_split("eval"):
        ids = data.tokenize(tokenizer, f"{title}\n\n{text}")
        n = ids.numel() // seqlen
        rows.extend(ids[: n * seqlen].reshape(n, seqlen))
    if not rows:
        raise data.DataError(f"no held-back article has {seqlen} tokens; use a smaller --seqlen")
    return torch.stack(rows[:max_windows] if max_windows else rows)


def load_windows(tokenizer, name: str, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """``int64 [W, seqlen]`` evaluation windows of dataset ``name`` (see the module docstring)."""
    if name == LONG_DATA:
        return long_article_windows(tokenizer, seqlen, max_windows)
    tokens = data.tokenize(tokenizer, data.load_text(name))
    return data.eval_windows(tokens, seqlen, max_windows)


# ----------------------------------------------------------------------------- targets


def is_artifact(target: str) -> bool:
    """Whether ``target`` names an artifact: a folder with ``wkvq.json``, or a Hub repo holding one."""
    path = Path(target).expanduser()
    if path.exists():
        return path.is_dir() and (path / artifact.META_FILE).is_file()
    if target.endswith(".gguf") or target.startswith((".", "/", "~")) or target.count("/") != 1:
        return False
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        hf_hub_download(target, artifact.META_FILE)
    except (OSError, ValueError, HfHubHTTPError) as e:
        log.info("%s has no %s on the Hub (%s): a plain model", target, artifact.META_FILE, type(e).__name__)
        return False
    return True


def load_target(target: str, device: torch.device, dtype: torch.dtype, poq: bool = True):
    """``(model, tokenizer, info)``: an artifact through :func:`runtime.load`, else a plain model."""
    if is_artifact(target):
        model, tok = runtime.load(target, device=device, dtype=dtype, poq=poq)
        meta = model.wkvq_metadata
        return model, tok, {"kind": "artifact", "method": meta["method"], "weight_quant": meta["weight_quant"],
                            "kv_quant": {**meta["kv_quant"], "poq": poq}}
    model, tok, src = source.load_model(target, dtype=dtype)
    return model.to(device), tok, {"kind": "model", "source": src.model, "kv_quant": None}


# ----------------------------------------------------------------------------- perplexity


def set_kv_mode(model, kv_mode: str) -> None:
    """Select the attention: ``wkvq_sim`` for ``decode``, plain ``sdpa`` for ``prefill``."""
    if kv_mode not in KV_MODES:
        raise ValueError(f"kv_mode must be one of {', '.join(KV_MODES)}, got {kv_mode!r}")
    model.set_attn_implementation(SIM_ATTENTION if kv_mode == "decode" else "sdpa")


def nll_sum(model, ids: torch.Tensor) -> float:
    """Summed NLL (float64) of tokens ``1..T-1`` of ``ids [B, T]`` in one teacher-forced pass.

    The decoder runs once; the ``lm_head`` and the float32 log-softmax run in chunks of
    :data:`LOGITS_CHUNK` positions so an 8192-token window never materialises all logits.
    """
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state  # [B, T, H]
    total = torch.zeros((), dtype=torch.float64, device=ids.device)
    t = ids.shape[1]
    for s in range(0, t - 1, LOGITS_CHUNK):
        e = min(s + LOGITS_CHUNK, t - 1)
        logits = model.lm_head(hidden[:, s:e]).float()  # [B, e - s, V]
        targets = ids[:, s + 1:e + 1]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                 reduction="sum").double()
    return float(total)


def result_from_nll(total: float, tokens: int, windows: int, seqlen: int, seconds: float) -> PPLResult:
    mean = total / tokens
    return PPLResult(math.exp(mean), mean, tokens, windows, seqlen, seconds)


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, kv_mode: str = "decode", batch_size: int = 1,
               desc: str = "eval", progress: bool = True) -> PPLResult:
    """Perplexity of ``model`` over ``windows [W, T]`` (see the module docstring for ``kv_mode``)."""
    set_kv_mode(model, kv_mode)
    device = next(model.parameters()).device
    start, total = time.perf_counter(), 0.0
    batches = windows.split(batch_size)
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        total += nll_sum(model, batch.to(device))
    w, t = windows.shape
    return result_from_nll(total, w * (t - 1), w, t, time.perf_counter() - start)


def evaluate(target: str, cfg: EvalConfig) -> dict:
    """``wkvq eval TARGET``: load, tokenize, measure; the JSON-ready result."""
    device, dtype = cfg.torch_device(), cfg.torch_dtype()
    model, tok, info = load_target(target, device, dtype, cfg.poq)
    source.check_seqlen(model.config, cfg.seqlen)
    windows = load_windows(tok, cfg.data, cfg.seqlen, cfg.max_windows)
    res = perplexity(model, windows, cfg.kv_mode, cfg.batch_size, desc=Path(target).name or target,
                     progress=cfg.progress)
    quantized_kv = info["kv_quant"] is not None
    return {**res.to_dict(), "kv_mode": cfg.kv_mode, "kv_mode_label": KV_MODE_LABELS[cfg.kv_mode],
            "poq": cfg.poq if quantized_kv else None, "target": target, "data": cfg.data,
            "device": str(device), "dtype": str(dtype).removeprefix("torch."), **info}


def summary_line(result: dict) -> str:
    """One human line for the CLI."""
    poq = {True: ", POQ", False: ", no POQ", None: ""}[result["poq"]]
    return (f"ppl {result['ppl']:.4f} over {result['tokens']} tokens ({result['windows']} windows x "
            f"{result['seqlen']}), {result['kv_mode_label']}{poq}, {result['dtype']} on {result['device']}")


def write_json(result: dict, path: str | Path) -> Path:
    """Write ``result`` as indented JSON (parent directories created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
