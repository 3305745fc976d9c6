"""Triton kernels for the CUDA decode path (INT4 weights, 4-bit POQ KV cache).

Triton is optional: CI and CPU-only installs do not have it. :func:`available` says whether the
kernels can run on tensors of a given device: on CUDA when Triton is installed, and on CPU
tensors only under Triton's interpreter (``TRITON_INTERPRET=1``, for tests).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path

import torch


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _index(device: torch.device) -> int:
    """The CUDA device's index (the current device for a bare ``cuda``): the key of the cached queries below."""
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def cuda_major(device) -> int:
    """The major compute capability of ``device`` when the kernels compile for it (a CUDA device, outside Triton's
    interpreter), else 0: what the inline PTX of a kernel needs (e.g. 8 for ``mma.sync``, 9 for PDL)."""
    device = torch.device(device)
    if interpreting() or device.type != "cuda" or not torch.cuda.is_available():
        return 0
    return _major(_index(device))


@functools.cache
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def multiprocessors(device) -> int:
    """Multiprocessors of ``device`` (cached; 4 off CUDA, for Triton's interpreter)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 4
    return _sms(_index(device))


@functools.cache
def _shared(index: int) -> int:
    return getattr(torch.cuda.get_device_properties(index), "shared_memory_per_multiprocessor", 0)


def shared_memory_per_multiprocessor(device, default: int) -> int:
    """Bytes of shared memory of one of ``device``'s multiprocessors (cached; ``default`` off CUDA or where this
    torch does not report it): 228 KB on Hopper and B200, ~100 KB on an RTX 5090."""
    device = torch.device(device)
    if device.type != "cuda":
        return default
    return _shared(_index(device)) or default


def device_key(device) -> str:
    """``device`` named with its index (``"cuda"`` and ``"cuda:0"`` are one device when 0 is current): the key of
    per-device buffers kept for the process."""
    device = torch.device(device)
    return str(torch.device("cuda", _index(device)) if device.type == "cuda" else device)


_KEPT: dict[tuple[str, str], torch.Tensor] = {}


def kept_zeros(name: str, device, rows: int, cols: tuple[int, ...] = (), dtype=torch.int32) -> torch.Tensor:
    """A buffer named ``name`` on ``device`` (:func:`device_key`), kept for the process: ``[>= rows, *cols]`` of
    ``dtype``, zeros when made, made again (larger) where a caller needs more rows. What the kernels leave in it
    stays for the next launch (and a captured CUDA graph keeps the tensor it was given)."""
    key = (name, device_key(device))
    buf = _KEPT.get(key)
    if buf is None or buf.shape[0] < rows:
        buf = _KEPT[key] = torch.zeros(rows, *cols, dtype=dtype, device=device)
    return buf


def kept(name: str, device) -> torch.Tensor | None:
    """The buffer :func:`kept_zeros` keeps under ``name`` on ``device``, or None where none was made."""
    return _KEPT.get((name, device_key(device)))


def zeroed_counts(name: str, device, n: int) -> torch.Tensor:
    """A zeroed ``int32 [>= n]`` buffer of counts named ``name``, one per device, kept for the process
    (:func:`kept_zeros`, at least 1024): the kernels that count in it leave it zeroed (the program that completes a
    count sets it back), so launches in stream order share it and a captured CUDA graph needs no memset."""
    return kept_zeros(name, device, max(n, 1024))


def check_row_buffer(name: str, buf: torch.Tensor, rows: int) -> None:
    """Raise unless ``buf`` is a ``[rows, n]`` buffer with unit stride along ``n`` (one a kernel zeroes row by row
    in the same launch as its own work)."""
    if buf.dim() != 2 or buf.shape[0] != rows or buf.stride(1) != 1:
        raise ValueError(f"{name} must be [{rows}, n] with unit stride along n, got {list(buf.shape)} "
                         f"strides {buf.stride()}")


def head_dim_ok(head_dim: int) -> bool:
    """Whether the attention kernels take heads of ``head_dim`` channels: a power of two, at least 8 (their tiles
    are ``tl.arange`` over a head's channels and its 4-bit words)."""
    return head_dim >= 8 and head_dim & (head_dim - 1) == 0


def available(device) -> bool:
    """Whether the Triton kernels can run on tensors on ``device``."""
    device = torch.device(device)
    if not triton_installed():
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and interpreting()


def sweep_table(path, entry, what: str, tool: str) -> dict:
    """The ``best`` table of the sweep record at ``path`` (written by ``tool --json``), each ``key: row`` of it
    turned into ``(key, config)`` by ``entry``; anything else is a one-line ``ValueError`` naming ``what``."""
    try:
        return dict(entry(key, row) for key, row in json.loads(Path(path).read_text())["best"].items())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not {what} sweep record with a 'best' table ({type(e).__name__}: {e}); "
                         f"write one with {tool} --json") from e


@functools.cache
def env_tables(paths: str | None, load) -> dict:
    """The tables ``load(path)`` of the records in ``paths`` (an environment variable's value, ``os.pathsep``-
    separated, e.g. one sweep per batch; later ones win), read once per value."""
    table = {}
    for path in filter(None, (paths or "").split(os.pathsep)):
        table.update(load(path))
    return table


MAX_QG = 4  # query heads a program of the tensor-core attention (runtime.kernels.kv4_mma)


def query_parts(qg: int) -> int:
    """Programs that share a KV head's split in the tensor-core attention (``PARTS`` of
    :func:`runtime.kernels.kv4_mma._attn_mma_kernel`): the fewest that divide ``qg`` query heads a KV head into parts
    of at most :data:`MAX_QG` (1 up to 4; LLaMA-2-70B's 8: 2; 6: 2; 7: 7). Each part reads the KV head's tiles; the
    parts run side by side, so the later ones find most of them in L2 (inferred from times, NOTES.md round 28)."""
    if qg < 1:
        raise ValueError(f"query heads a KV head must be at least 1, got {qg}")
    return next(p for p in range(1, qg + 1) if qg % p == 0 and qg // p <= MAX_QG)


def part_heads(qg: int) -> int:
    """Query heads a program of the tensor-core attention takes of ``qg`` a KV head (``qg / query_parts(qg)``): the
    heads one ready flag stands for."""
    return qg // query_parts(qg)


MERGE_ROWS = 64  # partial rows (query heads x splits) one program merges in one level


def merge_group(heads: int, splits: int) -> int:
    """Splits whose partial results a first merge level combines (1: one level) in the tensor-core attention's fused
    combine (``GROUP`` of :func:`runtime.kernels.kv4._combine_if_last`) for a program of ``heads`` query heads and
    ``splits`` splits. One warp merges what it is given a batch of registers at a time, so one level over 4 heads
    of 64 splits (128 KB of partials, LLaMA-3-8B and the 70B's parts) took ~13 µs after the last tile (NOTES.md round
    29). Above :data:`MERGE_ROWS` rows, the last program of each group of about ``sqrt(splits)`` splits merges its
    group and the last of those the groups: two shorter chains, one more count."""
    if heads < 1 or splits < 1:
        raise ValueError(f"heads and splits must be at least 1, got {heads}, {splits}")
    if heads * splits <= MERGE_ROWS:
        return 1
    g = 1
    while g * g < splits:
        g *= 2
    return g if splits % g == 0 and g < splits else 1
