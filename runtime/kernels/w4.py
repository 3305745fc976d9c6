"""INT4 group-wise weight matmul straight from the artifact's packed layout.

``y [M, N] = x [M, K] @ W^T (+ bias) (+ residual)`` with ``W ~ (q - zero) * scale`` per group of
``group_size`` input channels. ``qweight uint8 [N, ceil(K/2)]`` holds element ``2j`` in the low
nibble and ``2j + 1`` in the high nibble (:func:`runtime.quant.pack`), ``scales [N, G]`` (float16)
and ``zeros uint8 [N, G]``. ``K`` may end in a ragged group. Three kernels:

* up to 16 rows, ``K % 8 == 0`` (the decode step): :func:`_w4_splitk_kernel`, split over ``N`` and
  ``K``, one tensor-core dot per group on codes unpacked by byte permutes (no per-code float
  arithmetic, see :func:`_codes_asm`), results added atomically into a float32 output
  (:func:`w4_accumulate`);
* one row otherwise (``K % 8 != 0``): :func:`_w4_gemv_kernel` (bytes, float32 FMA);
* several rows (prefill): :func:`_w4_kernel`, a ``BLOCK_M x BLOCK_N`` tile per
  program walking ``K`` one group at a time, dequantized in registers and multiplied on the
  tensor cores.

The CUDA path reads the artifact's layout as it is (no repacking): a row's bytes are read as int32
words, word ``w`` holding input channels ``8w .. 8w+7`` at bits ``4i``. Every kernel also takes the group-major
copy of :func:`runtime.quant.group_major` (codes ``[N, G, group/2]``, each group's rows contiguous; the fused
projections' layout on CUDA): the loads step from group to group by the tensors' group strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import quant
from . import interpreting

SUPPORTED_GROUPS = (32, 64, 128, 256)


@triton.jit
def _nibbles(qb, s, z, dt: tl.constexpr):
    """The weights of packed bytes ``qb`` (low nibble: channel ``2j``, high: ``2j + 1``): ``(q - zero) * scale`` in
    float32, rounded once to ``dt``; ``s`` and ``z`` broadcast against ``qb``."""
    return (((qb & 15).to(tl.float32) - z) * s).to(dt), (((qb >> 4).to(tl.float32) - z) * s).to(dt)


@triton.jit
def _w4_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, r_ptr, y_ptr, M, N, K,
               stride_xm, stride_qn, stride_qg, stride_sn, stride_sg, stride_zn, stride_zg, stride_rm, stride_ym,
               GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
    HALF: tl.constexpr = GROUP // 2
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rb = tl.arange(0, HALF)
    mask_m, mask_n = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, tl.cdiv(K, GROUP)):
        kb = g * HALF + rb  # packed byte index
        ke = 2 * kb  # even input channel
        x_rows = x_ptr + rm[:, None] * stride_xm
        xe = tl.load(x_rows + ke[None, :], mask=mask_m[:, None] & (ke < K)[None, :], other=0.0)
        xo = tl.load(x_rows + ke[None, :] + 1, mask=mask_m[:, None] & (ke + 1 < K)[None, :], other=0.0)
        qb = tl.load(qw_ptr + rn[None, :] * stride_qn + g * stride_qg + rb[:, None],
                     mask=mask_n[None, :] & (ke < K)[:, None], other=0)
        s = tl.load(s_ptr + rn * stride_sn + g * stride_sg, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rn * stride_zn + g * stride_zg, mask=mask_n, other=0).to(tl.float32)
        wl, wh = _nibbles(qb, s[None, :], z[None, :], xe.dtype)
        # "ieee": a float32 model's products in float32, not TF32 (Triton's default on CUDA; ignored for 16-bit x)
        acc += tl.dot(xe, wl, input_precision="ieee")
        acc += tl.dot(xo, wh, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RES:
        acc += tl.load(r_ptr + rm[:, None] * stride_rm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _w4_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, r_ptr, y_ptr, M, N, K,
                    stride_xm, stride_qn, stride_qg, stride_sn, stride_sg, stride_zn, stride_zg, stride_rm,
                    stride_ym,
                    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, KG: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
    """One row of ``x`` per program (rows fastest, so their programs share the weight tile in L2);
    ``KG`` groups per iteration as a ``[BLOCK_N, KG, GROUP/2]`` tile; float32 FMA, one reduction."""
    HALF: tl.constexpr = GROUP // 2
    m = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rn < N
    gi = tl.arange(0, KG)
    jj = gi[:, None] * HALF + tl.arange(0, HALF)[None, :]  # channel pair within the tile [KG, HALF]
    jq = gi[:, None] * stride_qg + tl.arange(0, HALF)[None, :]  # its byte offset from the tile's first group
    acc = tl.zeros((BLOCK_N, KG, HALF), dtype=tl.float32)
    n3 = rn[:, None, None]
    for g0 in range(0, tl.cdiv(K, GROUP), KG):
        kb = g0 * HALF + jj
        ke = 2 * kb
        xe = tl.load(x_ptr + m * stride_xm + ke, mask=ke < K, other=0.0).to(tl.float32)
        xo = tl.load(x_ptr + m * stride_xm + ke + 1, mask=ke + 1 < K, other=0.0).to(tl.float32)
        wmask = mask_n[:, None, None] & (ke < K)[None, :, :]
        qb = tl.load(qw_ptr + n3 * stride_qn + g0 * stride_qg + jq[None, :, :], mask=wmask, other=0)
        gmask = mask_n[:, None] & ((g0 + gi) * GROUP < K)[None, :]
        s = tl.load(s_ptr + rn[:, None] * stride_sn + (g0 + gi[None, :]) * stride_sg, mask=gmask,
                    other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rn[:, None] * stride_zn + (g0 + gi[None, :]) * stride_zg, mask=gmask,
                    other=0).to(tl.float32)
        lo = (qb & 15).to(tl.float32) - z[:, :, None]
        hi = (qb >> 4).to(tl.float32) - z[:, :, None]
        acc += s[:, :, None] * (lo * xe[None, :, :] + hi * xo[None, :, :])
    y = tl.sum(tl.sum(acc, 2), 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_RES:
        y += tl.load(r_ptr + m * stride_rm + rn, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=mask_n)


def _codes_asm_text(magic: int) -> str:
    """PTX for one int32 word ``$8`` -> its eight codes as 16-bit floats ``OFFSET + code`` in ``$0..$7``
    (``magic``: the bit pattern of ``OFFSET`` twice). For each byte ``i`` (channels ``2i``, ``2i+1``), ``prmt``
    moves byte ``i`` of the word and of the word shifted right by 4 into the low bytes of the two halves;
    ``lop3`` keeps the nibbles and ors in the exponent: 9 instructions per word."""
    lines = ["{", ".reg .b32 w0, w4, t;", "mov.b32 w0, $8;", "shr.u32 w4, w0, 4;"]
    for i in range(4):
        lines += [f"prmt.b32 t, w0, w4, {hex(0x0400 | (i << 8) | i)};",
                  f"lop3.b32 t, t, 0x000F000F, {hex(magic)}, 0xEA;", f"mov.b32 {{${2 * i}, ${2 * i + 1}}}, t;"]
    return "\n".join(lines + ["}"])


_ASM_F16: tl.constexpr = tl.constexpr(_codes_asm_text(0x64006400))  # 1024.0 in float16
_ASM_BF16: tl.constexpr = tl.constexpr(_codes_asm_text(0x43004300))  # 128.0 in bfloat16


@triton.jit
def _codes_asm(words, BF16: tl.constexpr):
    if BF16:
        return tl.inline_asm_elementwise(
            asm=_ASM_BF16, constraints="=h,=h,=h,=h,=h,=h,=h,=h,r", args=[words], is_pure=True, pack=1,
            dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16,
                   tl.bfloat16))
    else:
        return tl.inline_asm_elementwise(
            asm=_ASM_F16, constraints="=h,=h,=h,=h,=h,=h,=h,=h,r", args=[words], is_pure=True, pack=1,
            dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16))


@triton.jit
def _codes_plain(words, OFFSET: tl.constexpr, dt: tl.constexpr):
    """Reference of :func:`_codes_asm` in plain Triton (the interpreter cannot run PTX)."""
    return ((((words >> 0) & 15) + OFFSET).to(dt), (((words >> 4) & 15) + OFFSET).to(dt),
            (((words >> 8) & 15) + OFFSET).to(dt), (((words >> 12) & 15) + OFFSET).to(dt),
            (((words >> 16) & 15) + OFFSET).to(dt), (((words >> 20) & 15) + OFFSET).to(dt),
            (((words >> 24) & 15) + OFFSET).to(dt), (((words >> 28) & 15) + OFFSET).to(dt))


@triton.jit
def _offset_codes(words, OFFSET: tl.constexpr, dt: tl.constexpr, USE_ASM: tl.constexpr, BF16: tl.constexpr):
    """``int32 [R, W]`` words -> ``[R, 8 W]`` of ``OFFSET + code`` in channel order (exact in ``dt``)."""
    if USE_ASM:
        e0, e1, e2, e3, e4, e5, e6, e7 = _codes_asm(words, BF16)
    else:
        e0, e1, e2, e3, e4, e5, e6, e7 = _codes_plain(words, OFFSET, dt)
    # join appends a minor axis: flat index 4a + 2b + c of [R, W, a, b, c] is channel 4a + 2b + c
    w = tl.join(tl.join(tl.join(e0, e4), tl.join(e2, e6)), tl.join(tl.join(e1, e5), tl.join(e3, e7)))
    return tl.reshape(w, (words.shape[0], words.shape[1] * 8))


@triton.jit
def _group_words(qw_ptr, rn, mask_n, g, K, G, stride_qn, stride_qg, GROUP: tl.constexpr, EVEN_K: tl.constexpr):
    """Code words ``int32 [BLOCK_N, GROUP/8]`` of group ``g`` (zeros past ``K``)."""
    NW: tl.constexpr = GROUP // 8
    rw = tl.arange(0, NW)
    gmask = mask_n & (tl.full(rn.shape, g, tl.int32) < G)
    if EVEN_K:
        wmask = gmask[:, None]
    else:
        wmask = gmask[:, None] & ((g * NW + rw) < K // 8)[None, :]
    return tl.load(qw_ptr + rn[:, None] * stride_qn + g * stride_qg + rw[None, :], mask=wmask, other=0)


@triton.jit
def _group_params(x_ptr, s_ptr, z_ptr, rn, rm, mask_n, mask_m, g, K, G, stride_xm, stride_sn, stride_sg, stride_zn,
                  stride_zg, GROUP: tl.constexpr, EVEN_K: tl.constexpr):
    """``x [16, GROUP]`` (rows past ``M`` zero), scales and zero points ``float32 [BLOCK_N]`` of group ``g``."""
    rk = tl.arange(0, GROUP)
    gmask = mask_n & (tl.full(rn.shape, g, tl.int32) < G)
    if EVEN_K:
        xmask = mask_m[:, None] & (tl.full((1, GROUP), g, tl.int32) < G)
    else:
        xmask = mask_m[:, None] & ((g * GROUP + rk) < K)[None, :]
    x = tl.load(x_ptr + rm[:, None] * stride_xm + g * GROUP + rk[None, :], mask=xmask, other=0.0)
    s = tl.load(s_ptr + rn * stride_sn + g * stride_sg, mask=gmask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + rn * stride_zn + g * stride_zg, mask=gmask, other=0).to(tl.float32)
    return x, s, z


@triton.jit
def _group_product(words, x, s, z, OFFSET: tl.constexpr, USE_ASM: tl.constexpr, BF16: tl.constexpr):
    """``[16, BLOCK_N]`` float32: ``scale * (x . (OFFSET + q) - (OFFSET + zero) * sum(x))`` of one group."""
    dt: tl.constexpr = x.dtype
    d = tl.dot(x, tl.trans(_offset_codes(words, OFFSET, dt, USE_ASM, BF16)), input_precision="ieee")
    e = tl.dot(x, tl.full((x.shape[1], words.shape[0]), 1.0, dt), input_precision="ieee")
    return s[None, :] * (d - e * (z + OFFSET)[None, :])


@triton.jit
def _w4_splitk_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, G,
                      stride_xm, stride_qn, stride_qg, stride_sn, stride_sg, stride_zn, stride_zg, stride_ym,
                      GROUP: tl.constexpr, BLOCK_N: tl.constexpr, GPP: tl.constexpr, EVEN_K: tl.constexpr,
                      HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr, BF16: tl.constexpr):
    """``y [M, N] (float32) += x @ W^T`` for ``M <= 16``: ``BLOCK_N`` rows x ``GPP`` (1, 2 or 4) groups per program.

    Per group, on the tensor cores (``x`` padded to 16 rows): ``d = x . (OFFSET + q)`` and ``sum(x)`` (a dot
    with ones, so it lands in the accumulator's layout); ``y += scale * (d - (OFFSET + zero) * sum(x))`` in
    float32. ``qw_ptr``: int32 words (module docstring), ``K % 8 == 0``; ``EVEN_K``: ``K % GROUP == 0``.
    All loads of the program are issued before any arithmetic (the shared-memory barriers of the dots
    would otherwise serialise them group by group)."""
    OFFSET: tl.constexpr = (128 if BF16 else 1024) if USE_ASM else 0  # the plain path needs no offset
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, 16)
    mask_n, mask_m = rn < N, rm < M
    g = pid_k * GPP
    w0 = _group_words(qw_ptr, rn, mask_n, g, K, G, stride_qn, stride_qg, GROUP, EVEN_K)
    if GPP > 1:
        w1 = _group_words(qw_ptr, rn, mask_n, g + 1, K, G, stride_qn, stride_qg, GROUP, EVEN_K)
    if GPP > 2:
        w2 = _group_words(qw_ptr, rn, mask_n, g + 2, K, G, stride_qn, stride_qg, GROUP, EVEN_K)
        w3 = _group_words(qw_ptr, rn, mask_n, g + 3, K, G, stride_qn, stride_qg, GROUP, EVEN_K)
    x0, s0, z0 = _group_params(x_ptr, s_ptr, z_ptr, rn, rm, mask_n, mask_m, g, K, G, stride_xm, stride_sn,
                               stride_sg, stride_zn, stride_zg, GROUP, EVEN_K)
    if GPP > 1:
        x1, s1, z1 = _group_params(x_ptr, s_ptr, z_ptr, rn, rm, mask_n, mask_m, g + 1, K, G, stride_xm, stride_sn,
                                   stride_sg, stride_zn, stride_zg, GROUP, EVEN_K)
    if GPP > 2:
        x2, s2, z2 = _group_params(x_ptr, s_ptr, z_ptr, rn, rm, mask_n, mask_m, g + 2, K, G, stride_xm, stride_sn,
                                   stride_sg, stride_zn, stride_zg, GROUP, EVEN_K)
        x3, s3, z3 = _group_params(x_ptr, s_ptr, z_ptr, rn, rm, mask_n, mask_m, g + 3, K, G, stride_xm, stride_sn,
                                   stride_sg, stride_zn, stride_zg, GROUP, EVEN_K)
    acc = _group_product(w0, x0, s0, z0, OFFSET, USE_ASM, BF16)
    if GPP > 1:
        acc += _group_product(w1, x1, s1, z1, OFFSET, USE_ASM, BF16)
    if GPP > 2:
        acc += _group_product(w2, x2, s2, z2, OFFSET, USE_ASM, BF16)
        acc += _group_product(w3, x3, s3, z3, OFFSET, USE_ASM, BF16)
    if HAS_BIAS:
        first = tl.full((BLOCK_N,), pid_k, tl.int32) == 0  # the first K split adds the bias
        acc += tl.load(b_ptr + rn, mask=mask_n & first, other=0.0).to(tl.float32)[None, :]
    tl.atomic_add(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc, mask=mask_m[:, None] & mask_n[None, :],
                  sem="relaxed")


@triton.jit
def _w4_dequant_kernel(qw_ptr, s_ptr, z_ptr, w_ptr, N, K, stride_qn, stride_qg, stride_sn, stride_sg, stride_zn,
                       stride_zg, stride_wn, GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    """``W [N, K] = (q - zero) * scale`` (float32, then ``w_ptr``'s dtype), one group of ``BLOCK_N`` rows a
    program: what :func:`runtime.quant.dequantize_weight` computes, from either packed layout."""
    HALF: tl.constexpr = GROUP // 2
    g = tl.program_id(1)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rb = tl.arange(0, HALF)
    ke = g * GROUP + 2 * rb
    mask_n = rn < N
    qb = tl.load(qw_ptr + rn[:, None] * stride_qn + g * stride_qg + rb[None, :],
                 mask=mask_n[:, None] & (ke < K)[None, :], other=0)
    s = tl.load(s_ptr + rn * stride_sn + g * stride_sg, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    z = tl.load(z_ptr + rn * stride_zn + g * stride_zg, mask=mask_n, other=0).to(tl.float32)[:, None]
    lo, hi = _nibbles(qb, s, z, w_ptr.dtype.element_ty)
    w = tl.reshape(tl.join(lo, hi), (BLOCK_N, GROUP))  # channel 2j from the low nibble, 2j + 1 from the high one
    kk = g * GROUP + tl.arange(0, GROUP)
    tl.store(w_ptr + rn[:, None] * stride_wn + kk[None, :], w, mask=mask_n[:, None] & (kk < K)[None, :])


GEMV_MAX_ROWS = 1
_GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "KG": kg}, num_warps=w, num_stages=st)
    for bn, kg, w, st in ((8, 8, 4, 3), (4, 8, 4, 3), (16, 4, 4, 3), (8, 4, 4, 4), (16, 8, 8, 2), (4, 16, 4, 2))
]
_w4_gemv_tuned = triton.autotune(configs=_GEMV_CONFIGS, key=["M", "N", "K"])(_w4_gemv_kernel)


_DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=st)
    for bn, w, st in ((16, 2, 4), (32, 4, 4), (64, 4, 4), (32, 2, 6), (64, 8, 3))
]
_w4_tuned = triton.autotune(configs=_DECODE_CONFIGS, key=["N", "K", "BLOCK_M"])(_w4_kernel)


def check_w4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, in_features: int,
             group_size: int) -> None:
    """Raise unless the operands are a packed INT4 weight of ``in_features`` inputs: codes ``uint8 [out,
    ceil(K/2)]`` (row-major) or ``[out, G, group/2]`` with unit stride in the last dim (group-major,
    :func:`runtime.quant.group_major`), ``scales``, ``zeros`` ``[out, G]``."""
    if group_size not in SUPPORTED_GROUPS:
        raise ValueError(f"the INT4 kernel supports group sizes {SUPPORTED_GROUPS}, got {group_size}")
    g = -(-in_features // group_size)
    if qweight.dim() == 3:
        if qweight.dtype != torch.uint8 or qweight.shape[1:] != (g, group_size // 2) or qweight.stride(2) != 1:
            raise ValueError(f"a group-major qweight must be uint8 [out, {g}, {group_size // 2}] with unit stride in "
                             f"its last dim, got {qweight.dtype} {list(qweight.shape)} strides {qweight.stride()}")
    elif qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] != (in_features + 1) // 2:
        raise ValueError(f"qweight must be uint8 [out, {(in_features + 1) // 2}], "
                         f"got {qweight.dtype} {list(qweight.shape)}")
    if scales.shape != zeros.shape or scales.shape[0] != qweight.shape[0]:
        raise ValueError(f"scales {list(scales.shape)} and zeros {list(zeros.shape)} must both be [out, G]")


def _block_m(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


def _no_block_m(flags: dict) -> dict:
    return {k: v for k, v in flags.items() if k != "BLOCK_M"}


SPLITK_MAX_ROWS = 16
# Above the split-K kernel's rows (a prefill, an evaluation window, a decode step the tensor-core GEMV does not take)
# w4_linear dequantizes the weight (w4_dequantize) and multiplies on cuBLAS. Measured on an H200 at the 7B
# projections (thirty-seventh session, benchmarks/prefill_bench.py --gemm): faster than the tiled INT4 kernel at every
# row count tried, from 64 rows (gate_up 0.163 against 0.259 ms) to 32768 (8.60 against 66.2 ms: 7.7x), within
# 0.04-0.08 ms of cuBLAS on a float16 weight made beforehand (the dequantization's own time) and level with it from
# 8192 rows. Below 64 rows the tiled kernel is slower still: 129-342 us a 7B projection at 24 rows and 147-390 at 32
# (thirty-eighth session, benchmarks/rows_probe.py, "before"; its 32-row tiles make 17 rows cost what 32 do) against
# 75-163 us for dequantization + cuBLAS at 64 rows, so the dequantization starts right above the split-K kernel
# (until the thirty-eighth session at 64 rows). Timed at 33-48 rows in the thirty-ninth: 28-120 us against the tiled
# kernel's 70-232 (rows_probe.py "dequant" and "before").
DEQUANT_MIN_ROWS = SPLITK_MAX_ROWS + 1
# (N, K) -> (BLOCK_N, groups per program, warps): fastest of a CUDA-graph-timed sweep on the H200 (NOTES.md);
# other shapes take the default, within 5% of the best at every 7B shape
SPLITK_TABLE: dict[tuple[int, int], tuple[int, int, int]] = {
    (12288, 4096): (256, 1, 4), (4096, 4096): (256, 2, 4), (22016, 4096): (128, 2, 4), (4096, 11008): (128, 2, 4)}
SPLITK_DEFAULT = (128, 2, 4)


def splitk_ok(x2: torch.Tensor, qweight: torch.Tensor) -> bool:
    """Whether :func:`w4_accumulate` can take ``x2 [M, K]`` (int32 view of the codes, <= 16 rows)."""
    k = x2.shape[-1]
    dtypes = (torch.float16, torch.bfloat16) + ((torch.float32,) if interpreting() else ())
    return (x2.shape[0] <= SPLITK_MAX_ROWS and k % 8 == 0 and x2.dtype in dtypes
            and qweight.storage_offset() % 4 == 0 and qweight.stride(-1) == 1
            and all(st % 4 == 0 for st in qweight.stride()[:-1]))


def w4_accumulate(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  group_size: int, out: torch.Tensor, bias: torch.Tensor | None = None,
                  config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``out [M, N] (float32) += x2 [M, K] @ W^T (+ bias)`` by :func:`_w4_splitk_kernel` (see :func:`splitk_ok`).

    Partial sums of the ``K`` splits are added atomically, so ``out`` must hold what the products are
    added to (zeros, or the residual stream). ``config``: ``(BLOCK_N, groups per program, warps)``."""
    m, k = x2.shape
    n = qweight.shape[0]
    if not splitk_ok(x2, qweight) or out.dtype != torch.float32 or out.shape != (m, n) or out.stride(1) != 1:
        raise ValueError(f"w4_accumulate needs <= {SPLITK_MAX_ROWS} fp16/bf16 rows with K % 8 == 0 and a float32 "
                         f"out [{m}, {n}]; got x {x2.dtype} {list(x2.shape)}, out {out.dtype} {list(out.shape)}")
    check_w4(qweight, scales, zeros, k, group_size)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    g = scales.shape[1]
    bn, gpp, warps = config or ((16, 1, 4) if interpreting() else SPLITK_TABLE.get((n, k), SPLITK_DEFAULT))
    words = qweight.view(torch.int32)
    sq, sqg, ss, ssg, sz, szg = quant.group_strides(qweight, scales, zeros, group_size)
    _w4_splitk_kernel[(triton.cdiv(n, bn), triton.cdiv(g, gpp))](
        x2, words, scales, zeros, bias if bias is not None else out, out, m, n, k, g,
        x2.stride(0), sq // 4, sqg // 4, ss, ssg, sz, szg, out.stride(0),
        GROUP=group_size, BLOCK_N=bn, GPP=gpp, EVEN_K=k % group_size == 0, HAS_BIAS=bias is not None,
        USE_ASM=not interpreting(),
        BF16=x2.dtype == torch.bfloat16, num_warps=warps)
    return out


def w4_dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, in_features: int,
                  group_size: int = 128, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The weight ``[N, in_features]`` in ``dtype``, from either packed layout: the same values as
    :func:`runtime.quant.dequantize_weight` of the unpacked codes (``(q - zero) * scale`` in float32, rounded once)."""
    check_w4(qweight, scales, zeros, in_features, group_size)
    n = qweight.shape[0]
    w = torch.empty(n, in_features, dtype=dtype, device=qweight.device)
    sq_n, sq_g, ss_n, ss_g, sz_n, sz_g = quant.group_strides(qweight, scales, zeros, group_size)
    block_n = 32
    _w4_dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(in_features, group_size))](
        qweight, scales, zeros, w, n, in_features, sq_n, sq_g, ss_n, ss_g, sz_n, sz_g, w.stride(0),
        GROUP=group_size, BLOCK_N=block_n)
    return w


def _dequant_linear(x2, qweight, scales, zeros, group_size, bias, residual):
    w = w4_dequantize(qweight, scales, zeros, x2.shape[1], group_size, x2.dtype)
    base = residual.reshape(x2.shape[0], -1).to(x2.dtype) if residual is not None else None
    if bias is not None:
        base = bias.to(x2.dtype) if base is None else base + bias.to(x2.dtype)
    # addmm adds the base in the GEMM's float32 epilogue: one rounding, as the tiled kernel's
    return torch.mm(x2, w.t()) if base is None else torch.addmm(base.expand(x2.shape[0], -1), x2, w.t())


def w4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              group_size: int = 128, bias: torch.Tensor | None = None,
              residual: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] -> [..., N]`` in ``x.dtype`` (see the module docstring for the layout); from
    :data:`DEQUANT_MIN_ROWS` rows the weight dequantized (:func:`w4_dequantize`) times ``x`` on cuBLAS."""
    k = x.shape[-1]
    check_w4(qweight, scales, zeros, k, group_size)
    n = qweight.shape[0]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    if m >= DEQUANT_MIN_ROWS:
        return _dequant_linear(x2, qweight, scales, zeros, group_size, bias, residual).reshape(*x.shape[:-1], n)
    if splitk_ok(x2, qweight):
        out = (residual.reshape(m, n).to(torch.float32, copy=True) if residual is not None
               else torch.zeros(m, n, dtype=torch.float32, device=x.device))
        return w4_accumulate(x2, qweight, scales, zeros, group_size, out, bias).to(x.dtype).reshape(*x.shape[:-1], n)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    res = residual.reshape(m, n).contiguous() if residual is not None else y
    bm = _block_m(m)
    args = (x2, qweight, scales, zeros, bias if bias is not None else y, res, y, m, n, k, x2.stride(0),
            *quant.group_strides(qweight, scales, zeros, group_size), res.stride(0), y.stride(0))
    flags = dict(GROUP=group_size, BLOCK_M=bm, HAS_BIAS=bias is not None, HAS_RES=residual is not None)
    if m <= GEMV_MAX_ROWS:
        if interpreting():
            _w4_gemv_kernel[(m, triton.cdiv(n, 8))](*args, BLOCK_N=8, KG=2, **_no_block_m(flags))
        else:
            grid = lambda meta: (m, triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
            _w4_gemv_tuned[grid](*args, **_no_block_m(flags))
    elif interpreting() or bm > 16:
        bn = 64 if bm > 16 else 32
        _w4_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm))](*args, BLOCK_N=bn, **flags)
    else:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, bm))  # noqa: E731
        _w4_tuned[grid](*args, **flags)
    return y.reshape(*x.shape[:-1], n)
