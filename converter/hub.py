"""Push an artifact to the Hugging Face Hub: verify it, write its model card, create the repo, and
upload every file in one commit.

The token comes from the ``token`` argument, ``HF_TOKEN`` or the stored login
(``huggingface_hub.get_token``); it is passed to ``HfApi`` and never logged, printed or written.
``HF_ENDPOINT`` is read when called. Failures are one-line :class:`runtime.hub.HubError` s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from runtime.artifact import read_metadata, verify
from runtime.hub import HubError, check_repo_id, endpoint_name, hub_endpoint, hub_errors

from .card import CARD_FILE, write_card

log = logging.getLogger(__name__)

DEFAULT_BRANCH = "main"


@dataclass(frozen=True)
class PushConfig:
    """What ``wkvq push`` does. ``revision``: a branch, created from main if missing."""

    directory: Path
    repo_id: str
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None
    exist_ok: bool = False
    dry_run: bool = False
    base_model: str | None = None

    def __post_init__(self):
        check_repo_id(self.repo_id)
        if self.revision is not None and (not self.revision.strip() or self.revision.startswith("refs/pr/")):
            raise ValueError(f"--revision must be a branch name, got {self.revision!r}")

    @property
    def branch(self) -> str:
        return self.revision or DEFAULT_BRANCH


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    branch: str
    files: tuple[tuple[str, int], ...]  # (path in repo, bytes), README.md included
    card: Path
    dry_run: bool
    commit_url: str | None = None
    commit_oid: str | None = None


def artifact_files(directory: Path) -> list[tuple[str, int]]:
    """``(name, bytes)`` of the regular, non-hidden files at the top of ``directory``, sorted."""
    return sorted((p.name, p.stat().st_size) for p in directory.iterdir()
                  if p.is_file() and not p.is_symlink() and not p.name.startswith("."))


def require_token(token: str | None = None) -> str:
    """``token`` or the one huggingface_hub finds (``HF_TOKEN``, stored login); never echoed."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise HubError("no Hugging Face token: set HF_TOKEN to a write token or run `hf auth login`")
    return token


def default_message(meta: dict) -> str:
    w, kv = meta["weight_quant"], meta["kv_quant"]
    return f"Upload W{w['bits']}KV{kv['bits']} {meta['method']} artifact (wkvquant {meta['producer']['version']})"


def prepare(cfg: PushConfig) -> tuple[list[tuple[str, int]], Path]:
    """Verify the artifact and write its card: ``(files to upload, card path)``. No network."""
    directory = Path(cfg.directory)
    summary = verify(directory)
    log.info("%s: %s", directory, summary.line())
    card = write_card(directory, cfg.repo_id, [f for f in artifact_files(directory) if f[0] != CARD_FILE],
                      cfg.base_model)
    return artifact_files(directory), card


def _create_repo(api, cfg: PushConfig) -> None:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.create_repo(cfg.repo_id, private=cfg.private, exist_ok=False)
        log.info("created %s", cfg.repo_id)
    except HfHubHTTPError as e:
        if e.response is None or e.response.status_code != 409:
            raise
        if not (cfg.exist_ok or cfg.revision):
            raise HubError(f"repo {cfg.repo_id} already exists on {endpoint_name(api.endpoint)}; pass --exist-ok "
                           f"to add a commit to it, or --revision BRANCH to push to a branch") from None
        log.info("%s exists; adding a commit to %s", cfg.repo_id, cfg.branch)
    if cfg.branch != DEFAULT_BRANCH:
        api.create_branch(cfg.repo_id, branch=cfg.branch, exist_ok=True)


def push(cfg: PushConfig, token: str | None = None) -> PushResult:
    """Verify ``cfg.directory``, write its card, then (unless ``dry_run``) create the repo and upload."""
    files, card = prepare(cfg)
    if cfg.dry_run:
        return PushResult(cfg.repo_id, cfg.branch, tuple(files), card, dry_run=True)
    from huggingface_hub import CommitOperationAdd, HfApi

    token = require_token(token)
    endpoint = hub_endpoint()
    api = HfApi(endpoint=endpoint, token=token)
    directory = Path(cfg.directory)
    ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(directory / name)) for name, _ in files]
    message = cfg.commit_message or default_message(read_metadata(directory))
    with hub_errors(cfg.repo_id, cfg.revision, endpoint):
        _create_repo(api, cfg)
        info = api.create_commit(cfg.repo_id, ops, commit_message=message, revision=cfg.branch)
    log.info("pushed %d files to %s@%s: %s", len(files), cfg.repo_id, cfg.branch, info.commit_url)
    return PushResult(cfg.repo_id, cfg.branch, tuple(files), card, dry_run=False,
                      commit_url=str(info.commit_url), commit_oid=info.oid)


def preflight(repo_id: str, token: str | None = None) -> None:
    """Before a long conversion: the id is valid, a token exists, and the repo does not exist yet."""
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    token = require_token(token)
    endpoint = hub_endpoint()
    with hub_errors(repo_id, None, endpoint):
        exists = HfApi(endpoint=endpoint, token=token).repo_exists(repo_id)
    if exists:
        raise HubError(f"repo {repo_id} already exists on {endpoint_name(endpoint)}; choose another --push-to-hub "
                       f"id, or convert first and then run `wkvq push DIR {repo_id} --exist-ok`")
