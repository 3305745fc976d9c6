"""WKVQuant runtime: load a W4KV4 artifact into a transformers LLaMA and generate.

    from runtime import load
    model, tokenizer = load("path/to/artifact")
"""

from . import attention  # noqa: F401  (registers the "wkvq_sim" attention implementation)
from .artifact import ArtifactError, verify
from .model import build

__all__ = ["ArtifactError", "load", "verify"]


def load(path_or_id, device=None, dtype=None, poq: bool = True, verify: bool = True):
    """Load an artifact directory: ``(model, tokenizer)``."""
    return build(path_or_id, device=device, dtype=dtype, poq=poq, verify=verify)
