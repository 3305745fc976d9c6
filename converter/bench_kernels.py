"""Per-kernel timings of the decode kernels at LLaMA-2-7B shapes (CUDA), timed by CUDA-graph replay.

``python -m converter.bench_kernels [--sweep] [--out FILE]`` prints a table (and writes JSON): achieved GB/s
of the INT4 projections (split-K kernel per config, torch's tinygemm), of the
4-bit attention per split count and tile, and the launch cost of one small kernel inside a graph.
Used to choose :data:`runtime.kernels.w4.SPLITK_TABLE` and the attention tiles (NOTES.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import multiprocessing as mp

import torch

log = logging.getLogger(__name__)
SHAPES_7B = ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008))  # qkv, o, gate_up, down
SPLITK_SWEEP = list(itertools.product((128, 256), (1, 2, 4), (4, 8)))  # BLOCK_N, groups/program, warps


def graph_ms(fn, reps: int = 20) -> float:
    """Median ms of ``fn`` replayed in a CUDA graph (launch overhead out: these kernels take microseconds)."""
    import triton.testing

    fn()  # compile outside the capture
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=reps, return_mode="median")


def weight_ring(n: int, k: int, min_bytes: int = 256 << 20) -> tuple[list, int]:
    """Distinct random INT4 weights ``[n, k]`` (:func:`random_weight`) of at least ``min_bytes`` in all (larger than
    the H200's L2, so that a replay over them reads DRAM), and the bytes of one."""
    first = random_weight(n, k)
    nbytes = _nbytes(*first)
    return [first] + [random_weight(n, k) for _ in range(max(1, -(-min_bytes // nbytes)) - 1)], nbytes


def projection_case(weight, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For ``weight`` (codes, scales, zeros of ``[N, K]``) and ``m`` rows: a random float16 ``x [m, K]``, the float64
    reference ``x @ W^T`` and a float32 ``out [m, N]`` to accumulate into."""
    n, k = weight[0].shape[0], weight[0].shape[1] * 2
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    return x, _reference(x, *weight, dtype=torch.float64), torch.zeros(m, n, device="cuda")


def ring_ms(launch, items: list) -> float:
    """ms per ``launch(item)`` over ``items`` (e.g. a ring of weights larger than the L2, so that every call reads
    DRAM), by CUDA-graph replay of one pass over them."""
    def step():
        for it in items:
            launch(it)

    return graph_ms(step, reps=30) / len(items)


def ring_check_time(launch, ring: list, out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """``launch(*weights)`` adds into ``out``: (its relative error against ``ref`` from a zeroed ``out`` with the
    ring's first weights, ms per call over the ``ring`` of weights, :func:`ring_ms`)."""
    out.zero_()
    launch(*ring[0])
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    return err, ring_ms(lambda w: launch(*w), ring)


def in_workers(fn, items: list, workers: int) -> list:
    """``fn(chunk) -> list`` over ``items`` in ``workers`` spawned processes (round-robin chunks; ``fn`` a module-level
    function or a partial of one), the lists concatenated; in this process for ``workers <= 1``. For compiling
    kernels in parallel into Triton's on-disk cache before a timing loop."""
    if workers <= 1:
        return fn(items)
    with mp.get_context("spawn").Pool(workers) as pool:
        return list(itertools.chain.from_iterable(pool.map(fn, [items[j::workers] for j in range(workers)])))


def error_line(e: BaseException) -> str:
    """``Type: first line of the message`` (at most 200 characters), for a sweep's record of failed configs."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def random_weight(n: int, k: int, group: int = 128):
    g = -(-k // group)
    return (torch.randint(0, 256, (n, (k + 1) // 2), dtype=torch.uint8, device="cuda"),
            (torch.rand(n, g, device="cuda") * 2e-3 + 1e-3).half(),
            torch.randint(0, 16, (n, g), dtype=torch.uint8, device="cuda"))


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _reference(x, qw, sc, zr, dtype: torch.dtype = torch.float32):
    """``x @ W^T`` with the dequantized weight (group 128), computed in ``dtype``."""
    from runtime import quant

    w = quant.dequantize_weight(quant.unpack(qw, 4, x.shape[1]), sc, zr, 128, dtype)
    return x.to(dtype) @ w.T


def splitk_rows(shapes=SHAPES_7B, ms=(1, 8), configs=None) -> list[dict]:
    """Every config of the split-K kernel at every shape: us, GB/s and the error against the reference."""
    from runtime.kernels import w4

    rows = []
    for n, k in shapes:
        qw, sc, zr = random_weight(n, k)
        nbytes = _nbytes(qw, sc, zr)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            ref = _reference(x, qw, sc, zr)
            out = torch.zeros(m, n, device="cuda")
            for cfg in configs or SPLITK_SWEEP:
                out.zero_()
                w4.w4_accumulate(x, qw, sc, zr, 128, out, config=cfg)
                err = ((out - ref).norm() / ref.norm()).item()
                t = graph_ms(lambda: w4.w4_accumulate(x, qw, sc, zr, 128, out, config=cfg))
                rows.append(dict(kernel="w4_splitk", n=n, k=k, m=m, config=list(cfg) if cfg else None, us=t * 1e3,
                                 GBps=nbytes / t / 1e6, rel_err=err))
                log.info("%s", rows[-1])
    return rows


def baseline_rows(shapes=SHAPES_7B, ms=(1, 8)) -> list[dict]:
    """torch's tinygemm int4 kernel (``aten._weight_int4pack_mm``, bf16) at the same shapes."""
    rows = []
    for n, k in shapes:
        qw, sc, zr = random_weight(n, k)
        packed = torch.ops.aten._convert_weight_to_int4pack(qw, 8)
        sz = torch.rand(k // 128, n, 2, device="cuda").to(torch.bfloat16)
        for m in ms:
            xb = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t = graph_ms(lambda: torch.ops.aten._weight_int4pack_mm(xb, packed, 128, sz))
            rows.append(dict(kernel="tinygemm", n=n, k=k, m=m, us=t * 1e3, GBps=_nbytes(packed, sz) / t / 1e6))
        log.info("%s", rows[-2:])
    return rows


def decode_weights_row(layers: int = 32, m: int = 1, table=None) -> dict:
    """All projections of a 7B decode step (fresh weights per layer, so nothing is served from L2)."""
    from runtime.kernels import w4

    weights = [[random_weight(n, k) for n, k in SHAPES_7B] for _ in range(layers)]
    xs = {k: torch.randn(m, k, device="cuda", dtype=torch.float16) for _, k in SHAPES_7B}
    outs = {n: torch.zeros(m, n, device="cuda") for n, _ in SHAPES_7B}

    def step():
        for layer in weights:
            for (n, k), (qw, sc, zr) in zip(SHAPES_7B, layer):
                w4.w4_accumulate(xs[k], qw, sc, zr, 128, outs[n], config=(table or {}).get((n, k)))

    t = graph_ms(step, reps=50)
    nbytes = sum(_nbytes(*w) for layer in weights for w in layer)
    return dict(kernel="w4_splitk x128 (7B projections)", m=m, us=t * 1e3, GBps=nbytes / t / 1e6,
                table={f"{n}x{k}": v for (n, k), v in (table or {}).items()})


def attention_rows(cases=((1, 2048), (1, 32768), (8, 32768)), heads=32, d=128,
                   splits=(16, 32, 64, 128), blocks=(32, 64, 128), warps=(4,)) -> list[dict]:
    from runtime.kernels import kv4
    from runtime.static_cache import StaticPOQCache

    rows = []
    for b, length in cases:
        cache = StaticPOQCache(1, b, length + 1, heads, d, device="cuda")
        for t in cache.layers[0].tensors():
            t.random_(0, 200) if t.dtype == torch.uint8 else t.uniform_(0.01, 0.1)
        cache.pos.fill_(length)
        params = tuple(torch.rand(heads, d, device="cuda") + 0.5 for _ in range(4))
        q = torch.randn(b, heads, d, device="cuda")
        kc, vc = torch.randn(b, heads, d, device="cuda"), torch.randn(b, heads, d, device="cuda")
        nbytes = cache.nbytes() * length // (length + 1)
        default = kv4.num_splits(b, heads, length + 1)
        for sp, bs, w in itertools.product(splits, blocks, warps):
            if b * heads * sp > 8192:
                continue
            t = graph_ms(lambda: kv4.decode_attention(q, kc, vc, cache.layers[0], cache.pos, params, d ** -0.5,
                                                      torch.float16, sp, bs, w))
            rows.append(dict(kernel="attention", b=b, length=length, splits=sp, block_s=bs, warps=w,
                             default_splits=default, us=t * 1e3, GBps=nbytes / t / 1e6))
        log.info("%s", min((r for r in rows if r["b"] == b and r["length"] == length), key=lambda r: r["us"]))
    return rows


def launch_row(n: int = 300) -> dict:
    """Cost of one tiny kernel inside a CUDA graph (the floor per kernel of a decode step)."""
    from runtime.kernels import misc

    x, w = torch.randn(1, 4096, device="cuda", dtype=torch.float16), torch.randn(4096, device="cuda").half()
    t = graph_ms(lambda: [misc.rmsnorm(x, w, 1e-5) for _ in range(n)])
    return dict(kernel=f"rmsnorm 1x4096 x{n} in one graph", us=t * 1e3 / n)


def best_table(rows: list[dict], m: int = 1) -> dict:
    best = {}
    for r in rows:
        if r["kernel"] == "w4_splitk" and r["m"] == m and r["rel_err"] < 1e-2 and r["config"]:
            key = (r["n"], r["k"])
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    return {key: tuple(r["config"]) for key, r in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sweep", action="store_true", help="all split-K configs and attention tiles")
    ap.add_argument("--bench", default=None, help="then run `wkvq bench` on these shapes (e.g. 7b,13b) with the "
                    "best split-K configs and attention tile of the sweep applied")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from runtime.kernels import kv4, w4

    from .bench import BenchConfig, copy_bandwidth, format_table, run_bench

    result = {"copy_GBps": copy_bandwidth() / 1e9, "rows": [launch_row()]}

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)

    result["rows"] += splitk_rows(configs=None if args.sweep else [None])
    table = best_table(result["rows"])
    result["table"] = {f"{n}x{k}": v for (n, k), v in table.items()}
    save()
    result["rows"] += attention_rows() if args.sweep else attention_rows(splits=(32,), blocks=(32,))
    save()
    if args.bench:
        w4.SPLITK_TABLE.update(table)
        attn = [r for r in result["rows"] if r["kernel"] == "attention" and r["b"] == 1 and r["length"] == 32768]
        if attn:
            kv4.ATTN_DEFAULT = dataclasses.replace(kv4.ATTN_DEFAULT, block_s=min(attn, key=lambda r: r["us"])["block_s"])
        result["applied"] = {"splitk": result["table"], "block_s": kv4.ATTN_DEFAULT.block_s}
        bench = run_bench(BenchConfig(shapes=tuple(args.bench.split(",")), paths=("wkvq",)))
        result["bench"] = bench
        save()
        print(format_table(bench))
    result["rows"] += [decode_weights_row(table=table), decode_weights_row(m=8, table=table)]
    save()
    result["rows"] += baseline_rows()
    save()
    for r in result["rows"]:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
