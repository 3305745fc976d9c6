"""Blocks kept on the host and paged onto the device one at a time (the end-to-end stage's ``--e2e-offload``).

The end-to-end stage trains every block at once; holding them all on the device costs the whole model's
weights plus their trained state (18 bytes a weight with rounding offsets: ~117 GB at LLaMA-2-7B). Paged,
the device holds only the block in use, the next one (prefetched while the current one computes) and the one
being written back; everything else stays in host memory, as in the block-wise stage.

* :class:`PagedBlock` — one module's parameters, buffers and optimizer state: host tensors that
  :meth:`~PagedBlock.fetch` copies to the device (asynchronously on CUDA, on an upload stream) and
  :meth:`~PagedBlock.attach` swaps in; :meth:`~PagedBlock.release` swaps the host tensors back, writing the
  trained parameters and their AdamW moments back first when asked (on a download stream).
* :class:`Pager` — walks a list of paged blocks forwards or backwards, each block attached while the
  caller uses it and the next one already on its way.

On CPU the same bookkeeping runs with plain copies (the tests compare a paged stage against the stage that
keeps every block in place, exactly). Nothing here changes a value: paging only moves tensors.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
from collections.abc import Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)

STATE_KEYS = ("exp_avg", "exp_avg_sq")  # the AdamW moments (its "step" counter stays a host scalar)


def _slots(module: nn.Module) -> list[tuple[nn.Module, str, bool]]:
    """``(owner, name, is_parameter)`` of every tensor of ``module`` (each owner's own, no duplicates)."""
    slots = []
    for owner in module.modules():
        slots += [(owner, n, True) for n, p in owner._parameters.items() if p is not None]
        slots += [(owner, n, False) for n, b in owner._buffers.items() if b is not None]
    return slots


def _get(owner: nn.Module, name: str, param: bool) -> torch.Tensor:
    return owner._parameters[name] if param else owner._buffers[name]


def _set(owner: nn.Module, name: str, param: bool, t: torch.Tensor) -> None:
    if param:
        owner._parameters[name].data = t
    else:
        owner._buffers[name] = t


ALIGN = 256  # bytes: every tensor carved from a HostArena starts at a multiple


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class HostArena:
    """One page-aligned anonymous host mapping carved into tensors, page-locked in place on CUDA
    (``cudaHostRegister``: the exact size, where pinned tensors from torch's host allocator round up to a power of
    two, up to twice the memory), so copies to and from the device run asynchronously."""

    def __init__(self, nbytes: int, pin: bool):
        self.buf = mmap.mmap(-1, max(nbytes, 1))
        self.base = torch.frombuffer(self.buf, dtype=torch.uint8)
        self.used = 0
        self.pinned = False
        if pin:
            err = int(torch.cuda.cudart().cudaHostRegister(self.base.data_ptr(), len(self.buf), 0))
            self.pinned = err == 0
            if not self.pinned:
                log.warning("could not page-lock %d bytes of host memory (CUDA error %d): the end-to-end stage's "
                            "copies to the device will be synchronous and slower", len(self.buf), err)

    def take(self, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised contiguous host tensor of ``like``'s shape and dtype."""
        n = _nbytes(like)
        if self.used + n > len(self.buf):
            raise RuntimeError(f"host arena of {len(self.buf)} bytes is full")
        t = self.base[self.used:self.used + n].view(like.dtype).view(like.shape)
        self.used += _aligned(n)
        return t

    def close(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.base.data_ptr())
            self.pinned = False


class PagedBlock:
    """``module``'s tensors moved into a :class:`HostArena` and paged onto ``device`` (see the module docstring).
    ``optimizer``: the AdamW over its trainable parameters, whose moments get host room in the arena too."""

    def __init__(self, module: nn.Module, device: torch.device, optimizer: torch.optim.Optimizer | None = None):
        self.module, self.device, self.optimizer = module, torch.device(device), optimizer
        self.cuda = self.device.type == "cuda"
        self.slots = _slots(module)
        tensors = [_get(*s).data for s in self.slots]
        trained = {id(p) for g in optimizer.param_groups for p in g["params"]} if optimizer is not None else set()
        self.trained = [i for i, (o, n, param) in enumerate(self.slots) if param and id(o._parameters[n]) in trained]
        size = sum(_aligned(_nbytes(t)) for t in tensors) + sum(
            len(STATE_KEYS) * _aligned(_nbytes(tensors[i])) for i in self.trained)
        self.arena = HostArena(size, self.cuda)
        self.host = []
        for slot, t in zip(self.slots, tensors):
            h = self.arena.take(t)
            h.copy_(t)
            _set(*slot, h)
            self.host.append(h)
        self.host_state = {i: {k: self.arena.take(tensors[i]) for k in STATE_KEYS} for i in self.trained}
        self.written: torch.cuda.Event | None = None  # the last write-back (CUDA)
        self.staged: tuple[list[torch.Tensor], dict, torch.cuda.Event | None] | None = None

    def _param(self, i: int) -> nn.Parameter:
        owner, name, _ = self.slots[i]
        return owner._parameters[name]

    def _stepped(self) -> list[int]:
        """The trained slots whose optimizer state exists (after the first step)."""
        return [i for i in self.trained if self.optimizer.state.get(self._param(i))]

    def fetch(self, up: torch.cuda.Stream | None = None, state: bool = False) -> None:
        """Start copying the tensors (and, with ``state``, the optimizer's moments) to the device."""
        ctx = torch.cuda.stream(up) if self.cuda and up is not None else contextlib.nullcontext()
        with ctx:
            if self.cuda and self.written is not None:
                torch.cuda.current_stream().wait_event(self.written)
            tensors = [t.to(self.device, non_blocking=True, copy=True) for t in self.host]
            moments = {i: {k: t.to(self.device, non_blocking=True, copy=True) for k, t in self.host_state[i].items()}
                       for i in (self._stepped() if state else ())}
            event = None
            if self.cuda:
                event = torch.cuda.Event()
                event.record()
        self.staged = (tensors, moments, event)

    def attach(self) -> nn.Module:
        """Swap the fetched device tensors in (waiting for their copies); returns the module."""
        if self.staged is None:
            self.fetch()
        tensors, moments, event = self.staged
        self.staged = None
        if self.cuda and event is not None:
            stream = torch.cuda.current_stream()
            stream.wait_event(event)
            for t in (*tensors, *(m for st in moments.values() for m in st.values())):
                t.record_stream(stream)
        for slot, t in zip(self.slots, tensors):
            _set(*slot, t)
        for i, st in moments.items():
            self.optimizer.state[self._param(i)].update(st)
        return self.module

    def release(self, down: torch.cuda.Stream | None = None, write_back: bool = False) -> None:
        """Swap the host tensors back; with ``write_back`` first copy the trained parameters and their moments
        (which the optimizer keeps on the device from its first step on) to the host."""
        if write_back and self.trained:
            compute = torch.cuda.current_stream() if self.cuda else None
            ctx = torch.cuda.stream(down) if self.cuda and down is not None else contextlib.nullcontext()
            with ctx:
                if self.cuda:
                    torch.cuda.current_stream().wait_stream(compute)
                for i in self.trained:
                    self._download(self.host[i], self._param(i).data)
                for i in self._stepped():
                    st = self.optimizer.state[self._param(i)]
                    for k in STATE_KEYS:
                        self._download(self.host_state[i][k], st[k])
                        st[k] = self.host_state[i][k]
                if self.cuda:
                    self.written = torch.cuda.Event()
                    self.written.record()
        for i, slot in enumerate(self.slots):
            if slot[2]:
                self._param(i).grad = None
            _set(*slot, self.host[i])

    def _download(self, host: torch.Tensor, dev: torch.Tensor) -> None:
        host.copy_(dev, non_blocking=self.cuda)
        if self.cuda:
            dev.record_stream(torch.cuda.current_stream())

    def close(self) -> None:
        """Wait for the last write-back and unpin the arena (its tensors stay valid as pageable memory)."""
        if self.written is not None:
            self.written.synchronize()
        self.arena.close()


class Pager:
    """A list of :class:`PagedBlock` walked in order, one block attached at a time, the next one prefetched."""

    def __init__(self, blocks: list[PagedBlock]):
        self.blocks = blocks
        cuda = bool(blocks) and blocks[0].cuda
        self.up = torch.cuda.Stream(blocks[0].device) if cuda else None
        self.down = torch.cuda.Stream(blocks[0].device) if cuda else None

    def walk(self, reverse: bool = False, train: bool = False) -> Iterator[tuple[int, nn.Module]]:
        """``(index, module)`` for every block (last first with ``reverse``); with ``train`` each comes with its
        optimizer's moments and is written back once the caller moves on (after its optimizer step)."""
        order = list(range(len(self.blocks)))[::-1 if reverse else 1]
        if order:
            self.blocks[order[0]].fetch(self.up, train)
        for n, i in enumerate(order):
            blk = self.blocks[i]
            module = blk.attach()
            if n + 1 < len(order):
                self.blocks[order[n + 1]].fetch(self.up, train)
            try:
                yield i, module
            finally:
                blk.release(self.down, write_back=train)

    def close(self) -> None:
        for b in self.blocks:
            b.close()
