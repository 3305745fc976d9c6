"""Optional GemLite backend for the INT4 projections of the CUDA decode step.

GemLite (PyPI ``gemlite``, Triton low-bit matmul kernels) is not a dependency: it is imported
lazily, only when a model asks for it (:meth:`runtime.fast.FastLlama.with_projections`), and only
on CUDA (importing it queries the GPU).

Layout: a :class:`runtime.fast.W4Weight` holds ``qweight uint8 [N, K/2]`` (channel ``2j`` in the low
nibble), ``scales float16 [N, G]``, ``zeros uint8 [N, G]`` with ``W = (q - z) * s``. Read as int32
words, a row holds channels ``8w .. 8w+7`` at bits ``4i``: exactly GemLite's 32-bit "packed over
columns" layout, stored transposed (``W_q int32 [K/8, N]``, ``scales``/``zeros`` ``[G, N]``).
:func:`to_gemlite` packs the codes through GemLite's own ``pack`` with integer zeros as float16 and
``fma_mode=False`` (GemLite's ``W_group_mode`` 3, ``(q - z) * s`` computed in float16). The
dequantized weights are therefore the float16 rounding of ``(q - z) * s``, the same values as
``quant.dequantize_weight(..., dtype=torch.float16)`` (the product of a 4-bit integer and a float16
scale is exact in float32, so both round once). Against the float32 dequantized matmul this adds
the float16 rounding of each weight (relative <= 2**-11, ~1.5e-4 on a whole product); the
split-K kernel of :mod:`runtime.kernels.w4` applies the scale in float32 and has no such term.
With bfloat16 activations GemLite's tensor-core path (``GEMM_SPLITK``, 5..63 rows) rounds the
float16 weights again to bfloat16.

Kernels: GemLite picks ``GEMV_REVSPLITK`` for up to 4 rows and ``GEMM_SPLITK`` up to 63. Both add
partial sums atomically. ``GEMV_REVSPLITK`` is launched here straight into the float32 ``out`` of
the accumulate contract (``direct``: one kernel, no zeroed temporary, no add); the other types go
through GemLite's public forward (float32 output) and one ``out.add_``.

Configs: GemLite autotunes on a shape's first call, timing launches outside CUDA graphs; its
pre-tuned tables (one per GPU name) hold Llama-3-8B shapes. :func:`seed_config` gives each shape
used the pre-tuned config of the nearest shape (same rows, group and packing), so no autotuning
runs (on an H200, whose name matches no table, the H100 table is loaded). Calls made before
capture (``DecodeGraph`` warm-up) compile the kernels; the captured graph replays them.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import logging
import math
import os
from dataclasses import dataclass

import torch

from ..fast import W4Weight

log = logging.getLogger(__name__)

TESTED_VERSION = "0.6.0.post2"  # the direct launch replicates this version's GEMV_REVSPLITK forward
SUPPORTED_GROUPS = (32, 64, 128, 256)
DTYPES = (torch.float16, torch.bfloat16)
DIRECT_TYPE = "GEMV_REVSPLITK"
PAD_K = 4096  # >= BLOCK_SIZE_K * SPLIT_K of any GemLite GEMM_SPLITK config (at most 256 * 16)
# GPU-name substring -> GemLite config table next to this module, written by benchmarks/gemlite_tune.py
TUNED_TABLES = {"h200": "gemlite_h200.json"}


def installed() -> bool:
    return importlib.util.find_spec("gemlite") is not None


def available(device) -> bool:
    """Whether the backend can run on ``device``: gemlite installed, a CUDA device visible."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available() and installed()


def require_gemlite():
    """``import gemlite`` with an error that says what is missing (and where it runs)."""
    if not torch.cuda.is_available():
        raise ValueError("the gemlite projection backend needs a CUDA GPU; none is visible")
    if not installed():
        raise ImportError(f"the gemlite projection backend needs the optional package gemlite "
                          f"(pip install gemlite=={TESTED_VERSION}, or this project's [gemlite] extra)")
    import gemlite

    _load_reference_configs(gemlite)
    return gemlite


def tuned_table(device_name: str) -> str | None:
    """This project's graph-timed GemLite table for a GPU (:data:`TUNED_TABLES`), or ``None``."""
    name = device_name.lower()
    for tag, file in TUNED_TABLES.items():
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), file)
        if tag in name and os.path.exists(path):
            return path
    return None


def _load_reference_configs(gemlite) -> None:
    """GemLite loads the pre-tuned table whose name is in the GPU's name; Hopper GPUs without one get
    H100's. This project's own tuned entries (:func:`tuned_table`) then replace those of their shapes."""
    core = gemlite.core
    if getattr(core, "_wkvq_loaded", False):
        return
    core._wkvq_loaded = True
    if getattr(core, "selected_tag", None) is None and torch.cuda.get_device_capability() == (9, 0):
        path = os.path.join(os.path.dirname(core.__file__), "configs", "h100.json")
        if os.path.exists(path) and gemlite.load_config(path, print_error=False):
            log.info("gemlite: no pre-tuned table for %s, loaded %s", torch.cuda.get_device_name(), path)
    path = tuned_table(torch.cuda.get_device_name())
    if path and gemlite.load_config(path, print_error=False):
        log.info("gemlite: loaded this project's tuned configs %s", path)


# ----------------------------------------------------------------------------- shapes and configs


def supported(w: W4Weight, dtype: torch.dtype) -> bool:
    """Whether ``w`` maps onto GemLite (else the :mod:`runtime.kernels.w4` kernels keep it)."""
    k = w.in_features
    return (dtype in DTYPES and w.group_size in SUPPORTED_GROUPS and k % w.group_size == 0 and k % 32 == 0
            and w.qweight.dtype == torch.uint8
            and (w.qweight.shape[0], math.prod(w.qweight.shape[1:])) == (w.scales.shape[0], k // 2)
            and w.scales.shape == w.zeros.shape and w.scales.shape[1] == k // w.group_size)


def parse_signature(key: str) -> tuple[int, ...] | None:
    """GemLite's config-table key ``"(M, N, K, group, elements_per_sample, type_id)"`` as a tuple."""
    try:
        t = ast.literal_eval(key)
    except (ValueError, SyntaxError):
        return None
    return tuple(t) if isinstance(t, tuple) and len(t) >= 6 and all(isinstance(v, int) for v in t) else None


def nearest_config(table: dict, m: int, n: int, k: int, group: int, eps: int, type_id: int) -> dict | None:
    """The entry of ``table`` (one matmul type of a GemLite config file) for the same ``(group, eps,
    type_id)`` (a config's K tile depends on the group) nearest to ``(m, n, k)`` in log scale, the rows
    first; ``None`` if there is none."""
    best, best_d = None, math.inf
    for key, cfg in table.items():
        t = parse_signature(key)
        if t is None or (t[3], t[4], t[5]) != (group, eps, type_id) or min(t[:3]) < 1:
            continue
        d = 4 * abs(math.log(t[0] / m)) + abs(math.log(t[1] / n)) + abs(math.log(t[2] / k))
        if d < best_d:
            best, best_d = cfg, d
    return copy.deepcopy(best)


def signature(linear, m: int) -> tuple[str, str]:
    """(matmul type GemLite runs for ``m`` rows, its config-table key) of a packed GemLite linear."""
    from gemlite import core
    from gemlite.triton_kernels import utils

    in_dtype = 1 if linear.input_dtype.value == 2 else linear.input_dtype.value  # bf16 shares fp16's tuning
    sig = (utils.get_closest_m(m), linear.out_features, linear.in_features, linear.group_size,
           linear.elements_per_sample, in_dtype * 100 + linear.W_nbits)
    return core.get_matmul_type(m, linear.W_nbits), str(tuple(int(v) for v in sig))


def seed_config(linear, m: int) -> bool:
    """Fix GemLite's kernel config for ``m`` rows of ``linear`` (nearest pre-tuned shape) so that it does
    not autotune; ``False`` when no table entry fits (GemLite will then autotune on the first call)."""
    from gemlite import core

    kind, sig = signature(linear, m)
    table = core.GEMLITE_TRITON_CONFIG_CACHE.setdefault(kind, {})
    if sig in table:
        return True
    t = parse_signature(sig)
    cfg = nearest_config(table, t[0], *t[1:6])
    if cfg is None:
        log.warning("gemlite: no pre-tuned %s config near %s; it will autotune", kind, sig)
        return False
    table[sig] = cfg
    log.info("gemlite: %s %s <- nearest pre-tuned config %s", kind, sig, cfg)
    return True


# ----------------------------------------------------------------------------- conversion and matmul


def to_gemlite(w: W4Weight, dtype: torch.dtype):
    """A packed ``GemLiteLinear`` (float32 output, no bias) with the dequantized values of ``w`` (see module doc).

    Holds its own copy of the codes (``int32 [K/8, N]``), float16 scales and float16 zeros ``[G, N]``."""
    if not supported(w, dtype):
        raise ValueError(f"gemlite takes 4-bit weights with K a multiple of 32 and of the group size "
                         f"{SUPPORTED_GROUPS} and activations in {DTYPES}; got K={w.in_features}, "
                         f"group {w.group_size}, qweight {list(w.qweight.shape)}, {dtype}")
    gemlite = require_gemlite()
    from runtime import quant

    n, k = w.qweight.shape[0], w.in_features
    linear = gemlite.GemLiteLinear(W_nbits=4, group_size=w.group_size, in_features=k, out_features=n,
                                   input_dtype=gemlite.DType.BF16 if dtype == torch.bfloat16 else gemlite.DType.FP16,
                                   output_dtype=gemlite.DType.FP32)
    codes = quant.unpack(quant.row_major_codes(w.qweight), 4, k)
    linear.pack(codes, w.scales.half(), w.zeros.half(), bias=None, fma_mode=False)
    if linear.W_group_mode != 3 or linear.elements_per_sample != 8:
        raise ValueError(f"gemlite packed W_group_mode {linear.W_group_mode}, elements_per_sample "
                         f"{linear.elements_per_sample}; this backend needs (q - z) * s on 32-bit words (3, 8)")
    # GEMM_SPLITK loads the scales/zeros row of every K tile without a mask, also past K when K is not a
    # multiple of BLOCK_SIZE_K * SPLIT_K (NaN in Triton's interpreter): zero rows up to PAD_K channels past K
    pad = torch.zeros(PAD_K // w.group_size, n, dtype=linear.scales.dtype, device=linear.scales.device)
    for name in ("scales", "zeros"):
        setattr(linear, name, torch.nn.Parameter(torch.cat([getattr(linear, name), pad]), requires_grad=False))
    return linear


def _launch_direct(linear, x: torch.Tensor, out: torch.Tensor, config: dict | None = None) -> None:
    """GemLite's ``GEMV_REVSPLITK`` kernel (atomic adds) into ``out`` itself (gemlite 0.6.0.post2 arguments).

    ``config`` (a config-table entry: block sizes, ``A_load_order``, ``dot_prod_mode``, ``num_warps``,
    ``num_stages``) launches the kernel with exactly that config, bypassing GemLite's autotuner and table."""
    import triton
    from gemlite.dtypes import DTYPE_TO_TRITON, TORCH_DTYPE_TO_TRITON
    from gemlite.triton_kernels import gemv_revsplitK_kernels as kmod

    m, k = x.shape
    n = linear.out_features
    in_dtype = 1 if linear.input_dtype.value == 2 else linear.input_dtype.value
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_SIZE_M"]) * triton.cdiv(n, meta["BLOCK_SIZE_N"]),  # noqa: E731
                         triton.cdiv(k, meta["BLOCK_SIZE_K"] * 2))
    w_q, scales, zeros = linear.W_q, linear.scales, linear.zeros
    kernel, meta = kmod.gemv_INT_revsplitK_kernel, {}
    if config is not None:
        meta = {key: config[key] for key in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "A_load_order",
                                             "dot_prod_mode", "num_warps", "num_stages")}
        meta.update(EVEN_N=n % meta["BLOCK_SIZE_N"] == 0, EVEN_K=k % (meta["BLOCK_SIZE_K"] * 2) == 0)
        kernel = kernel.fn  # the autotuner's jitted function
    kernel[grid](
        x, w_q, out, scales, zeros, None,
        m, n, k, linear.W_nbits, linear.group_size, linear.unpack_mask, linear.elements_per_sample,
        in_dtype * 100 + linear.W_nbits, False,
        x.stride(0), x.stride(1), w_q.stride(0), w_q.stride(1), out.stride(0), out.stride(1),
        0, 0, scales.stride(0), scales.stride(1),
        input_dtype=DTYPE_TO_TRITON[linear.input_dtype.value], output_dtype=TORCH_DTYPE_TO_TRITON[out.dtype],
        acc_dtype=DTYPE_TO_TRITON[linear.acc_dtype.value], meta_dtype=DTYPE_TO_TRITON[linear.meta_dtype.value],
        channel_scale_mode=linear.channel_scale_mode, W_group_mode=linear.W_group_mode,
        zero_is_scalar=zeros.numel() == 1, data_contiguous=linear.data_contiguous, dump_b_val=0, **meta)


def direct_ok(linear, m: int) -> bool:
    import gemlite

    return gemlite.__version__ == TESTED_VERSION and signature(linear, m)[0] == DIRECT_TYPE


def accumulate(linear, x: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None,
               direct: bool = True) -> torch.Tensor:
    """``out [M, N] (float32) += x [M, K] @ W^T (+ bias)`` through GemLite (``linear`` from :func:`to_gemlite`).

    ``direct``: up to 4 rows, launch ``GEMV_REVSPLITK`` into ``out`` (see the module doc); otherwise
    GemLite's forward and one add. Fixes the kernel config first (:func:`seed_config`)."""
    m, k = x.shape
    if out.dtype != torch.float32 or tuple(out.shape) != (m, linear.out_features) or k != linear.in_features:
        raise ValueError(f"gemlite accumulate needs x [M, {linear.in_features}] and a float32 out "
                         f"[M, {linear.out_features}]; got x {list(x.shape)}, out {out.dtype} {list(out.shape)}")
    if x.dtype != linear.compute_dtype:
        raise ValueError(f"this gemlite linear takes {linear.compute_dtype} activations, got {x.dtype}")
    if x.stride(1) != 1:
        x = x.contiguous()
    seed_config(linear, m)
    if direct and out.stride(1) == 1 and direct_ok(linear, m):
        _launch_direct(linear, x, out)
    else:
        out.add_(linear.forward_auto_no_warmup(x))
    if bias is not None:
        out.add_(bias)
    return out


@dataclass
class GemLiteW4(W4Weight):
    """A :class:`W4Weight` whose decode-step ``accumulate`` runs on GemLite (same tensors for the eager path).

    ``linear`` is ``None`` for shapes GemLite does not take (ragged K, other groups): those keep the
    split-K kernel, as do activations of another dtype than the one the linear was packed for."""

    linear: object = None
    direct: bool = True

    @classmethod
    def from_w4(cls, w: W4Weight, dtype: torch.dtype, direct: bool = True) -> GemLiteW4:
        linear = to_gemlite(w, dtype) if supported(w, dtype) else None
        if linear is None:
            log.info("gemlite: K=%d group %d stays on the split-K kernel", w.in_features, w.group_size)
        return cls(w.qweight, w.scales, w.zeros, w.in_features, w.group_size, w.bias, linear, direct)

    def plain(self) -> W4Weight:
        return W4Weight(self.qweight, self.scales, self.zeros, self.in_features, self.group_size, self.bias)

    def takes(self, x: torch.Tensor) -> bool:
        """GemLite runs ``x``: packed for its dtype, and bfloat16 only on the GEMV path (<= 4 rows; its
        tensor-core path gave wrong sums with bfloat16 under Triton's interpreter, unverified on a GPU)."""
        lin = self.linear
        return (lin is not None and x.dtype == lin.compute_dtype
                and (x.dtype == torch.float16 or signature(lin, x.shape[0])[0] == DIRECT_TYPE))

    def accumulate(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if not self.takes(x):
            return super().accumulate(x, out)
        return accumulate(self.linear, x, out, self.bias, self.direct)
