"""WKVQuant runtime: load a W4KV4 artifact into a transformers LLaMA and generate.

    from runtime import load
    model, tokenizer = load("path/to/artifact")
    ids = tokenizer("The capital of France is", return_tensors="pt").to(model.device)
    out = model.generate(**ids, max_new_tokens=20)   # the POQ 4-bit KV cache by default

Callers running ``model(...)`` themselves get a fresh cache from :func:`new_cache`.
"""

from __future__ import annotations

from pathlib import Path

from . import attention  # noqa: F401  (registers the "wkvq_sim" attention implementation)
from .artifact import ArtifactError, verify
from .cache import CACHE_KWARG, PoqCache, new_cache
from .hub import resolve_artifact
from .model import build

__all__ = ["ArtifactError", "CACHE_KWARG", "PoqCache", "load", "new_cache", "verify"]


def load(path_or_id, device=None, dtype=None, poq: bool = True, verify: bool = True, revision: str | None = None):
    """Load an artifact: ``(model, tokenizer)``.

    ``path_or_id``: a local artifact directory, or a Hub id (resolved by ``runtime.hub``).
    ``device``: cpu / cuda / cuda:N (default: cuda if available). ``dtype``: float32 / float16 /
    bfloat16 compute dtype (default: float32 on CPU, the artifact's dtype on CUDA). ``poq=False``
    quantizes the current tokens' K/V too (ablation). ``verify``: check checksums first.
    """
    directory = _local_directory(path_or_id, revision)
    return build(directory, device=device, dtype=dtype, poq=poq, verify=verify)


def _local_directory(path_or_id, revision: str | None) -> Path:
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"revision {revision!r} applies to Hub ids only; {path} is a local directory")
        return path
    if path.exists():
        raise ArtifactError(f"{path} is not a directory; give an artifact directory or a Hub id")
    return Path(resolve_artifact(str(path_or_id), revision=revision))
