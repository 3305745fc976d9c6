"""A static-shape decode path for W4KV4 LLaMA models: fused INT4 projections, a preallocated 4-bit
POQ cache (:mod:`runtime.static_cache`) and a CUDA-graph-captured decode step.

``FastLlama.from_hf(model)`` takes a model from :func:`runtime.load` (QuantLinear projections, a
``kv_quant`` per attention) and shares its tensors: q/k/v and gate/up are fused into one packed
weight each, and the model's QuantLinears are re-pointed to row slices of the fused tensors, so no
weight is held twice. ``forward`` is the eager path (any device, any number of new tokens: prefill,
and decode on CPU). On CUDA, ``decode_step`` runs one token per sequence through the Triton kernels
(:mod:`runtime.kernels`) with static shapes, and :class:`DecodeGraph` captures it in a CUDA graph.
Batches are of equal-length sequences (no padding).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import kernels, quant
from .static_cache import StaticPOQCache

log = logging.getLogger(__name__)
PROJECTIONS = ("triton", "gemlite", "gemv")
# Fusions of the decode step (FastLlama._fused_inputs). Input transforms the gemv projections may compute in their
# loads: "norm" (qkv and gate_up norm x themselves) and "silu" (down computes silu(gate) * up); both measured
# slower at 7B b1 p2048 on an H200 (eighth session, BENCHMARKS.md): 2.83 ms a step unfused, 3.16 ms with "silu"
# (every program recomputes its slice of the product), 4.21 ms with both (every program first reads its rows of x
# whole for their rsqrt). "rope": the attention kernel ropes q/k/v from qkv and appends the token to the cache
# itself (kv4.rope_attention, no rope_append launch; the norm kernels zero qkv and gate_up), any projections, not
# with "norm" (no norm kernel left to zero qkv). WKVQ_FUSE picks them: e.g. "rope", "norm,silu" or "none".
# "rope" is the default at one row (FUSE_DEFAULT) since the tensor-core attention takes it (fifteenth session, H200,
# 7B b1: 2.115 -> 2.064 ms a step at p2048, 3.391 -> 3.307 at p32768); at b8 it was slower at p2048 (3.06-3.11
# against 2.96-3.05) and even at p32768 (13.0-13.5 both), and on the split kernel neutral (thirteenth session).
# "heads" (with "rope"): the attention lets the output projection launch at once and flags each KV head when its
# output is stored (cache.ready, the step's epoch cache.step); the projection's programs, at one row, wait for their
# heads' flags instead of the whole attention (w4_mma_accumulate's ready). By default only at the output projection
# shapes of HEADS_DEFAULT_SHAPES, where it measured faster (twenty-first session, H200, b1, benchmarks/results/r24):
# 7B (4096 x 4096) 2.662-2.691 ms against 2.749-2.760 at p32768, p2048 unchanged (1.711-1.738 against 1.729-1.758);
# 13B (5120 x 5120) slower, 4.648-4.722 against 4.549-4.582 (p2048 +0.13). WKVQ_FUSE naming it: at any shape.
# "silu" at one row on the tensor-core GEMV (w4_mma_accumulate_silu: down's programs build silu(gate) * up in shared
# memory, no SiLU launch) is the default where down runs on a split grid (GemvW4.silu_by_default; twenty-fifth
# session, H200, b1, alternated pairs, benchmarks/results/r28): 7B 1.684-1.722 / 2.620-2.680 ms against 1.705-1.756 /
# 2.661-2.716 (p2048 / p32768, five pairs); 13B, whose down is a stream-K grid, 2.857-2.880 / 4.602-4.664 against
# 2.825-2.857 / 4.563-4.667 (four pairs): slower, so not there; nor on the row GEMV (slower there, above).
FUSIONS = ("norm", "silu", "rope", "heads")
FUSE_DEFAULT: dict[int, tuple[str, ...]] = {1: ("rope", "heads", "silu")}  # rows -> the default fusions
HEADS_DEFAULT_SHAPES = frozenset({(4096, 4096)})  # (out, in) of the output projections where "heads" is the default
FUSE_ENV = "WKVQ_FUSE"


def fuse_choice(value: str | None, rows: int = 1) -> frozenset[str]:
    """The fusions named by ``value`` (``WKVQ_FUSE``: comma-separated :data:`FUSIONS`, or ``none``); unset or
    empty: :data:`FUSE_DEFAULT` at ``rows`` rows."""
    if not value or not value.strip():
        return frozenset(FUSE_DEFAULT.get(rows, ()))
    names = {v.strip() for v in value.split(",") if v.strip()} - {"none"}
    bad = sorted(names - set(FUSIONS))
    if bad:
        raise ValueError(f"{FUSE_ENV}={value!r}: unknown fusion {', '.join(bad)}; use a comma-separated list of "
                         f"{', '.join(FUSIONS)}, or none")
    return frozenset(names)


# The fused weights' layout in memory (the artifact stays row-major): "group" (runtime.quant.group_major: each
# group's rows contiguous) where the CUDA kernels read them, "row" elsewhere. WKVQ_LAYOUT ("row" or "group")
# overrides. On an H200 the tensor-core GEMV ran 7-17% faster on the group-major layout (seventeenth session).
LAYOUTS = ("row", "group")
LAYOUT_ENV = "WKVQ_LAYOUT"


def weight_layout(device, use_kernels: bool, group_size: int) -> str:
    """The fused weights' layout (:data:`LAYOUTS`): ``WKVQ_LAYOUT`` if set, else "group" on CUDA with the kernels
    at group 128, else "row". A one-line ``ValueError`` names an unknown value."""
    value = os.environ.get(LAYOUT_ENV, "").strip()
    if value and value not in LAYOUTS:
        raise ValueError(f"{LAYOUT_ENV}={value!r}: use one of {', '.join(LAYOUTS)}")
    if value:
        return value
    return "group" if use_kernels and torch.device(device).type == "cuda" and group_size == 128 else "row"


@dataclass(frozen=True)
class FastConfig:
    """Shapes of the decoder (LLaMA family)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    eps: float
    kv_bits: int = 4
    kv_group_size: int | None = None

    @property
    def scaling(self) -> float:
        return self.head_dim ** -0.5


@dataclass
class W4Weight:
    """A packed INT4 weight ``[out, in]`` (layout of :class:`runtime.qlinear.QuantLinear`)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    in_features: int
    group_size: int
    bias: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, use_kernels: bool, residual: torch.Tensor | None = None) -> torch.Tensor:
        if use_kernels:
            from .kernels.w4 import w4_linear

            return w4_linear(x, self.qweight, self.scales, self.zeros, self.group_size, self.bias, residual)
        codes = quant.unpack(quant.row_major_codes(self.qweight), 4, self.in_features)
        w = quant.dequantize_weight(codes, self.scales, self.zeros, self.group_size, x.dtype)
        y = F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        return y if residual is None else y + residual

    def accumulate(self, x: torch.Tensor, out: torch.Tensor, ready=None, stamps: str | None = None) -> torch.Tensor:
        """``out [M, N] (float32) += x [M, K] @ W^T (+ bias)`` with the kernels (CUDA decode step). ``ready``: flags
        that ``x``'s groups are written, ``stamps``: a kind of per-program timestamps
        (:func:`runtime.kernels.w4_mma.w4_mma_accumulate`); unused here, where the kernel waits for the one before to
        complete, which implies the flags."""
        from .kernels import w4

        if w4.splitk_ok(x, self.qweight):
            return w4.w4_accumulate(x, self.qweight, self.scales, self.zeros, self.group_size, out, self.bias)
        return out.add_(w4.w4_linear(x, self.qweight, self.scales, self.zeros, self.group_size, self.bias))


def fuse_quant_linears(linears, layout: str = "row") -> W4Weight:
    """Concatenate QuantLinears of one input along the output dim, in ``layout`` (:data:`LAYOUTS`); re-point them
    to views (row slices) of the result."""
    first = linears[0]
    if any(m.in_features != first.in_features or m.group_size != first.group_size or m.bits != 4
           for m in linears):
        raise ValueError("fused projections must be 4-bit with one input size and group size")
    packed = quant.packed_length(first.in_features, 4)
    # row-major codes, also from QuantLinears an earlier from_hf left as views of a group-major weight
    qweight = torch.cat([quant.row_major_codes(m.qweight)[:, :packed] for m in linears])
    scales, zeros = (torch.cat([getattr(m, name) for m in linears]) for name in ("scales", "zeros"))
    if layout == "group":
        qweight, scales, zeros = quant.group_major(qweight, scales, zeros, first.group_size)
    parts = {"qweight": qweight, "scales": scales, "zeros": zeros}
    biases = [m.bias for m in linears]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b if b is not None else torch.zeros(m.out_features, device=first.qweight.device, dtype=first.scales.dtype)
         for b, m in zip(biases, linears)])
    start = 0
    for m in linears:
        for name, fused in parts.items():
            setattr(m, name, fused[start:start + m.out_features])
        start += m.out_features
    return W4Weight(parts["qweight"], parts["scales"], parts["zeros"], first.in_features, first.group_size, bias)


@dataclass
class FastLayer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    qkv: W4Weight
    o: W4Weight
    gate_up: W4Weight
    down: W4Weight
    kv_quant: torch.nn.Module  # runtime.kvquant.KVQuantizer

    def kv_params(self) -> tuple[torch.Tensor, ...]:
        return self.kv_quant.kernel_params()


def _rmsnorm_ref(x, weight, eps):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x, cos, sin):
    return x * cos + _rotate_half(x) * sin


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``gate_up [..., 2 I]`` (``[..., I]``): the SiLU in place in ``gate_up``'s first half, so
    the product is the one new tensor (the values of ``F.silu(gate) * up``)."""
    g, u = gate_up.chunk(2, dim=-1)
    return F.silu(g, inplace=True) * u


def resolve_kernels(device, head_dim: int, use_kernels: bool | None) -> bool:
    """Whether :class:`FastLlama` runs the Triton kernels: ``use_kernels``, or where it is None wherever they are
    available and take heads of ``head_dim`` channels (:func:`runtime.kernels.head_dim_ok`). Asking for them where
    they cannot run is a one-line ``ValueError``."""
    shape_ok = kernels.head_dim_ok(head_dim)
    if use_kernels is None:
        return kernels.available(device) and shape_ok
    if use_kernels and not shape_ok:
        raise ValueError(f"the attention kernels need a power-of-two head_dim, this model has {head_dim}; "
                         "pass use_kernels=False")
    if use_kernels and not kernels.available(device):
        raise ValueError(f"Triton kernels are not available on {device}")
    return use_kernels


class FastLlama:
    """Decoder weights (shared with the source model), rope tables and the two forward paths."""

    def __init__(self, config: FastConfig, embed, layers, norm, lm_head, cos, sin, use_kernels: bool | None = None):
        self.config, self.embed, self.layers, self.norm, self.lm_head = config, embed, layers, norm, lm_head
        self.cos, self.sin = cos, sin  # float32 [max_positions, head_dim]
        self.device = embed.device
        self.use_kernels = resolve_kernels(self.device, config.head_dim, use_kernels)

    @classmethod
    def from_hf(cls, model, max_positions: int, use_kernels: bool | None = None,
                projections: str | None = None) -> FastLlama:
        """Wrap a loaded W4KV4 ``LlamaForCausalLM`` (see the module docstring); ``projections``: see
        :meth:`with_projections`; None: "gemv" on the kernel path on CUDA (the fastest measured), else "triton"."""
        cfg, dec = model.config, model.model
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kq = dec.layers[0].self_attn.kv_quant
        device = dec.embed_tokens.weight.device
        use_kernels = resolve_kernels(device, head_dim, use_kernels)  # before the layout: it depends on it
        layout = weight_layout(device, use_kernels, dec.layers[0].self_attn.q_proj.group_size)
        fc = FastConfig(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim,
                        cfg.num_hidden_layers, cfg.rms_norm_eps, kq.config.bits, kq.config.group_size)
        layers = []
        for layer in dec.layers:
            at, mlp = layer.self_attn, layer.mlp
            layers.append(FastLayer(
                layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                fuse_quant_linears([at.q_proj, at.k_proj, at.v_proj], layout),
                fuse_quant_linears([at.o_proj], layout),
                fuse_quant_linears([mlp.gate_proj, mlp.up_proj], layout), fuse_quant_linears([mlp.down_proj], layout),
                at.kv_quant))
        probe = torch.zeros(1, device=dec.embed_tokens.weight.device)
        cos, sin = dec.rotary_emb(probe, torch.arange(max_positions, device=probe.device)[None])
        fast = cls(fc, dec.embed_tokens.weight, layers, dec.norm.weight, model.lm_head.weight,
                   cos[0].float().contiguous(), sin[0].float().contiguous(), use_kernels)
        if projections is None:
            projections = "gemv" if fast.use_kernels and fast.device.type == "cuda" else "triton"
        return fast.with_projections(projections)

    def with_projections(self, backend: str) -> FastLlama:
        """The decode step's four fused projections on ``backend``: "triton" (:mod:`runtime.kernels.w4`, split-K
        on the tensor cores through ``tl.dot``), "gemlite" (optional package, CUDA:
        :mod:`runtime.kernels.gemlite_backend`; shapes it does not take stay on "triton") or "gemv" (the default of
        :meth:`from_hf` on CUDA: :class:`runtime.kernels.w4_gemv.GemvW4`, i.e. the inline-PTX tensor-core GEMV
        :mod:`runtime.kernels.w4_mma` for 1..8 float16 rows at group 128, the row-streaming GEMV for other inputs of
        up to 4 rows, "triton" above; the norms and SiLU product inside the row-streaming GEMVs only as ``WKVQ_FUSE``
        asks, :meth:`_fused_inputs`). The eager path is unchanged. Returns ``self``."""
        if backend not in PROJECTIONS:
            raise ValueError(f"unknown projections backend {backend!r}; allowed: {', '.join(PROJECTIONS)}")
        plain = lambda w: w.plain() if hasattr(w, "plain") else w  # noqa: E731 - the weight without a backend
        if backend == "gemlite":
            from .kernels import gemlite_backend

            if not (self.use_kernels and self.device.type == "cuda"):
                raise ValueError(f"gemlite projections need the kernel path on CUDA, got {self.device} "
                                 f"(use_kernels={self.use_kernels})")
            gemlite_backend.require_gemlite()
            wrap = lambda w: gemlite_backend.GemLiteW4.from_w4(w, self.embed.dtype)  # noqa: E731
        elif backend == "gemv":
            from .kernels import w4_gemv

            if not self.use_kernels:
                raise ValueError("gemv projections run on the kernel path (CUDA, or Triton's interpreter); "
                                 f"this model has use_kernels={self.use_kernels}")
            wrap = lambda w: w4_gemv.GemvW4.from_w4(plain(w))  # noqa: E731
        else:
            wrap = plain
        for layer in self.layers:
            layer.qkv, layer.o, layer.gate_up, layer.down = map(wrap, (layer.qkv, layer.o, layer.gate_up, layer.down))
        return self

    def new_cache(self, batch: int, max_len: int | None = None) -> StaticPOQCache:
        c = self.config
        max_len = max_len or self.cos.shape[0]
        if max_len > self.cos.shape[0]:
            raise ValueError(f"max_len {max_len} exceeds the rope table of {self.cos.shape[0]} positions")
        return StaticPOQCache(c.layers, batch, max_len, c.kv_heads, c.head_dim, c.kv_group_size, c.kv_bits,
                              self.device, query_heads=c.heads)

    # ------------------------------------------------------------------ eager path (reference)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, cache: StaticPOQCache) -> torch.Tensor:
        """``ids [B, T]`` new tokens -> logits of the last one ``[B, vocab]`` (float32); stores them."""
        c = self.config
        t = ids.shape[1]
        start = cache.length
        if start + t > cache.max_len:
            raise ValueError(f"{t} new tokens after {start} overflow the cache of {cache.max_len}")
        cos, sin = self.cos[start:start + t].to(self.embed.dtype), self.sin[start:start + t].to(self.embed.dtype)
        x = self.embed[ids]
        # each sublayer's intermediates are a helper's locals, gone before the next sublayer allocates its own (in one
        # loop body a layer's gate_up output outlived it until the next layer's replaced it: a 7B prefill of 32768
        # tokens held 2 GB more than fp16's, thirty-ninth session, benchmarks/prefill_bench.py --memory)
        for i, layer in enumerate(self.layers):
            x = layer.o(self._prefill_attention(i, layer, x, cache, cos, sin), self.use_kernels, residual=x)
            x = layer.down(_silu_mul(layer.gate_up(_rmsnorm_ref(x, layer.ln2, c.eps), self.use_kernels)),
                           self.use_kernels, residual=x)
        cache.advance(t)
        x = _rmsnorm_ref(x[:, -1], self.norm, c.eps)
        return F.linear(x, self.lm_head).float()

    def _prefill_attention(self, i: int, layer: FastLayer, x: torch.Tensor, cache: StaticPOQCache, cos: torch.Tensor,
                           sin: torch.Tensor) -> torch.Tensor:
        """Layer ``i``'s POQ attention of ``x [B, T, hidden]`` (the output projection's input ``[B, T, heads *
        head_dim]``); stores the new keys and values."""
        c = self.config
        b, t = x.shape[:2]
        qkv = layer.qkv(_rmsnorm_ref(x, layer.ln1, c.eps), self.use_kernels)
        q, k, v = qkv.view(b, t, c.heads + 2 * c.kv_heads, c.head_dim).transpose(1, 2).split(
            [c.heads, c.kv_heads, c.kv_heads], dim=1)
        a = cache.attend(i, layer.kv_quant, _rope(q, cos, sin), _rope(k, cos, sin), v, c.scaling)
        return a.transpose(1, 2).reshape(b, t, -1)

    # ------------------------------------------------------------------ kernel path (static shapes)

    def _decode_body(self, ids: torch.Tensor, cache: StaticPOQCache, splits: int) -> torch.Tensor:
        """One token per sequence through the kernels; advances ``cache.pos`` (not ``cache.length``).

        The residual stream ``x`` is float32; the projections add into it (o, down) or into zeroed
        float32 buffers (qkv, gate_up) that their reader zeroes again after use. With :meth:`_fused_inputs`
        "norm" the qkv and gate_up GEMVs norm ``x`` themselves; with "silu" the down GEMV computes
        ``silu(gate) * up``, so rope_append zeroes ``gate_up`` (after the previous layer's down projection, before
        this gate_up); with "rope" the attention kernel reads ``qkv`` itself (:func:`kv4.rope_attention`), the norm
        before qkv zeroes ``qkv`` (read by the previous layer's attention) and, with "silu", the norm before
        gate_up zeroes ``gate_up``; with "heads" the output projection starts on each KV head's output as soon as
        the attention flags it (``cache.ready`` at epoch ``cache.step``)."""
        from .kernels import kv4, misc, part_heads

        c, dt = self.config, self.embed.dtype
        x = self.embed[ids].float()
        first, fused = self.layers[0], self._fused_inputs(x.shape[0])
        norm, silu, rope, heads = "norm" in fused, "silu" in fused, "rope" in fused, "heads" in fused
        flag_heads = part_heads(c.heads // c.kv_heads)  # query heads a ready flag
        qkv = torch.zeros(x.shape[0], first.qkv.qweight.shape[0], dtype=torch.float32, device=x.device)
        gate_up = torch.zeros(x.shape[0], first.gate_up.qweight.shape[0], dtype=torch.float32, device=x.device)
        for i, layer in enumerate(self.layers):
            store, params = cache.layers[i], layer.kv_params()
            if norm:
                layer.qkv.accumulate_rmsnorm(x, layer.ln1, c.eps, dt, qkv)
            else:
                layer.qkv.accumulate(misc.rmsnorm(x, layer.ln1, c.eps, dt, clear=qkv if rope and i else None), qkv)
            ready = (cache.ready[i], cache.step) if heads else None  # "heads" implies "rope"
            if rope:
                a = kv4.rope_attention(qkv, self.cos, self.sin, cache.pos, store, params, c.heads, c.scaling, dt,
                                       splits, bits=c.kv_bits, ready=ready)
            else:
                q, k_cur, v_cur = kv4.rope_append(qkv, self.cos, self.sin, cache.pos, store, params, c.heads,
                                                  c.kv_bits, clear=True, clear_extra=gate_up if silu else None)
                a = kv4.decode_attention(q, k_cur, v_cur, store, cache.pos, params, c.scaling, dt, splits)
            layer.o.accumulate(a.view(x.shape[0], -1), x,
                               ready=(*ready, flag_heads) if heads else None,
                               stamps="o")
            if norm:
                layer.gate_up.accumulate_rmsnorm(x, layer.ln2, c.eps, dt, gate_up)
            else:
                layer.gate_up.accumulate(misc.rmsnorm(x, layer.ln2, c.eps, dt, clear=gate_up if rope and silu and i
                                                      else None), gate_up)
            if silu:
                layer.down.accumulate_silu(gate_up, dt, x)
            else:
                layer.down.accumulate(misc.silu_mul(gate_up, dt, clear=True), x)
        cache.counters.add_(1)  # pos and step
        return F.linear(misc.rmsnorm(x, self.norm, c.eps, dt), self.lm_head)

    def _fused_inputs(self, m: int) -> frozenset[str]:
        """The fusions (of :data:`FUSIONS`, chosen by :func:`fuse_choice` of ``WKVQ_FUSE``) of the decode step of
        ``m`` rows: the input transforms only where the projections are :class:`~runtime.kernels.w4_gemv.GemvW4`
        that take them ("norm": every qkv and gate_up, on the row GEMV; "silu": every down, on the tensor-core GEMV
        at one row or on the row GEMV); "rope" unless "norm" is kept; "heads" with "rope",
        where the output projections are :class:`~runtime.kernels.w4_gemv.GemvW4` and a head is one group of 128
        channels (by default only at :data:`HEADS_DEFAULT_SHAPES`)."""
        from .kernels.w4_gemv import GemvW4

        value = os.environ.get(FUSE_ENV)
        chosen = fuse_choice(value, m)
        inputs = set(chosen & {"norm", "silu"})
        if "norm" in inputs and not all(isinstance(w, GemvW4) and w.fuses_inputs(m)
                                        for la in self.layers for w in (la.qkv, la.gate_up)):
            inputs.discard("norm")
        dt = self.embed.dtype  # the products' dtype (the decode step's ``dt``)
        if "silu" in inputs and not all(isinstance(la.down, GemvW4) and la.down.fuses_silu(m, dt)
                                        for la in self.layers):
            inputs.discard("silu")
        default = not (value or "").strip()
        if "silu" in inputs and default and not all(la.down.silu_by_default(m, dt) for la in self.layers):
            inputs.discard("silu")  # the default: only where it measured faster
        rope = "rope" in chosen and "norm" not in inputs
        heads = ("heads" in chosen and rope and self.config.head_dim == 128
                 and all(isinstance(la.o, GemvW4) for la in self.layers))
        if heads and default:  # the default: only where it measured faster
            heads = all((la.o.qweight.shape[0], la.o.in_features) in HEADS_DEFAULT_SHAPES for la in self.layers)
        return inputs | ({"rope"} if rope else set()) | ({"heads"} if heads else set())

    def splits_for(self, cache: StaticPOQCache) -> int:
        """Sequence splits of the decode attention at this cache (:func:`runtime.kernels.kv4.attn_config`: the
        attention table at its batch and size, else the default policy); fixed when the step is captured."""
        from .kernels import kv4

        batch = cache.layers[0].k_codes.shape[0]
        return kv4.attn_config(batch, self.config.heads, cache.max_len, kv4.multiprocessors(self.device),
                               self.config.kv_heads).splits

    @torch.no_grad()
    def decode_step(self, ids: torch.Tensor, cache: StaticPOQCache) -> torch.Tensor:
        """``ids [B]`` -> logits ``[B, vocab]``: kernels when available, else the eager path."""
        if not self.use_kernels:
            return self.forward(ids[:, None], cache)
        if cache.length >= cache.max_len:
            raise ValueError(f"the cache of {cache.max_len} tokens is full")
        logits = self._decode_body(ids, cache, self.splits_for(cache))
        cache.length += 1
        return logits.float()


class DecodeGraph:
    """The kernel decode step of ``model`` for ``cache`` captured in a CUDA graph (static buffers)."""

    def __init__(self, model: FastLlama, cache: StaticPOQCache, warmup: int = 2):
        if model.device.type != "cuda" or not model.use_kernels:
            raise ValueError(f"CUDA graphs need the kernel path on a CUDA device, got {model.device}")
        self.model, self.cache = model, cache
        batch = cache.layers[0].k_codes.shape[0]
        self.ids = torch.zeros(batch, dtype=torch.long, device=model.device)
        splits = model.splits_for(cache)
        saved = cache.pos.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(warmup):  # compiles and autotunes the kernels; writes slot `pos`, rewritten later
                model._decode_body(self.ids, cache, splits)
                cache.pos.copy_(saved)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.logits = model._decode_body(self.ids, cache, splits)
        cache.pos.copy_(saved)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Replay for ``ids [B]``; returns the (reused) logits buffer ``[B, vocab]``."""
        if self.cache.length >= self.cache.max_len:
            raise ValueError(f"the cache of {self.cache.max_len} tokens is full")
        self.ids.copy_(ids)
        self.graph.replay()
        self.cache.length += 1
        return self.logits


@torch.no_grad()
def pick_tokens(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row of ``logits [B, vocab]``: the argmax at ``temperature`` 0, else a sample of
    ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens (0: all) and then to the
    smallest set whose probability reaches ``top_p`` (the order of transformers' warpers)."""
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be >= 0, top_k >= 0 and 0 < top_p <= 1; got {temperature}, {top_k}, "
                         f"{top_p}")
    if temperature == 0:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # tokens after the set has reached top_p (the first always stays)
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model: FastLlama, ids: torch.Tensor, max_new_tokens: int, use_graph: bool = True, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, eos_token_id=None,
             on_token=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Decoding of ``ids [B, T]`` (equal-length prompts) on a static POQ cache: greedy, or sampled
    (:func:`pick_tokens`); on CUDA with the kernels every step is one CUDA-graph replay (``use_graph``).
    Returns ``[B, n]`` new tokens, ``n <= max_new_tokens``: it stops once every sequence has produced one of
    ``eos_token_id`` (an int or a list; a finished sequence's later tokens are its first), and calls
    ``on_token(tokens [B])`` after each step (e.g. a streamer)."""
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
    cache = model.new_cache(ids.shape[0], ids.shape[1] + max_new_tokens)
    logits = model.forward(ids, cache)
    cuda_graph = use_graph and model.device.type == "cuda" and model.use_kernels
    step = DecodeGraph(model, cache).step if cuda_graph else None
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    eos_t = torch.tensor(eos, device=ids.device, dtype=torch.long)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    out = []
    for _ in range(max_new_tokens):
        tok = pick_tokens(logits, temperature, top_k, top_p, generator)
        if eos:
            tok = torch.where(done, eos_t[0], tok)
            done |= torch.isin(tok, eos_t)
        out.append(tok)
        if on_token is not None:
            on_token(tok)
        if len(out) == max_new_tokens or bool(done.all()):
            break
        logits = step(tok) if step else model.decode_step(tok, cache)
    return torch.stack(out, dim=1)
