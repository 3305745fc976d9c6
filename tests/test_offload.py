"""converter/offload.py: blocks on the host, paged onto the device (the end-to-end stage's --e2e-offload).

CPU runs the bookkeeping with plain copies; the CUDA test (skipped without a GPU) runs the asynchronous copies on
their streams and checks that training through the pager computes what training in place computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from converter import offload


def _module(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 16, bias=False))
    m.register_buffer("frozen", torch.randn(5, dtype=torch.float16))
    m[2].weight.requires_grad_(False)
    return m


def _host_ptrs(pb: offload.PagedBlock) -> set[int]:
    return {t.data_ptr() for t in pb.host} | {t.data_ptr() for st in pb.host_state.values() for t in st.values()}


def test_arena_carves_aligned_tensors_and_refuses_overflow():
    arena = offload.HostArena(1000, pin=False)
    a = arena.take(torch.empty(3, dtype=torch.float16))
    b = arena.take(torch.empty(2, 5))
    assert (b.data_ptr() - a.data_ptr()) == offload.ALIGN and b.shape == (2, 5) and b.dtype == torch.float32
    b.fill_(2.0)
    assert float(arena.base[offload.ALIGN:offload.ALIGN + 40].view(torch.float32).sum()) == 20.0
    with pytest.raises(RuntimeError, match="arena of 1000 bytes is full"):
        arena.take(torch.empty(200))


def test_paged_block_moves_values_not_results():
    """The module's tensors live in the arena (the same values); attached, it computes on copies; trained and
    released with write-back, the host holds the new parameters and AdamW's moments, and nothing of the device
    copies stays referenced (tensors, moments, gradients)."""
    ref, m = _module(), _module()
    x = torch.randn(4, 16)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    pb = offload.PagedBlock(m, "cpu", opt)
    assert len(pb.trained) == 2 and len(pb.host) == 4  # two trained parameters, one frozen weight, one buffer
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), m.state_dict().values()))
    pager = offload.Pager([pb])
    for step in range(3):
        for _, blk in pager.walk(train=True):
            assert not {t.data_ptr() for t in blk.state_dict().values()} & _host_ptrs(pb)  # on copies
            blk(x).square().mean().backward()
            opt.step()
        ref(x).square().mean().backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        assert {t.data_ptr() for t in m.state_dict().values()} <= _host_ptrs(pb)  # back on the host
        assert all(p.grad is None for p in m.parameters())
        moments = [t for st in opt.state.values() for k, t in st.items() if k in offload.STATE_KEYS]
        assert len(moments) == 4 and {t.data_ptr() for t in moments} <= _host_ptrs(pb)
        assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), m.state_dict().values())), step
    for _, blk in pager.walk():  # a forward walk writes nothing back
        with torch.no_grad():
            for p in blk.parameters():
                p.add_(1.0)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), m.state_dict().values()))
    pager.close()


def test_pager_walks_in_order_and_releases_on_early_exit():
    pbs = [offload.PagedBlock(_module(i), "cpu") for i in range(3)]
    pager = offload.Pager(pbs)
    assert [i for i, _ in pager.walk()] == [0, 1, 2]
    assert [i for i, _ in pager.walk(reverse=True)] == [2, 1, 0]
    walk = pager.walk()
    next(walk)
    walk.close()
    assert all(t.data_ptr() in _host_ptrs(pbs[0]) for t in pbs[0].module.state_dict().values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_paged_training_on_cuda_is_training_in_place():
    """On CUDA (pinned arena, copies on the upload and download streams): several blocks trained through the pager
    for a few steps end exactly where the same blocks trained on the device end, and the pager leaves no more than
    its resident blocks on the device."""
    dev = torch.device("cuda")
    ref = [_module(i).to(dev) for i in range(4)]
    paged = [_module(i) for i in range(4)]
    ref_opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in ref]
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in paged]
    pager = offload.Pager([offload.PagedBlock(m, dev, o) for m, o in zip(paged, opts)])
    assert all(pb.arena.pinned for pb in pager.blocks)
    x0 = torch.randn(8, 16, device=dev)
    for _ in range(3):
        h = x0
        for m in ref:
            h = m(h)
        h.square().mean().backward()
        for o in ref_opts:
            o.step()
            o.zero_grad(set_to_none=True)
        inputs, h = [], x0
        with torch.no_grad():
            for _, blk in pager.walk():
                inputs.append(h)
                h = blk(h)
        h = h.detach().requires_grad_()
        h.square().mean().backward()
        grad = h.grad
        for j, blk in pager.walk(reverse=True, train=True):
            x = inputs.pop().detach().requires_grad_()
            blk(x).backward(grad)
            grad = x.grad
            opts[j].step()
    pager.close()
    for a, b in zip(ref, paged):
        assert all(torch.equal(t.cpu(), u) for t, u in zip(a.state_dict().values(), b.state_dict().values()))
