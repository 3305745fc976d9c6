"""WKVQuant calibration: blocks in order, LWC + K/V smoothing/shift, CRR loss, POQ fake-quant K/V.

For block ``i`` (see :func:`calibrate_blocks`):

1. ``X_fp`` (full-precision input of block ``i``) -> target ``T = F_{i+k}(...F_i(X_fp))``, the
   full-precision output of the CRR window ``i..i+k`` (shortened at the last blocks).
2. A float32 copy of block ``i`` with :class:`~converter.lwc.LWCLinear` projections; its K/V
   ranges on the quantized input ``X_q`` initialise ``s`` (half-range) and ``delta`` (mid-point).
3. AdamW minimises ``mean |W(Q_i(X_q)) - T|`` where ``Q_i`` is the quantized block (weights
   fake-quantized, K/V fake-quantized per token with POQ by the ``wkvq_sim`` attention) and
   ``W`` the full-precision blocks ``i+1..i+k``.
4. The parameters are folded (:class:`~converter.lwc.BlockParams`), saved to the work dir, and
   ``X_q`` moves on through block ``i`` exactly as the artifact will compute it.

Only the window's blocks and the samples' activations (``X_fp``, ``X_q``, ``T``) live on the
device; the model stays on CPU. On CUDA the frozen parts run under bfloat16 autocast.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from runtime.artifact import DECODER_LINEARS
from runtime.kvquant import KVQuantConfig

from . import data, gptq, lwc
from .calib_state import WorkDir, tensor_digest, work_dir_for
from .export import Calibration, WeightQuantConfig, export_qparams
from .lwc import BlockParams

log = logging.getLogger(__name__)

ROUNDINGS = ("nearest", "learned", "gptq")  # how the weights' codes are rounded on the (learned) grid
COMPUTE_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}
SCHEDULES = ("constant", "cosine")  # learning-rate schedules (block-wise training and the end-to-end stage)
CRR_OUTPUTS = ("hidden", "kl")  # what the CRR loss compares (CalibConfig.crr_output)
EVAL_SPLITS = ("enwiki-sample:eval", "wikitext2:test")
CHECK_EVERY = 32  # steps between loss syncs (finiteness check, progress bar)


class CalibrationError(ValueError):
    """Calibration cannot go on (e.g. a non-finite loss); the message names the block."""


@dataclass(frozen=True)
class CalibConfig:
    """The WKVQuant recipe. Defaults: 128 x 2048 tokens, 5 epochs, CRR window k = 5, batch 1 (as the
    paper / OmniQuant), AdamW without weight decay, each block's learning rates decayed to zero by a half
    cosine over its steps: 2e-2 for LWC, 1e-2 for the smoothing/shift parameters and the rounding
    offsets. Until the eighth session the rates were constant at 1e-2 (LWC, OmniQuant's) and 5e-3; on
    SmolLM2 at full scale the four cosine runs (default, 2x and 4x rates, two seeds at 2x) measured
    19.63-19.69 decode-simulated PPL against 19.80-19.95 for the three constant ones (BENCHMARKS.md).

    ``rounding`` says how the codes are rounded on the learned grid: ``learned`` (default, beyond the
    paper: per-weight offsets trained with the block's CRR loss alongside LWC, ``round_lr``; the
    offsets only decide up or down, so the artifact's format does not change), ``nearest`` (the
    paper) or ``gptq`` (inverse-Hessian error feedback on the block's quantized inputs once the block
    is trained, :mod:`converter.gptq`). Learned rounding is the default because it measured better
    everywhere it was compared (BENCHMARKS.md, fifth session: SmolLM2 small CPU recipe 16.51 against
    19.01 for nearest; full recipe + the end-to-end stage 19.52 against 20.04) and fits the 7B targets
    (29.9 min, 16.2 GiB on an H200 against 23.0 min, 13.2 GiB). ``schedule`` scales every block's
    learning rates per step (``cosine``: a half cosine to zero over the block's steps;
    ``constant``: the paper's). ``crr_output`` ``kl`` (beyond the paper, experimental): the blocks whose CRR
    window reaches the last block are trained on the KL of the model's next-token distribution (the frozen
    final norm and LM head on the window's output, against the same of the full-precision output) instead of
    the MAE of the hidden states; the others as the paper (SmolLM2, the sixth session's blocks 0-23 kept, 24-29
    retrained: 19.900 against 19.797 with the MAE, BENCHMARKS.md: measured worse). Experimental: ``tune_norms``
    also trains the block's RMSNorm weights (``norm_lr``). SmolLM2, blocks 0/1, 32 x 512 tokens, held-out CRR loss:
    nearest 0.228/0.333, learned 0.201/0.261, gptq 0.169/0.255, norms 0.225/0.326; but the full
    recipe with gptq on the H200 gave a decode-simulated PPL of 27.3 against 20.9 with nearest
    (the error grows from block 4 on): see BENCHMARKS.md. ``e2e_epochs`` > 0 (default 2; 0: the paper's
    block-wise recipe alone) adds a stage after the blocks that tunes every block's LWC and smoothing parameters at
    once against the full-precision model's next-token distribution (:mod:`converter.e2e`, ``e2e_lr``; with
    ``e2e_rounding``, default, also per-weight rounding offsets at ``e2e_round_lr``; ``e2e_schedule`` constant or
    cosine decay of its learning rates to zero; the defaults are the best measured on SmolLM2: +4.55% to +4.87%
    over fp16 in three runs against +6.3% to +7.1% without the stage, BENCHMARKS.md); the
    block-wise results it starts from do not depend on it, so ``keep_work`` + ``resume`` re-run it
    with other settings. ``e2e_offload`` (a run control, not recorded; None: on CUDA devices) keeps the stage's
    blocks on the host, paged onto the device one at a time (:mod:`converter.offload`; the same values).
    ``compile`` (a run control, not recorded) runs the fake quantization of the
    training through ``torch.compile`` (:func:`converter.lwc.fake_quant_fns`)."""

    nsamples: int = 128
    seqlen: int = 2048
    epochs: int = 5
    crr_k: int = 5
    crr_output: str = "hidden"
    batch_size: int = 1
    lwc: bool = True
    smooth: bool = True
    lwc_lr: float = 2e-2
    smooth_lr: float = 1e-2
    rounding: str = "learned"
    round_lr: float = 1e-2
    schedule: str = "cosine"
    tune_norms: bool = False
    norm_lr: float = 1e-4
    e2e_epochs: int = 2
    e2e_lr: float = 3e-3
    e2e_rounding: bool = True
    e2e_round_lr: float = 2e-3
    e2e_schedule: str = "cosine"
    e2e_offload: bool | None = None
    weight_decay: float = 0.0
    calib_data: str = "enwiki-sample:calib"
    compute_dtype: str = "auto"
    resume: bool = False
    keep_work: bool = False
    compile: bool = False
    progress: bool = True

    def __post_init__(self):
        for name in ("nsamples", "seqlen", "epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.e2e_epochs, int) or self.e2e_epochs < 0:
            raise ValueError(f"e2e_epochs must be an integer >= 0 (0: no end-to-end stage), got {self.e2e_epochs!r}")
        if self.e2e_epochs and self.rounding == "gptq":
            raise ValueError("the end-to-end stage (on by default) moves the grid GPTQ's decisions were made on; "
                             "rounding 'gptq' needs it off: add --e2e-epochs 0 (or use rounding nearest or learned)")
        for name in ("schedule", "e2e_schedule"):
            if getattr(self, name) not in SCHEDULES:
                raise ValueError(f"{name} must be one of {', '.join(SCHEDULES)}, got {getattr(self, name)!r}")
        if self.crr_output not in CRR_OUTPUTS:
            raise ValueError(f"crr_output must be one of {', '.join(CRR_OUTPUTS)}, got {self.crr_output!r}")
        if not isinstance(self.crr_k, int) or self.crr_k < 0:
            raise ValueError(f"crr_k must be an integer >= 0 (0: single-block reconstruction), got {self.crr_k!r}")
        if self.batch_size > self.nsamples:
            raise ValueError(f"batch size {self.batch_size} is larger than nsamples {self.nsamples}")
        for name in ("lwc_lr", "smooth_lr", "round_lr", "norm_lr", "e2e_lr", "e2e_round_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.compile and not lwc.compile_supported():
            raise ValueError(f"--compile needs torch >= {'.'.join(map(str, lwc.MIN_COMPILE_TORCH))} (on torch "
                             f"{torch.__version__} the compiled fake quantization differs from eager); drop --compile")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        if self.calib_data in EVAL_SPLITS:
            raise ValueError(f"{self.calib_data} is an evaluation split and is never used for calibration; "
                             "use enwiki-sample:calib, wikitext2:train or a text file")

    def to_dict(self) -> dict:
        """The recipe as recorded in the artifact (without run controls such as resume)."""
        d = asdict(self)
        for name in ("resume", "keep_work", "compile", "progress", "e2e_offload"):
            d.pop(name)
        return d

    def blockwise(self) -> dict:
        """The settings the block-wise results depend on (what ``--resume`` must match): not the
        end-to-end stage's, nor a learning rate of parameters the blocks do not train."""
        unused = {"round_lr"} if self.rounding != "learned" else set()
        unused |= {"norm_lr"} if not self.tune_norms else set()
        # constant is what every run before the option used: leaving it out keeps their work dirs resumable
        unused |= {"schedule"} if self.schedule == "constant" else set()
        unused |= {"crr_output"} if self.crr_output == "hidden" else set()  # likewise: before the option
        return {k: v for k, v in self.to_dict().items() if not k.startswith("e2e_") and k not in unused}


@dataclass(frozen=True)
class BlockSetup:
    """What every block's calibration needs besides data."""

    weight: WeightQuantConfig
    kv: KVQuantConfig
    calib: CalibConfig
    device: torch.device
    dtype: torch.dtype  # activations and frozen blocks on the device
    seed: int = 0

    @property
    def chunk(self) -> int:
        """Samples per no-grad forward pass (propagation, targets, statistics)."""
        return max(self.calib.batch_size, 4)


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    dtype = COMPUTE_DTYPES[name]
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return dtype


def autocast(setup: BlockSetup):
    if setup.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(setup.device.type, dtype=setup.dtype)


def rope(rotary, seqlen: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` ``[1, T, D]`` float32 on ``device`` from the model's rotary embedding (on CPU)."""
    pos = torch.arange(seqlen)[None]
    dummy = torch.zeros(1, seqlen, 1, dtype=torch.float32)
    cos, sin = rotary(dummy, pos)
    return cos.float().to(device), sin.float().to(device)


@torch.no_grad()
def run_blocks(blocks, x: torch.Tensor, pe, setup: BlockSetup, inplace: bool = False) -> torch.Tensor:
    """``x [N, T, H]`` through ``blocks`` in chunks of samples; in place if ``inplace``."""
    out = x if inplace else x.clone()
    for s in range(0, x.shape[0], setup.chunk):
        h = out[s:s + setup.chunk]
        with autocast(setup):
            for blk in blocks:
                h = blk(h, position_embeddings=pe)
        out[s:s + setup.chunk] = h.to(out.dtype)
    return out


@torch.no_grad()
def observe(block, x: torch.Tensor, pe, setup: BlockSetup) -> None:
    """Run ``block`` over every sample for its side effects (K/V range statistics, Hessians), keeping no output."""
    for s in range(0, x.shape[0], setup.chunk):
        with autocast(setup):
            block(x[s:s + setup.chunk], position_embeddings=pe)


def window_forward(qblock, window, x: torch.Tensor, pe) -> torch.Tensor:
    h = qblock(x, position_embeddings=pe)
    for blk in window:
        h = blk(h, position_embeddings=pe)
    return h


def crr_loss(out: torch.Tensor, target: torch.Tensor, head=None) -> torch.Tensor:
    """Mean absolute error (float32) between the window's quantized and full-precision outputs; with ``head``
    (the frozen final norm and LM head, :class:`converter.e2e.Head`) the token-mean KL of the next-token
    distributions they give instead."""
    if head is None:
        return (out.float() - target.float()).abs().mean()
    from .e2e import kl_loss  # imports this module

    with torch.no_grad():
        teacher = head(target)
    return kl_loss(head(out), teacher)


def block_seed(seed: int, index: int) -> int:
    """The per-block RNG seed: a resumed block shuffles its samples exactly as an uninterrupted run."""
    return seed * 1_000_003 + index


def check_finite(total: torch.Tensor, where: str, epoch: int, step: int) -> float:
    """``float(total)``, or :class:`CalibrationError` naming ``where`` (e.g. "block 3") if not finite."""
    value = float(total)
    if not math.isfinite(value):
        raise CalibrationError(
            f"{where}: the calibration loss is not finite ({value}) at epoch {epoch + 1}, step {step + 1}; "
            "lower the learning rates (--lwc-lr/--smooth-lr/--e2e-lr), use --calib-dtype float32, or check the model's weights")
    return value


def adamw(param_lrs, weight_decay: float) -> torch.optim.Optimizer | None:
    """AdamW over ``(parameters, lr)`` groups, leaving out empty ones; None when all are empty."""
    groups = [{"params": ps, "lr": lr} for ps, lr in param_lrs if ps]
    return torch.optim.AdamW(groups, weight_decay=weight_decay) if groups else None


def make_optimizer(qblock, ccfg: CalibConfig) -> torch.optim.Optimizer | None:
    return adamw(((lwc.lwc_parameters(qblock), ccfg.lwc_lr), (lwc.smooth_parameters(qblock), ccfg.smooth_lr),
                  (lwc.rounding_parameters(qblock), ccfg.round_lr), (lwc.norm_parameters(qblock), ccfg.norm_lr)),
                 ccfg.weight_decay)


def lr_factor(schedule: str, step: int, total: int) -> float:
    """The learning-rate multiplier of optimizer step ``step`` (0-based) of ``total``: 1 for
    ``constant``; for ``cosine`` a half cosine from 1 at the first step towards 0 after the last."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / total))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")


def train_epochs(opt, step_loss, n: int, epochs: int, setup: BlockSetup, gen: torch.Generator,
                 where: str, schedule: str = "constant") -> list[float]:
    """``epochs`` shuffled passes over ``n`` samples in batches of ``batch_size``: ``step_loss(idx)``
    (CPU int64 indices) gives the loss, then an optimizer step with each group's learning rate
    scaled by :func:`lr_factor` (``schedule``); returns each epoch's mean loss. The progress bar and
    a non-finite running loss's :class:`CalibrationError` name ``where``."""
    base = [g["lr"] for g in opt.param_groups]

    def update(idx, factor):
        set_lr_factor(opt, base, factor)
        loss = step_loss(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return run_epochs(update, n, epochs, setup, gen, where, schedule)


def set_lr_factor(opt, base: list[float], factor: float) -> None:
    """Every group of ``opt`` at its base learning rate (``base``, in group order) times ``factor``."""
    for g, lr in zip(opt.param_groups, base):
        g["lr"] = lr * factor


def run_epochs(update, n: int, epochs: int, setup: BlockSetup, gen: torch.Generator, where: str,
               schedule: str = "constant") -> list[float]:
    """The loop of :func:`train_epochs` around ``update(idx, factor)``, which makes one optimizer step on the
    samples ``idx`` with the learning rates scaled by ``factor`` and returns the step's (detached) loss."""
    bs = setup.calib.batch_size
    steps = math.ceil(n / bs)
    epoch_losses = []
    with tqdm(total=epochs * steps, desc=where, unit="step", disable=not setup.calib.progress,
              dynamic_ncols=True) as bar:
        for epoch in range(epochs):
            perm = torch.randperm(n, generator=gen)
            total = torch.zeros((), device=setup.device)
            for step in range(steps):
                total += update(perm[step * bs:(step + 1) * bs], lr_factor(schedule, epoch * steps + step,
                                                                            epochs * steps))
                if (step + 1) % CHECK_EVERY == 0 or step + 1 == steps:
                    bar.set_postfix(loss=f"{check_finite(total, where, epoch, step) / (step + 1):.5f}")
                bar.update()
            epoch_losses.append(float(total) / steps)
    return epoch_losses


def train_block(qblock, window, x_q, target, pe, setup: BlockSetup, index: int, head=None) -> list[float]:
    """AdamW on the CRR loss (:func:`crr_loss`, ``head``) for ``epochs`` passes over the samples; returns each
    epoch's mean loss."""
    opt = make_optimizer(qblock, setup.calib)
    if opt is None:  # nothing to learn (--no-lwc --no-smooth)
        return []

    def step_loss(idx):
        idx = idx.to(setup.device)
        with autocast(setup):
            return crr_loss(window_forward(qblock, window, x_q[idx], pe), target[idx], head)

    gen = torch.Generator().manual_seed(block_seed(setup.seed, index))
    return train_epochs(opt, step_loss, x_q.shape[0], setup.calib.epochs, setup, gen, f"block {index}",
                        setup.calib.schedule)


@torch.no_grad()
def eval_loss(qblock, window, x_q, target, pe, setup: BlockSetup, index: int, head=None) -> float:
    total = torch.zeros((), device=setup.device)
    chunk = setup.chunk if head is None else setup.calib.batch_size  # logits: [chunk, T, vocab] float32
    for s in range(0, x_q.shape[0], chunk):
        with autocast(setup):
            out = window_forward(qblock, window, x_q[s:s + chunk], pe)
            total += crr_loss(out, target[s:s + chunk], head) * out.shape[0]
    return check_finite(total, f"block {index}", 0, 0) / x_q.shape[0]


def calibrate_block(layer, config, index: int, window, x_q, target, pe, setup: BlockSetup,
                    head=None) -> BlockParams:
    """Train block ``index`` against ``target`` (the window's full-precision output; with ``head`` on the KL of
    the next-token distributions, :func:`crr_loss`) and fold it."""
    start = time.perf_counter()
    ccfg = setup.calib
    qblock = lwc.quant_block(layer, config, index, setup.weight, ccfg.lwc, setup.device,
                             rounding=ccfg.rounding == "learned", tune_norms=ccfg.tune_norms, compiled=ccfg.compile)
    observe(qblock, x_q, pe, setup)  # K/V statistics for the smoothing/shift init
    lwc.set_kv_quantizer(qblock, setup.kv, setup.calib.smooth, ccfg.compile)
    initial = eval_loss(qblock, window, x_q, target, pe, setup, index, head)
    qblock.train()
    losses = train_block(qblock, window, x_q, target, pe, setup, index, head)
    params = lwc.fold_block(qblock)
    if ccfg.rounding == "gptq":
        params.rounding = gptq_rounding(layer, config, index, params, x_q, pe, setup)
    params.loss, params.initial_loss, params.epoch_losses = (losses or [initial])[-1], initial, losses
    params.seconds = time.perf_counter() - start
    log.info("block %d: %s %.6f -> %.6f (%.1f s)", index, "KL" if head is not None else "loss", initial, params.loss,
             params.seconds)
    return params


@torch.no_grad()
def gptq_rounding(layer, config, index: int, params: BlockParams, x_q, pe, setup: BlockSetup) -> dict:
    """GPTQ rounding decisions for each Linear of block ``index`` on its learned grid, with the
    Hessians of the Linears' inputs when the block runs as the artifact computes it (nearest
    rounding) on the quantized inputs ``x_q``."""
    blk = lwc.applied_block(layer, config, index, params, setup.weight, setup.kv, setup.device, setup.dtype)
    acc, hooks = {}, []
    for name in DECODER_LINEARS:
        lin = blk.get_submodule(name)
        acc[name] = gptq.HessianAccumulator(lin.in_features, setup.device)
        hooks.append(lin.register_forward_pre_hook(lambda m, args, a=acc[name]: a.add(args[0])))
    try:
        observe(blk, x_q, pe, setup)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name in DECODER_LINEARS:
        w = layer.get_submodule(name).weight.detach().to(setup.device, torch.float32)
        _, _, scale, zero = export_qparams(w, setup.weight, *lwc.clips_on(params, name, setup.device))
        out[name] = gptq.gptq_decisions(w, acc[name].h, scale, zero, setup.weight.bits, setup.weight.group_size).cpu()
    return out


class FullPrecisionWindow:
    """Device copies (in the compute dtype) of the full-precision blocks ``i..i+k``, built lazily."""

    def __init__(self, layers, config, setup: BlockSetup):
        self.layers, self.config, self.setup = layers, config, setup
        self.blocks: dict[int, torch.nn.Module] = {}

    def get(self, first: int, last: int) -> list:
        for j in [j for j in self.blocks if j < first]:
            del self.blocks[j]
        for j in range(first, last + 1):
            if j not in self.blocks:
                self.blocks[j] = lwc.clone_layer(self.layers[j], self.config, j, self.setup.device, self.setup.dtype)
        return [self.blocks[j] for j in range(first, last + 1)]


def calibrate_blocks(layers, config, rotary, x0: torch.Tensor, setup: BlockSetup,
                     work: WorkDir | None = None, num_blocks: int | None = None, keep_fp: bool = False,
                     head=None):
    """Calibrate ``layers[:num_blocks]`` in order (CPU modules); ``x0 [N, T, H]`` are the embedded samples.
    Returns the :class:`BlockParams` per block, and with ``keep_fp`` also the full-precision output
    of the last calibrated block (on the device). ``head``: the frozen final norm and LM head
    (:class:`converter.e2e.Head`), used with ``crr_output`` ``kl`` by the blocks whose window reaches the last.

    ``config``: the HF config with the ``wkvq_sim`` attention (:func:`converter.lwc.calib_model_config`).
    Finished blocks found in ``work`` are loaded instead of trained; the activations are recomputed
    with exactly the same operations, so a resumed run gives the same tensors as an uninterrupted one.
    """
    num_layers, num_blocks = len(layers), num_blocks or len(layers)
    pe = rope(rotary, x0.shape[1], setup.device)
    x_fp = x0.to(setup.device, setup.dtype, copy=True)  # updated in place; the caller's x0 stays as it is
    x_q = x_fp.clone()
    fp = FullPrecisionWindow(layers, config, setup)
    results = []
    for i in range(num_blocks):
        blocks = fp.get(i, min(i + setup.calib.crr_k, num_layers - 1))
        params = work.load(i) if work is not None else None
        run_blocks(blocks[:1], x_fp, pe, setup, inplace=True)  # X_fp <- F_i(X_fp)
        if params is None:
            target = run_blocks(blocks[1:], x_fp, pe, setup) if len(blocks) > 1 else x_fp
            to_logits = setup.calib.crr_output == "kl" and i + len(blocks) == num_layers
            if to_logits and head is None:
                raise ValueError("crr_output 'kl' needs the model's final norm and LM head (calibrate_blocks head=)")
            params = calibrate_block(layers[i], config, i, blocks[1:], x_q, target, pe, setup,
                                     head if to_logits else None)
            del target
            if work is not None:
                work.save(i, params)
        applied = lwc.applied_block(layers[i], config, i, params, setup.weight, setup.kv, setup.device, setup.dtype)
        run_blocks([applied], x_q, pe, setup, inplace=True)  # X_q <- Q_i(X_q), as the artifact computes it
        results.append(params)
    return (results, x_fp) if keep_fp else results


# ----------------------------------------------------------------------------- the converter's entry point


def calibration_tokens(tokenizer, ccfg: CalibConfig, seed: int) -> torch.Tensor:
    """``int64 [nsamples, seqlen]`` windows of ``--calib-data`` (never an evaluation split)."""
    tokens = data.tokenize(tokenizer, data.load_text(ccfg.calib_data))
    return data.calibration_samples(tokens, ccfg.nsamples, ccfg.seqlen, seed)


@torch.no_grad()
def embed(model, samples: torch.Tensor, device, dtype, chunk: int = 8) -> torch.Tensor:
    """The embedded samples ``[N, T, H]`` on ``device`` (the embedding runs where it lives, on CPU)."""
    emb = model.get_input_embeddings()
    x = torch.empty(*samples.shape, model.config.hidden_size, device=device, dtype=dtype)
    for s in range(0, samples.shape[0], chunk):
        x[s:s + chunk] = emb(samples[s:s + chunk].to(emb.weight.device)).to(device, dtype)
    return x


def resume_recipe(model, cfg, samples: torch.Tensor, dtype: torch.dtype) -> dict:
    """Everything a block's result depends on; a work dir is only resumed for the same recipe."""
    first = model.model.layers[0].self_attn.q_proj.weight
    recipe = {**cfg.recipe(), "calibration": (cfg.calibration or CalibConfig()).blockwise()}
    return {"recipe": recipe, "model": cfg.model, "config": model.config.to_dict(),
            "weights": tensor_digest(first.float()), "samples": tensor_digest(samples), "compute_dtype": str(dtype)}


def to_calibration(results: list[BlockParams], info: dict) -> Calibration:
    calib = Calibration(losses=[r.loss for r in results], info=info)
    for i, r in enumerate(results):
        for name, clips in r.clips.items():
            calib.clips[f"model.layers.{i}.{name}"] = clips
        for name, decisions in r.rounding.items():
            calib.rounding[f"model.layers.{i}.{name}"] = decisions
        for name, t in r.norms.items():
            calib.tensors[f"model.layers.{i}.{name}"] = t
        if r.kv is not None:
            calib.kv[i] = r.kv
    calib.info["block_seconds"] = [round(r.seconds, 3) for r in results]
    calib.info["initial_losses"] = [r.initial_loss for r in results]
    calib.info["epoch_losses"] = [r.epoch_losses for r in results]
    return calib


def run_calibration(model, tokenizer, cfg, device: torch.device) -> Calibration:
    """Calibrate every block of ``model`` (float32, on CPU) for ``cfg`` (a ConvertConfig)."""
    ccfg = cfg.calibration or CalibConfig()
    dtype = resolve_compute_dtype(ccfg.compute_dtype, device)
    setup = BlockSetup(cfg.weight, cfg.kv, ccfg, device, dtype, cfg.seed)
    if ccfg.e2e_epochs:  # before any work: a stage that cannot fit fails now, not after the blocks
        from . import e2e  # imports this module

        if e2e.offloaded(ccfg, device):  # the paged stage's blocks need the host: no float32 copies of float16 values
            freed = lwc.compact_linears(model.model.layers)
            if freed:
                log.info("source model's decoder weights held in float16 on the host (exact): %.1f GiB freed",
                         freed / 2**30)
        # held on the host through the stage: the source model and the teacher's final states
        resident = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        resident += ccfg.nsamples * ccfg.seqlen * model.config.hidden_size * dtype.itemsize
        e2e.check_memory(model.config, ccfg, device, host_resident=resident)
        if ccfg.rounding == "learned" and not ccfg.e2e_rounding:
            log.warning("end-to-end stage on learned-rounding blocks without --e2e-rounding: it moves the clips "
                        "under fixed rounding decisions and raised the KL wherever measured (BENCHMARKS.md); "
                        "consider --e2e-rounding or --rounding nearest")
    samples = calibration_tokens(tokenizer, ccfg, cfg.seed)
    work = WorkDir.open(work_dir_for(cfg.out), resume_recipe(model, cfg, samples, dtype), ccfg.resume)
    resumed = len(work.done())
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    x0 = embed(model, samples, "cpu", dtype)  # calibrate_blocks copies it to the device
    config = lwc.calib_model_config(model.config)
    head = None
    if ccfg.crr_output == "kl":
        from .e2e import Head  # imports this module

        head = Head(model, device, dtype)
    results, fp_out = calibrate_blocks(model.model.layers, config, model.model.rotary_emb, x0, setup, work,
                                       keep_fp=True, head=head)
    del head
    e2e_summary = None
    if ccfg.e2e_epochs:
        pe = rope(model.model.rotary_emb, x0.shape[1], device)
        fp_out = fp_out.cpu()  # the teacher states on the host: the stage copies a sample's when it needs them
        results, e2e_summary = e2e.tune(model, config, x0, fp_out, pe, results, setup)
    del fp_out
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    info = {"seconds": round(time.perf_counter() - start, 3), "peak_memory_bytes": peak, "device": str(device),
            "compute_dtype": str(dtype).removeprefix("torch."),
            "resumed_blocks": resumed}
    if e2e_summary:
        info["end_to_end"] = e2e_summary
    return to_calibration(results, info)


def finish(out) -> None:
    """Remove the work dir once the artifact is written."""
    WorkDir(work_dir_for(out)).remove()
