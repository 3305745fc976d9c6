"""INT4 group-128 GEMV/skinny GEMM for the decode step on the tensor cores (1 to 32 rows of ``x``, CUDA sm_80+).

``out [M, N] (float32) += x [M, K] @ W^T`` with ``W = (q - zero) * scale`` on the artifact's layout
(:mod:`runtime.kernels.w4`: ``qweight uint8 [N, K/2]``, channel ``2j`` in the low nibble of byte ``j``, i.e. word
``w`` of a row read as int32 holds channels ``8w .. 8w+7`` at bits ``4i``; ``scales float16 [N, G]``, ``zeros uint8
[N, G]``, group 128) or on its group-major copy (:func:`runtime.quant.group_major`: codes ``[N, G, 64]`` with each
group's rows contiguous, the decode step's layout on CUDA; 7-13% faster at the 7B shapes, seventeenth session).

Why: at batch 1 the row-streaming GEMV (:mod:`runtime.kernels.w4_gemv`) is bound by its arithmetic, not by its
reads (``benchmarks/gemv_probe.py`` on the H200: with every load an L1/L2 hit it still takes ~80% of its time,
while a kernel that only reads the same words takes ~55%). Its ~3.6 instructions a code are mostly the per-code
multiply-adds. Here the products run on the tensor cores: each warp owns ``16 * TILES`` rows and walks the
groups of its ``K`` range; per group every thread loads 16 bytes of codes of each of its rows (rows ``g`` and
``g + 8`` of each 16-row tile, ``g = lane / 4``, word ``4 t .. 4 t + 3`` with ``t = lane % 4``), turns each word
into four ``f16x2`` pairs of ``q - z`` (exact small integers: a ``lop3`` into the mantissa of 1024 then ``sub``, or
of 1024 with the code times 16 then one ``fma`` by 1/16; 9 instructions a word), and feeds them as the A operand
of ``mma.sync.m16n8k16`` (f16 inputs, f32 accumulation). The ``K`` slots of an MMA are any 16 channels as long as
the B operand (``x``) uses the same ones: thread ``t`` holds, in every row, the channels of its own words, and the
``x`` pairs ``(x_i, x_{i+4})`` of those words (one 16-byte load per word and four ``prmt``). Column ``n`` of B is
row ``n`` of ``x`` (zero from ``M`` on), so up to 8 rows of ``x`` cost the same as one; 9-32 rows are 2-4 such blocks
in one launch, each word's A operand built once and multiplied with every block's ``x`` (:func:`_range_blocks`; the
dequantization, not the reads, bounds these rows: thirty-eighth session). After a group's 8 MMAs
(per tile) the f32 result is scaled by the rows' float16 scales (float32 FMA) into the accumulators. ~2.0-2.1
instructions a code against ~3.6 (local sm_90 SASS), and no rounding but float32's: the products are exact.

The per-lane work (rows, pointers, the MMAs) is inline PTX; Triton runs the loop over groups, holds one value per
thread in ``[32 * WARPS]`` tensors (one element per thread) and writes the results (the epilogue's PTX says which
row and column each thread's values belong to). Triton's interpreter cannot run PTX: there the decode step keeps
the row-streaming GEMV (:func:`mma_ok` is false), and the tests of this kernel run on CUDA only.

Programs: ``(cdiv(N, 16 * TILES * WARPS), SPLIT)``; program ``(i, j)`` owns rows ``[i 16 TILES WARPS, ...)`` and
range ``j`` of ``SPLIT`` contiguous ranges of the groups; with ``SPLIT > 1`` the partial sums are added with float32
``atomic_add``. With ``MmaConfig.persist`` (stream-K) the grid is ``persist`` programs a multiprocessor instead,
each taking an equal contiguous share of the ``(row block, group)`` pairs (row block major) and adding its partial
sums with atomics. The loop runs two groups an iteration, so that each group's loads land in the registers the
group before last was computed from (one iteration of one group needed ~29 register copies of the prefetched words),
and the launch's row strides are compiled into the loads (immediate offsets from each tensor's first row: one
address add per tensor and group), the last row block then shifted down to end at ``N`` (its rows below the block
recomputed, not written). Local sm_90 SASS at two tiles: 230 instructions a group of 128 codes per thread, 1.8 a
code (290 before the thirteenth session). Rows past ``N`` (tiny ``N``) read row ``N - 1`` and are
not written; a ragged last group (``K % 128``, a multiple
of 32) leaves whole 32-channel thread slices out (``x`` read as zeros, codes not read).

Launched with PDL (:mod:`runtime.kernels.overlap`) for one row of ``x``, a program loads the codes, scales and zeros
of its first two groups before it waits for the kernel before, and their ``x`` after (``PRE``; ``WKVQ_MMA_PRE=0``
waits first; slower at 8 rows): the weights are not written by the step, so the first trip to DRAM overlaps the norm
or SiLU kernel the GEMV waits for.
Those loads are coherent ``ld.global``: ptxas moves ``griddepcontrol.wait`` above ``.nc`` loads, and ``.nc`` loads
of ``x`` above the wait. 7B b1 p2048 on an H200: 1.74-1.79 -> 1.68-1.69 ms a step (nineteenth session).

With the SiLU input (:func:`w4_mma_accumulate_silu`, the down projection at one row; the decode step's fusion
"silu") ``x`` is ``silu(gate) * up`` of the gate_up projection's float32 sums: after its PDL wait each range loads
the gate and up sums of its groups at once (one round trip), rounds the product as
:func:`runtime.kernels.misc.silu_mul` does into a shared copy of ``x`` (``XS_SYMBOL``, 256 bytes a group), and its
``x`` loads read that copy: no SiLU launch, and the first ``x`` one L2 round trip after the gate_up projection
ends instead of after a SiLU kernel (7B b1 on an H200: 1.733 -> 1.698 ms a step at p2048, 2.683 -> 2.634 at
p32768, means of five alternated pairs; twenty-fifth session).

With ``ready`` flags (the output projection after the attention, :func:`w4_mma_accumulate`; the decode step's
fusion "heads"), a preloading program waits for its groups' flags instead of the kernel before: the attention
launches it at once and flags each head as it completes, so o's programs start on the heads that are done (7B b1
p32768 on an H200: 2.75-2.76 -> 2.66-2.70 ms a step, twenty-first session).
"""

from __future__ import annotations

import functools
import itertools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import quant
from . import cuda_major, env_tables, multiprocessors, overlap, stamps, sweep_table

GROUP = 128
BLOCK_ROWS = 8  # rows of x an MMA takes (its B operand's 8 columns); a launch takes up to 4 such blocks
MMA_MAX_ROWS = 4 * BLOCK_ROWS
ROWS_ENV = "WKVQ_MMA_ROWS"  # the most rows the decode step's projections put on this kernel (8: before the
# thirty-eighth session, batches 9-32 on the split-K and tiled kernels)
MMA_ENV = "WKVQ_MMA"  # 0: the decode step's GEMV projections stay on the row-streaming kernel


PRE_ENV = "WKVQ_MMA_PRE"  # 0: with PDL, wait for the kernel before first, then load (no weight preload)


def preload_enabled() -> bool:
    """Whether a GEMV of one row launched with PDL loads its first two groups' weights before it waits for the
    kernel before (``WKVQ_MMA_PRE`` not ``0``; depth 1 only, :func:`_range`). At 8 rows it measured
    slower (7B b8 p2048 2.52-2.57 against 2.45-2.50 ms, nineteenth session), so one row only."""
    return os.environ.get(PRE_ENV, "1") != "0"


def max_rows() -> int:
    """The most rows of ``x`` :func:`mma_ok` takes: ``WKVQ_MMA_ROWS`` (1..32), default :data:`MMA_MAX_ROWS`."""
    raw = os.environ.get(ROWS_ENV, str(MMA_MAX_ROWS))
    if not (raw.isdigit() and 1 <= int(raw) <= MMA_MAX_ROWS):
        raise ValueError(f"{ROWS_ENV}={raw!r}: give the most rows of x the tensor-core GEMV takes, 1 to {MMA_MAX_ROWS}")
    return int(raw)


LAUNCHES_MAX_ROWS = 80  # GemvW4 takes up to this many rows in launches of MMA_MAX_ROWS (the last one ragged)


def row_launches(m: int) -> list[tuple[int, int]] | None:
    """The row ranges ``[lo, hi)`` of ``m`` rows in launches of at most :data:`MMA_MAX_ROWS` rows, or None above
    :data:`LAUNCHES_MAX_ROWS` (``w4.w4_linear`` dequantizes there) or where ``WKVQ_MMA_ROWS`` lowers the rows a
    launch takes (the path before the thirty-eighth session). The launches beat the dequantization on cuBLAS at every
    7B projection to 80 rows and tie at 96 (H200, thirty-ninth session, benchmarks/rows_probe.py, µs qkv / o / gate_up
    / down): 33 rows 33 / 15 / 57 / 32 against 72 / 28 / 119 / 66, 64 rows 51 / 23 / 88 / 47 against 72 / 25 / 122 /
    68, 80 rows 67 / 29 / 114 / 60 against 74 / 31 / 124 / 68, 96 rows 75 / 33 / 133 / 71 against 75 / 30 / 124 / 69.
    A 7B step at p2048: b40 8.46 against 13.05 ms, b64 12.3 against 14.9. Hence the bound at 80 (three launches
    from 65 rows; fortieth session: b72 14.07 against 15.58 ms, b80 15.42 against 16.28)."""
    if max_rows() < MMA_MAX_ROWS or not 1 <= m <= LAUNCHES_MAX_ROWS:
        return None
    return [(lo, min(lo + MMA_MAX_ROWS, m)) for lo in range(0, m, MMA_MAX_ROWS)]


def mma_enabled() -> bool:
    """Whether :class:`runtime.kernels.w4_gemv.GemvW4` puts its projections on this kernel where :func:`mma_ok`
    (``WKVQ_MMA`` not ``0``)."""
    return os.environ.get(MMA_ENV, "1") != "0"


class MmaConfig(NamedTuple):
    """``warps`` per program, ``tiles`` of 16 rows per warp, ``split``: contiguous ranges of the groups (programs
    per row block, float32 atomics when > 1), ``depth``: groups whose loads are in flight while a group is computed
    (1 or 2; registers carried around the loop), ``l2``: each warp first asks the L2 for its rows' codes over the
    program's groups (Hopper only; :func:`_prefetch_asm`), ``chains``: MMA accumulator chains (1 or 2,
    :func:`_compute_asm`), ``persist``: 0, or a stream-K grid of ``persist`` programs a multiprocessor that share
    the ``(row block, group)`` pairs equally (``split`` unused; float32 atomics): no partly filled last wave; won at
    the large M = 1 shapes. ``stages`` and ``bulk`` must be 0: they named two shared-memory pipelines, ``cp.async``
    copies a thread (thirteenth session: 5-25% slower than the register prefetch at every 7B shape) and a bulk-copy
    ring a warp (nineteenth and twenty-fourth sessions: slower in the step and in the GEMV chain), removed in the
    twenty-fourth session (the code is in git before that; NOTES.md round 22); the fields stay so that the sweep
    records' nine-value configs load."""

    warps: int = 4
    tiles: int = 1
    split: int = 1
    depth: int = 1
    l2: bool = False
    chains: int = 1
    stages: int = 0
    persist: int = 0
    bulk: int = 0

    def label(self) -> str:
        return (f"w{self.warps}_t{self.tiles}_x{self.split}" + (f"_d{self.depth}" if self.depth != 1 else "")
                + ("_l2" if self.l2 else "") + (f"_c{self.chains}" if self.chains != 1 else "")
                + (f"_p{self.persist}" if self.persist else ""))


MMA_CONFIGS = [MmaConfig(w, t, s, d, l2, c) for w, t, s, d, l2, c in itertools.product(
    (2, 4, 8), (1, 2), (1, 2, 4, 8, 16), (1, 2), (False, True), (1, 2))]
# stream-K grids: programs a multiprocessor (register-limited residency: 128 registers at two tiles, 16 warps)
MMA_CONFIGS += [MmaConfig(w, t, 1, persist=p) for w, t, p in itertools.product(
    (1, 2, 4), (1, 2), (1, 2, 3, 4, 6, 8, 12, 16)) if w * p <= 32]
# (N, K, M) -> config; M = 0: any M. The best of the graph-timed sweeps on the H200 (benchmarks/w4_mma_bench.py).
# Seventeenth session (records benchmarks/results/r20): on the group-major layout the decode step holds on CUDA
# (runtime.quant.group_major), 7B from mma_group_sweep.json, 13B from mma_group_sweep_13b.json; the 7B M = 1
# configs of the row-major sweeps (r15/r16) stayed within 0.1 us of the best, the M = 8 ones lost 1.5-4.6 us to
# the stream-K grids. Other shapes: default_mma_config's guess.
MMA_TABLE: dict[tuple[int, int, int], MmaConfig] = {
    (12288, 4096, 1): MmaConfig(1, 2, 1, persist=16),  # 9.17 us, 2874 GB/s (row-major: 9.84)
    (4096, 4096, 1): MmaConfig(4, 2, 16),  # 4.13 us, 2129 GB/s (4.55)
    (22016, 4096, 1): MmaConfig(1, 2, 1, persist=16),  # 14.71 us, 3209 GB/s (16.15)
    (4096, 11008, 1): MmaConfig(4, 2, 16),  # 8.45 us, 2793 GB/s (9.64)
    (12288, 4096, 8): MmaConfig(4, 2, 1, persist=4),  # 9.70 us, 2717 GB/s (split grid w2_t2_x4: 11.24)
    (4096, 4096, 8): MmaConfig(2, 2, 16),  # 4.81 us, 1825 GB/s (w8_t2_x8: 7.24)
    (22016, 4096, 8): MmaConfig(4, 2, 1, persist=4),  # 15.51 us, 3043 GB/s (w2_t2_x2: 20.11)
    (4096, 11008, 8): MmaConfig(2, 2, 16),  # 9.03 us, 2613 GB/s
    (15360, 5120, 1): MmaConfig(4, 2, 4),  # 12.69 us, 3243 GB/s
    (5120, 5120, 1): MmaConfig(2, 2, 16),  # 6.44 us, 2129 GB/s
    (27648, 5120, 1): MmaConfig(4, 2, 1, persist=4),  # 21.19 us, 3496 GB/s
    (5120, 13824, 1): MmaConfig(4, 2, 1, persist=4),  # 11.93 us, 3106 GB/s
    (15360, 5120, 8): MmaConfig(2, 2, 1, persist=8),  # 13.76 us, 2993 GB/s
    (5120, 5120, 8): MmaConfig(4, 2, 1, persist=4),  # 6.99 us, 1963 GB/s
    (27648, 5120, 8): MmaConfig(4, 2, 1, persist=4),  # 22.63 us, 3275 GB/s
    (5120, 13824, 8): MmaConfig(4, 2, 1, persist=4),  # 12.54 us, 2953 GB/s
    # LLaMA-3-8B (and Mistral-7B): twenty-ninth session, benchmarks/results/r32/mma_8b_m1.json (a sweep of 14
    # configs near the 7B and 13B winners); the guess had the step at 2.58 / 3.40 ms (b1 p2048 / p32768), these
    # 2.17-2.20 / 2.83-2.86 beside ATTN_KV_TABLE's entry
    (6144, 4096, 1): MmaConfig(4, 2, 8),  # 5.46 us, 2413 GB/s
    (28672, 4096, 1): MmaConfig(2, 2, 4),  # 18.89 us, 3255 GB/s
    (4096, 14336, 1): MmaConfig(4, 2, 16),  # 9.22 us, 3333 GB/s
    # LLaMA-2-70B: same session, r32/mma_70b_m1.json (the same 14 configs); the step at b1 p2048 16.61 ms on the
    # guess, 11.37 on these (one run each)
    (10240, 8192, 1): MmaConfig(2, 2, 16),  # 14.35 us, 3061 GB/s
    (8192, 8192, 1): MmaConfig(4, 2, 8),  # 10.39 us, 3382 GB/s
    (57344, 8192, 1): MmaConfig(2, 2, 8),  # 62.71 us, 3921 GB/s
    (8192, 28672, 1): MmaConfig(4, 2, 8),  # 31.52 us, 3900 GB/s
    # 25-32 rows (four blocks of 8, one launch): thirty-eighth session, benchmarks/results/r44/rows.json
    # (benchmarks/rows_probe.py); the 8-row entries' configs beat the guess there (at 9-24 rows the guess won or tied)
    (12288, 4096, 32): MmaConfig(4, 2, 1, persist=4),  # 26.1 us (guess 31.9)
    (4096, 4096, 32): MmaConfig(2, 2, 16),  # 11.7 us (12.0)
    (22016, 4096, 32): MmaConfig(4, 2, 1, persist=4),  # 44.1 us (51.4)
    (4096, 11008, 32): MmaConfig(2, 2, 16),  # 24.7 us (25.1)
    (15360, 5120, 32): MmaConfig(2, 2, 1, persist=8),  # 38.2 us (48.6)
    (5120, 5120, 32): MmaConfig(4, 2, 1, persist=4),  # 18.7 us (19.0)
    (27648, 5120, 32): MmaConfig(4, 2, 1, persist=4),  # 65.0 us (72.6)
    (5120, 13824, 32): MmaConfig(4, 2, 1, persist=4),  # 35.1 us (40.2)
}
TABLE_ENV = "WKVQ_MMA_TABLE"  # sweep records (benchmarks/w4_mma_bench.py --json) over MMA_TABLE


def load_table(path) -> dict[tuple[int, int, int], MmaConfig]:
    """The best config per ``(N, K, M)`` of a sweep record written by ``benchmarks/w4_mma_bench.py --json``."""
    return sweep_table(path, lambda key, row: (tuple(int(v) for v in key.split("x")), MmaConfig(*row["config"])),
                       "a w4_mma", "benchmarks/w4_mma_bench.py")


def default_mma_config(n: int, k: int, m: int, sms: int = 132) -> MmaConfig:
    """The config of the sweep records named by ``WKVQ_MMA_TABLE`` (several separated by ``os.pathsep``), then of
    :data:`MMA_TABLE` (25-31 rows: its 32-row entry), else a guess (:func:`guess_mma_config`)."""
    table = {**MMA_TABLE, **env_tables(os.environ.get(TABLE_ENV), load_table)}
    cfg = table.get((n, k, m)) or table.get((n, k, 0))
    if cfg is None and m > 3 * BLOCK_ROWS:  # four blocks of rows: the 32-row entry
        cfg = table.get((n, k, MMA_MAX_ROWS))
    return cfg if cfg is not None else guess_mma_config(n, k, sms, os.environ.get(GUESS_ENV, GUESS_DEFAULT))


GUESS_ENV = "WKVQ_MMA_GUESS"  # "1": guess_mma_config's first rule (the default until the thirtieth session)
GUESS_DEFAULT = "2"


def guess_mma_config(n: int, k: int, sms: int = 132, rule: str = GUESS_DEFAULT) -> MmaConfig:
    """The config of a shape no table has: rule "2" (the default), 4 warps of two tiles split until about 8 programs
    per multiprocessor (at most 16 ranges); rule "1", 4 warps of one tile, the groups split until there are about
    4 programs per multiprocessor (at most 8 ranges). Both keep at least 2 groups a range. Every one-row winner of
    the sweeps has two tiles (NOTES.md round 27). In the step at LLaMA-3.2-3B's shapes, which no table has (H200,
    thirtieth session, NOTES.md round 28), rule 2 was 8-11% faster at b1 and b4 (3% at b4 p32768), and at the 7B
    shapes at b2 and b4, which the table has at b1 and b8 only; at b16 the same."""
    if rule not in ("1", "2"):
        raise ValueError(f"{GUESS_ENV}={rule!r}: the rules are 1 and 2 (the default)")
    tiles, most, per_sm = (1, 8, 4) if rule == "1" else (2, 16, 8)
    blocks = triton.cdiv(n, 16 * tiles * 4)
    groups = triton.cdiv(k, GROUP)
    split = 1
    while split < most and blocks * split < per_sm * sms and groups // (2 * split) >= 2:
        split *= 2
    return MmaConfig(4, tiles, split)


# ------------------------------------------------------------------------------------------------ inline PTX


def _prologue_asm(tiles: int) -> tuple[str, str]:
    """PTX that gives each thread its pointers: per tile and half (rows ``g``, ``g + 8``) the code, scale and zero
    row pointers (rows clamped to ``N - 1``; the code pointer at word ``4 t``), the ``x`` pointer (row ``g`` clamped
    to ``M - 1``, channel ``32 t``: column ``g`` of B, whose results from ``M`` on are not written) and ``t``.
    Returns (asm, constraints)."""
    outs = 6 * tiles + 2
    a = [f"${i}" for i in range(outs)]
    inp = {name: f"${outs + i}" for i, name in enumerate(
        ("row0", "qw", "s", "z", "x", "n", "sq", "ss", "sz", "sx", "m"))}
    lines = [
        "{",
        ".reg .u32 lane, tid, warp, g, t, row, rowc, nm1, mm1, nx;",
        ".reg .u64 off, p;",
        f".reg .u64 o<{outs}>;",
        "mov.u32 lane, %laneid;",
        "mov.u32 tid, %tid.x;",
        "shr.u32 warp, tid, 5;",
        "shr.u32 g, lane, 2;",
        "and.b32 t, lane, 3;",
        f"sub.u32 nm1, {inp['n']}, 1;",
        f"mad.lo.u32 row, warp, {16 * tiles}, {inp['row0']};",
        "add.u32 row, row, g;",
    ]
    k = 0
    for r in range(tiles):
        for h in (0, 8):
            lines += [
                f"add.u32 rowc, row, {16 * r + h};",
                "min.u32 rowc, rowc, nm1;",
                f"mul.wide.u32 off, rowc, {inp['sq']};",
                f"add.u64 p, {inp['qw']}, off;",
                "mul.wide.u32 off, t, 16;",
                f"add.u64 o{k}, p, off;",
                f"mul.wide.u32 off, rowc, {inp['ss']};",
                f"add.u64 o{k + 1}, {inp['s']}, off;",
                f"mul.wide.u32 off, rowc, {inp['sz']};",
                f"add.u64 o{k + 2}, {inp['z']}, off;",
            ]
            k += 3
    lines += [
        f"sub.u32 mm1, {inp['m']}, 1;",
        "min.u32 nx, g, mm1;",
        f"mul.wide.u32 off, nx, {inp['sx']};",
        f"add.u64 p, {inp['x']}, off;",
        "mul.wide.u32 off, t, 64;",
        f"add.u64 o{k}, p, off;",
    ]
    lines += [f"mov.u64 {a[i]}, o{i};" for i in range(k + 1)]
    lines += [f"mov.u32 {a[k + 1]}, t;", "}"]
    cons = ",".join(["=l"] * (k + 1) + ["=r"] + ["r", "l", "l", "l", "l", "r", "r", "r", "r", "r", "r"])
    return "\n".join(lines), cons


def _prefetch_asm(tiles: int) -> str:
    """PTX (sm_90) in which lane ``l < 16 tiles`` of each warp asks the L2 for row ``l`` of the warp's rows over the
    program's groups (``cp.async.bulk.prefetch.L2``: bytes ``[64 g_lo, min(64 g_hi, K/2))`` of the row). Inputs:
    ``row0``, the codes, ``N``, the row stride, ``g_lo``, ``g_hi``, ``K/2``; the output (0) means nothing."""
    rows = 16 * tiles
    return "\n".join([
        "{",
        ".reg .u32 lane, tid, warp, row, lo, hi;",
        ".reg .u64 off, p;",
        ".reg .pred q;",
        "mov.u32 lane, %laneid;",
        "mov.u32 tid, %tid.x;",
        "shr.u32 warp, tid, 5;",
        f"mad.lo.u32 row, warp, {rows}, $1;",
        "add.u32 row, row, lane;",
        "shl.b32 lo, $5, 6;",
        "shl.b32 hi, $6, 6;",
        "min.u32 hi, hi, $7;",
        "sub.u32 hi, hi, lo;",
        f"setp.lt.u32 q, lane, {rows};",
        "setp.lt.and.u32 q, row, $3, q;",
        "setp.gt.and.s32 q, hi, 0, q;",
        "mul.wide.u32 off, row, $4;",
        "add.u64 p, $2, off;",
        "cvt.u64.u32 off, lo;",
        "add.u64 p, p, off;",
        "@q cp.async.bulk.prefetch.L2.global [p], hi;",
        "mov.u32 $0, 0;",
        "}"])


def _load_asm(tiles: int, ragged: bool, strides: tuple[int, int, int] | None = None,
              gstrides: tuple[int, int, int] = (64, 2, 1), part: str = "all",
              coherent: bool = False, xsmem: bool = False) -> tuple[str, str]:
    """PTX of one thread's loads for one group: its 16 bytes of codes of each of its rows (per tile: rows ``g``,
    ``g + 8``: 8 words), the rows' float16 scales (one word: row ``g`` low) and zero points (one word: row ``g`` in
    bits 0-7, row ``g + 8`` in 16-23), and its 32 channels of ``x`` (16 words). Inputs: the prologue's pointers,
    ``t``, the group index, ``K``. ``ragged`` (``K % 128 != 0``): a thread whose channels lie past ``K`` reads no
    codes and zeros for ``x`` (predicated loads); otherwise the loads are unconditional. Outputs, in order: ``x``
    words, then per tile the 8 code words, the scales word, the zeros word. Returns (asm, constraints).

    ``strides`` (bytes between rows of codes, scales, zeros; the launch's, known when the kernel is compiled): the
    rows ``g + 8 h`` are read at immediate offsets from the first row's pointers (one 64-bit add per tensor and
    group instead of one per row; the other rows' pointers go unused and ptxas drops them). Needs every row of the
    block inside ``N`` (the kernel then shifts the last block down, ``FIXED``). ``gstrides``: bytes between groups
    of codes, scales, zeros (64, 2, 1 in the artifact's row-major layout; :func:`runtime.quant.group_major` puts
    each group's rows next to each other). ``part``: "all", or only the weight words ("w": codes, scales, zeros,
    in the same order; what a program may read before the PDL wait) or only the ``x`` words ("x"); the inputs are
    the same for every part. ``coherent``: ``ld.global`` instead of the read-only ``ld.global.nc`` (ptxas moves the
    PDL wait above ``.nc`` loads placed before it, and ``.nc`` loads placed after it above the wait). ``xsmem``: ``x``
    from the program's shared copy (:data:`XS_SYMBOL`, one row, 256 bytes a group, written by
    :func:`_silu_prologue`) instead of global memory; the ``x`` pointer input goes unused."""
    nout = 16 + 10 * tiles
    keep = {"all": range(nout), "w": range(16, nout), "x": range(16)}[part]
    ld = "ld.global" if coherent else "ld.global.nc"
    outs = [f"${i}" for i in range(len(keep))]
    idx = len(keep)
    ptrs = []  # per tile and half: (codes, scales, zeros)
    for _ in range(2 * tiles):
        ptrs.append((f"${idx}", f"${idx + 1}", f"${idx + 2}"))
        idx += 3
    px, t, gi, kk = (f"${idx + i}" for i in range(4))
    pred = "@pk " if ragged else ""
    L = ["{", ".reg .pred pk;", ".reg .u32 c0;", ".reg .b16 z16a, z16b, s16a, s16b;", ".reg .u32 za, zb;",
         ".reg .u64 off, ad, offc, offs, offz;", f".reg .b32 v<{nout}>;"]
    if ragged:
        L += [f"shl.b32 c0, {gi}, 7;", f"mad.lo.u32 c0, {t}, 32, c0;", f"setp.lt.u32 pk, c0, {kk};"]
    if part != "w":
        L += [f"mov.b32 v{i}, 0;" for i in range(16)] if ragged else []
        if xsmem:  # channels 32 t .. of group gi of the shared copy: XS_SYMBOL + 256 gi + 64 t
            L += [".reg .u32 xs;", f"mov.u32 xs, {XS_SYMBOL};", f"mad.lo.u32 xs, {gi}, 256, xs;",
                  f"mad.lo.u32 xs, {t}, 64, xs;"]
        else:
            L += [f"mul.wide.u32 off, {gi}, 256;", f"add.u64 ad, {px}, off;"]
        for v in range(4):
            regs = f"{{v{4 * v},v{4 * v + 1},v{4 * v + 2},v{4 * v + 3}}}"
            L.append(f"{pred}ld.shared.v4.u32 {regs}, [xs+{16 * v}];" if xsmem else
                     f"{pred}{ld}.v4.u32 {regs}, [ad+{16 * v}];")
    L += [f"mul.wide.u32 offc, {gi}, {gstrides[0]};", f"mul.wide.u32 offs, {gi}, {gstrides[1]};",
          f"mul.wide.u32 offz, {gi}, {gstrides[2]};"]
    offs, bases = ("offc", "offs", "offz"), ("pc", "ps", "pz")  # per tensor: codes, scales, zeros
    if strides is not None:  # one pointer per tensor (the first row's), the rows at immediate offsets from it
        L += [".reg .u64 pc, ps, pz;"] + [f"add.u64 {b}, {p}, {o};" for b, p, o in zip(bases, ptrs[0], offs)]

    def at(half: int, tensor: int) -> tuple[list[str], str]:
        """The lines before a load of ``tensor`` for row half ``half`` (``2 r + h``), and its address."""
        if strides is not None:
            return [], f"[{bases[tensor]}+{8 * half * strides[tensor]}]"
        return [f"add.u64 ad, {ptrs[half][tensor]}, {offs[tensor]};"], "[ad]"

    for r in range(tiles if part != "x" else 0):
        o, ha, hb = 16 + 10 * r, 2 * r, 2 * r + 1
        if ragged:
            L += [f"mov.b32 v{o + i}, 0;" for i in range(8)]
        for h, regs in ((ha, f"v{o},v{o + 1},v{o + 2},v{o + 3}"), (hb, f"v{o + 4},v{o + 5},v{o + 6},v{o + 7}")):
            pre, ad = at(h, 0)
            L += pre + [f"{pred}{ld}.v4.u32 {{{regs}}}, {ad};"]
        for tensor, (kind, ra, rb, w) in ((1, ("b16", "s16a", "s16b", o + 8)), (2, ("u8", "z16a", "z16b", o + 9))):
            for h, reg in ((ha, ra), (hb, rb)):
                pre, ad = at(h, tensor)
                L += pre + [f"{ld}.{kind} {reg}, {ad};"]
            L.append(f"mov.b32 v{w}, {{{ra}, {rb}}};")
    L += [f"mov.b32 {out}, v{i};" for out, i in zip(outs, keep)]
    L.append("}")
    cons = ",".join(["=r"] * len(keep) + ["l"] * (6 * tiles) + ["l", "r", "r", "r"])
    return "\n".join(L), cons


@functools.cache
def _compute_asm(tiles: int, chains: int = 1, blocks: int = 1) -> tuple[str, str]:
    """PTX of one group's products for one thread (all 32 lanes of the warp run it together: ``mma.sync``). Inputs:
    the ``4 tiles blocks`` float32 accumulators, ``blocks`` times the 16 ``x`` words of :func:`_load_asm` (one
    block of 8 rows of ``x`` each) and its ``10 tiles`` weight words (for one block: simply :func:`_load_asm`'s
    outputs); outputs the accumulators plus the group's products times the rows' scales. Accumulator
    ``4 (tiles b + r) + c`` of block ``b``, tile ``r``: ``c`` 0/1 row ``g``, columns ``2t``/``2t + 1``; ``c`` 2/3 row
    ``g + 8``. Each word's codes are turned into the A operand once and multiplied with every block's ``x`` (the
    dequantization is most of the instructions, thirty-eighth session). ``chains`` 2 (one block): the MMAs of odd and
    even words accumulate separately (two dependency chains of 4 instead of one of 8; 4 more registers); several
    blocks are separate chains already."""
    if blocks > 1 and chains != 1:
        raise ValueError("two accumulator chains are for one block of x")
    nacc = 4 * tiles * blocks
    outs = [f"${i}" for i in range(nacc)]
    acc_in = [f"${nacc + i}" for i in range(nacc)]
    base_in = 2 * nacc
    xin = [[f"${base_in + 16 * b + i}" for i in range(16)] for b in range(blocks)]
    wbase = base_in + 16 * blocks
    L = [
        "{",
        ".reg .u32 tmp, zq;",
        ".reg .b32 mag, m0, m1, k16, zero;",
        ".reg .b16 lo16, hi16;",
        f".reg .b32 xp<{16 * blocks}>, h<8>, zs<2>, zf<2>;",
        f".reg .f32 d<{4 * blocks}>, e<4>, sc<2>;",
        f".reg .f32 r<{nacc}>;",
        "mov.b32 mag, 0x64006400;",
        "mov.b32 m0, 0x000F000F;",
        "mov.b32 m1, 0x00F000F0;",
        "mov.b32 k16, 0x2C002C00;",  # float16 1/16 in both halves
        "mov.b32 zero, 0;",
    ]
    # x pairs (x_i, x_{i+4}) of each of the thread's four words, per block: xp[16 b + 4 wd + p]
    for b in range(blocks):
        for wd in range(4):
            a, bb, c, d = (xin[b][4 * wd + i] for i in range(4))
            o = 16 * b + 4 * wd
            L += [f"prmt.b32 xp{o}, {a}, {c}, 0x5410;", f"prmt.b32 xp{o + 1}, {a}, {c}, 0x7632;",
                  f"prmt.b32 xp{o + 2}, {bb}, {d}, 0x5410;", f"prmt.b32 xp{o + 3}, {bb}, {d}, 0x7632;"]
    for r in range(tiles):
        o = wbase + 10 * r
        w = [f"${o + i}" for i in range(8)]
        spk, zpk = f"${o + 8}", f"${o + 9}"
        L += [f"mov.b32 {{lo16, hi16}}, {spk};", "cvt.f32.f16 sc0, lo16;", "cvt.f32.f16 sc1, hi16;"]
        for half in range(2):  # z of row g (byte 0) or g + 8 (byte 2) into both 16-bit halves, then in both
            L += [f"prmt.b32 zq, {zpk}, zero, {0x4040 + 0x202 * half:#x};",  # halves without carries (z < 256):
                  f"add.u32 zs{half}, zq, 0x64006400;",  # float16 1024 + z
                  f"mad.lo.u32 zf{half}, zq, 16, 0xD400D400;"]  # float16 -(64 + z)
        L += [f"mov.f32 d{i}, 0f00000000;" for i in range(4 * blocks)]
        L += [f"mov.f32 e{i}, 0f00000000;" for i in range(4)]
        for wd in range(4):
            for half in range(2):
                wr, hb = w[4 * half + wd], 4 * half
                L += [f"lop3.b32 h{hb}, {wr}, m0, mag, 0xEA;", f"sub.f16x2 h{hb}, h{hb}, zs{half};",
                      f"lop3.b32 h{hb + 1}, {wr}, m1, mag, 0xEA;", f"fma.rn.f16x2 h{hb + 1}, h{hb + 1}, k16, zf{half};",
                      f"shr.u32 tmp, {wr}, 8;",
                      f"lop3.b32 h{hb + 2}, tmp, m0, mag, 0xEA;", f"sub.f16x2 h{hb + 2}, h{hb + 2}, zs{half};",
                      f"lop3.b32 h{hb + 3}, tmp, m1, mag, 0xEA;", f"fma.rn.f16x2 h{hb + 3}, h{hb + 3}, k16, zf{half};"]
            for b in range(blocks):
                if blocks == 1:
                    c = "d" if chains == 1 or wd % 2 == 0 else "e"  # chains 2: independent MMAs in flight
                    acc = f"{{{c}0,{c}1,{c}2,{c}3}}"
                else:
                    acc = "{" + ",".join(f"d{4 * b + i}" for i in range(4)) + "}"
                mma = f"mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {acc}"
                xo = 16 * b + 4 * wd
                L += [f"{mma}, {{h0,h4,h1,h5}}, {{xp{xo},xp{xo + 1}}}, {acc};",
                      f"{mma}, {{h2,h6,h3,h7}}, {{xp{xo + 2},xp{xo + 3}}}, {acc};"]
        if chains == 2:
            L += [f"add.f32 d{i}, d{i}, e{i};" for i in range(4)]
        for b in range(blocks):
            a, d = 4 * (tiles * b + r), 4 * b
            L += [f"fma.rn.f32 r{a}, sc0, d{d}, {acc_in[a]};", f"fma.rn.f32 r{a + 1}, sc0, d{d + 1}, {acc_in[a + 1]};",
                  f"fma.rn.f32 r{a + 2}, sc1, d{d + 2}, {acc_in[a + 2]};",
                  f"fma.rn.f32 r{a + 3}, sc1, d{d + 3}, {acc_in[a + 3]};"]
    L += [f"mov.f32 {outs[i]}, r{i};" for i in range(nacc)]
    L.append("}")
    cons = ",".join(["=f"] * nacc + ["f"] * nacc + ["r"] * (16 * blocks + 10 * tiles))
    return "\n".join(L), cons


EPILOGUE_ASM = """{
.reg .u32 lane, tid, warp;
mov.u32 lane, %laneid;
mov.u32 tid, %tid.x;
shr.u32 warp, tid, 5;
shr.u32 $0, lane, 2;
and.b32 $1, lane, 3;
shl.b32 $1, $1, 1;
mov.u32 $2, warp;
}"""


XS_SYMBOL = "wkvq_gemv_xs"  # the shared copy of x a program builds itself (SILU: silu(gate) * up, float16)
# x's shared copy (one row, 256 bytes a group) into byte $1 of it, where $3 is not 0: float16 bits in $2's low half
XS_STORE_ASM = tl.constexpr(f"""{{
.reg .pred p;
.reg .u32 a;
.reg .b16 h;
setp.ne.u32 p, $3, 0;
mov.u32 a, {XS_SYMBOL};
add.u32 a, a, $1;
cvt.u16.u32 h, $2;
@p st.shared.b16 [a], h;
mov.u32 $0, 0;
}}""")


def xs_declare_asm(groups: int) -> str:
    """PTX that declares the shared copy of ``x`` for ``groups`` groups (function scope: the kernel's first lines,
    before any use of the symbol; the output, 0, means nothing)."""
    return f".shared .align 16 .b8 {XS_SYMBOL}[{256 * groups}];\nmov.u32 $0, 0;"


@triton.jit
def _silu_prologue(gu_ptr, K, g_lo, g_hi, GMAX: tl.constexpr):
    """``x = silu(gate) * up`` of groups ``[g_lo, g_hi)`` (at most ``GMAX``) into the program's shared copy
    (:data:`XS_SYMBOL`), from the gate_up projection's float32 sums ``gu_ptr [1, 2K]`` (gate first), rounded as
    :func:`runtime.kernels.misc.silu_mul` rounds (the SiLU, then the product, to float16); channels past ``K`` of a
    ragged last group are 0. All the range's loads at once (one round trip), then the program's barrier. A barrier
    first too: a stream-K program's warps may still read the range before from the copy."""
    tl.debug_barrier()
    gi = g_lo + tl.arange(0, GMAX)[:, None]
    k = gi * 128 + tl.arange(0, 128)[None, :]
    live = gi < g_hi
    ok = live & (k < K)
    g = tl.load(gu_ptr + k, mask=ok, other=0.0, cache_modifier=".cg")  # written by the kernel before: coherent
    u = tl.load(gu_ptr + K + k, mask=ok, other=0.0, cache_modifier=".cg")
    silu = (g / (1.0 + tl.exp(-g))).to(tl.float16).to(tl.float32)
    h = (silu * u).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
    tl.inline_asm_elementwise(XS_STORE_ASM, "=r,r,r,r", [k * 2, h, live.to(tl.int32)], dtype=tl.int32,
                              is_pure=False, pack=1)
    tl.debug_barrier()


# Thread 0 of the program spins until the flag at $1 holds $2 (an acquire load a round, a short sleep between);
# the other threads skip it and wait at the barrier after (_wait_ready; CUTLASS's semaphore does the same): one
# poller a program, so that the waiting programs do not load the L2 the attention streams through. Labels are
# local to the braces' block, so the block may be inlined more than once.
READY_WAIT_ASM = tl.constexpr("""{
.reg .pred p, q;
.reg .b32 v, t;
mov.u32 t, %tid.x;
setp.ne.u32 q, t, 0;
@q bra WKVQ_READY_DONE;
WKVQ_READY:
ld.acquire.gpu.global.b32 v, [$1];
setp.ne.s32 p, v, $2;
@p nanosleep.u32 64;
@p bra WKVQ_READY;
WKVQ_READY_DONE:
mov.b32 $0, 0;
}""")


@triton.jit
def _wait_ready(rdy_ptr, epoch, g_lo, g_hi, RQG: tl.constexpr):
    """Wait until the flags of groups ``[g_lo, g_hi)`` (group ``g``: flag ``g // RQG``) hold ``epoch``: thread 0
    spins on them (:data:`READY_WAIT_ASM`), then the program's barrier; what their writer stored before it set
    them (with release) is then visible to every thread of the program."""
    for gi in range(g_lo, g_hi):
        tl.inline_asm_elementwise(READY_WAIT_ASM, "=r,l,r", [rdy_ptr + gi // RQG, epoch], dtype=tl.int32,
                                  is_pure=False, pack=1)
    tl.debug_barrier()


@triton.jit
def _wait_before_x(PDL: tl.constexpr, rdy_ptr, epoch, g_lo, g_hi, RQG: tl.constexpr, stamp_ptr,
                   STAMPS: tl.constexpr):
    """Before a range's first ``x``: the ready flags of its groups (``RQG`` > 0, :func:`_wait_ready`), else the
    kernel before (:func:`runtime.kernels.overlap.wait_prior`); ``STAMPS``: then the program's "ready" stamp."""
    if RQG > 0:
        _wait_ready(rdy_ptr, epoch, g_lo, g_hi, RQG)
    else:
        overlap.wait_prior(PDL)
    if STAMPS:
        stamps.stamp(stamp_ptr, _program(), 1, 3)


@triton.jit
def _program():
    """The program's index in its 1-D or 2-D grid (x fastest)."""
    return tl.program_id(0) + tl.program_id(1) * tl.num_programs(0)


@functools.cache
def _asm(tiles: int, ragged: bool, chains: int = 1, strides: tuple[int, int, int] | None = None,
         gstrides: tuple[int, int, int] = (64, 2, 1), coherent: bool = False, xsmem: bool = False):
    pro, pro_cons = _prologue_asm(tiles)
    load, load_cons = _load_asm(tiles, ragged, strides, gstrides, coherent=coherent, xsmem=xsmem)
    comp, comp_cons = _compute_asm(tiles, chains)
    return pro, pro_cons, load, load_cons, comp, comp_cons, _prefetch_asm(tiles)


@functools.cache
def _split_load_asm(tiles: int, ragged: bool, strides: tuple[int, int, int] | None = None,
                    gstrides: tuple[int, int, int] = (64, 2, 1), xsmem: bool = False,
                    coherent: bool = True) -> tuple[str, str, str, str]:
    """:func:`_load_asm`'s weight part and ``x`` part, coherent loads by default (the preload before the PDL wait;
    ``coherent=False`` for several row blocks of ``x``, whose kernel waits first thing): (w, w_cons, x, x_cons)."""
    return (*_load_asm(tiles, ragged, strides, gstrides, "w", coherent=coherent),
            *_load_asm(tiles, ragged, strides, gstrides, "x", coherent=coherent, xsmem=xsmem))


# ------------------------------------------------------------------------------------------------ the kernel


@triton.jit
def _store_acc(y_ptr, acc, row, lo, n, N, M, stride_ym, ATOMIC: tl.constexpr):
    mask = (row >= lo) & (row < N) & (n < M)
    ptr = y_ptr + n * stride_ym + row
    if ATOMIC:
        tl.atomic_add(ptr, acc, mask=mask, sem="relaxed")
    else:  # the thread owns (n, row): a plain read-modify-write
        tl.store(ptr, tl.load(ptr, mask=mask, other=0.0) + acc, mask=mask)


@triton.jit
def _store_tiles(y_ptr, A, row, lo, n, N, M, stride_ym, ATOMIC: tl.constexpr, TILES: tl.constexpr):
    """The accumulators ``A`` of :func:`_compute_asm` (``4 TILES``) into ``y``: thread rows ``row + 8 h`` of each
    tile, columns (rows of ``x``) ``n``, ``n + 1``; rows below ``lo`` (a shifted last block) and past ``N``, columns
    past ``M`` not written."""
    _store_acc(y_ptr, A[0], row, lo, n, N, M, stride_ym, ATOMIC)
    _store_acc(y_ptr, A[1], row, lo, n + 1, N, M, stride_ym, ATOMIC)
    _store_acc(y_ptr, A[2], row + 8, lo, n, N, M, stride_ym, ATOMIC)
    _store_acc(y_ptr, A[3], row + 8, lo, n + 1, N, M, stride_ym, ATOMIC)
    if TILES == 2:
        _store_acc(y_ptr, A[4], row + 16, lo, n, N, M, stride_ym, ATOMIC)
        _store_acc(y_ptr, A[5], row + 16, lo, n + 1, N, M, stride_ym, ATOMIC)
        _store_acc(y_ptr, A[6], row + 24, lo, n, N, M, stride_ym, ATOMIC)
        _store_acc(y_ptr, A[7], row + 24, lo, n + 1, N, M, stride_ym, ATOMIC)


@triton.jit
def _pointers(lane, qw_ptr, s_ptr, z_ptr, x_ptr, N, stride_qn, stride_sn, stride_zn, stride_xm, M,
              PRO: tl.constexpr, PRO_CONS: tl.constexpr, TILES: tl.constexpr):
    """:func:`_prologue_asm`: each thread's code, scale and zero pointers, its ``x`` pointer (rows of ``x_ptr``
    clamped to ``M - 1``) and ``t``."""
    return tl.inline_asm_elementwise(
        PRO, PRO_CONS, [lane, qw_ptr, s_ptr, z_ptr, x_ptr, N, stride_qn, stride_sn, stride_zn, stride_xm, M],
        dtype=(tl.uint64,) * (6 * TILES + 1) + (tl.int32,), is_pure=True, pack=1)


@triton.jit
def _load(P, gi, K, LOAD: tl.constexpr, LOAD_CONS: tl.constexpr, TILES: tl.constexpr):
    """:func:`_load_asm` of group ``gi`` at the prologue pointers ``P`` (its inputs: all of ``P``, ``gi``, ``K``):
    ``16 + 10 TILES`` words."""
    return tl.inline_asm_elementwise(LOAD, LOAD_CONS, P + (gi, K), dtype=(tl.int32,) * (16 + 10 * TILES),
                                     is_pure=True, pack=1)


@triton.jit
def _comp(A, V, COMP: tl.constexpr, COMP_CONS: tl.constexpr, TILES: tl.constexpr):
    """:func:`_compute_asm` (one block of ``x``): the ``4 TILES`` accumulators ``A`` after the group loaded in
    ``V``."""
    return tl.inline_asm_elementwise(COMP, COMP_CONS, A + V, dtype=(tl.float32,) * (4 * TILES), is_pure=True,
                                     pack=1)


@triton.jit
def _loadw(P, gi, K, LOADW: tl.constexpr, LOADW_CONS: tl.constexpr, TILES: tl.constexpr):
    """The weight part of :func:`_load_asm` (codes, scales, zeros) of group ``gi``: what may be read before the PDL
    wait (not pure: otherwise the compiler sinks the loads below the wait)."""
    return tl.inline_asm_elementwise(LOADW, LOADW_CONS, P + (gi, K), dtype=(tl.int32,) * (10 * TILES),
                                     is_pure=False, pack=1)


@triton.jit
def _loadx(P, gi, K, LOADX: tl.constexpr, LOADX_CONS: tl.constexpr):
    """The 16 ``x`` words of :func:`_load_asm` of group ``gi`` at the prologue pointers ``P``."""
    return tl.inline_asm_elementwise(LOADX, LOADX_CONS, P + (gi, K), dtype=(tl.int32,) * 16, is_pure=True, pack=1)


@triton.jit
def _loadx_join(P, gi, K, W, LOADX: tl.constexpr, LOADX_CONS: tl.constexpr):
    """The ``x`` part of :func:`_load_asm` of group ``gi``, joined with its weight part ``W`` (:func:`_loadw`) into
    what :func:`_load` returns."""
    return _loadx(P, gi, K, LOADX, LOADX_CONS) + W


@triton.jit
def _blocks_comp(A, W, P0, P1, P2, P3, gi, K, COMP: tl.constexpr, COMP_CONS: tl.constexpr, LOADX: tl.constexpr,
                 LOADX_CONS: tl.constexpr, TILES: tl.constexpr, NB: tl.constexpr):
    """One group's products for ``NB`` blocks of 8 rows of ``x``: the weight words ``W`` (:func:`_loadw`, loaded
    once) with each block's ``x`` words (:func:`_loadx` at the block's prologue pointers ``P<b>``) in one
    :func:`_compute_asm` of ``NB`` blocks (the codes dequantized once); ``A``: its ``4 TILES NB`` accumulators."""
    X = _loadx(P0, gi, K, LOADX, LOADX_CONS) + _loadx(P1, gi, K, LOADX, LOADX_CONS)
    if NB >= 3:
        X = X + _loadx(P2, gi, K, LOADX, LOADX_CONS)
    if NB >= 4:
        X = X + _loadx(P3, gi, K, LOADX, LOADX_CONS)
    return tl.inline_asm_elementwise(COMP, COMP_CONS, A + X + W, dtype=(tl.float32,) * (4 * TILES * NB),
                                     is_pure=True, pack=1)


@triton.jit
def _range_blocks(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, N, K, M, stride_xm, stride_qn, stride_sn, stride_zn, stride_ym,
                  row0, g_lo, g_hi, NT: tl.constexpr, TILES: tl.constexpr, ATOMIC: tl.constexpr, PRO: tl.constexpr,
                  PRO_CONS: tl.constexpr, COMP: tl.constexpr, COMP_CONS: tl.constexpr, EPI: tl.constexpr,
                  FIXED: tl.constexpr, LOADW: tl.constexpr, LOADW_CONS: tl.constexpr, LOADX: tl.constexpr,
                  LOADX_CONS: tl.constexpr, NB: tl.constexpr):
    """:func:`_range` (no preload, ready flags nor SiLU input) for ``NB`` (2-4) blocks of 8 rows of ``x``: each
    group's weight words are loaded once (the next group's while this one is computed), dequantized once and
    multiplied with every block's ``x`` (block ``b``: rows ``8 b ..``, its own prologue pointers, rows clamped to
    ``M - 1``; ``COMP``: :func:`_compute_asm` of ``NB`` blocks), so 9-32 rows cost one weight read and one
    dequantization."""
    if FIXED:
        rowp = tl.minimum(row0, N - NT // 2 * TILES)
    else:
        rowp = row0
    lane = tl.zeros((NT,), tl.int32) + rowp
    xs = stride_xm // 2 * 8  # elements between blocks of 8 rows of x (stride_xm: bytes)
    P0 = _pointers(lane, qw_ptr, s_ptr, z_ptr, x_ptr, N, stride_qn, stride_sn, stride_zn, stride_xm, M, PRO,
                   PRO_CONS, TILES)
    P1 = _pointers(lane, qw_ptr, s_ptr, z_ptr, x_ptr + xs, N, stride_qn, stride_sn, stride_zn, stride_xm, M - 8,
                   PRO, PRO_CONS, TILES)
    P2 = P1
    P3 = P1
    if NB >= 3:
        P2 = _pointers(lane, qw_ptr, s_ptr, z_ptr, x_ptr + 2 * xs, N, stride_qn, stride_sn, stride_zn, stride_xm,
                       M - 16, PRO, PRO_CONS, TILES)
    if NB >= 4:
        P3 = _pointers(lane, qw_ptr, s_ptr, z_ptr, x_ptr + 3 * xs, N, stride_qn, stride_sn, stride_zn, stride_xm,
                       M - 24, PRO, PRO_CONS, TILES)
    A = (tl.zeros((NT,), tl.float32),) * (4 * TILES * NB)
    V = _loadw(P0, lane * 0 + g_lo, K, LOADW, LOADW_CONS, TILES)
    for gi in range(g_lo, g_hi - 1, 2):  # two groups an iteration, as _range
        U = _loadw(P0, lane * 0 + gi + 1, K, LOADW, LOADW_CONS, TILES)
        if gi != K:
            A = _blocks_comp(A, V, P0, P1, P2, P3, lane * 0 + gi, K, COMP, COMP_CONS, LOADX, LOADX_CONS, TILES, NB)
        V = _loadw(P0, lane * 0 + tl.minimum(gi + 2, g_hi - 1), K, LOADW, LOADW_CONS, TILES)
        if gi != K:
            A = _blocks_comp(A, U, P0, P1, P2, P3, lane * 0 + gi + 1, K, COMP, COMP_CONS, LOADX, LOADX_CONS, TILES,
                             NB)
    if (g_hi - g_lo) % 2 == 1:
        A = _blocks_comp(A, V, P0, P1, P2, P3, lane * 0 + g_hi - 1, K, COMP, COMP_CONS, LOADX, LOADX_CONS, TILES, NB)
    g, n, warp = tl.inline_asm_elementwise(EPI, "=r,=r,=r,r", [lane], dtype=(tl.int32,) * 3, is_pure=True, pack=1)
    row = rowp + warp * (16 * TILES) + g
    T4: tl.constexpr = 4 * TILES
    _store_tiles(y_ptr, A[0:T4], row, row0, n, N, M, stride_ym, ATOMIC, TILES)
    _store_tiles(y_ptr, A[T4:2 * T4], row, row0, n + 8, N, M, stride_ym, ATOMIC, TILES)
    if NB >= 3:
        _store_tiles(y_ptr, A[2 * T4:3 * T4], row, row0, n + 16, N, M, stride_ym, ATOMIC, TILES)
    if NB >= 4:
        _store_tiles(y_ptr, A[3 * T4:4 * T4], row, row0, n + 24, N, M, stride_ym, ATOMIC, TILES)


@triton.jit
def _range(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, N, K, M, stride_xm, stride_qn, stride_sn, stride_zn, stride_ym, row0,
           g_lo, g_hi, NT: tl.constexpr, TILES: tl.constexpr, ATOMIC: tl.constexpr, PRO: tl.constexpr,
           PRO_CONS: tl.constexpr, LOAD: tl.constexpr, LOAD_CONS: tl.constexpr, COMP: tl.constexpr,
           COMP_CONS: tl.constexpr, EPI: tl.constexpr, DEPTH: tl.constexpr, L2: tl.constexpr, PF: tl.constexpr,
           FIXED: tl.constexpr, LOADW: tl.constexpr, LOADW_CONS: tl.constexpr, LOADX: tl.constexpr,
           LOADX_CONS: tl.constexpr, PRE: tl.constexpr, PDL: tl.constexpr, rdy_ptr, epoch, RQG: tl.constexpr,
           stamp_ptr, STAMPS: tl.constexpr, SILU: tl.constexpr = False, GMAX: tl.constexpr = 1,
           NB: tl.constexpr = 1):
    """Rows ``[row0, row0 + 16 TILES WARPS)`` over groups ``[g_lo, g_hi)`` (non-empty), added into ``y``.
    ``FIXED`` (``LOAD`` with immediate row offsets, ``N >= 16 TILES WARPS``): a last block past ``N`` is shifted
    down to end at ``N`` (its rows below ``row0`` computed again and not written), so every row it reads exists.
    ``PRE`` (the register prefetch at depth 1 only): the weights of the range's first two groups are loaded, then
    the program waits for the kernels before it (:func:`runtime.kernels.overlap.wait_prior`), then their ``x``:
    the first weight bytes are on their way while the kernel before ends. ``RQG`` > 0 (with ``PRE``): instead of
    the kernel before, the range waits for its groups' ready flags (:func:`_wait_ready`; before its ``x``, or first
    thing in a stream-K share's later ranges). ``SILU``: ``x`` is ``silu(gate) * up`` of
    the float32 ``gate_up`` at ``x_ptr``, which the range builds in the program's shared memory before its first
    ``x`` (:func:`_silu_prologue`, at most ``GMAX`` groups) and reads from there (the ``LOAD`` / ``LOADX`` PTX).
    ``NB`` > 1: 2-4 blocks of 8 rows of ``x``, :func:`_range_blocks` (none of ``PRE``, ``RQG``, ``SILU``)."""
    if NB > 1:
        _range_blocks(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, N, K, M, stride_xm, stride_qn, stride_sn, stride_zn,
                      stride_ym, row0, g_lo, g_hi, NT, TILES, ATOMIC, PRO, PRO_CONS, COMP, COMP_CONS, EPI, FIXED,
                      LOADW, LOADW_CONS, LOADX, LOADX_CONS, NB)
    else:
        if RQG > 0:  # noqa: SIM102 - a constexpr test around a constexpr one
            if not PRE:
                _wait_ready(rdy_ptr, epoch, g_lo, g_hi, RQG)
        if SILU:  # noqa: SIM102
            if not PRE:  # the kernel has waited for the one before first thing (or in an earlier range)
                _silu_prologue(x_ptr, K, g_lo, g_hi, GMAX)
        if FIXED:
            rowp = tl.minimum(row0, N - NT // 2 * TILES)
        else:
            rowp = row0
        lane = tl.zeros((NT,), tl.int32) + rowp  # one element per thread: carries the block's first row into the PTX
        if L2:  # the program's codes into L2 first (PF: _prefetch_asm)
            tl.inline_asm_elementwise(PF, "=r,r,l,r,r,r,r,r", [lane, qw_ptr, N, stride_qn, g_lo, g_hi, K // 2],
                                      dtype=tl.int32, is_pure=False, pack=1)
        P = _pointers(lane, qw_ptr, s_ptr, z_ptr, x_ptr, N, stride_qn, stride_sn, stride_zn, stride_xm, M, PRO,
                      PRO_CONS, TILES)
        zero = tl.zeros((NT,), tl.float32)
        if TILES == 1:
            A = (zero, zero, zero, zero)
        else:
            A = (zero, zero, zero, zero, zero, zero, zero, zero)
        if DEPTH == 1:  # two groups an iteration: the loads land in the registers just computed (no V = U copies)
            if PRE:  # the first iteration peeled: its two groups' weights read before the wait
                g1 = tl.minimum(g_lo + 1, g_hi - 1)
                Vw = _loadw(P, lane * 0 + g_lo, K, LOADW, LOADW_CONS, TILES)
                Uw = _loadw(P, lane * 0 + g1, K, LOADW, LOADW_CONS, TILES)
                _wait_before_x(PDL, rdy_ptr, epoch, g_lo, g_hi, RQG, stamp_ptr, STAMPS)
                if SILU:
                    _silu_prologue(x_ptr, K, g_lo, g_hi, GMAX)
                V = _loadx_join(P, lane * 0 + g_lo, K, Vw, LOADX, LOADX_CONS)
                U = _loadx_join(P, lane * 0 + g1, K, Uw, LOADX, LOADX_CONS)
                if g_hi - g_lo >= 2:
                    A = _comp(A, V, COMP, COMP_CONS, TILES)
                    V = _load(P, lane * 0 + tl.minimum(g_lo + 2, g_hi - 1), K, LOAD, LOAD_CONS, TILES)
                    A = _comp(A, U, COMP, COMP_CONS, TILES)
                g_start = g_lo + 2
            else:
                V = _load(P, lane * 0 + g_lo, K, LOAD, LOAD_CONS, TILES)
                g_start = g_lo
            for gi in range(g_start, g_hi - 1, 2):
                U = _load(P, lane * 0 + gi + 1, K, LOAD, LOAD_CONS, TILES)
                if gi != K:  # always (gi < G < K): a block boundary that keeps ptxas from sinking U's loads below
                    A = _comp(A, V, COMP, COMP_CONS, TILES)
                V = _load(P, lane * 0 + tl.minimum(gi + 2, g_hi - 1), K, LOAD, LOAD_CONS, TILES)
                if gi != K:
                    A = _comp(A, U, COMP, COMP_CONS, TILES)
            if (g_hi - g_lo) % 2 == 1:  # the range's last group (V: group g_hi - 1)
                A = _comp(A, V, COMP, COMP_CONS, TILES)
        else:
            V = _load(P, lane * 0 + g_lo, K, LOAD, LOAD_CONS, TILES)
            W = _load(P, lane * 0 + tl.minimum(g_lo + 1, g_hi - 1), K, LOAD, LOAD_CONS, TILES)
            for gi in range(g_lo, g_hi):
                U = _load(P, lane * 0 + tl.minimum(gi + 2, g_hi - 1), K, LOAD, LOAD_CONS, TILES)
                if gi != K:
                    A = _comp(A, V, COMP, COMP_CONS, TILES)
                V = W
                W = U
        g, n, warp = tl.inline_asm_elementwise(EPI, "=r,=r,=r,r", [lane], dtype=(tl.int32,) * 3, is_pure=True, pack=1)
        _store_tiles(y_ptr, A, rowp + warp * (16 * TILES) + g, row0, n, N, M, stride_ym, ATOMIC, TILES)


@triton.jit
def _share_range(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, N, K, G, M, stride_xm, stride_qn, stride_sn, stride_zn,
                 stride_ym, w, w_end, NT: tl.constexpr, ROWS: tl.constexpr, TILES: tl.constexpr, PRO: tl.constexpr,
                 PRO_CONS: tl.constexpr, LOAD: tl.constexpr, LOAD_CONS: tl.constexpr, COMP: tl.constexpr,
                 COMP_CONS: tl.constexpr, EPI: tl.constexpr, DEPTH: tl.constexpr, L2: tl.constexpr, PF: tl.constexpr,
                 FIXED: tl.constexpr, LOADW: tl.constexpr, LOADW_CONS: tl.constexpr, LOADX: tl.constexpr,
                 LOADX_CONS: tl.constexpr, PRE: tl.constexpr, PDL: tl.constexpr, rdy_ptr, epoch, RQG: tl.constexpr,
                 stamp_ptr, STAMPS: tl.constexpr, SILU: tl.constexpr = False, GMAX: tl.constexpr = 1,
                 NB: tl.constexpr = 1):
    """The stream-K share's part from pair ``w`` (row block major) to the end of its row block or ``w_end``:
    :func:`_range` of those groups (atomics); returns the pair after it."""
    rb = w // G
    g_lo = w - rb * G
    g_hi = tl.minimum(G, g_lo + (w_end - w))
    _range(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, N, K, M, stride_xm, stride_qn, stride_sn, stride_zn, stride_ym,
           rb * ROWS, g_lo, g_hi, NT, TILES, True, PRO, PRO_CONS, LOAD, LOAD_CONS, COMP, COMP_CONS, EPI, DEPTH, L2,
           PF, FIXED, LOADW, LOADW_CONS, LOADX, LOADX_CONS, PRE, PDL, rdy_ptr, epoch, RQG, stamp_ptr, STAMPS, SILU,
           GMAX, NB)
    return w + (g_hi - g_lo)


@triton.jit
def _w4_mma_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, N, K, G, M, stride_xm, stride_qn, stride_sn, stride_zn, stride_ym,
                   WARPS: tl.constexpr, TILES: tl.constexpr, SPLIT: tl.constexpr, PERSIST: tl.constexpr,
                   PRO: tl.constexpr, PRO_CONS: tl.constexpr, LOAD: tl.constexpr, LOAD_CONS: tl.constexpr,
                   COMP: tl.constexpr, COMP_CONS: tl.constexpr, EPI: tl.constexpr, DEPTH: tl.constexpr,
                   L2: tl.constexpr, PF: tl.constexpr, FIXED: tl.constexpr, PDL: tl.constexpr, LOADW: tl.constexpr,
                   LOADW_CONS: tl.constexpr, LOADX: tl.constexpr, LOADX_CONS: tl.constexpr, PRE: tl.constexpr,
                   rdy_ptr=None, ep_ptr=None, RQG: tl.constexpr = 0, stamp_ptr=None, STAMPS: tl.constexpr = False,
                   SILU: tl.constexpr = False, XS: tl.constexpr = "", GMAX: tl.constexpr = 1,
                   NB: tl.constexpr = 1):
    """See the module docstring. ``stride_*`` in bytes for the pointers the PTX walks (``qw``, ``s``, ``z``, ``x``),
    in elements for ``y``; ``PRO``, ``LOAD``, ``COMP``, ``EPI``: the PTX of :func:`_prologue_asm`, :func:`_load_asm`,
    :func:`_compute_asm` and :data:`EPILOGUE_ASM` for ``TILES``. The loads of group ``i + DEPTH`` are issued before
    the products of group ``i`` (loop-carried registers: ``DEPTH`` groups in flight per warp while it computes; the
    last ones re-read the range's last group, cached). ``PERSIST``: a 1-D grid of programs that split the
    ``(row block, group)`` pairs, row block major, into equal contiguous shares (stream-K: every program the same
    number of groups, whatever the grid's waves; a share crossing row blocks runs one range per row block).
    ``PDL`` (:mod:`runtime.kernels.overlap`): the next kernel may launch at once; this one waits for the kernels
    before it first thing (its loads of ``x`` and of the weights are one PTX block), or with ``PRE`` (depth 1)
    after loading the weights of its first range's first two groups (:func:`_range`). ``RQG`` > 0 (with
    ``PRE``): ``x`` is the attention's output, whose heads become ready one by one: each range waits for the flags
    of its groups in ``rdy_ptr`` (group ``g``: flag ``g // RQG``) to hold the step's epoch at ``ep_ptr`` instead of
    waiting for the kernel before, its loads are coherent (``x`` changes while the kernel runs), and the program
    waits for the kernel before only at its end (so that its completion still implies the earlier kernels').
    ``STAMPS``: each program writes ``%globaltimer`` at its start, before its first ``x`` and at its end into row
    :func:`_program` of ``stamp_ptr`` (:mod:`runtime.kernels.stamps`). ``SILU`` (one row): ``x_ptr`` is the gate_up
    projection's float32 ``[1, 2K]`` and ``x = silu(gate) * up``, built by each range in the program's shared memory
    (``XS``: :func:`xs_declare_asm`, first of all) instead of read from a SiLU kernel's output (:func:`_range`)."""
    if SILU:
        tl.inline_asm_elementwise(XS, "=r,r", [tl.zeros((32 * WARPS,), tl.int32)], dtype=tl.int32, is_pure=False,
                                  pack=1)
    overlap.launch_dependents(PDL)
    if STAMPS:
        stamps.stamp(stamp_ptr, _program(), 0, 3)
    if not PRE:
        overlap.wait_prior(PDL)
        if STAMPS:
            stamps.stamp(stamp_ptr, _program(), 1, 3)
    if RQG > 0:
        epoch = tl.load(ep_ptr)
    else:
        epoch = 0
    NT: tl.constexpr = 32 * WARPS
    ROWS: tl.constexpr = 16 * TILES * WARPS
    if PERSIST:
        p, P = tl.program_id(0), tl.num_programs(0)
        work = tl.cdiv(N, ROWS) * G
        w = p * work // P
        w_end = (p + 1) * work // P  # > w: the grid has at most one program a (row block, group) pair
        if PRE:  # the first range apart: it preloads
            w = _share_range(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, N, K, G, M, stride_xm, stride_qn, stride_sn,
                             stride_zn, stride_ym, w, w_end, NT, ROWS, TILES, PRO, PRO_CONS, LOAD, LOAD_CONS, COMP,
                             COMP_CONS, EPI, DEPTH, L2, PF, FIXED, LOADW, LOADW_CONS, LOADX, LOADX_CONS, True,
                             PDL, rdy_ptr, epoch, RQG, stamp_ptr, STAMPS, SILU, GMAX, NB)
        while w < w_end:  # a share crossing row blocks: the next block's range (rarely more than one)
            w = _share_range(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, N, K, G, M, stride_xm, stride_qn, stride_sn,
                             stride_zn, stride_ym, w, w_end, NT, ROWS, TILES, PRO, PRO_CONS, LOAD, LOAD_CONS, COMP,
                             COMP_CONS, EPI, DEPTH, L2, PF, FIXED, LOADW, LOADW_CONS, LOADX, LOADX_CONS, False,
                             PDL, rdy_ptr, epoch, RQG, stamp_ptr, STAMPS, SILU, GMAX, NB)
    else:
        i, j = tl.program_id(0), tl.program_id(1)
        _range(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, N, K, M, stride_xm, stride_qn, stride_sn, stride_zn, stride_ym,
               i * ROWS, j * G // SPLIT, (j + 1) * G // SPLIT, NT, TILES, SPLIT > 1, PRO, PRO_CONS, LOAD,
               LOAD_CONS, COMP, COMP_CONS, EPI, DEPTH, L2, PF, FIXED, LOADW, LOADW_CONS, LOADX, LOADX_CONS, PRE,
               PDL, rdy_ptr, epoch, RQG, stamp_ptr, STAMPS, SILU, GMAX, NB)
    if RQG > 0:  # the kernel before has long ended: returns at once
        overlap.wait_prior(PDL)
    if STAMPS:
        stamps.stamp(stamp_ptr, _program(), 2, 3)


# ------------------------------------------------------------------------------------------------ host side


def mma_ok(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
           bias: torch.Tensor | None = None) -> bool:
    """Whether :func:`w4_mma_accumulate` takes these operands: a CUDA sm_80+ device outside the interpreter, float16
    ``x2 [M, K]`` with ``1 <= M <=`` :func:`max_rows` (32), 16-byte aligned rows (``x`` stride a multiple of 8
    elements), group 128, ``K % 32 == 0``, codes ``uint8 [N, K/2]`` with 16-byte aligned rows or their group-major
    copy ``[N, G, 64]`` (:func:`runtime.quant.group_major`, 16-byte aligned rows and groups), no bias."""
    m, k = x2.shape if x2.dim() == 2 else (0, 0)
    return (x2.dtype == torch.float16 and 1 <= m <= max_rows() and x2.stride(1) == 1
            and (m == 1 or x2.stride(0) % 8 == 0) and x2.data_ptr() % 16 == 0
            and _operands_ok(x2.device, k, qweight, scales, zeros, group_size, bias))


def _weight_ok(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, k: int) -> bool:
    """:func:`mma_ok`'s conditions on the weight of ``k`` input channels."""
    g = -(-k // GROUP)
    shape = {2: (k // 2,), 3: (g, GROUP // 2)}.get(qweight.dim())  # row-major, or group-major (quant.group_major)
    codes_ok = (tuple(qweight.shape[1:]) == shape and qweight.stride(-1) == 1
                and all(st % 16 == 0 for st in qweight.stride()[:-1]))
    return (k > 0 and k % 32 == 0 and qweight.dtype == torch.uint8 and codes_ok and qweight.data_ptr() % 16 == 0
            and scales.dtype == torch.float16 and zeros.dtype == torch.uint8
            and scales.shape == zeros.shape == (qweight.shape[0], g))


def silu_input_ok(gate_up: torch.Tensor) -> bool:
    """Whether ``gate_up`` is what the SiLU input reads: a gate_up projection's float32 sums ``[1, 2K]`` (one row,
    contiguous)."""
    return (gate_up.dim() == 2 and gate_up.shape[0] == 1 and gate_up.shape[1] % 2 == 0
            and gate_up.dtype == torch.float32 and gate_up.is_contiguous())


def silu_ok(gate_up: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
            group_size: int, bias: torch.Tensor | None = None, config: MmaConfig | tuple | None = None) -> bool:
    """Whether :func:`w4_mma_accumulate_silu` takes these operands: a ``gate_up`` :func:`silu_input_ok` takes and a
    weight of ``K`` input channels that :func:`silu_weight_ok` takes."""
    return silu_input_ok(gate_up) and silu_weight_ok(gate_up.device, gate_up.shape[1] // 2, qweight, scales, zeros,
                                                     group_size, bias, config)


def _operands_ok(device, k: int, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, bias: torch.Tensor | None = None) -> bool:
    """The device and weight (``k`` input channels) every input of the kernel needs: :func:`mma_ok` without ``x``,
    :func:`silu_weight_ok` without the config."""
    return (cuda_major(device) >= 8 and bias is None and group_size == GROUP
            and _weight_ok(qweight, scales, zeros, k))


def silu_weight_ok(device, k: int, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   group_size: int, bias: torch.Tensor | None = None, config: MmaConfig | tuple | None = None) -> bool:
    """:func:`mma_ok`'s device and weight (``k`` input channels), and a config (``config``, else the table's) whose
    ranges fit the SiLU prologue (:func:`launch_plan`)."""
    if not _operands_ok(device, k, qweight, scales, zeros, group_size, bias):
        return False
    n = qweight.shape[0]
    cfg = MmaConfig(*config) if config is not None else default_mma_config(n, k, 1)
    sq, sqg, ss, ssg, sz, szg = quant.group_strides(qweight, scales, zeros, GROUP)
    try:
        launch_plan(cfg, n, k, 1, (sq, 2 * ss, sz), (sqg, 2 * ssg, szg), multiprocessors(device), False, False,
                    silu=True)
    except ValueError:
        return False
    return True


def launch_plan(cfg: MmaConfig, n: int, k: int, m: int, row_strides: tuple[int, int, int],
                gstrides: tuple[int, int, int], sms: int, pdl: bool, hopper: bool,
                ready_qg: int = 0, stamps: bool = False, silu: bool = False) -> tuple[tuple[int, int], dict]:
    """The grid and the kernel's constexpr arguments (but ``PDL``) of a launch of ``cfg`` on a weight ``[n, k]`` with
    ``m`` rows of ``x``: ``row_strides`` and ``gstrides`` in bytes (codes, scales, zeros), ``sms`` multiprocessors,
    launched with ``pdl`` on a ``hopper`` GPU; ``ready_qg`` > 0: groups per ready flag, used where the launch
    preloads (``PRE``; else the kernel waits for the kernel before, which implies the flags); ``stamps``: the
    programs write timestamps (:mod:`runtime.kernels.stamps`); ``silu``: ``x`` is ``silu(gate) * up`` of a float32
    gate_up projection's output, built by each range in shared memory (one row; at most :data:`SILU_MAX_PER_THREAD`
    channels a thread a range, :func:`silu_groups`). Pure: what
    :func:`w4_mma_accumulate` launches and what the sm_90 SASS tests compile. A config the weight cannot take is a
    one-line ``ValueError``."""
    if (cfg.tiles not in (1, 2) or cfg.warps not in (1, 2, 4, 8) or cfg.split < 1 or cfg.depth not in (1, 2)
            or cfg.chains not in (1, 2) or not 0 <= cfg.persist <= 32):
        raise ValueError(f"MmaConfig {cfg}: tiles 1 or 2, warps 1, 2, 4 or 8, split >= 1, depth and chains 1 or 2, "
                         "persist 0-32")
    if cfg.stages or cfg.bulk:
        raise ValueError(f"MmaConfig {cfg}: the cp.async stages and the bulk ring were removed (slower than the "
                         "register prefetch wherever measured; runtime/kernels/NOTES.md round 22); set both to 0")
    rows = 16 * cfg.tiles * cfg.warps
    fixed = n >= rows  # immediate row offsets
    strides = row_strides if fixed else None
    ragged = k % GROUP != 0
    if gstrides != (64, 2, 1) and cfg.l2:
        raise ValueError(f"MmaConfig {cfg}: the L2 prefetch reads the row-major layout only; this weight is "
                         f"group-major (group strides {gstrides})")
    pre = pdl and preload_enabled() and m == 1 and cfg.depth == 1
    rqg = ready_qg if pre else 0
    g = -(-k // GROUP)
    blocks = triton.cdiv(n, rows)
    if cfg.persist:  # stream-K: persist programs an SM (at most one a (row block, group) pair)
        grid = (min(cfg.persist * sms, blocks * g), 1)
    else:
        grid = (blocks, min(cfg.split, g))
    most = silu_groups(cfg, grid, g, blocks)
    gmax = triton.next_power_of_2(most)  # the prologue's block: [gmax, 128]
    if silu and (m != 1 or rqg or gmax * GROUP > SILU_MAX_PER_THREAD * 32 * cfg.warps):
        raise ValueError(f"MmaConfig {cfg}: the SiLU input needs one row of x, no ready flags and at most "
                         f"{SILU_MAX_PER_THREAD} channels a thread a range; got {m} rows, {most} groups a range, "
                         f"{cfg.warps} warps (use misc.silu_mul and the plain GEMV)")
    if silu and 256 * g > XS_MAX_BYTES:
        raise ValueError(f"the SiLU input's shared copy of x holds every group, 256 bytes each: {g} groups (K = {k}) "
                         f"need {256 * g} bytes, over the {XS_MAX_BYTES} a kernel may declare statically "
                         "(use misc.silu_mul and the plain GEMV)")
    pro, pro_cons, load, load_cons, comp, comp_cons, pf = _asm(cfg.tiles, ragged, cfg.chains, strides, gstrides,
                                                               rqg > 0, silu)
    nb = -(-m // BLOCK_ROWS)
    if not 1 <= nb <= MMA_MAX_ROWS // BLOCK_ROWS or (nb > 1 and (pre or silu)):
        raise ValueError(f"w4_mma takes 1..{MMA_MAX_ROWS} rows of x, and one block of {BLOCK_ROWS} with the preload "
                         f"or the SiLU input; got {m} rows")
    if pre:
        loadw, loadw_cons, loadx, loadx_cons = _split_load_asm(cfg.tiles, ragged, strides, gstrides, silu)
    elif nb > 1:  # the weight words once, each block's x after them, one product PTX for the blocks
        loadw, loadw_cons, loadx, loadx_cons = _split_load_asm(cfg.tiles, ragged, strides, gstrides, coherent=False)
        comp, comp_cons = _compute_asm(cfg.tiles, 1, nb)
    else:
        loadw, loadw_cons, loadx, loadx_cons = "", "r", "", "r"
    return grid, {
        "WARPS": cfg.warps, "TILES": cfg.tiles, "SPLIT": grid[1], "PERSIST": cfg.persist > 0, "PRO": pro,
        "PRO_CONS": pro_cons, "LOAD": load, "LOAD_CONS": load_cons, "COMP": comp, "COMP_CONS": comp_cons,
        "EPI": EPILOGUE_ASM, "DEPTH": cfg.depth, "L2": bool(cfg.l2) and hopper, "PF": pf, "FIXED": fixed,
        "LOADW": loadw, "LOADW_CONS": loadw_cons, "LOADX": loadx, "LOADX_CONS": loadx_cons, "PRE": pre, "RQG": rqg,
        "STAMPS": stamps, "SILU": silu, "XS": xs_declare_asm(g) if silu else "", "GMAX": gmax if silu else 1,
        "NB": nb}


SILU_MAX_PER_THREAD = 32  # channels of gate and of up a thread loads at once in a range's SiLU prologue
XS_MAX_BYTES = 48 * 1024  # static shared memory a kernel may declare (ptxas refuses more: LLaMA-2-70B's down, K 28672)


def silu_groups(cfg: MmaConfig, grid: tuple[int, int], g: int, blocks: int) -> int:
    """The most groups one range of a launch of ``cfg`` with ``grid`` on ``g`` groups of ``blocks`` row blocks
    covers (:func:`_silu_prologue`'s block is the next power of two): a split grid's ranges are ``cdiv(g, split)``
    groups, a stream-K share's ranges at most the share's length."""
    return min(g, -(-blocks * g // grid[0])) if cfg.persist else -(-g // grid[1])


def w4_mma_accumulate(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      group_size: int, out: torch.Tensor, config: MmaConfig | tuple | None = None,
                      ready: tuple[torch.Tensor, torch.Tensor, int] | None = None,
                      stamps_kind: str | None = None) -> torch.Tensor:
    """``out [M, N] (float32) += x2 [M, K] @ W^T`` on the tensor cores (see :func:`mma_ok`); returns ``out``.
    ``ready = (flags, epoch, qg)``: ``x2`` is being written by the kernel before (launched with PDL, it lets this one
    launch early), group ``g`` of it complete once ``flags[g // qg]`` (``int32``) holds ``epoch`` (``int32 [1]``;
    :func:`runtime.kernels.kv4.rope_attention`'s ``ready``): at one row with the weight preload each program waits
    for its groups' flags instead of the whole kernel before (:func:`launch_plan`). ``stamps_kind``: where
    ``WKVQ_STAMPS=1``, the programs' timestamps go to that kind's buffer (:mod:`runtime.kernels.stamps`)."""
    grid, args, kwargs = launch_args(x2, qweight, scales, zeros, group_size, out, config, ready, stamps_kind)
    _w4_mma_kernel[grid](*args, **kwargs)
    return out


def w4_mma_accumulate_silu(gate_up: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                           group_size: int, out: torch.Tensor, config: MmaConfig | tuple | None = None,
                           stamps_kind: str | None = None) -> torch.Tensor:
    """``out [1, N] (float32) += silu_mul(gate_up) @ W^T`` (:func:`runtime.kernels.misc.silu_mul`'s float16 product
    of the float32 ``gate_up [1, 2K]``, gate first), the product built by the GEMV's programs in shared memory
    (:func:`silu_ok`): no SiLU launch, and the first ``x`` of a range one round trip after the PDL wait instead of
    the SiLU kernel's end. Leaves ``gate_up`` for its next user to zero."""
    grid, args, kwargs = launch_args(gate_up, qweight, scales, zeros, group_size, out, config, None, stamps_kind,
                                     silu=True)
    _w4_mma_kernel[grid](*args, **kwargs)
    return out


def launch_args(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int, out: torch.Tensor, config: MmaConfig | tuple | None = None,
                ready: tuple[torch.Tensor, torch.Tensor, int] | None = None,
                stamps_kind: str | None = None, silu: bool = False) -> tuple[tuple[int, int], tuple, dict]:
    """The grid, positional and keyword arguments of :func:`w4_mma_accumulate`'s launch of the kernel (``silu``: of
    :func:`w4_mma_accumulate_silu`'s, ``x2`` the float32 ``gate_up``), its operands checked (a one-line
    ``ValueError`` for what it cannot take): what ``benchmarks/phase_probe.py`` launches with parts of the PTX taken
    out."""
    if silu:  # the config's ranges are launch_plan's to check (its one-line error says "SiLU input needs" too)
        if not (silu_input_ok(x2) and _operands_ok(x2.device, x2.shape[1] // 2, qweight, scales, zeros,
                                                   group_size)):
            raise ValueError(f"w4_mma's SiLU input needs CUDA sm_80+, a contiguous float32 gate_up [1, 2K] with K % 32 "
                             f"== 0, group 128, uint8 codes [N, K/2] and a config whose ranges fit the prologue; got "
                             f"gate_up {x2.dtype} {list(x2.shape)} on {x2.device}, qweight {qweight.dtype} "
                             f"{list(qweight.shape)}, group {group_size}")
        m, k = 1, x2.shape[1] // 2
    elif not mma_ok(x2, qweight, scales, zeros, group_size):
        raise ValueError(f"w4_mma needs CUDA sm_80+, float16 x [1..{max_rows()}, K] with K % 32 == 0 and 16-byte "
                         f"aligned rows, group 128 and uint8 codes [N, K/2]; got x {x2.dtype} {list(x2.shape)} on "
                         f"{x2.device}, qweight {qweight.dtype} {list(qweight.shape)}, group {group_size}")
    else:
        m, k = x2.shape
    n = qweight.shape[0]
    if out.dtype != torch.float32 or out.shape != (m, n) or out.stride(1) != 1:
        raise ValueError(f"out must be float32 [{m}, {n}] with unit stride, got {out.dtype} {list(out.shape)}")
    cfg = MmaConfig(*config) if config is not None else default_mma_config(n, k, m)
    sq, sqg, ss, ssg, sz, szg = quant.group_strides(qweight, scales, zeros, GROUP)
    row_strides, gstrides = (sq, 2 * ss, sz), (sqg, 2 * ssg, szg)  # bytes: codes, scales (float16), zeros
    pdl_opts = overlap.launch_options(x2.device, "gemv")
    qg = 0
    if ready is not None:
        flags, epoch, qg = ready
        g = scales.shape[1]
        if (flags.dtype != torch.int32 or epoch.dtype != torch.int32 or not flags.is_contiguous()
                or flags.numel() < -(-g // qg) or epoch.numel() != 1 or qg < 1):
            raise ValueError(f"ready must be (int32 flags of at least {g} groups / qg, int32 epoch [1], qg >= 1); got "
                             f"{flags.dtype} {list(flags.shape)}, {epoch.dtype} {list(epoch.shape)}, qg {qg}")
    on = bool(stamps_kind) and stamps.enabled()
    grid, consts = launch_plan(cfg, n, k, m, row_strides, gstrides, multiprocessors(x2.device), pdl_opts["PDL"],
                               overlap.hopper(x2.device), qg, on, silu)
    rdy = (flags, epoch) if consts["RQG"] else (out, out)  # unused without RQG
    st = stamps.buffer(x2.device, stamps_kind, grid[0] * grid[1]) if on else None
    args = (x2, qweight, scales, zeros, out, n, k, scales.shape[1], m, x2.stride(0) * x2.element_size(),
            *row_strides, out.stride(0))
    return grid, args, {"rdy_ptr": rdy[0], "ep_ptr": rdy[1], "stamp_ptr": st if on else out, **consts,
                        "num_warps": cfg.warps, **pdl_opts}
