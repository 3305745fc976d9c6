"""Per-block calibration state in a work directory next to ``--out``, for ``--resume``.

Layout of ``.<out name>.wkvq-work/`` (a hidden sibling of ``--out``; never a valid artifact)::

    state.json              {"fingerprint": ..., "recipe": ...}: what the blocks were calibrated for
    block_0003.safetensors  the folded parameters of block 3 (+ JSON metadata: loss, time)

A block file is written to a temporary name and renamed, so a present file is complete. No pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from runtime.artifact import KV_TENSORS

from .lwc import BlockParams

log = logging.getLogger(__name__)

STATE_FILE = "state.json"


def work_dir_for(out: str | Path) -> Path:
    out = Path(out).resolve()
    return out.parent / f".{out.name}.wkvq-work"


def fingerprint(recipe: dict) -> str:
    """sha256 of a JSON-serialisable description of everything the calibration depends on."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


class WorkDir:
    """Saves and loads :class:`BlockParams` per block index."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def open(cls, path: str | Path, recipe: dict, resume: bool) -> WorkDir:
        """Create the work dir, or reuse it with ``resume`` if it was made for the same ``recipe``."""
        path, digest = Path(path), fingerprint(recipe)
        state = path / STATE_FILE
        if path.exists():
            if not resume:
                raise ValueError(f"{path} holds the state of an interrupted calibration; "
                                 "pass --resume to continue it, or delete it to start over")
            found = json.loads(state.read_text()).get("fingerprint") if state.is_file() else None
            if found != digest:
                raise ValueError(f"{path} was made for a different model, data or recipe than this run; "
                                 "run with the same flags to resume, or delete it to start over")
            work = cls(path)
            log.info("resuming from %s (%d blocks done)", path, len(work.done()))
            return work
        path.mkdir(parents=True)
        tmp = path / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps({"fingerprint": digest, "recipe": recipe}, indent=1, default=str))
        os.replace(tmp, state)
        return cls(path)

    def block_file(self, index: int) -> Path:
        return self.path / f"block_{index:04d}.safetensors"

    def done(self) -> list[int]:
        return sorted(int(p.stem.split("_")[1]) for p in self.path.glob("block_*.safetensors"))

    def save(self, index: int, params: BlockParams) -> None:
        tensors = {}
        for name, (hi, lo) in params.clips.items():
            tensors[f"{name}.clip_hi"], tensors[f"{name}.clip_lo"] = hi.contiguous(), lo.contiguous()
        for name, t in params.rounding.items():
            tensors[f"{name}.rounding"] = t.contiguous()
        for name, t in params.norms.items():
            tensors[f"norm.{name}"] = t.contiguous()
        for name, t in (params.kv or {}).items():
            tensors[f"kv.{name}"] = t.contiguous()
        meta = {"loss": params.loss, "initial_loss": params.initial_loss, "epoch_losses": params.epoch_losses,
                "seconds": params.seconds, "clips": sorted(params.clips), "rounding": sorted(params.rounding),
                "norms": sorted(params.norms), "kv": params.kv is not None}
        target = self.block_file(index)
        tmp = target.with_name(target.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"wkvq_block": json.dumps(meta)})
        os.replace(tmp, target)

    def load(self, index: int) -> BlockParams | None:
        """The saved parameters of block ``index``, or None if it was not finished."""
        path = self.block_file(index)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = json.loads(f.metadata()["wkvq_block"])
            clips = {n: (f.get_tensor(f"{n}.clip_hi"), f.get_tensor(f"{n}.clip_lo")) for n in meta["clips"]}
            rounding = {n: f.get_tensor(f"{n}.rounding") for n in meta.get("rounding", [])}
            norms = {n: f.get_tensor(f"norm.{n}") for n in meta.get("norms", [])}
            kv = {n: f.get_tensor(f"kv.{n}") for n in KV_TENSORS} if meta["kv"] else None
        return BlockParams(clips=clips, rounding=rounding, norms=norms, kv=kv, loss=meta["loss"],
                           initial_loss=meta["initial_loss"], epoch_losses=meta["epoch_losses"],
                           seconds=meta["seconds"])

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
