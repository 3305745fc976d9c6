"""Calibration and evaluation text.

Names accepted wherever a dataset is asked for (``--calib-data``, ``--data``):

* ``enwiki-sample:calib`` / ``enwiki-sample:eval`` — the embedded default: the Wikipedia excerpt
  shipped in the PyPI package ``gensim==4.4.0`` (~100 articles), extracted and cleaned
  deterministically. Every fifth article (in file order, starting with the fifth) is held back
  for evaluation and never used for calibration. ``enwiki-sample`` alone means the calib split.
* ``wikitext2`` (``wikitext2:train`` / ``wikitext2:test``) — WikiText-2 raw through Hugging Face
  ``datasets`` (needs Hub access and ``pip install datasets``).
* a path to a UTF-8 text file.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import json
import logging
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from .source import cache_dir, fetch_wheel_member

log = logging.getLogger(__name__)

GENSIM_PACKAGE = "gensim==4.4.0"
ENWIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
EVAL_EVERY = 5
CLEAN_VERSION = 1  # bump when clean_wikitext changes, to refresh the cache
SPLITS = ("enwiki-sample:calib", "enwiki-sample:eval", "wikitext2:train", "wikitext2:test")


class DataError(ValueError):
    """A dataset name or file that cannot be used."""


def _enwiki_bz2() -> Path:
    """The compressed dump from the gensim wheel, fetched with ``pip download --no-deps`` once."""
    target = cache_dir() / "enwiki-sample.xml.bz2"
    if target.is_file():
        return target
    log.info("fetching %s for the embedded Wikipedia sample", GENSIM_PACKAGE)
    return fetch_wheel_member(GENSIM_PACKAGE, ENWIKI_MEMBER, target, DataError, "pass --calib-data FILE instead")


_PATTERNS = [
    (re.compile(r"<!--.*?-->", re.DOTALL), ""),
    (re.compile(r"<ref[^>/]*/>", re.DOTALL), ""),
    (re.compile(r"<ref[^>]*>.*?</ref>", re.DOTALL), ""),
    (re.compile(r"<(gallery|math|timeline|score)[^>]*>.*?</\1>", re.DOTALL), ""),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]",
                re.IGNORECASE), ""),
    (re.compile(r"\[\[([^\]|]*)\|([^\]]*)\]\]"), r"\2"),
    (re.compile(r"\[\[([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[https?://[^\s\]]+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"\[https?://[^\]]*\]"), ""),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.MULTILINE), r"\n\1\n"),
    (re.compile(r"^[*#:;]+\s*", re.MULTILINE), ""),
    (re.compile(r"__[A-Z]+__"), ""),
    (re.compile(r"[ \t]+"), " "),
    (re.compile(r"\n\s*\n+"), "\n\n"),
]


def _strip_nested(text: str, open_: str, close: str) -> str:
    """Remove balanced ``open_ ... close`` spans (templates ``{{ }}``, tables ``{| |}``); an
    unbalanced opening drops the rest of the text, a stray closing is kept."""
    token = re.compile(re.escape(open_) + "|" + re.escape(close))
    out, depth, last = [], 0, 0
    for m in token.finditer(text):
        if m.group() == open_:
            if depth == 0:
                out.append(text[last:m.start()])
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                last = m.end()
    if depth == 0:
        out.append(text[last:])
    return "".join(out)


def clean_wikitext(text: str) -> str:
    """Deterministic wikitext -> plain text (templates, tables, refs, markup removed)."""
    text = _strip_nested(text, "{{", "}}")
    text = _strip_nested(text, "{|", "|}")
    text = html.unescape(text)
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    lines = [ln.strip() for ln in text.split("\n")]
    text = "\n".join(ln for ln in lines if not ln.startswith(("|", "!")))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def enwiki_articles() -> list[tuple[str, str]]:
    """``[(title, cleaned text)]`` of the sample's main-namespace, non-redirect articles, in file order
    (cleaned once, then read from a JSON cache beside the dump)."""
    cached = cache_dir() / f"enwiki-sample.clean-v{CLEAN_VERSION}.json"
    if cached.is_file():
        return [tuple(a) for a in json.loads(cached.read_text())]
    articles = _parse_enwiki(_enwiki_bz2())
    tmp = cached.with_name(cached.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(articles))
    os.replace(tmp, cached)
    return articles


def _parse_enwiki(path: Path) -> list[tuple[str, str]]:
    ns = "{http://www.mediawiki.org/xml/export-0.10/}"
    articles = []
    with bz2.open(path) as f:
        for _, el in ET.iterparse(f):
            if el.tag != ns + "page":
                continue
            if el.findtext(ns + "ns") == "0" and el.find(ns + "redirect") is None:
                text = clean_wikitext(el.findtext(f"{ns}revision/{ns}text") or "")
                if len(text) > 200:
                    articles.append((el.findtext(ns + "title"), text))
            el.clear()
    return articles


def enwiki_split(split: str) -> list[tuple[str, str]]:
    if split not in ("calib", "eval"):
        raise DataError(f"enwiki-sample split must be 'calib' or 'eval', got {split!r}")
    arts = enwiki_articles()
    held = [a for i, a in enumerate(arts) if i % EVAL_EVERY == EVAL_EVERY - 1]
    return held if split == "eval" else [a for i, a in enumerate(arts) if i % EVAL_EVERY != EVAL_EVERY - 1]


def _wikitext2(split: str) -> str:
    try:
        import datasets
    except ImportError:
        raise DataError("wikitext2 needs the 'datasets' package: pip install datasets") from None
    ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    return "\n\n".join(ds["text"])


def load_text(name: str) -> str:
    """The text of a named dataset split or a text file (see the module docstring)."""
    base, _, split = name.partition(":")
    if base == "enwiki-sample":
        return "\n\n".join(f"{title}\n\n{text}" for title, text in enwiki_split(split or "calib"))
    if base == "wikitext2":
        return _wikitext2(split or "train")
    path = Path(name)
    if not path.is_file():
        raise DataError(f"unknown dataset {name!r}: use one of {', '.join(SPLITS)} or a path to a text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{name} is not UTF-8 text") from None


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """All tokens of ``text`` as one ``int64 [N]`` tensor, with the tokenizer's defaults."""
    return torch.tensor(tokenizer(text, return_attention_mask=False)["input_ids"], dtype=torch.long)


def calibration_samples(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``[nsamples, seqlen]`` windows starting at seeded random offsets (GPTQ/OmniQuant style)."""
    if tokens.numel() < seqlen + 1 or tokens.numel() < nsamples * seqlen // 4:
        raise DataError(
            f"calibration text has {tokens.numel()} tokens, too few for --nsamples {nsamples} x --seqlen {seqlen}; "
            "use fewer or shorter samples or more text"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen, (nsamples,), generator=g)
    return torch.stack([tokens[s:s + seqlen] for s in starts.tolist()])


def eval_windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping ``[W, seqlen]`` windows from the start (the remainder is dropped)."""
    n = tokens.numel() // seqlen
    if n == 0:
        raise DataError(f"the text has {tokens.numel()} tokens, fewer than one window of --seqlen {seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return tokens[: n * seqlen].reshape(n, seqlen)
