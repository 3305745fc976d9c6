"""Fetch a WKVQuant artifact from the Hugging Face Hub by repo id.

    from runtime.hub import resolve_artifact
    path = resolve_artifact("user/smollm2-w4kv4", revision="main")   # a verified local folder

The download goes through ``huggingface_hub.snapshot_download`` (its cache, ``HF_TOKEN`` or the
stored login, ``HF_ENDPOINT``), restricted to the artifact's files. ``HF_ENDPOINT`` and
``HF_HUB_CACHE`` are read when called, not when imported. Every failure (repo or revision not
found, 401, network down) is a :class:`HubError`: an :class:`~runtime.artifact.ArtifactError`
with a one-line message. No token is ever logged or written by this module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from pathlib import Path

from .artifact import META_FILE, WEIGHTS_FILE, ArtifactError, verify

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
# config, generation config, tokenizer (json / txt / sentencepiece / chat template), card, weights, metadata
ARTIFACT_PATTERNS = ("*.json", "*.txt", "*.model", "*.jinja", "README.md", WEIGHTS_FILE)
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


class HubError(ArtifactError):
    """The Hub cannot be reached, refuses the request, or has no such repo / revision."""


def is_repo_id(text: str) -> bool:
    """Whether ``text`` has the shape of a Hub repo id ``namespace/name``."""
    return bool(_REPO_ID.match(text)) and ".." not in text and not text.endswith((".", "-"))


def check_repo_id(repo_id: str) -> str:
    if not isinstance(repo_id, str) or not is_repo_id(repo_id):
        raise HubError(
            f"{repo_id!r} is not a Hub repo id; expected 'namespace/name' (letters, digits, '-', '_', '.')"
        )
    return repo_id


def hub_endpoint() -> str | None:
    """``HF_ENDPOINT`` as set now (``None``: huggingface_hub's default)."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or None


def endpoint_name(endpoint: str | None) -> str:
    return endpoint or DEFAULT_ENDPOINT


def _network_errors() -> tuple[type[BaseException], ...]:
    """Transport errors of the HTTP client huggingface_hub uses: httpx2 (2.x) or httpx (1.x)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "TransportError"):
            errors.append(module.TransportError)
    return tuple(errors)


def _server_message(e) -> str:
    text = getattr(e, "server_message", None) or ""
    return " ".join(str(text).split())[:200]


def describe_hub_error(e: BaseException, repo_id: str, revision: str | None, endpoint: str | None) -> str | None:
    """One line for a huggingface_hub / transport exception, or ``None`` if it is not one of those."""
    from huggingface_hub import errors as hf

    where = endpoint_name(endpoint)
    rev = f" (revision {revision})" if revision else ""
    if isinstance(e, hf.RevisionNotFoundError):
        return f"revision {revision!r} of {repo_id} does not exist on {where}"
    if isinstance(e, hf.GatedRepoError):
        return f"{repo_id} is gated on {where}: accept its terms there and use a token that has access"
    if isinstance(e, hf.RepositoryNotFoundError):
        return (f"repo {repo_id} not found on {where}{rev} (or it is private and the token has no access; "
                f"set HF_TOKEN or run `hf auth login`)")
    if isinstance(e, hf.OfflineModeIsEnabled) or (isinstance(e, hf.LocalEntryNotFoundError)
                                                  and isinstance(e.__cause__, hf.OfflineModeIsEnabled)):
        return f"HF_HUB_OFFLINE is set and {repo_id}{rev} is not in the local Hugging Face cache"
    if isinstance(e, hf.HfHubHTTPError) and e.response is not None:
        return _describe_status(e, repo_id, where)
    if isinstance(e, hf.LocalEntryNotFoundError):
        return (f"cannot reach the Hub at {where} ({type(e.__cause__ or e).__name__}) and {repo_id}{rev} is not "
                f"in the local cache; check the network or HF_ENDPOINT")
    if isinstance(e, _network_errors()):
        return f"cannot reach the Hub at {where} ({type(e).__name__}) for {repo_id}; check the network or HF_ENDPOINT"
    return None


def _describe_status(e, repo_id: str, where: str) -> str:
    status = e.response.status_code
    if status == 401:
        return f"the Hub at {where} rejected the token (401 Unauthorized); check HF_TOKEN or run `hf auth login`"
    if status == 403:
        return (f"the token may not write to {repo_id} on {where} (403 Forbidden); "
                f"use a write token of the namespace {repo_id.split('/')[0]!r}")
    message = _server_message(e)
    return f"the Hub at {where} answered {status} for {repo_id}" + (f": {message}" if message else "")


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None = None, endpoint: str | None = None):
    """Turn huggingface_hub and network exceptions into a one-line :class:`HubError`."""
    try:
        yield
    except HubError:
        raise
    except Exception as e:  # noqa: BLE001  (re-raised unchanged unless it is a Hub/transport error)
        line = describe_hub_error(e, repo_id, revision, endpoint)
        if line is None:
            raise
        raise HubError(line) from e


def _snapshot(repo_id: str, revision: str | None, token, cache_dir, force: bool) -> Path:
    from huggingface_hub import snapshot_download

    endpoint = hub_endpoint()
    with hub_errors(repo_id, revision, endpoint):
        folder = snapshot_download(repo_id, revision=revision, endpoint=endpoint, token=token,
                                   cache_dir=cache_dir or os.environ.get("HF_HUB_CACHE") or None,
                                   allow_patterns=list(ARTIFACT_PATTERNS), force_download=force)
    return Path(folder)


def resolve_artifact(repo_id: str, revision: str | None = None, *, token: str | None = None,
                     cache_dir: str | Path | None = None) -> Path:
    """Download the artifact ``repo_id`` at ``revision`` (branch, tag or commit; default main), verify it,
    and return its local folder. A cached copy that fails verification is downloaded once more."""
    if not is_repo_id(str(repo_id)):
        raise HubError(f"{repo_id} is neither a local artifact directory nor a Hub repo id ('namespace/name')")
    path = _snapshot(repo_id, revision, token, cache_dir, force=False)
    if not (path / META_FILE).is_file():
        raise HubError(f"{repo_id}{f' at {revision}' if revision else ''} is not a WKVQuant artifact: "
                       f"it has no {META_FILE}")
    try:
        summary = verify(path)
    except ArtifactError as e:
        log.warning("%s from the cache failed verification (%s); downloading it again", repo_id, e)
        path = _snapshot(repo_id, revision, token, cache_dir, force=True)
        summary = verify(path)
    log.info("%s -> %s: %s", repo_id, path, summary.line())
    return path
