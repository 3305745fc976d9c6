"""Graph-timed sweep of the 4-bit POQ decode attention (:func:`runtime.kernels.kv4.decode_attention`: split kernel +
combine) at the LLaMA-2-7B attention shape (32 query and KV heads, head_dim 128, per-token stats; ``--heads``,
``--kv-heads``: another, e.g. LLaMA-3-8B's 32 on 8), over splits x (block_s, num_warps) x loads x row_max
(:class:`runtime.kernels.kv4.AttnConfig`).

Per case (batch x context, the cache filled with ``context`` random tokens): every config is checked against the
float64 POQ attention of the dequantized cache (relative error < 1e-4: the kernel is float32 throughout), then timed
by CUDA-graph replay over a ring of distinct caches of >= 256 MB (H200 L2: 60 MB; every replay reads from HBM), as in
``benchmarks/w4_gemv_bench.py``. Configs that fail to compile or run, or are wrong, are recorded, not timed. GB/s
counts the codes and stats of the ``context`` past tokens read per call.

    python3 benchmarks/attn_bench.py --json benchmarks/results/attn_h200.json [--batches 1,8] [--contexts 2048,32768]
        [--heads 32 --kv-heads 8]

Compiles run first in ``--workers`` processes (Triton's on-disk cache), so the timing loop only loads them. The record
is rewritten after every case; its "best" table (fastest correct config per batch and context) is what
``WKVQ_ATTN_TABLE=record.json`` makes the decode step use (:func:`runtime.kernels.kv4.load_table`; keyed by batch and
context only, so a record for other head counts belongs in ``kv4.ATTN_KV_TABLE``). Prints one table per
case (fastest first, and the default config), the best time per loads/row_max option, and ``ATTN_TABLE`` entries.
``--dry``: the same code path on CPU under ``TRITON_INTERPRET=1`` at a tiny shape, timed by wall clock (a smoke test).
``--rope``: times :func:`runtime.kernels.kv4.rope_attention` instead (the decode step's default at one row: the
query, key and value roped from the projection's output and the token appended by the attention kernel itself),
checked against the same reference with the query, key and value roped in torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gemlite_tune import RING_BYTES  # noqa: E402
from converter.bench_kernels import error_line, graph_ms, in_workers  # noqa: E402
from converter.bench_paths import _fill_random  # noqa: E402
from runtime import kernels, quant  # noqa: E402
from runtime.kernels import kv4  # noqa: E402
from runtime.static_cache import StaticPOQCache, poq_attention  # noqa: E402

log = logging.getLogger("attn_bench")
MAX_REL_ERR = 1e-4  # float32 kernel against float64 (the interpreter tests hold the same bound)
HEADS, HEAD_DIM = 32, 128  # LLaMA-2-7B; --dry: 2 heads of 32
# (block_s, num_warps) with 1..8 int32 words of a code tile per thread at head_dim 128 (16 words a token); local
# sm_90 SASS (Triton 3.9): 8 words take 215-250 registers (1-2 programs per SM), 2 words 80-95, 4 words 125-160.
# The eighth session's sweep (block_s >= 16) was won by the smallest tile, 16 x 1 warp, at every case; 8 x 1 and 8 x 2,
# then added, came after it (b1 p2048: 12.29 us against 11.22)
TILES = ((8, 1), (8, 2), (16, 1), (16, 2), (16, 4), (16, 8), (32, 2), (32, 4), (32, 8), (64, 4), (64, 8), (128, 8))
# (tokens a stage, stages) of the tensor-core kernel (runtime/kernels/kv4_mma.py; --mma all)
MMA_TILES = ((16, 2), (16, 4), (16, 8), (16, 16), (32, 2), (32, 3), (32, 4), (32, 8), (64, 2), (64, 3),
             (64, 4), (128, 2))
QUICK = (kv4.AttnConfig(), kv4.AttnConfig(loads="early"), kv4.AttnConfig(loads="prefetch"),
         kv4.AttnConfig(loads="prefetch", row_max=True), kv4.AttnConfig(block_s=16, num_warps=2, loads="prefetch",
                                                                        row_max=True))


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    context: int  # past tokens in the cache (its size: context + 1, the decode token's slot)

    @property
    def key(self) -> str:
        return f"{self.batch}x{kv4.context_bucket(self.context + 1)}"


def splits_range(case: Case, heads: int, sms: int) -> list[int]:
    """Powers of two from half the default policy's count, >= 32 tokens a split, <= 16384 programs (7B, H200:
    b1 p2048 8..64, b1 p32768 32..256, b8 4..64)."""
    default = kv4.num_splits(case.batch, heads, case.context + 1, sms)
    return [n for n in (1 << i for i in range(9))
            if n >= max(1, default // 2) and case.context // n >= 32 and case.batch * heads * n <= 16384]


def candidates(case: Case, heads: int, sms: int, args, kv_heads: int | None = None) -> list[kv4.AttnConfig]:
    """The default config (:func:`runtime.kernels.kv4.attn_config` at ``kv_heads``) first, then the sweep's grid (or
    ``QUICK``)."""
    default = kv4.attn_config(case.batch, heads, case.context + 1, sms, kv_heads=kv_heads)
    splits = [int(v) for v in args.splits.split(",")] if args.splits else splits_range(case, heads, sms)
    if args.mma_only:
        grid = []
    elif args.quick:
        grid = [dataclasses.replace(c, splits=n) for n in splits[:3] for c in QUICK]
    else:
        tiles = _pairs(args.tiles) if args.tiles else TILES
        grid = [kv4.AttnConfig(n, bs, w, loads, bool(rm))
                for n, (bs, w), loads, rm in itertools.product(splits, tiles, args.loads.split(","),
                                                               [int(v) for v in args.row_max.split(",")])]
    if args.mma:
        pairs = MMA_TILES if args.mma == "all" else _pairs(args.mma)
        grid += [kv4.AttnConfig(n, bs, mma=True, stages=st, combine=True, copies=cp, keys_a=bool(ka))
                 for n, (bs, st), cp, ka in itertools.product(splits, pairs, args.copies.split(","),
                                                               [int(v) for v in args.keys_a.split(",")])
                 if kv4.mma_smem_bytes(bs, st) <= kv4.MMA_SMEM_LIMIT]
    return [default] + [c for c in dict.fromkeys(grid) if c != default]


def _pairs(text: str) -> list[tuple[int, int]]:
    """``"16x2,32x4"`` -> ``[(16, 2), (32, 4)]``."""
    return [tuple(int(v) for v in p.split("x")) for p in text.split(",")]


def _compile(items) -> list[tuple[kv4.AttnConfig, str]]:
    """Worker: run each ``(config, cache size, rope, query heads, KV heads)`` once on a small cache of the same Triton
    specialisation (size mod 16), so that it lands in Triton's on-disk cache; returns ``(config, error text)`` of
    those that fail."""
    bad = []
    for cfg, size, rope, heads, kv_heads in items:
        small = 64 if size % 16 == 0 else 64 + size % 16
        try:
            inputs = _inputs(1, small - 1, heads, kv_heads, HEAD_DIM, "cuda", 1, rope)
            for dtype in (torch.float32, torch.float16):
                attend(inputs, inputs.cache.layers[0], dtype, cfg)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - reported, the config is skipped
            bad.append((cfg, error_line(e)))
    return bad


def precompile(items: list[tuple[kv4.AttnConfig, int, bool, int, int]], workers: int) -> dict[kv4.AttnConfig, str]:
    return dict(in_workers(_compile, items, workers))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF rotate-half rope of ``x [..., d]`` at the position of ``cos``, ``sin [d]``."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


class Inputs(NamedTuple):
    """What :func:`attend` calls the kernel with (:func:`_inputs`)."""

    q: torch.Tensor
    k_cur: torch.Tensor
    v_cur: torch.Tensor
    params: tuple
    cache: StaticPOQCache
    rope: tuple | None  # (qkv, cos, sin) for kv4.rope_attention, else None


def _inputs(batch: int, context: int, heads: int, kv_heads: int, d: int, device, layers: int,
            rope: bool = False) -> Inputs:
    """Query (``heads``), current key/value and smoothing params (``kv_heads``), a random cache of ``layers`` layers
    holding ``context`` tokens and, with ``rope``, ``(qkv, cos, sin)``: the projection's output whose roped parts (at
    position ``context``) are the query, key and value."""
    g = torch.Generator(device=device).manual_seed(0)
    q = 4 * torch.randn(batch, heads, d, device=device, generator=g)  # spread scores: the running maximum moves
    k_cur, v_cur = (torch.randn(batch, kv_heads, d, device=device, generator=g) for _ in range(2))
    scale = lambda: 0.5 + torch.rand(kv_heads, d, device=device, generator=g)  # noqa: E731
    params = (scale(), torch.randn(kv_heads, d, device=device, generator=g), scale(),
              torch.randn(kv_heads, d, device=device, generator=g))
    cache = StaticPOQCache(layers, batch, context + 1, kv_heads, d, device=device)
    _fill_random(cache, context)
    rope_in = None
    if rope:
        angle = torch.rand(context + 1, d, device=device, generator=g) * 6.3
        cos, sin = angle.cos(), angle.sin()
        qkv = torch.cat([q, k_cur, v_cur], 1).reshape(batch, -1).contiguous()
        q, k_cur = (_rotate(x, cos[context], sin[context]) for x in (q, k_cur))
        rope_in = (qkv, cos, sin)
    return Inputs(q, k_cur, v_cur, params, cache, rope_in)


def attend(inputs: Inputs, store, dtype, cfg: kv4.AttnConfig) -> torch.Tensor:
    """The timed call on ``store`` (a layer of the ring) with :func:`_inputs`: :func:`kv4.rope_attention` where they
    hold ``qkv`` (it also appends the token at slot ``context``, which no call reads), else
    :func:`kv4.decode_attention`."""
    q, k_cur, v_cur, params, cache, rope = inputs
    d = q.shape[-1]
    if rope is not None:
        qkv, cos, sin = rope
        return kv4.rope_attention(qkv, cos, sin, cache.pos, store, params, q.shape[1], d ** -0.5, dtype, cfg)
    return kv4.decode_attention(q, k_cur, v_cur, store, cache.pos, params, d ** -0.5, dtype, cfg)


def reference(q, k_cur, v_cur, params, store, context: int) -> torch.Tensor:
    """float64 POQ attention over the dequantized past of ``store`` (one sequence at a time: bounded memory)."""
    k_scale, k_shift, v_scale, v_shift = params
    d, out = q.shape[-1], []
    for i in range(q.shape[0]):
        t = [x[i:i + 1, :, :context] for x in store.tensors()]
        pk, pv = (quant.kv_dequantize(quant.unpack(codes, 4, d), step, minimum, scale, shift,
                                      d // step.shape[-1], torch.float64)
                  for codes, step, minimum, scale, shift in ((*t[:3], k_scale, k_shift), (*t[3:], v_scale, v_shift)))
        qi, ki, vi = (x[i:i + 1, :, None].double() for x in (q, k_cur, v_cur))
        out.append(poq_attention(qi, ki, vi, pk, pv, d ** -0.5)[:, :, 0])
    return torch.cat(out)


def bench_case(case: Case, cands, failed: dict, args, device) -> list[dict]:
    d = 32 if args.dry else HEAD_DIM
    probe = StaticPOQCache(1, case.batch, case.context + 1, args.kv_heads, d, device="meta")
    layers = 1 if args.dry else max(1, -(-(args.ring_mb << 20) // probe.nbytes()))
    inputs = _inputs(case.batch, case.context, args.heads, args.kv_heads, d, device, layers, args.rope)
    ring = inputs.cache
    ref = reference(inputs.q, inputs.k_cur, inputs.v_cur, inputs.params, ring.layers[0], case.context)
    nbytes = probe.nbytes() * case.context // (case.context + 1)
    rows = []
    for i, cfg in enumerate(cands):
        row = dict(batch=case.batch, context=case.context, key=case.key, config=dataclasses.asdict(cfg),
                   label=cfg.label(), default=i == 0, ring=layers, us=None, GBps=None, rel_err=None, ok=False,
                   rope=args.rope)
        rows.append(row)
        if cfg in failed:
            row["error"] = failed[cfg]
            continue

        def call(store, dtype=torch.float16, cfg=cfg):
            return attend(inputs, store, dtype, cfg)

        def step():
            for store in ring.layers:
                call(store)

        try:
            out = call(ring.layers[0], torch.float32)
            row["rel_err"] = ((out.double() - ref).norm() / ref.norm()).item()
            row["ok"] = row["rel_err"] < MAX_REL_ERR
            if row["ok"]:
                ms = _wall_ms(step) if args.dry else graph_ms(step, reps=args.reps)
                row["us"] = ms * 1e3 / layers
                row["GBps"] = nbytes / (ms / layers) / 1e6
        except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
            row["error"] = error_line(e)
            log.warning("%s %s: %s", case.key, cfg.label(), row["error"])
    log.info("%s: %d configs, %d timed, ring of %d caches of %.1f MB", case.key, len(rows),
             sum(r["us"] is not None for r in rows), layers, probe.nbytes() / 2 ** 20)
    return rows


def _wall_ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def best_table(rows: list[dict]) -> dict[str, dict]:
    """Fastest correct config per case key, with the default config's time for scale."""
    best = {}
    for key in dict.fromkeys(r["key"] for r in rows):
        timed = [r for r in rows if r["key"] == key and r["us"] is not None]
        if not timed:
            continue
        top = min(timed, key=lambda r: r["us"])
        default = next((r for r in timed if r["default"]), None)
        best[key] = dict(config=top["config"], label=top["label"], us=top["us"], GBps=top["GBps"],
                         default_label=default and default["label"], default_us=default and default["us"])
    return best


def print_table(rows: list[dict], top: int) -> None:
    for key in dict.fromkeys(r["key"] for r in rows):
        sel = sorted((r for r in rows if r["key"] == key and r["us"] is not None), key=lambda r: r["us"])
        print(f"\n{key} (batch x context)        config                           us      GB/s   rel_err")
        for r in sel[:top] + [r for r in sel[top:] if r["default"]]:
            print(f"  {'default' if r['default'] else '':8s} {r['label']:36s} {r['us']:9.2f} {r['GBps']:8.0f}   "
                  f"{r['rel_err']:.1e}")
        mma = [r for r in sel if r["config"].get("mma")]
        if mma:
            print(f"  best tensor-core config:                {mma[0]['us']:9.2f} us  {mma[0]['label']}")
        for loads, rm in itertools.product(kv4.LOADS, (False, True)):
            opt = [r for r in sel if r["config"]["loads"] == loads and r["config"]["row_max"] == rm
                   and not r["config"].get("mma")]
            if opt:
                print(f"  best with loads={loads:8s} row_max={rm!s:5s}: {opt[0]['us']:9.2f} us  {opt[0]['label']}")
        for r in rows:
            if r["key"] == key and not r["ok"]:
                why = r.get("error") or f"rel_err {r['rel_err']:.1e}"
                print(f"  FAILED  {r['label']:36s} {why}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="record: every config's time, error; the best per case")
    ap.add_argument("--batches", default="1,8", help="comma-separated")
    ap.add_argument("--contexts", default="2048,32768", help="past tokens, comma-separated")
    ap.add_argument("--splits", default="", help="split counts (default: per case, see splits_range)")
    ap.add_argument("--tiles", default="", help="block_s x num_warps pairs, e.g. 16x2,32x4 (default: TILES)")
    ap.add_argument("--loads", default=",".join(kv4.LOADS), help="of " + ", ".join(kv4.LOADS))
    ap.add_argument("--row-max", default="0,1", help="0, 1 or both")
    ap.add_argument("--mma", default="", help="tensor-core kernel configs (AttnConfig.mma, fused combine): tokens x "
                    "stages pairs, e.g. 16x4,32x4, or 'all' (MMA_TILES), at every split count")
    ap.add_argument("--copies", default="mixed", help="--mma configs' AttnConfig.copies, comma-separated")
    ap.add_argument("--keys-a", default="0", help="--mma configs' AttnConfig.keys_a: 0, 1 or both (0,1)")
    ap.add_argument("--mma-only", action="store_true", help="no split-kernel grid: the default config and --mma")
    ap.add_argument("--quick", action="store_true", help="a few configs per case at 3 split counts (a smoke test)")
    ap.add_argument("--workers", type=int, default=min(15, os.cpu_count() or 1), help="compile processes")
    ap.add_argument("--reps", type=int, default=10, help="ms of graph replays per timing (x10 replays)")
    ap.add_argument("--ring-mb", type=int, default=RING_BYTES >> 20, help="caches per case: at least this many MB")
    ap.add_argument("--top", type=int, default=12, help="rows per table")
    ap.add_argument("--rope", action="store_true", help="time kv4.rope_attention (rope and append in the kernel)")
    ap.add_argument("--heads", type=int, help=f"query heads (default {HEADS}; --dry: 2)")
    ap.add_argument("--kv-heads", type=int, help="KV heads, dividing --heads (default: as many as --heads)")
    ap.add_argument("--dry", action="store_true", help="CPU smoke test under TRITON_INTERPRET=1: heads of 32 "
                    "channels, wall-clock times (default cases 1 x 100)")
    args = ap.parse_args(argv)
    args.heads = args.heads or (2 if args.dry else HEADS)
    args.kv_heads = args.kv_heads or args.heads
    if args.heads < 1 or args.kv_heads < 1 or args.heads % args.kv_heads:
        ap.error(f"--kv-heads {args.kv_heads} must be positive and divide --heads {args.heads}")
    bad = [v for v in args.loads.split(",") if v not in kv4.LOADS] + [
        v for v in args.row_max.split(",") if v not in ("0", "1")] + [
        v for v in args.copies.split(",") if v not in kv4.COPIES] + [
        v for v in args.keys_a.split(",") if v not in ("0", "1")]
    if bad:
        ap.error(f"unknown --loads / --row-max / --copies / --keys-a values {bad}; allowed: {', '.join(kv4.LOADS)} "
                 f"/ 0, 1 / {', '.join(kv4.COPIES)} / 0, 1")
    if args.dry:
        args.batches, args.contexts = ("1", "100") if (args.batches, args.contexts) == ("1,8", "2048,32768") else (
            args.batches, args.contexts)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.dry and not kernels.available("cpu"):
        sys.exit("attn_bench.py --dry: needs Triton's interpreter (set TRITON_INTERPRET=1); nothing run")
    if not args.dry and not torch.cuda.is_available():
        sys.exit("attn_bench.py: needs a CUDA device (none found); nothing measured (--dry: a CPU smoke test)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import triton

    device = "cpu" if args.dry else "cuda"
    heads = args.heads
    sms = kv4.multiprocessors(device)
    cases = [Case(b, c) for b in map(int, args.batches.split(",")) for c in map(int, args.contexts.split(","))]
    cands = {case: candidates(case, heads, sms, args, args.kv_heads) for case in cases}
    record = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": "cpu (interpreter)" if args.dry else
              torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "sms": sms,
              "heads": heads, "kv_heads": args.kv_heads, "rope": args.rope,
              "argv": sys.argv[1:] if argv is None else list(argv), "rows": []}
    t0 = time.time()
    failed = {}
    if not args.dry:
        failed = precompile(list(dict.fromkeys((cfg, case.context + 1, args.rope, heads, args.kv_heads)
                                               for case in cases for cfg in cands[case])), args.workers)
        log.info("compiled %d configs in %.0f s; %d failed", len({c for cs in cands.values() for c in cs}),
                 time.time() - t0, len(failed))
    for case in cases:
        record["rows"] += bench_case(case, cands[case], failed, args, device)
        if device == "cuda":
            torch.cuda.empty_cache()  # the case's ring
        record["best"] = best_table(record["rows"])  # read back by runtime.kernels.kv4.load_table
        Path(args.json).write_text(json.dumps(record, indent=1))
    log.info("sweep done in %.0f s", time.time() - t0)
    print_table(record["rows"], args.top)
    print("\nATTN_TABLE = {")
    for key, r in record["best"].items():
        fields = ", ".join(f"{k}={v!r}" for k, v in r["config"].items() if v != getattr(kv4.AttnConfig(), k))
        print(f"    ({key.replace('x', ', ')}): AttnConfig({fields}),  # {r['us']:.2f} us, {r['GBps']:.0f} GB/s "
              f"(default {r['default_us'] or float('nan'):.2f} us)")
    print("}")


if __name__ == "__main__":
    main()
