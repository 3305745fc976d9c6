"""Time to first token: the prefill of one prompt, W4KV4 (``FastLlama.forward``, what ``runtime.fast.generate`` and
``wkvq generate --fast`` run before the first decode step) against transformers fp16 (one forward over the prompt
into a StaticCache), on random models of real shapes (CUDA).

    python3 benchmarks/prefill_bench.py --shapes 7b,8b --prompts 2048,8192,32768 --json prefill.json

Each cell: the median of ``--repeats`` timed prefills after one untimed (compiles, autotunes), each from an empty
cache and waited for, and the peak memory the prefill adds above the model and its cache. ``--before`` times the
W4KV4 prefill's projections and attention as they were until the thirty-seventh session (every projection on the
tiled INT4 kernel, the attention with a materialized mask); the KV write stays the kernel it became then
(``runtime.kernels.kv4.quant_write``). ``--gemm`` times the projections alone at the 7B shapes, tiled kernel against
dequantization + cuBLAS, over rows.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converter.bench import SHAPES, _time_ms, llama_config
from converter.bench_paths import DEV, random_fast_llama, random_hf, random_w4
from runtime import static_cache
from runtime.kernels import w4


def _masked_poq_attention(query, key, value, past_key, past_value, scaling):
    """poq_attention before the thirty-seventh session (for --before): a materialized mask in every case."""
    t, p = query.shape[-2], past_key.shape[-2]
    keys, values = torch.cat([past_key, key], dim=-2), torch.cat([past_value, value], dim=-2)
    idx = torch.arange(t, device=query.device)
    mask = torch.cat([torch.ones(t, p, dtype=torch.bool, device=query.device), idx[None, :] <= idx[:, None]], -1)
    return torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling,
                                                            enable_gqa=query.shape[1] != key.shape[1])


def before() -> None:
    static_cache.poq_attention = _masked_poq_attention
    w4.DEQUANT_MIN_ROWS = 1 << 62


GEMM_SHAPES = ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008))  # 7B: qkv, o, gate_up, down


def gemm_sweep(rows: list[int]) -> list[dict]:
    """Each 7B projection at each row count: the tiled INT4 kernel, dequantization + cuBLAS, cuBLAS alone on a
    float16 weight made beforehand (the floor), ms."""
    out = []
    print(f"{'N x K':12} {'rows':>6} {'tiled':>9} {'dequant':>9} {'cuBLAS':>9}")
    for n, k in GEMM_SHAPES:
        w = random_w4(n, k)
        wf = w4.w4_dequantize(w.qweight, w.scales, w.zeros, k, 128)
        for m in rows:
            x = torch.randn(m, k, device=DEV, dtype=torch.float16)
            saved, times = w4.DEQUANT_MIN_ROWS, {}
            for name, limit in (("tiled", 1 << 62), ("dequant", 1)):
                w4.DEQUANT_MIN_ROWS = limit
                fn = functools.partial(w4.w4_linear, x, w.qweight, w.scales, w.zeros, 128)
                fn()
                times[name] = _time_ms(fn, 10)
            w4.DEQUANT_MIN_ROWS = saved
            times["cublas"] = _time_ms(functools.partial(torch.mm, x, wf.t()), 10)
            out.append({"n": n, "k": k, "rows": m, **times})
            print(f"{n:5d}x{k:<6d} {m:6d} {times['tiled']:9.3f} {times['dequant']:9.3f} {times['cublas']:9.3f}",
                  flush=True)
    return out


def _peak_gb(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


def wkvq_prefill(config, prompt: int, repeats: int) -> dict:
    model = random_fast_llama(config, prompt + 8)
    ids = torch.randint(0, config.vocab_size, (1, prompt), device=DEV)
    cache = model.new_cache(1, prompt + 8)

    def run():
        cache.length = 0
        cache.pos.zero_()
        return model.forward(ids, cache)

    return _measure(run, repeats)


def _measure(run, repeats: int) -> dict:
    """One prefill cell: ``run`` once untimed, then its median ms over ``repeats`` and the peak memory it adds;
    with ``--profile`` its top kernels, with ``--memory`` what it holds at its peak."""
    run()
    out = {"ms": _time_ms(run, repeats), "peak_GB": _peak_gb(run)}
    if PROFILE:
        out["kernels"] = _top_kernels(run)
    if MEMORY:
        out["memory"] = peak_owners(run)
    return out


def _top_kernels(fn, n: int = 8) -> list:
    """The ``n`` kernels with the most GPU time in one call of ``fn``: [name, ms, calls]."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:n]
    return [[e.key[:90], round(e.device_time_total / 1e3, 2), e.count] for e in rows]


PROFILE = False  # --profile
MEMORY = False  # --memory


def _caller_frame(frames) -> str:
    """The innermost Python frame of ``frames`` (a memory-history trace's, innermost first) outside torch."""
    for f in frames:
        name = f["filename"]
        if name.endswith(".py") and "/torch/" not in name:
            return f"{Path(name).parent.name}/{Path(name).name}:{f['line']} {f['name']}"
    return "?"


def peak_owners(fn, n: int = 10) -> dict:
    """What is allocated at the peak of one call of ``fn`` that was not before it: replays the CUDA caching
    allocator's trace (``torch.cuda.memory._record_memory_history``) and groups the blocks live at the highest
    point by the innermost line outside torch that allocated them (:func:`_caller_frame`): ``{"peak_GB",
    "owners": [[line, GB, blocks]]}``, the ``n`` largest."""
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    try:
        fn()
        torch.cuda.synchronize()
        trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    live, now, best, at_best = {}, 0, 0, {}
    for ev in trace:
        if ev["action"] == "alloc":
            live[ev["addr"]] = (ev["size"], _caller_frame(ev.get("frames", [])))
            now += ev["size"]
            if now > best:
                best, at_best = now, dict(live)
        elif ev["action"] == "free_completed" and ev["addr"] in live:
            now -= live.pop(ev["addr"])[0]
    owners: dict[str, list] = {}
    for size, where in at_best.values():
        o = owners.setdefault(where, [where, 0.0, 0])
        o[1] += size / 1e9
        o[2] += 1
    top = sorted(owners.values(), key=lambda o: -o[1])[:n]
    return {"peak_GB": best / 1e9, "owners": [[w, round(gb, 3), c] for w, gb, c in top]}


def fp16_prefill(config, prompt: int, repeats: int) -> dict:
    from transformers import StaticCache

    from runtime.cache import CACHE_KWARG

    model = random_hf(config, torch.float16)
    cache = StaticCache(config=config, max_cache_len=prompt + 8)
    ids = torch.randint(0, config.vocab_size, (1, prompt), device=DEV)
    pos = torch.arange(prompt, device=DEV)

    def run():
        cache.reset()
        with torch.no_grad():
            return model(ids, use_cache=True, logits_to_keep=1, cache_position=pos, **{CACHE_KWARG: cache}).logits

    return _measure(run, repeats)


PATHS = {"wkvq": wkvq_prefill, "fp16": fp16_prefill}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="7b")
    p.add_argument("--prompts", default="2048,32768")
    p.add_argument("--paths", default="wkvq,fp16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path)
    p.add_argument("--profile", action="store_true", help="also list each cell's top kernels by GPU time")
    p.add_argument("--memory", action="store_true", help="also list what the W4KV4 prefill holds at its peak, by line")
    p.add_argument("--before", action="store_true", help="the projections and attention as before the thirty-seventh session")
    p.add_argument("--gemm", help="rows (comma-separated): time the 7B projections alone instead")
    a = p.parse_args(argv)
    global PROFILE, MEMORY
    PROFILE, MEMORY = a.profile, a.memory
    if a.gemm:
        rows = gemm_sweep([int(x) for x in a.gemm.split(",")])
        if a.json:
            a.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "gemm": rows}, indent=1))
        return 0
    if a.before:
        before()
    shapes, paths = a.shapes.split(","), a.paths.split(",")
    bad = [s for s in shapes if s not in SHAPES] + [q for q in paths if q not in PATHS]
    if bad:
        p.error(f"unknown shape or path {bad}; shapes: {', '.join(SHAPES)}; paths: {', '.join(PATHS)}")
    rows = []
    print(f"{'shape':6} {'path':6} {'prompt':>7} {'ms':>10} {'tok/s':>10} {'peak GB':>8}")
    for shape in shapes:
        for path in paths:
            for prompt in (int(x) for x in a.prompts.split(",")):
                try:
                    r = PATHS[path](llama_config(shape), prompt, a.repeats)
                except torch.OutOfMemoryError as e:
                    r = {"error": f"out of memory: {str(e).splitlines()[0]}"}
                row = {"shape": shape, "path": path, "prompt": prompt,
                       "variant": "before" if a.before and path == "wkvq" else "", **r}
                rows.append(row)
                if "ms" in r:
                    print(f"{shape:6} {path:6} {prompt:7d} {r['ms']:10.1f} {prompt / r['ms'] * 1e3:10.0f} "
                          f"{r['peak_GB']:8.2f}", flush=True)
                    for k in r.get("kernels", []):
                        print(f"    {k[1]:9.2f} ms {k[2]:5d}x  {k[0]}")
                    if "memory" in r:
                        print(f"    traced peak {r['memory']['peak_GB']:.2f} GB, held by:")
                        for w, gb, c in r["memory"]["owners"]:
                            print(f"    {gb:8.3f} GB {c:5d}x  {w}")
                else:
                    print(f"{shape:6} {path:6} {prompt:7d} {r['error']}", flush=True)
                gc.collect()
                torch.cuda.empty_cache()
    if a.json:
        a.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "device": torch.cuda.get_device_name(),
                                      "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
