"""Per-kernel timings of the decode kernels at LLaMA-2-7B shapes (CUDA): achieved GB/s per kernel.

``python -m converter.bench_kernels`` prints a table; used to find where decode time goes.
"""

from __future__ import annotations

import torch


def _bench(fn) -> float:
    """Median ms of ``fn`` replayed in a CUDA graph (launch overhead out: these kernels take microseconds)."""
    import triton.testing

    fn()  # compile and autotune outside the capture
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")


def w4_rows(shapes=((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)), ms=(1, 8)):
    from runtime.kernels import w4

    rows = []
    for n, k in shapes:
        g = k // 128
        qw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
        sc = torch.rand(n, g, device="cuda").half()
        zr = torch.randint(0, 16, (n, g), dtype=torch.uint8, device="cuda")
        nbytes = qw.numel() + sc.numel() * 2 + zr.numel()
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            t = _bench(lambda: w4.w4_linear(x, qw, sc, zr, 128))
            rows.append((f"w4 gemv/auto M={m} N={n} K={k}", t * 1e3, nbytes / t / 1e6))
        cfg = getattr(w4._w4_gemv32_tuned, "best_config", None)
        rows.append((f"  best gemv config {cfg}", 0.0, 0.0))
    return rows


def attention_rows(cases=((1, 2048), (1, 32768), (8, 2048)), heads=32, d=128):
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
        splits = kv4.num_splits(b, heads, length + 1)
        t = _bench(lambda: kv4.decode_attention(q, kc, vc, cache.layers[0], cache.pos, params, d ** -0.5,
                                                torch.float16, splits))
        nbytes = cache.nbytes() * length // (length + 1)
        rows.append((f"attention B={b} L={length} splits={splits}", t * 1e3, nbytes / t / 1e6))
        qkv = torch.randn(b, 3 * heads * d, device="cuda", dtype=torch.float16)
        cos = torch.randn(length + 1, d, device="cuda")
        t = _bench(lambda: kv4.rope_append(qkv, cos, cos, cache.pos, cache.layers[0], params, heads))
        rows.append((f"rope_append B={b}", t * 1e3, 0.0))
    return rows


def misc_rows():
    from runtime.kernels import misc

    x, w = torch.randn(1, 4096, device="cuda", dtype=torch.float16), torch.randn(4096, device="cuda").half()
    gu = torch.randn(1, 22016, device="cuda", dtype=torch.float16)
    return [("rmsnorm 1x4096", _bench(lambda: misc.rmsnorm(x, w, 1e-5)) * 1e3, 0.0),
            ("silu_mul 1x11008", _bench(lambda: misc.silu_mul(gu)) * 1e3, 0.0)]


def main() -> None:
    rows = w4_rows() + attention_rows() + misc_rows()
    for name, us, gbs in rows:
        print(f"{name:60} {us:9.1f} us {gbs:8.0f} GB/s")


if __name__ == "__main__":
    main()
