"""Calibration-only modules and the blocks built from them.

* :class:`LWCLinear` — a frozen Linear whose weight is fake-quantized group-wise with learnable
  clipping (OmniQuant LWC): ``clip_hi = sigmoid(gamma)``, ``clip_lo = sigmoid(beta)``, ``[out, G]``.
* :class:`SmoothedKV` — a :class:`runtime.kvquant.KVQuantizer` whose static smoothing ``s`` and
  shift ``delta`` are learned relative to their statistics-based initial values:
  ``s = s0 * exp(a)`` (always positive), ``delta = delta0 + s0 * b`` with ``a, b`` zero-initialised,
  so one learning rate fits channels of any range.
* :class:`KVRangeObserver` — stands in for the quantizer to record per-channel K/V ranges
  (it returns K/V unchanged).

Both trainable modules take ``compiled``: their fake quantization (:func:`lwc_weight`,
:func:`runtime.quant.kv_fake_quantize`) then runs through ``torch.compile`` (:func:`fake_quant_fns`),
which fuses its ~100 small operations per Linear (forward and backward) into a few kernels; the
training step of these small-tensor graphs is otherwise bound by launch and dispatch overhead.

Blocks are copies of a decoder layer (built on the meta device, weights assigned), so the live
model is never modified. After training, :func:`fold_block` turns the parameters into plain
tensors (:class:`BlockParams`); :func:`applied_block` rebuilds the block exactly as the artifact
will compute it (export-quantized weights, folded ``s``/``delta``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from runtime import attention, quant
from runtime.artifact import DECODER_LINEARS, KV_TENSORS
from runtime.kvquant import STATS_DTYPE, KVQuantConfig, KVQuantizer

from . import export
from .export import WeightQuantConfig

RECOMPILE_LIMIT = 64  # graphs per compiled fake-quantization function (fake_quant_fns)
LWC_INIT = 4.0  # sigmoid(4) ~ 0.982: clipping starts near the full range (as OmniQuant)
MIN_RANGE = 1e-5


@dataclass
class BlockParams:
    """What calibration learned for one block, as plain CPU float32 tensors.

    ``clips[name] = (clip_hi, clip_lo)`` ``[out, G]`` per Linear name (e.g. ``"mlp.up_proj"``),
    empty without LWC; ``rounding[name]`` int8 offsets to nearest rounding (``--rounding learned``
    or ``gptq``; empty with nearest rounding); ``norms`` the tuned RMSNorm weights (empty without
    norm tuning); ``kv`` = ``{k_scale, k_shift, v_scale, v_shift}`` ``[H_kv, D]`` or None.
    """

    clips: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    rounding: dict[str, torch.Tensor] = field(default_factory=dict)  # int8 [out, in] per Linear name
    norms: dict[str, torch.Tensor] = field(default_factory=dict)  # tuned RMSNorm weights, e.g. "input_layernorm.weight"
    kv: dict[str, torch.Tensor] | None = None
    loss: float | None = None
    initial_loss: float | None = None  # the CRR loss before training (LWC and s/delta at their init)
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def compact(w: torch.Tensor) -> torch.Tensor:
    """``w`` (float32) as float16 when that is exact — half the memory for float16 source models,
    e.g. the whole model on the device in the end-to-end stage — else unchanged."""
    h = w.half()
    return h if torch.equal(h.float(), w) else w


def compact_linears(layers) -> int:
    """Hold every decoder Linear weight of ``layers`` as :func:`compact` does (float16 where that is exact, the same
    values; the calibration reads them as float32): the source model's host memory while the paged end-to-end stage
    needs the host for its blocks. Returns the bytes freed."""
    freed = 0
    for layer in layers:
        for name in DECODER_LINEARS:
            p = layer.get_submodule(name).weight
            if p.dtype == torch.float32:
                before = p.data.nbytes
                p.data = compact(p.data)
                freed += before - p.data.nbytes
    return freed


def lwc_clips(gamma, beta) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(clip_hi, clip_lo) = (sigmoid(gamma), sigmoid(beta))``; ``(None, None)`` without LWC."""
    return (None, None) if gamma is None else (torch.sigmoid(gamma), torch.sigmoid(beta))


def lwc_weight(w, gamma, beta, offset, bits: int, group_size: int, params_dtype) -> torch.Tensor:
    """The fake-quantized weight of :class:`LWCLinear`: :func:`lwc_clips`, rounding ``offset`` (or
    None), straight-through rounding."""
    return quant.fake_quantize_weight(w.float(), bits, group_size, *lwc_clips(gamma, beta), offset=offset,
                                      params_dtype=params_dtype)


# --compile is exact (values identical to eager, tests/test_compile_calib.py) from this torch on; torch 2.11
# (the GPU machine's, 2026-11-30) gave different forward values on CPU and CUDA alike
MIN_COMPILE_TORCH = (2, 13)


def compile_supported(version: str | None = None) -> bool:
    """Whether ``torch.compile`` of the fake quantization is verified exact on this torch (or ``version``)."""
    major, minor = (int(v) for v in (version or torch.__version__).split("+")[0].split(".")[:2])
    return (major, minor) >= MIN_COMPILE_TORCH


@functools.cache
def fake_quant_fns(compiled: bool):
    """``(weight_fn, kv_fn)``: :func:`lwc_weight` and :func:`runtime.quant.kv_fake_quantize`, through
    ``torch.compile`` (static shapes: one graph per weight shape) when ``compiled``."""
    if not compiled:
        return lwc_weight, quant.kv_fake_quantize
    # emulate_precision_casts: keep the float16 round trips of cast_ste / round_kv_stats (Inductor
    # otherwise drops them and the trained weight is no longer the exported one)
    opts = {"emulate_precision_casts": True}
    # one graph per weight shape, grad mode and offsets/no offsets: past Dynamo's default of 8 graphs per
    # function it would silently run the rest eagerly
    cfg = torch._dynamo.config
    limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, limit, max(getattr(cfg, limit), RECOMPILE_LIMIT))
    return (torch.compile(lwc_weight, dynamic=False, options=opts),
            torch.compile(quant.kv_fake_quantize, dynamic=False, options=opts))


class LWCLinear(nn.Module):
    """``y = x @ fq(W)^T + b``; ``W`` frozen (stored :func:`compact`), ``gamma``/``beta`` learnable when
    ``lwc``, per-weight rounding offsets ``offset`` (in code units, used clamped to [-0.5, 0.5]) learnable
    when ``rounding``. :meth:`freeze_decisions` instead holds earlier rounding decisions ``d`` (-1/0/+1) packed in
    2 bits and applies them as the fixed offsets ``d / 2`` (a quarter byte a weight where a float32 offset takes 4)."""

    def __init__(self, linear: nn.Linear, wcfg: WeightQuantConfig, lwc: bool = True, init: float = LWC_INIT,
                 rounding: bool = False, compiled: bool = False, keep_weight: bool = False):
        super().__init__()
        self.wcfg = wcfg
        self.weight_fn = fake_quant_fns(compiled)[0]
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.register_buffer("bias", bias)
        self.gamma = self.beta = self.offset = None
        self.register_buffer("decisions", None)  # uint8 [out, in / 4]: d + 1 in 2 bits (freeze_decisions)
        self.raw = lwc or rounding or keep_weight  # the weight kept unquantized (keep_weight: for freeze_decisions)
        if self.raw:
            self.register_buffer("weight", compact(w))
        else:  # min-max clipping, nearest rounding: the fake-quantized weight is fixed, compute it once
            self.register_buffer("weight", quant.fake_quantize_weight(w, wcfg.bits, wcfg.group_size))
        if lwc:
            g = quant.num_groups(self.in_features, wcfg.group_size)
            self.gamma = nn.Parameter(torch.full((self.out_features, g), init, device=w.device))
            self.beta = nn.Parameter(torch.full((self.out_features, g), init, device=w.device))
        if rounding:
            self.offset = nn.Parameter(torch.zeros(w.shape, device=w.device))
        self.held: torch.Tensor | None = None  # the fake-quantized weight while :func:`held_weights` holds it

    @property
    def rounds(self) -> bool:
        """Whether a rounding offset applies (learnable, or frozen decisions)."""
        return self.offset is not None or self.decisions is not None

    @property
    def fixed(self) -> bool:
        return self.gamma is None and not self.rounds

    def freeze_decisions(self, d: torch.Tensor) -> None:
        """Hold rounding decisions ``d`` (``[out, in]``, -1/0/+1) as the fixed offsets ``d / 2`` (no learnable
        ``offset``), packed as ``d + 1`` in 2 bits; needs the weight kept unquantized (``lwc``, ``rounding`` or
        ``keep_weight``)."""
        if self.offset is not None or not self.raw or d.shape != self.weight.shape:
            raise ValueError(f"decisions {list(d.shape)} need a Linear of weight {list(self.weight.shape)} "
                             "without learnable offsets")
        if d.numel() and not (d.min() >= -1 and d.max() <= 1):
            raise ValueError("rounding decisions must be -1, 0 or +1")
        self.decisions = quant.pack((d.to(torch.int16) + 1).to(torch.uint8), 2).to(self.weight.device)

    def current_offset(self) -> torch.Tensor | None:
        """The rounding offset in use: the learnable one, the frozen decisions' ``d / 2`` (float32, made on the
        fly), or None."""
        if self.offset is not None:
            return self.offset
        if self.decisions is None:
            return None
        return (quant.unpack(self.decisions, 2, self.in_features).float() - 1) * 0.5

    def clips(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return lwc_clips(self.gamma, self.beta)

    def fake_weight(self) -> torch.Tensor:
        """The weight the forward pass multiplies by: fake-quantized from the current parameters (or fixed)."""
        if self.fixed:
            return self.weight
        return self.weight_fn(self.weight, self.gamma, self.beta, self.current_offset(), self.wcfg.bits,
                              self.wcfg.group_size, export.PARAMS_DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.fake_weight() if self.held is None else self.held, self.bias)

    def rounding_decisions(self) -> torch.Tensor | None:
        """The learned rounding as int8 offsets to nearest rounding, for the export's exact scales."""
        offset = self.current_offset()
        if offset is None:
            return None
        _, _, scale, _ = export.export_qparams(self.weight, self.wcfg, *self.clips())  # rounds the clips as stored
        return quant.rounding_decisions(self.weight, scale, offset.detach(), self.wcfg.group_size).cpu()


class SmoothedKV(KVQuantizer):
    """Learnable ``s = s0 * exp(a)``, ``delta = delta0 + s0 * b`` for K and V (``a, b: [H, D]``)."""

    def __init__(self, init: dict[str, torch.Tensor], config: KVQuantConfig, compiled: bool = False):
        h, d = init["k_scale"].shape
        super().__init__(h, d, config, learnable=False, device=init["k_scale"].device)
        self.kv_fn = fake_quant_fns(compiled)[1]
        for name in KV_TENSORS:  # the buffers hold s0 / delta0
            getattr(self, name).copy_(init[name])
        for which in ("k", "v"):
            self.register_parameter(f"{which}_log_scale", nn.Parameter(torch.zeros_like(self.k_scale)))
            self.register_parameter(f"{which}_offset", nn.Parameter(torch.zeros_like(self.k_scale)))

    def params(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        s0, d0 = super().params(which)
        a, b = getattr(self, f"{which}_log_scale"), getattr(self, f"{which}_offset")
        return s0 * torch.exp(a), d0 + s0 * b

    def fake(self, which: str, x: torch.Tensor) -> torch.Tensor:
        return self.kv_fn(x, *self.params(which), self.config.bits, self.group_size, STATS_DTYPE)

    def folded(self) -> dict[str, torch.Tensor]:
        out = {}
        for which in ("k", "v"):
            s, d = self.params(which)
            out[f"{which}_scale"], out[f"{which}_shift"] = s.detach().float().cpu(), d.detach().float().cpu()
        return out


class KVRangeObserver(nn.Module):
    """Records per-channel min/max of K and V (``[H, D]``) over every call; returns them unchanged."""

    def __init__(self, num_kv_heads: int, head_dim: int, device=None):
        super().__init__()
        self.config = KVQuantConfig(poq=False)  # exact causal attention over the unchanged K/V
        for which in ("k", "v"):
            self.register_buffer(f"{which}_min", torch.full((num_kv_heads, head_dim), float("inf"), device=device))
            self.register_buffer(f"{which}_max", torch.full((num_kv_heads, head_dim), float("-inf"), device=device))

    def fake(self, which: str, x: torch.Tensor) -> torch.Tensor:
        lo, hi = getattr(self, f"{which}_min"), getattr(self, f"{which}_max")
        xf = x.detach().float()
        torch.minimum(lo, xf.amin(dim=(0, 2)), out=lo)
        torch.maximum(hi, xf.amax(dim=(0, 2)), out=hi)
        return x

    def smoothing_init(self) -> dict[str, torch.Tensor]:
        """``delta0`` = channel mid-point, ``s0`` = channel half-range (clamped positive)."""
        out = {}
        for which in ("k", "v"):
            lo, hi = getattr(self, f"{which}_min"), getattr(self, f"{which}_max")
            if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
                raise ValueError("K/V statistics are not finite; the block's inputs contain inf or NaN")
            out[f"{which}_scale"] = ((hi - lo) / 2).clamp(min=MIN_RANGE)
            out[f"{which}_shift"] = (hi + lo) / 2
        return out


# ----------------------------------------------------------------------------- blocks


def calib_model_config(config):
    """A copy of the HF config whose attention is the decode-simulated ``wkvq_sim``."""
    cfg = copy.deepcopy(config)
    cfg._attn_implementation = attention.NAME
    return cfg


def clone_layer(layer: nn.Module, config, index: int, device, dtype, state: dict | None = None) -> nn.Module:
    """A frozen copy of a decoder layer on ``device`` in ``dtype`` (``state`` overrides tensors)."""
    with torch.device("meta"):
        blk = type(layer)(config, index)
    src = {**layer.state_dict(), **(state or {})}
    blk.load_state_dict({k: v.detach().to(device=device, dtype=dtype) for k, v in src.items()}, assign=True)
    return blk.requires_grad_(False).eval()


def kv_shape(config) -> tuple[int, int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_key_value_heads, head_dim


NORMS = ("input_layernorm", "post_attention_layernorm")


def quant_block(layer, config, index: int, wcfg: WeightQuantConfig, lwc: bool, device,
                rounding: bool = False, tune_norms: bool = False, compiled: bool = False,
                keep_weight: bool = False) -> nn.Module:
    """A float32 copy of ``layer`` with :class:`LWCLinear` projections and a K/V range observer;
    its RMSNorm weights are trainable with ``tune_norms``; ``compiled``: see :func:`fake_quant_fns`;
    ``keep_weight``: the Linears keep their weights unquantized (for :meth:`LWCLinear.freeze_decisions`)."""
    blk = clone_layer(layer, config, index, device, torch.float32)
    for name in DECODER_LINEARS:
        parent, child = name.rsplit(".", 1)
        blk.get_submodule(parent).register_module(child, LWCLinear(blk.get_submodule(name), wcfg, lwc,
                                                                   rounding=rounding, compiled=compiled,
                                                                   keep_weight=keep_weight))
    blk.self_attn.register_module("kv_quant", KVRangeObserver(*kv_shape(config), device=device))
    if tune_norms:  # a copy: clone_layer's tensors may share storage with the source model's
        for name in NORMS:
            norm = blk.get_submodule(name)
            norm.weight = nn.Parameter(norm.weight.detach().clone())
    return blk


def set_kv_quantizer(blk: nn.Module, kvcfg: KVQuantConfig, smooth: bool, compiled: bool = False) -> None:
    """Replace the block's observer by the learnable :class:`SmoothedKV` (or a fixed RTN quantizer)."""
    observer = blk.self_attn.kv_quant
    if smooth:
        kvq = SmoothedKV(observer.smoothing_init(), kvcfg, compiled)
    else:
        kvq = KVQuantizer(*observer.k_min.shape, kvcfg, device=observer.k_min.device)
    blk.self_attn.register_module("kv_quant", kvq)


def lwc_parameters(blk: nn.Module) -> list[nn.Parameter]:
    return [p for m in blk.modules() if isinstance(m, LWCLinear) and m.gamma is not None for p in (m.gamma, m.beta)]


def rounding_parameters(blk: nn.Module) -> list[nn.Parameter]:
    return [m.offset for m in blk.modules() if isinstance(m, LWCLinear) and m.offset is not None]


def norm_parameters(blk: nn.Module) -> list[nn.Parameter]:
    return [w for w in (blk.get_submodule(n).weight for n in NORMS) if w.requires_grad]


def smooth_parameters(blk: nn.Module) -> list[nn.Parameter]:
    kvq = blk.self_attn.kv_quant
    return list(kvq.parameters()) if isinstance(kvq, SmoothedKV) else []


@contextlib.contextmanager
def held_weights(blk: nn.Module):
    """Within: every :class:`LWCLinear` of ``blk`` multiplies by its fake-quantized weight computed once on entry
    (without gradients) instead of once a call — for passes that run a block over many samples without training it
    (the same values: the parameters do not change inside). Needs the block's tensors where they stay meanwhile
    (a paged block attached)."""
    lins = [m for m in blk.modules() if isinstance(m, LWCLinear) and not m.fixed]
    with torch.no_grad():
        for m in lins:
            m.held = m.fake_weight()
    try:
        yield blk
    finally:
        for m in lins:
            m.held = None


def fold_block(blk: nn.Module) -> BlockParams:
    """The learned parameters as plain tensors; clipping factors rounded to float16 as the artifact stores them."""
    clips, rounding = {}, {}
    for name in DECODER_LINEARS:
        lin = blk.get_submodule(name)
        hi, lo = lin.clips()
        if hi is not None:
            clips[name] = (hi.detach().half().float().cpu(), lo.detach().half().float().cpu())
        if lin.rounds:
            rounding[name] = lin.rounding_decisions()
    norms = {f"{n}.weight": blk.get_submodule(n).weight.detach().float().cpu().clone()
             for n in NORMS if blk.get_submodule(n).weight.requires_grad}
    kvq = blk.self_attn.kv_quant
    return BlockParams(clips=clips, rounding=rounding, norms=norms, kv=kvq.folded() if isinstance(kvq, SmoothedKV) else None)


def clips_on(params: BlockParams, name: str, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The learned ``(clip_hi, clip_lo)`` of Linear ``name`` on ``device``, or ``(None, None)`` without LWC."""
    hi, lo = params.clips.get(name, (None, None))
    return (None, None) if hi is None else (hi.to(device), lo.to(device))


def exported_weight(weight: torch.Tensor, wcfg: WeightQuantConfig, clip_hi=None, clip_lo=None,
                    rounding=None) -> torch.Tensor:
    """The float32 weight the artifact will hold: export's codes, scales and zeros, dequantized."""
    t = export.linear_tensors("w", weight, wcfg, clip_hi, clip_lo, rounding)
    q = quant.unpack(t["w.qweight"], wcfg.bits, weight.shape[1])
    return quant.dequantize_weight(q, t["w.scales"], t["w.zeros"], wcfg.group_size)


def applied_block(layer, config, index: int, params: BlockParams, wcfg: WeightQuantConfig,
                  kvcfg: KVQuantConfig, device, dtype) -> nn.Module:
    """The block as the artifact computes it: quantized weights and the folded K/V quantizer."""
    state = {}
    for name in DECODER_LINEARS:
        w = layer.get_submodule(name).weight.detach().to(device=device, dtype=torch.float32)
        state[f"{name}.weight"] = exported_weight(w, wcfg, *clips_on(params, name, device), params.rounding.get(name))
    state.update(params.norms)
    blk = clone_layer(layer, config, index, device, dtype, state)
    kvq = KVQuantizer(*kv_shape(config), kvcfg, device=device)
    for name, t in (params.kv or {}).items():
        getattr(kvq, name).copy_(t)
    blk.self_attn.register_module("kv_quant", kvq)
    return blk
