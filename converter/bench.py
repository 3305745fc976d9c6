"""``wkvq bench``: decode speed and peak memory of W4KV4 against fp16 and int4 baselines (CUDA).

Random models of real LLaMA shapes are built directly on the GPU (speed and memory do not depend
on weight values). Paths:

* ``fp16_eager``: transformers, DynamicCache, fp16, eager.
* ``fp16_compiled``: transformers StaticCache + ``torch.compile(mode="reduce-overhead")``, fp16.
* ``int4_tinygemm``: decoder Linears as ``aten._weight_int4pack_mm`` (int4 g128), bf16 StaticCache, compiled.
* ``wkvq``: :class:`runtime.fast.FastLlama` (INT4 projections on the tensor-core GEMV :mod:`runtime.kernels.w4_mma`
  up to 8 rows, 4-bit POQ attention, Triton) in a CUDA graph. Until the eleventh session ``wkvq`` was the split-K
  projections, now ``wkvq-splitk``, and the GEMV path was ``wkvq-gemv`` (kept: the same as ``wkvq`` now).
* ``wkvq-gemlite``: ``wkvq`` with the INT4 projections on GemLite (optional package, not a default path).
* ``wkvq-splitk``: ``wkvq`` with the split-K ``tl.dot`` projections (:mod:`runtime.kernels.w4`).

The baselines prefill the prompt for real; ``wkvq`` fills its 4-bit cache with random codes
(the decode step reads the same bytes either way). ms/token is the median step time over
``steps`` decode steps after warm-up (one step advances every sequence of the batch by one token), each step
waited for before the next: what a loop that reads every token sees, the host's work before the step's first
kernel included. ``queued`` is the mean over ``steps`` steps queued back to back with one wait at the end: the GPU's
own time a step. The two part where the host is slow: torch.compile's guards and its CUDA graph's input copies take
~1 ms a step at 7B beside ~9 ms of GPU time (thirty-third session), while ``wkvq``'s step is one graph replay. The
positions of the transformers paths are made on the device beforehand (a transformers ``generate`` keeps them there
too), so a step does not wait for a host-to-device copy.

Each row also has the bytes a step must read (``bytes_per_step``: weights, and the cache up to the context) and their
rate as fractions of the copy rate by either time (``bandwidth_fraction``, ``queued_fraction``); ``speedups`` gives
``wkvq``'s speedup over ``fp16_compiled`` by either time beside ``bytes_ratio``, the ratio of their bytes, which is
the speedup at equal fractions (thirty-fourth session, 7B b1 p32768: 3.70x).
"""

from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SHAPES = {  # hidden, layers, heads, kv_heads, intermediate, vocab
    "7b": (4096, 32, 32, 32, 11008, 32000),
    "13b": (5120, 40, 40, 40, 13824, 32000),
    "8b": (4096, 32, 32, 8, 14336, 128256),  # LLaMA-3-8B: grouped-query attention, 4 query heads a KV head
    "70b": (8192, 80, 64, 8, 28672, 32000),  # LLaMA-2-70B (the fp16 baselines do not fit one 141 GB GPU)
    "3b": (3072, 28, 24, 8, 8192, 128256),  # LLaMA-3.2-3B: no table entries (the kernels' guessed configs)
    "tiny": (256, 2, 4, 2, 512, 1000),
}
PATHS = ("fp16_eager", "fp16_compiled", "int4_tinygemm", "wkvq", "wkvq-gemlite", "wkvq-gemv", "wkvq-splitk")
DEFAULT_PATHS = PATHS[:4]  # wkvq-gemlite needs the optional gemlite package; wkvq-gemv and -splitk: for comparison


@dataclass(frozen=True)
class BenchConfig:
    shapes: tuple[str, ...] = ("7b", "13b")
    batches: tuple[int, ...] = (1, 8)
    prompts: tuple[int, ...] = (2048, 32768)
    paths: tuple[str, ...] = DEFAULT_PATHS
    steps: int = 20
    out: Path | None = None

    def __post_init__(self):
        for name, given, allowed in (("shape", self.shapes, SHAPES), ("path", self.paths, PATHS)):
            bad = [g for g in given if g not in allowed]
            if bad:
                raise ValueError(f"unknown {name} {bad}; allowed: {', '.join(allowed)}")
        if self.steps < 2 or min(self.batches + self.prompts) < 1:
            raise ValueError(f"steps must be >= 2 and batches/prompts positive, got {self}")


def llama_config(shape: str):
    from transformers import LlamaConfig

    h, n, heads, kv, inter, vocab = SHAPES[shape]
    return LlamaConfig(hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, num_key_value_heads=kv,
                       intermediate_size=inter, vocab_size=vocab, max_position_embeddings=65536)


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus written."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * nbytes / (_time_ms(lambda: b.copy_(a), 10) / 1e3)


def _time_ms(fn, steps: int) -> float:
    """Median milliseconds of ``fn()`` over ``steps`` calls, timed with CUDA events."""
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def run_bench(cfg: BenchConfig) -> dict:
    """Every (shape, path, batch, prompt) of ``cfg``: a dict with ``rows`` and the copy bandwidth."""
    from . import bench_paths

    if not torch.cuda.is_available():
        raise ValueError("wkvq bench needs a CUDA GPU; none is visible")
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "copy_bandwidth_GBps": copy_bandwidth() / 1e9, "rows": []}
    for shape in cfg.shapes:
        for path in cfg.paths:
            runner = bench_paths.RUNNERS[path]
            for batch in cfg.batches:
                for prompt in cfg.prompts:
                    row = {"shape": shape, "path": path, "batch": batch, "prompt": prompt}
                    row.update(_measure(runner, llama_config(shape), batch, prompt, cfg.steps))
                    row.update(bandwidth_fractions(row, result["copy_bandwidth_GBps"]))
                    log.info("%s", row)
                    result["rows"].append(row)
                    result["speedups"] = speedups(result)
                    if cfg.out:
                        write_json(result, cfg.out)
    return result


def bandwidth_fractions(row: dict, copy_GBps: float) -> dict:
    """A row's bytes a step over its time, as a fraction of the copy rate: ``bandwidth_fraction`` by the
    waited-for median, ``queued_fraction`` by the queued time; empty where the row has no bytes or times."""
    out = {}
    for key, ms in (("bandwidth_fraction", row.get("ms_per_token")), ("queued_fraction", row.get("queued_ms"))):
        if row.get("bytes_per_step") and ms:
            out[key] = row["bytes_per_step"] / (ms / 1e3) / (copy_GBps * 1e9)
    return out


def speedups(result: dict, base: str = "fp16_compiled", path: str = "wkvq") -> list[dict]:
    """For every (shape, batch, prompt) that has ``path`` and ``base`` rows with times: ``path``'s speedup over
    ``base`` by the waited-for medians and by the queued times, and ``bytes_ratio``, ``base``'s bytes a step over
    ``path``'s: the speedup at equal bandwidth fractions (a greater speedup needs ``path`` to stream a larger
    fraction of the copy rate than ``base``)."""
    rows = {(r["shape"], r["batch"], r["prompt"], r["path"]): r for r in result["rows"] if r.get("ms_per_token")}
    out = []
    for (shape, batch, prompt, p), r in rows.items():
        b = rows.get((shape, batch, prompt, base))
        if p != path or b is None:
            continue
        s = {"shape": shape, "batch": batch, "prompt": prompt, "path": path, "base": base,
             "speedup": b["ms_per_token"] / r["ms_per_token"]}
        if r.get("queued_ms") and b.get("queued_ms"):
            s["speedup_queued"] = b["queued_ms"] / r["queued_ms"]
        if r.get("bytes_per_step") and b.get("bytes_per_step"):
            s["bytes_ratio"] = b["bytes_per_step"] / r["bytes_per_step"]
        out.append(s)
    return out


def _measure(runner, config, batch: int, prompt: int, steps: int) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        out = runner(config, batch, prompt, steps)
        out["peak_GB"] = torch.cuda.max_memory_allocated() / 1e9
        out["status"] = "ok"
    except torch.cuda.OutOfMemoryError:
        out = {"status": "oom", "peak_GB": torch.cuda.max_memory_allocated() / 1e9}
    except Exception as e:  # a baseline that fails is reported in its row, the others still run
        log.warning("%s failed: %s", runner.__name__, e)
        out = {"status": f"error: {type(e).__name__}: {str(e)[:200]}"}
    gc.collect()
    torch.cuda.empty_cache()
    return out


def write_json(result: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))


def format_table(result: dict) -> str:
    head = (f"{'shape':5} {'path':14} {'batch':>5} {'prompt':>6} {'ms/token':>9} {'queued':>7} {'peak GB':>8} "
            f"{'GB/step':>7} {'BW frac':>7} {'q frac':>6}  status")
    lines = [f"{result['device']}  copy {result['copy_bandwidth_GBps']:.0f} GB/s  {result['date']}", head]

    def num(r, key, fmt, scale=1.0):
        return format(r[key] * scale, fmt) if r.get(key) is not None else "-"

    for r in result["rows"]:
        lines.append(f"{r['shape']:5} {r['path']:14} {r['batch']:>5} {r['prompt']:>6} "
                     f"{num(r, 'ms_per_token', '9.3f'):>9} {num(r, 'queued_ms', '7.3f'):>7} "
                     f"{num(r, 'peak_GB', '8.2f'):>8} {num(r, 'bytes_per_step', '7.2f', 1e-9):>7} "
                     f"{num(r, 'bandwidth_fraction', '7.2f'):>7} {num(r, 'queued_fraction', '6.2f'):>6}  {r['status']}")
    for s in speedups(result):
        queued = f", queued {s['speedup_queued']:.2f}x" if "speedup_queued" in s else ""
        ratio = f"; bytes ratio {s['bytes_ratio']:.2f}x" if "bytes_ratio" in s else ""
        lines.append(f"{s['path']} vs {s['base']} at {s['shape']} b{s['batch']} p{s['prompt']}: "
                     f"{s['speedup']:.2f}x{queued}{ratio}")
    return "\n".join(lines)
