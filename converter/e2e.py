"""End-to-end tuning of the quantization parameters after the block-wise calibration.

Block-wise calibration (CRR) fits each block against a window of full-precision blocks; the error
left over accumulates through the depth of the model. This stage (``--e2e-epochs N``; in the
spirit of EfficientQAT's end-to-end training of quantization parameters) trains *only* the
quantization parameters of every block at once — LWC factors (``gamma``, ``beta``), K/V smoothing
``s`` and shift ``delta`` (and per-weight rounding offsets with ``--e2e-rounding``, the RMSNorm
weights with ``--tune-norms``) — with frozen weights,
the same fake quantization (straight-through rounding, POQ K/V per token), and the
full-precision model's next-token distribution as the target:

    loss = KL(p_fp || p_quant), averaged over the samples' tokens.

The teacher's distribution comes from the full-precision final hidden states that the block-wise
stage computes anyway, so no second model is on the device. On CUDA the quantized blocks stay in host
memory and are paged onto the device one at a time (:func:`paged_update`, :mod:`converter.offload`;
``--no-e2e-offload`` keeps them all on the device, as CPU runs do); either way each block is recomputed in
the backward pass (activation checkpointing), so activation memory is one block's plus the logits. Embeddings, final norm and LM head stay frozen
in full precision, as in the artifact. The result folds into the same
:class:`~converter.lwc.BlockParams`, so the artifact format is unchanged.
"""

from __future__ import annotations

import copy
import logging
import os
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from runtime.kvquant import KVQuantizer

from . import lwc, offload
from .calibrate import (
    BlockSetup,
    adamw,
    autocast,
    check_finite,
    run_epochs,
    set_lr_factor,
    train_epochs,
)
from .lwc import BlockParams

log = logging.getLogger(__name__)

CLIP_EPS = 2.0 ** -12  # the stored float16 clips may be exactly 1.0; keep their logit finite


# bytes a weight of the decoder Linears: the frozen weight (float16, as kept for a float16 checkpoint; float32
# sources take 4), trained rounding offsets (float32 value, gradient, two AdamW moments; the gradient only on the
# device), frozen learned rounding decisions (2 bits, LWCLinear.freeze_decisions)
WEIGHT_BYTES, TRAINED_OFFSET_BYTES, OFFSET_GRAD_BYTES, FROZEN_OFFSET_BYTES = 2, 16, 4, 0.25
PAGED_RESIDENT = 3  # blocks on the device at once when paged: in use, prefetched, being written back


def linear_weights(config) -> int:
    """The number of weights in the decoder Linears of a LLaMA config (q, k, v, o, gate, up, down per layer)."""
    h, i = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    q = config.num_attention_heads * head_dim
    return config.num_hidden_layers * (h * q + 2 * h * kv + q * h + 3 * h * i)


def memory_floor(config, ccfg, paged: bool = False) -> tuple[int, int]:
    """Lower bounds of the end-to-end stage's ``(device, host)`` memory in bytes for its blocks: every block's frozen
    weights and rounding offsets (trained with ``e2e_rounding``, with gradient and AdamW moments; else the learned
    blocks' decisions, frozen). In place all of it is on the device (host 0: the stage adds nothing there); ``paged``
    (:func:`offloaded`) the device holds :data:`PAGED_RESIDENT` blocks and every sample's states for the KL passes
    (:func:`mean_kl_paged`), the host all the blocks (without the gradients). The teacher's final states stay on the
    host (:func:`tune`); activations, logits and the fake
    quantization's temporaries come on top (measured at 7B in place without offsets: 19.76 GiB against a floor of
    13.6 GiB, BENCHMARKS.md)."""
    per_weight = WEIGHT_BYTES
    if ccfg.e2e_rounding:
        per_weight += TRAINED_OFFSET_BYTES
    elif ccfg.rounding == "learned":
        per_weight += FROZEN_OFFSET_BYTES
    weights = linear_weights(config)
    if not paged:
        return int(weights * per_weight), 0
    host = per_weight - (OFFSET_GRAD_BYTES if ccfg.e2e_rounding else 0)
    states = ccfg.nsamples * ccfg.seqlen * config.hidden_size * (4 if ccfg.compute_dtype == "float32" else 2)
    return int(PAGED_RESIDENT * weights * per_weight / config.num_hidden_layers) + states, int(weights * host)


def host_memory() -> int:
    """The host's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(config, ccfg, device, total: int | None = None, host_total: int | None = None,
                 host_resident: int = 0) -> None:
    """Refuse an end-to-end stage that cannot fit before any calibration runs: a one-line ValueError when
    :func:`memory_floor` exceeds the device's memory (``total`` bytes; default: the CUDA device's; CPU devices are
    not checked) or, paged, the host's (``host_total``; default :func:`host_memory`) with ``host_resident`` bytes
    already held there for the whole run (the source model, the teacher's states)."""
    if not ccfg.e2e_epochs:
        return
    paged = offloaded(ccfg, device)
    need, need_host = memory_floor(config, ccfg, paged)
    weights = f"{linear_weights(config) / 1e9:.2f} B weights"
    if paged:
        host_total = host_memory() if host_total is None else host_total
        need_host += host_resident
        if need_host > host_total:
            hint = ("drop --e2e-rounding (its offsets and their AdamW moments take 12 bytes a weight there)"
                    if ccfg.e2e_rounding else "use a machine with more memory")
            held = f", {host_resident / 2**30:.1f} GiB of it the source model and its states" if host_resident else ""
            raise ValueError(f"the end-to-end stage needs at least {need_host / 2**30:.1f} GiB of host memory "
                             f"({host_total / 2**30:.1f} GiB there{held}) for {weights}: {hint}")
    if total is None and torch.device(device).type != "cuda":
        return
    if total is None:
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    if need > total:
        if paged:
            hint = "use a device with more memory"
        elif ccfg.e2e_rounding:
            hint = "page the blocks with --e2e-offload or drop --e2e-rounding (its offsets take 16 bytes a weight)"
        elif ccfg.rounding == "learned":
            hint = "page the blocks with --e2e-offload, drop --e2e-epochs or use --rounding nearest"
        else:
            hint = "page the blocks with --e2e-offload or drop --e2e-epochs"
        raise ValueError(f"the end-to-end stage needs at least {need / 2**30:.1f} GiB on {device} "
                         f"({total / 2**30:.1f} GiB there) for {weights}: {hint}")


def offloaded(ccfg, device) -> bool:
    """Whether the stage pages its blocks from the host (``e2e_offload``; by default on CUDA devices)."""
    return ccfg.e2e_offload if ccfg.e2e_offload is not None else torch.device(device).type == "cuda"


def logit(p: torch.Tensor) -> torch.Tensor:
    p = p.float().clamp(CLIP_EPS, 1 - CLIP_EPS)
    return torch.log(p) - torch.log1p(-p)


def student_block(layer, config, index: int, params: BlockParams, setup: BlockSetup) -> nn.Module:
    """A trainable block (as :func:`converter.lwc.quant_block`) starting from the block-wise result.

    The blocks' learned rounding (``--rounding learned``: decisions ``d`` in -1/0/+1) applies as offsets
    ``d / 2``, which round the same way up to exact ties: learnable offsets starting there with
    ``e2e_rounding``, else the decisions held in 2 bits (:meth:`~converter.lwc.LWCLinear.freeze_decisions`,
    a quarter byte a weight instead of a float32 offset's 4; the same values)."""
    ccfg = setup.calib
    blk = lwc.quant_block(layer, config, index, setup.weight, ccfg.lwc, setup.device, rounding=ccfg.e2e_rounding,
                          tune_norms=ccfg.tune_norms, compiled=ccfg.compile, keep_weight=bool(params.rounding))
    with torch.no_grad():
        for name, (hi, lo) in params.clips.items():
            lin = blk.get_submodule(name)
            lin.gamma.copy_(logit(hi))
            lin.beta.copy_(logit(lo))
        for name, d in params.rounding.items():
            lin = blk.get_submodule(name)
            if ccfg.e2e_rounding:
                lin.offset.copy_(d.float() / 2)
            else:
                lin.freeze_decisions(d)
        for name, t in params.norms.items():
            blk.get_submodule(name.removesuffix(".weight")).weight.copy_(t)
    for p in lwc.rounding_parameters(blk):
        p.requires_grad_(ccfg.e2e_rounding)
    if params.kv is not None:
        kvq = lwc.SmoothedKV({k: v.to(setup.device) for k, v in params.kv.items()}, setup.kv, ccfg.compile)
    else:
        kvq = KVQuantizer(*lwc.kv_shape(config), setup.kv, device=setup.device)
    blk.self_attn.register_module("kv_quant", kvq)
    return blk


def make_optimizer(blocks, ccfg) -> torch.optim.Optimizer | None:
    """AdamW over the quantization parameters of all blocks: LWC and smoothing at ``e2e_lr``,
    rounding offsets (``e2e_rounding``) at ``e2e_round_lr``, RMSNorm weights (``tune_norms``) at ``norm_lr``."""
    quant = [p for b in blocks for p in (*lwc.lwc_parameters(b), *lwc.smooth_parameters(b))]
    offsets = [p for b in blocks for p in lwc.rounding_parameters(b) if p.requires_grad]
    norms = [p for b in blocks for p in lwc.norm_parameters(b)]
    return adamw(((quant, ccfg.e2e_lr), (offsets, ccfg.e2e_round_lr), (norms, ccfg.norm_lr)), ccfg.weight_decay)


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``KL(p_teacher || p_student)`` summed over the vocabulary, averaged over tokens (float32)."""
    s = F.log_softmax(student_logits.float().flatten(0, -2), dim=-1)
    t = F.log_softmax(teacher_logits.float().flatten(0, -2), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


class Head(nn.Module):
    """Frozen device copies of the source model's final norm and LM head."""

    def __init__(self, model, device, dtype):
        super().__init__()
        self.norm = copy.deepcopy(model.model.norm).to(device=device, dtype=dtype).requires_grad_(False)
        self.lm_head = copy.deepcopy(model.get_output_embeddings()).to(device=device, dtype=dtype).requires_grad_(False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))


def student_logits(blocks, head: Head, x: torch.Tensor, pe, recompute: bool) -> torch.Tensor:
    h = x
    for blk in blocks:
        if recompute:
            h = checkpoint(blk, h, position_embeddings=pe, use_reentrant=False)
        else:
            h = blk(h, position_embeddings=pe)
    return head(h)


@torch.no_grad()
def teacher_logits(head: Head, fp_out: torch.Tensor, idx, setup: BlockSetup) -> torch.Tensor:
    """The teacher's logits on the device for the samples ``idx`` (a slice, or CPU int64 indices) of ``fp_out``."""
    return head(fp_out[idx].to(setup.device))


@torch.no_grad()
def mean_kl(blocks, head, x0, fp_out, pe, setup: BlockSetup) -> float:
    total = torch.zeros((), device=setup.device)
    for s in range(x0.shape[0]):
        with autocast(setup):
            total += kl_loss(student_logits(blocks, head, x0[s:s + 1].to(setup.device), pe, False),
                             teacher_logits(head, fp_out, slice(s, s + 1), setup))
    return check_finite(total, "end-to-end stage", 0, 0) / x0.shape[0]


class Phases:
    """Wall seconds of the stage's phases (``setup``: building the students; ``kl``: both KL passes; ``train``;
    ``fold``), the device synchronised at each boundary so that a phase owns its queued work."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}
        self.t = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self.t, 3)
        self.t = now


def tune(model, config, x0: torch.Tensor, fp_out: torch.Tensor, pe, results: list[BlockParams],
         setup: BlockSetup) -> tuple[list[BlockParams], dict]:
    """Train every block's quantization parameters end to end; returns the refolded parameters
    (block-wise losses kept) and a summary (KL before, per epoch, after; seconds, per :class:`Phases`).

    ``x0 [N, T, H]``: the embedded samples; ``fp_out [N, T, H]``: the full-precision model's
    final hidden states (before the final norm), on the host or the device (a sample's states are copied to the
    device when its step needs them: ~16 MB a sample at 7B, against 2.1 GB for all 128 on the device).
    With :func:`offloaded` the blocks live on the host and are paged onto the device one at a time
    (:func:`paged_update`, :func:`mean_kl_paged`; the same values, the device memory of ~3 blocks instead of all)."""
    start = time.perf_counter()
    clock = Phases(setup.device)
    ccfg = setup.calib
    layers = model.model.layers
    head = Head(model, setup.device, setup.dtype)
    epochs = (x0.shape[0], ccfg.e2e_epochs, setup, torch.Generator().manual_seed(setup.seed), "end-to-end stage",
              ccfg.e2e_schedule)  # run_epochs' arguments after the step
    if offloaded(ccfg, setup.device):
        paged, opts = [], []
        for i, p in enumerate(results):  # each block built on the device, then moved into its host arena
            blk = student_block(layers[i], config, i, p, setup)
            opts.append(make_optimizer([blk], ccfg))
            paged.append(offload.PagedBlock(blk, setup.device, opts[-1]))
        pager = offload.Pager(paged)
        log.info("end-to-end stage: %d blocks paged from the host (%.1f GiB there, page-locked: %s)", len(paged),
                 sum(len(b.arena.buf) for b in paged) / 2**30, all(b.arena.pinned for b in paged))
        if all(o is None for o in opts):
            pager.close()
            return results, {}
        blocks = [b.module for b in paged]

        def kl():
            return mean_kl_paged(pager, head, x0, fp_out, pe, setup)

        def train():
            return run_epochs(paged_update(pager, opts, head, x0, fp_out, pe, setup), *epochs)

        def fold():
            return [lwc.fold_block(blk) for _, blk in pager.walk()]

        close = pager.close
    else:
        blocks = nn.ModuleList(student_block(layers[i], config, i, p, setup) for i, p in enumerate(results))
        opt = make_optimizer(blocks, ccfg)
        if opt is None:
            return results, {}

        def kl():
            return mean_kl(blocks, head, x0, fp_out, pe, setup)

        def step_loss(idx):
            with autocast(setup):
                return kl_loss(student_logits(blocks, head, x0[idx].to(setup.device), pe, True),
                               teacher_logits(head, fp_out, idx, setup))

        def train():
            return train_epochs(opt, step_loss, *epochs)

        def fold():
            return [lwc.fold_block(blk) for blk in blocks]

        def close():
            pass
    clock.lap("setup")
    try:
        initial = kl()
        clock.lap("kl")
        for blk in blocks:
            blk.train()
        epoch_losses = train()
        clock.lap("train")
        for blk in blocks:
            blk.eval()
        final = kl()
        clock.lap("kl")
        tuned = fold()
        clock.lap("fold")
    finally:
        close()
    for p, before in zip(tuned, results):
        p.loss, p.initial_loss, p.epoch_losses, p.seconds = (before.loss, before.initial_loss,
                                                             before.epoch_losses, before.seconds)
    summary = {"kl_initial": initial, "kl_epochs": epoch_losses, "kl_final": final,
               "seconds": round(time.perf_counter() - start, 3), "phase_seconds": clock.seconds}
    log.info("end-to-end: KL %.5f -> %.5f (%.1f s)", initial, final, summary["seconds"])
    return tuned, summary


def paged_update(pager: offload.Pager, opts, head: Head, x0, fp_out, pe, setup: BlockSetup):
    """The training step of :func:`tune` with the blocks paged (``opts``: each block's AdamW, or None), as
    :func:`converter.calibrate.run_epochs` calls it: the forward pass keeps each block's input; the backward pass
    recomputes each block from it, last block first, and steps that block's optimizer before the next one is paged
    in — what the checkpointed whole-model step computes (per-parameter AdamW), a block on the device at a time."""
    bases = [[g["lr"] for g in o.param_groups] if o is not None else [] for o in opts]

    def update(idx, factor):
        for o, base in zip(opts, bases):
            if o is not None:
                set_lr_factor(o, base, factor)
        h = x0[idx].to(setup.device)
        inputs = []
        with torch.no_grad():
            target = teacher_logits(head, fp_out, idx, setup)
            for _, blk in pager.walk():
                inputs.append(h)
                with autocast(setup):
                    h = blk(h, position_embeddings=pe)
        h = h.detach().requires_grad_()
        with autocast(setup):
            loss = kl_loss(head(h), target)
        loss.backward()
        grad = h.grad
        for j, blk in pager.walk(reverse=True, train=True):
            x = inputs.pop().detach().requires_grad_(j > 0)
            with autocast(setup):
                out = blk(x, position_embeddings=pe)
            out.backward(grad)
            grad = x.grad
            del x, out
            if opts[j] is not None:
                opts[j].step()
                opts[j].zero_grad(set_to_none=True)
        return loss.detach()

    return update


@torch.no_grad()
def mean_kl_paged(pager: offload.Pager, head: Head, x0, fp_out, pe, setup: BlockSetup) -> float:
    """:func:`mean_kl` block by block: each block paged in once for all samples, its fake-quantized weights computed
    once (:func:`converter.lwc.held_weights`), every sample's states on the device meanwhile (16 MB a sample at 7B:
    2.1 GB for 128; kept on the host they would cross the host link twice a block)."""
    hs = [x0[s:s + 1].to(setup.device) for s in range(x0.shape[0])]
    for _, blk in pager.walk():
        with lwc.held_weights(blk):
            for s, h in enumerate(hs):
                with autocast(setup):
                    hs[s] = blk(h, position_embeddings=pe)
    total = torch.zeros((), device=setup.device)
    for s, h in enumerate(hs):
        with autocast(setup):
            total += kl_loss(head(h), teacher_logits(head, fp_out, slice(s, s + 1), setup))
    return check_finite(total, "end-to-end stage", 0, 0) / x0.shape[0]
