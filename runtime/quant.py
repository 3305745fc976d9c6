"""Pure quantization primitives shared by the converter and the runtime.

Conventions (the artifact's contract, see ``schemas/artifact.schema.json``):

* **Weights** ``W: [out, in]`` are quantized asymmetrically per group of ``group_size``
  consecutive input channels. ``in`` need not be a multiple of the group: the last group is
  ragged (SmolLM2: 576 = 4 x 128 + 64). Codes are integers in ``[0, 2**bits - 1]`` with an
  integer zero point per group: ``W ~ (q - zero) * scale``. Learnable weight clipping
  (OmniQuant LWC) shrinks the group range with factors ``clip_hi = sigmoid(gamma)`` and
  ``clip_lo = sigmoid(beta)`` in (0, 1]: ``max' = clip_hi * max``, ``min' = clip_lo * min``.
* **Packing**: 4-bit codes two per ``uint8`` along the last dim, element ``2j`` in the low
  nibble and ``2j + 1`` in the high nibble; an odd length is padded with a zero code. 2-bit codes
  four per byte (element ``4j + i`` at bits ``2i``). Other widths (3, 5-8) one code per byte.
* **KV cache**: per token, per head, in groups of ``group_size`` channels of ``head_dim``,
  after a static per-channel smoothing ``s`` and shift ``delta``:
  ``x~ = (x - delta) / s`` is quantized asymmetrically with a float minimum
  (``x~ ~ q * scale + minimum``), and read back as ``deq(x~) * s + delta``.
"""

from __future__ import annotations

import math

import torch

# ----------------------------------------------------------------------------- helpers


def check_bits(bits: int) -> int:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
    return bits


def check_group_size(group_size: int) -> int:
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group size must be a positive integer, got {group_size!r}")
    return group_size


def num_groups(features: int, group_size: int) -> int:
    """Number of groups (the last one possibly ragged) covering ``features`` channels."""
    return math.ceil(features / check_group_size(group_size))


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, with a straight-through (identity) gradient."""
    return x + (torch.round(x) - x).detach()


def cast_ste(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``x`` rounded to the precision of ``dtype`` (kept in its own dtype), with a straight-through
    gradient; ``dtype=None`` returns ``x``."""
    if dtype is None:
        return x
    return x + (x.to(dtype).to(x.dtype) - x).detach()


def _grouped(x: torch.Tensor, group_size: int, fill: float = 0.0) -> torch.Tensor:
    """``[..., n] -> [..., G, group_size]``, padding the ragged last group with ``fill``."""
    n = x.shape[-1]
    pad = num_groups(n, group_size) * group_size - n
    if pad:
        x = torch.nn.functional.pad(x, (0, pad), value=fill)
    return x.reshape(*x.shape[:-1], -1, group_size)


def _ungrouped(x: torch.Tensor, features: int) -> torch.Tensor:
    """Inverse of :func:`_grouped`: ``[..., G, g] -> [..., features]``."""
    return x.reshape(*x.shape[:-2], -1)[..., :features]


def group_minmax(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min and max over the last dim (ragged last group), each ``[..., G]``."""
    lo = _grouped(x, group_size, fill=float("inf")).amin(-1)
    hi = _grouped(x, group_size, fill=float("-inf")).amax(-1)
    return lo, hi


def expand_groups(p: torch.Tensor, group_size: int, features: int) -> torch.Tensor:
    """Broadcast a per-group tensor ``[..., G]`` to channels ``[..., features]``."""
    return p.repeat_interleave(group_size, dim=-1)[..., :features]


# ----------------------------------------------------------------------------- weights


def weight_qparams(
    w: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    clip_hi: torch.Tensor | None = None,
    clip_lo: torch.Tensor | None = None,
    ste: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric per-group scale and integer zero point of ``w: [out, in]``.

    ``clip_hi``/``clip_lo``: ``[out, G]`` factors in (0, 1] (LWC), or None for min-max.
    The range always includes 0. Returns ``scale [out, G]`` (float32) and ``zero [out, G]``
    (float holding integers in ``[0, 2**bits - 1]``). With ``ste=True`` the zero point is
    rounded with a straight-through gradient so clipping factors can be learned.
    """
    qmax = 2 ** check_bits(bits) - 1
    lo, hi = group_minmax(w.float(), group_size)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)  # the range holds 0, so the zero point is a code
    if clip_hi is not None:
        hi = hi * clip_hi.float()
    if clip_lo is not None:
        lo = lo * clip_lo.float()
    scale = ((hi - lo) / qmax).clamp(min=1e-8)
    zero = (-lo / scale)
    zero = (round_ste(zero) if ste else torch.round(zero)).clamp(0, qmax)
    return scale, zero


def quantize_weight(w, scale, zero, bits: int = 4, group_size: int = 128, rounding=None) -> torch.Tensor:
    """Integer codes ``uint8 [out, in]`` of ``w`` for the given per-group parameters.

    ``rounding``: optional integer offsets ``[out, in]`` added to the nearest code before clamping
    (learned rounding gives -1/0/+1, :func:`rounding_decisions`; GPTQ any small integer).
    """
    qmax = 2 ** check_bits(bits) - 1
    n = w.shape[-1]
    s = expand_groups(scale, group_size, n)
    z = expand_groups(zero, group_size, n)
    q = torch.round(w.float() / s)
    if rounding is not None:
        q = q + rounding.float()
    return torch.clamp(q + z, 0, qmax).to(torch.uint8)


def rounding_decisions(w, scale, offset, group_size: int = 128) -> torch.Tensor:
    """``int8 [out, in]``: ``round(w / s + offset) - round(w / s)`` (each -1, 0 or +1 for
    ``offset`` in [-0.5, 0.5]): learned rounding as integer offsets to round-to-nearest."""
    s = expand_groups(scale.float(), group_size, w.shape[-1])
    x = w.float() / s
    return (torch.round(x + offset.float().clamp(-0.5, 0.5)) - torch.round(x)).to(torch.int8)


def dequantize_weight(q, scale, zero, group_size: int = 128, dtype=torch.float32) -> torch.Tensor:
    """``(q - zero) * scale`` per group: ``uint8 [out, in] -> dtype [out, in]``."""
    n = q.shape[-1]
    s = expand_groups(scale.float(), group_size, n)
    z = expand_groups(zero.float(), group_size, n)
    return ((q.float() - z) * s).to(dtype)


def fake_quantize_weight(
    w, bits: int = 4, group_size: int = 128, clip_hi=None, clip_lo=None, offset=None,
    params_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Quantize-dequantize ``w`` with straight-through rounding (differentiable in ``w``, the
    clipping factors and ``offset``); numerically equal to ``dequantize_weight(quantize_weight(...))``.

    ``offset``: optional learnable rounding offsets ``[out, in]``, clamped to [-0.5, 0.5] and added
    before rounding (AdaRound/AutoRound-style learned rounding; :func:`rounding_decisions`).
    ``params_dtype``: the precision the clipping factors and the scale are stored in (float16 in
    the artifact); they are rounded to it (straight-through) exactly where the export rounds them,
    so the result is the exported weight."""
    qmax = 2 ** check_bits(bits) - 1
    clip_hi, clip_lo = (None if c is None else cast_ste(c, params_dtype) for c in (clip_hi, clip_lo))
    scale, zero = weight_qparams(w, bits, group_size, clip_hi, clip_lo, ste=True)
    scale = cast_ste(scale, params_dtype)  # after the zero point, as the export does
    # computed on the grouped (padded) layout [out, G, group_size] and sliced back: the same
    # per-element arithmetic as with expand_groups, and a graph that torch.compile (Inductor, torch
    # 2.13 CPU) compiles correctly for ragged groups, where a slice of the expanded scale is not
    s, z = scale[..., None], zero[..., None]
    x = _grouped(w.float(), group_size) / s
    if offset is not None:
        x = x + _grouped(offset.float().clamp(-0.5, 0.5), group_size)
    q = torch.clamp(round_ste(x) + z, 0, qmax)
    return _ungrouped((q - z) * s, w.shape[-1]).to(w.dtype)


# ----------------------------------------------------------------------------- packing


def codes_per_byte(bits: int) -> int:
    """How many codes of ``bits`` share one byte of the packed container."""
    return {2: 4, 4: 2}.get(check_bits(bits), 1)


def packed_length(n: int, bits: int) -> int:
    return math.ceil(n / codes_per_byte(bits))


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``uint8 [..., n]`` into ``uint8 [..., packed_length(n, bits)]``."""
    per = codes_per_byte(bits)
    if per == 1:
        return q.to(torch.uint8).contiguous()
    n = q.shape[-1]
    pad = packed_length(n, bits) * per - n
    q = torch.nn.functional.pad(q.to(torch.uint8), (0, pad)).reshape(*q.shape[:-1], -1, per)
    out = torch.zeros(q.shape[:-1], dtype=torch.uint8, device=q.device)
    for i in range(per):
        out |= q[..., i] << (bits * i)
    return out


def unpack(p: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``uint8 [..., m] -> uint8 [..., n]``."""
    per = codes_per_byte(bits)
    if per == 1:
        return p[..., :n]
    mask = (1 << bits) - 1
    parts = [(p >> (bits * i)) & mask for i in range(per)]
    return torch.stack(parts, dim=-1).reshape(*p.shape[:-1], -1)[..., :n]


def group_major(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int = 128):
    """The same packed weight with each group's rows next to each other (copies): codes ``[N, G, group/2]``
    with strides ``(group/2, N group/2, 1)`` (a ragged last group padded with zero bytes), scales and zeros
    ``[N, G]`` with strides ``(1, N)``. A warp of a GEMV that reads one group of 32 rows then reads one
    contiguous block (2 KB at group 128) instead of 64 bytes from each of 32 rows: on an H200 the tensor-core
    GEMV ran 7-17% faster on it (seventeenth session, runtime/kernels/NOTES.md round 15). The CUDA kernels take
    either layout (:func:`group_strides`); row slices of the result stay views."""
    n, half = qweight.shape
    g = scales.shape[1]
    padded = torch.zeros(n, g * group_size // 2, dtype=qweight.dtype, device=qweight.device)
    padded[:, :half] = qweight
    codes = padded.view(n, g, group_size // 2).transpose(0, 1).contiguous()  # [G, N, group/2]
    return codes.transpose(0, 1), scales.t().contiguous().t(), zeros.t().contiguous().t()


def row_major_codes(qweight: torch.Tensor) -> torch.Tensor:
    """Packed codes ``[N, ceil(K/2)]`` (or more: a group-major weight's padding) in the artifact's row-major
    layout, from either layout (:func:`group_major`; a copy then); what :func:`unpack` takes for a weight."""
    return qweight.reshape(qweight.shape[0], -1) if qweight.dim() == 3 else qweight


def group_strides(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  group_size: int) -> tuple[int, int, int, int, int, int]:
    """Element strides ``(codes row, codes group, scales row, scales group, zeros row, zeros group)`` of a packed
    weight in either layout (row-major ``[N, ceil(K/2)]`` codes: a group is ``group/2`` bytes on)."""
    q_group = qweight.stride(1) if qweight.dim() == 3 else group_size // 2
    return qweight.stride(0), q_group, scales.stride(0), scales.stride(1), zeros.stride(0), zeros.stride(1)


# ----------------------------------------------------------------------------- KV cache


def kv_smooth(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``(x - shift) / scale`` for ``x: [B, H, T, D]``, ``scale, shift: [H, D]``."""
    return (x - shift[:, None, :]) / scale[:, None, :]


def kv_unsmooth(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`kv_smooth`."""
    return x * scale[:, None, :] + shift[:, None, :]


def round_kv_stats(step: torch.Tensor, minimum: torch.Tensor, dtype: torch.dtype | None):
    """Round per-token ``step``/``minimum`` to the precision a cache stores them in (``dtype``,
    e.g. float16), kept in their own dtype; clamped into ``dtype``'s range so that the step stays
    positive and finite. ``dtype=None`` returns them unchanged."""
    if dtype is None:
        return step, minimum
    info = torch.finfo(dtype)
    step = step.clamp(info.tiny, info.max).to(dtype).to(step.dtype)
    minimum = minimum.clamp(-info.max, info.max).to(dtype).to(minimum.dtype)
    return step, minimum


def kv_quantize(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, bits: int = 4, group_size: int | None = None,
    stats_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-wise quantization of keys or values.

    ``x: [B, H, T, D]``; ``scale, shift: [H, D]`` (static smoothing and shift).
    Returns ``codes uint8 [B, H, T, D]``, ``step [B, H, T, G]`` and ``minimum [B, H, T, G]``
    (float32), with ``G = ceil(D / group_size)``; ``group_size`` defaults to ``D``.
    ``stats_dtype`` (e.g. float16): step and minimum are first rounded to that precision
    (:func:`round_kv_stats`) and the codes computed with the rounded values.
    """
    qmax, g, xs, step, lo = _kv_stats(x, scale, shift, bits, group_size, stats_dtype)
    d = x.shape[-1]
    codes = torch.round((xs - expand_groups(lo, g, d)) / expand_groups(step, g, d))
    return codes.clamp(0, qmax).to(torch.uint8), step, lo


def _kv_stats(x, scale, shift, bits, group_size, stats_dtype):
    """What :func:`kv_quantize` and :func:`kv_fake_quantize` share: ``(qmax, group size, smoothed x (float32),
    step, minimum)``, the stats rounded to ``stats_dtype`` where given."""
    qmax = 2 ** check_bits(bits) - 1
    g = group_size or x.shape[-1]
    xs = kv_smooth(x.float(), scale.float(), shift.float())
    lo, hi = group_minmax(xs, g)
    # a true division on every device: CUDA divides by a Python number as a product with its reciprocal, one float32
    # ulp off in most cases, so a float16 step now and then differs from the CPU's and the kernels' (div.rn)
    qmax_t = torch.full((), float(qmax), dtype=hi.dtype, device=hi.device)
    step, lo = round_kv_stats(((hi - lo) / qmax_t).clamp(min=1e-8), lo, stats_dtype)
    return qmax, g, xs, step, lo


def kv_dequantize(
    codes, step, minimum, scale, shift, group_size: int | None = None, dtype=torch.float32
) -> torch.Tensor:
    """Inverse of :func:`kv_quantize` up to rounding: ``[B, H, T, D]`` in ``dtype``, computed in float32 (in
    float64 for ``dtype`` float64: the references of the kernels' benchmarks)."""
    d = codes.shape[-1]
    g = group_size or d
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    xs = codes.to(ct) * expand_groups(step.to(ct), g, d) + expand_groups(minimum.to(ct), g, d)
    return kv_unsmooth(xs, scale.to(ct), shift.to(ct)).to(dtype)


def kv_fake_quantize(x, scale, shift, bits: int = 4, group_size: int | None = None,
                     stats_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Quantize-dequantize keys or values token-wise with straight-through rounding.

    Differentiable in ``x``, ``scale`` and ``shift``; numerically equal to
    ``kv_dequantize(*kv_quantize(x, ...), ...)``.
    """
    qmax, g, xs, step, lo = _kv_stats(x, scale, shift, bits, group_size, stats_dtype)
    d = x.shape[-1]
    lo_c, step_c = expand_groups(lo, g, d), expand_groups(step, g, d)
    q = torch.clamp(round_ste((xs - lo_c) / step_c), 0, qmax)
    return kv_unsmooth(q * step_c + lo_c, scale.float(), shift.float()).to(x.dtype)
