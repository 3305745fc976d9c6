"""Launch configs of the row-owning INT4 GEMV (:mod:`runtime.kernels.w4_gemv`): :class:`GemvConfig`, the sweep's
candidates :data:`GEMV_CONFIGS`, the measured :data:`GEMV_TABLE`, a sweep record's table (:func:`load_table`, named by
``WKVQ_GEMV_TABLE``) and :func:`default_config`. Pure Python: no kernel here."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import NamedTuple

import triton

from . import env_tables, interpreting, sweep_table


class GemvConfig(NamedTuple):
    """``block_n`` rows per program in ``sub`` sub-tiles of ``block_n / sub`` rows; ``block_k`` input channels
    per step (a multiple of the group size); ``prefetch``: load step ``i + 1`` before computing step ``i``.
    ``num_stages`` is passed to Triton, which does not pipeline these loads (no dot): kept for the sweep.
    ``split``: the steps along ``K`` are cut into ``split`` contiguous ranges, one program per range and row
    block (grid ``(cdiv(N, block_n), split)``), each adding its partial sums into ``out`` with a float32
    ``atomic_add`` (accumulate mode only: :func:`w4_gemv` runs with ``split = 1``; the order of the adds,
    hence the last bits of ``out``, may vary from run to run). ``split = 1``: the plain row-owning kernel.
    ``half``: products in float16 for float16 inputs (``f16x2`` FMAs, 3.6 instructions a code instead of 4.6;
    error 3-4e-4 relative, bounded by 1e-3 in the tests, instead of ~1e-7, see
    :func:`runtime.kernels.w4_gemv._half_dot`); other dtypes keep the float32 form. ``l2``: each program first
    asks the L2 for its whole code range (:func:`runtime.kernels.overlap.prefetch_l2`; Hopper GPUs, ``K % 32 == 0``;
    ignored elsewhere). ``WKVQ_GEMV_L2`` (``0``/``1``) overrides it for every config (:func:`l2_override`)."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int = 1
    sub: int = 1
    prefetch: bool = False
    split: int = 1  # after the first six fields, so that their tuples stay valid
    half: bool = False
    l2: bool = False

    def label(self) -> str:
        pf = "_pf" if self.prefetch else ""
        sp = f"_x{self.split}" if self.split != 1 else ""  # split 1: the labels of earlier records
        hf = "_h" if self.half else ""
        l2 = "_l2" if self.l2 else ""
        return f"n{self.block_n}/{self.sub}_k{self.block_k}_w{self.num_warps}_s{self.num_stages}{pf}{sp}{hf}{l2}"


def shared_memory_free(cfg: GemvConfig, group_size: int = 128) -> bool:
    """Whether a step of ``cfg`` runs without shared memory (see :func:`_w4_gemv_rows_kernel`): the ``x`` and
    scale/zero loads of a step have fewer elements than the program has threads, and every thread holds at
    least one 16-byte vector of words."""
    threads = 32 * cfg.num_warps
    sub_n = cfg.block_n // cfg.sub
    return (cfg.block_n % cfg.sub == 0 and cfg.block_k % group_size == 0 and cfg.block_k // 8 < threads
            and sub_n * (cfg.block_k // group_size) < threads and sub_n * cfg.block_k // 8 >= 4 * threads)


# candidates for the GPU sweep (benchmarks/w4_gemv_bench.py), all free of shared memory at group 128
GEMV_CONFIGS: list[GemvConfig] = [
    cfg for bn, bk, w, sub, pf in itertools.product((8, 16, 32, 64, 128), (256, 512, 1024), (2, 4, 8), (1, 2, 4),
                                                     (False, True))
    if shared_memory_free(cfg := GemvConfig(bn, bk, w, 1, sub, pf))
    and bn // sub * bk // 8 // (32 * w) <= 8  # <= 2 vectors of words per thread and sub-tile
]
# split over K (2 and 4 ranges) for the 16- and 32-row configs: 256-1024 programs at the 4096-row shapes instead
# of 128-256 (8 rows already give 512; 64-128 rows would need more ranges than K has steps at K = 4096)
GEMV_CONFIGS += [cfg._replace(split=sp) for sp in (2, 4) for cfg in list(GEMV_CONFIGS) if cfg.block_n in (16, 32)]
# (N, K, M) -> config: the best of the graph-timed sweep on the H200; M = 0: any M. Ninth session
# (`w4_gemv_bench.py --ms 1 --half`, the 146 configs with float16 products, runtime/kernels/NOTES.md "Round 9"):
# 55.5 us per layer against 62.2 for the float32 table in the same run (GEMV_TABLE_F32)
GEMV_TABLE: dict[tuple[int, int, int], GemvConfig] = {
    (4096, 4096, 1): GemvConfig(16, 1024, 8, 1, 2, False, 2, True),  # 6.40 us, 1371 GB/s
    (4096, 11008, 1): GemvConfig(32, 512, 4, 1, 4, False, 4, True),  # 12.35 us, 1911 GB/s
    (12288, 4096, 1): GemvConfig(16, 256, 2, 1, 2, True, 2, True),  # 13.72 us, 1921 GB/s
    (22016, 4096, 1): GemvConfig(16, 256, 2, 1, 2, False, 4, True),  # 23.06 us, 2047 GB/s
}
# float32 products (seventh session, 146 configs): the configs a float32/bfloat16 x runs at these shapes
GEMV_TABLE_F32: dict[tuple[int, int, int], GemvConfig] = {
    (4096, 4096, 1): GemvConfig(32, 1024, 8, 1, 4, False, 2),  # 6.92 us, 1269 GB/s
    (4096, 11008, 1): GemvConfig(32, 512, 4, 1, 4, False, 4),  # 14.04 us, 1681 GB/s
    (12288, 4096, 1): GemvConfig(32, 256, 2, 1, 4, False, 2),  # 15.92 us, 1655 GB/s
    (22016, 4096, 1): GemvConfig(32, 256, 2, 1, 4, False, 4),  # 25.57 us, 1846 GB/s
}
# a sweep record (benchmarks/w4_gemv_bench.py --json) whose best configs take precedence over GEMV_TABLE
TABLE_ENV = "WKVQ_GEMV_TABLE"
L2_ENV = "WKVQ_GEMV_L2"


def l2_override(cfg: GemvConfig) -> GemvConfig:
    """``cfg`` with ``l2`` set by ``WKVQ_GEMV_L2`` (``1`` on, ``0`` off; unset or anything else: as it is)."""
    value = os.environ.get(L2_ENV)
    return cfg._replace(l2=value == "1") if value in ("0", "1") else cfg


def load_table(path: str | Path) -> dict[tuple[int, int, int], GemvConfig]:
    """The best config per ``(N, K, M)`` of a sweep record written by ``benchmarks/w4_gemv_bench.py --json``."""
    return sweep_table(path, lambda key, row: (tuple(int(v) for v in key.split("x")), GemvConfig(*row["config"])),
                       "a w4_gemv", "benchmarks/w4_gemv_bench.py")


def default_config(n: int, k: int, m: int, group_size: int, half: bool = True) -> GemvConfig:
    """The config for a shape: the sweep records named by the environment variable ``WKVQ_GEMV_TABLE``
    (:func:`load_table`; several separated by ``os.pathsep``), then :data:`GEMV_TABLE` (``half``: the input is
    float16, so float16 products may run) or :data:`GEMV_TABLE_F32`, else a guess (not measured; for ``N < 8192`` a
    split over ``K`` into 2-4 ranges, also a guess; float16 products at ``M = 1`` when ``half``, as measured at
    every 7B shape)."""
    base = GEMV_TABLE if half else GEMV_TABLE_F32
    table = {**base, **env_tables(os.environ.get(TABLE_ENV), load_table)}
    cfg = table.get((n, k, m)) or table.get((n, k, 0))
    if cfg is None:
        if interpreting():
            cfg = GemvConfig(16, 256, 2, 1, 2, True)
        else:
            wide = n >= 8192  # enough rows for >= 2 programs of 4 warps per SM; else 1 program of 8 warps
            if m == 1:  # 2 sub-tiles: 128 registers; at M = 2 they take 255 (one program per SM)
                cfg = GemvConfig(32, 512, 4, 1, 2, True) if wide else GemvConfig(32, 1024, 8, 1, 2, True)
            else:
                cfg = GemvConfig(16, 512, 4, 1, 1, True) if wide else GemvConfig(16, 1024, 8, 1, 1, True)
            if not wide:  # a guess, unmeasured: split K into 2-4 ranges of >= 2 steps (N = 4096: 128-256 row
                # blocks -> 256-1024 programs, 2+ per SM), e.g. K = 4096 at 1024 channels a step: 2 ranges
                steps = -(-k // _fit(cfg, group_size).block_k)
                cfg = cfg._replace(split=max(1, min(4, steps // 2)))
            cfg = cfg._replace(half=half and m == 1)
    return _fit(cfg, group_size)


def _fit(cfg: GemvConfig, group_size: int) -> GemvConfig:
    """``block_k`` rounded up to a power-of-two number of groups."""
    gpc = triton.next_power_of_2(max(1, -(-cfg.block_k // group_size)))
    return cfg._replace(block_k=gpc * group_size)
