"""Why the bench's fp16 baseline (transformers StaticCache + ``torch.compile(mode="reduce-overhead")``, the
``fp16_compiled`` path) at 7B b1 p32768 took ~9.4-9.6 ms in some runs and ~10.4-10.5 in others, each a fresh
process minutes apart (sessions 23-32, BENCHMARKS.md): one run's median step (the bench's own timing) and its kernel
time per step by kernel name under ``torch.profiler``. Run it several times in fresh processes, then set the records
side by side: the kernels whose time differs between a fast and a slow run say where the two modes part.

    python3 benchmarks/fp16_probe.py --shape 7b --prompt 32768 --json fp16_1.json      # CUDA only
    python3 benchmarks/fp16_probe.py --compare fp16_1.json fp16_2.json ...             # no GPU

The record keeps the SDPA backends torch reports as enabled and the kernel names (the attention's name tells which
backend ran: flash, memory-efficient or math).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decode_profile import kernel_times, probe_args
from converter.bench import llama_config


def compare(records: dict[str, dict], top: int = 12) -> list[tuple[str, list[float]]]:
    """``[(kernel name, [us a step in each record, 0.0 where it did not run])]``: first the step's median ms (as
    ``"step ms"``), then the ``top`` kernels whose times differ most between the records, largest spread first."""
    names = {r["name"] for rec in records.values() for r in rec["kernels"]}
    per = {n: [next((r["us"] for r in rec["kernels"] if r["name"] == n), 0.0) for rec in records.values()]
           for n in names}
    spread = sorted(names, key=lambda n: (-(max(per[n]) - min(per[n])), n))
    return [("step ms", [rec["ms_per_token"] for rec in records.values()])] + [(n, per[n]) for n in spread[:top]]


def print_compare(records: dict[str, dict], top: int = 12) -> None:
    print("  ".join(f"{Path(p).stem[:12]:>12}" for p in records) + "  kernel (us a step)")
    for name, values in compare(records, top):
        print("  ".join(f"{v:12.3f}" for v in values) + f"  {name[:100]}")


def main() -> None:
    args = probe_args("fp16_probe", __doc__, 32768, print_compare,
                      lambda ap: ap.add_argument("--wkvq", action="store_true", help="time the W4KV4 step too"))
    if args is None:
        return
    from converter import bench_paths as bp

    config = llama_config(args.shape)
    # room for the timed steps, the profiled ones and the queued ones after them
    model, cache, step = bp.hf_stepper(config, args.batch, args.prompt, 3 * args.steps, torch.float16)
    ms = bp.median_steps(step, args.steps)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    queued = bp.queued_steps(step, args.steps)
    rows = kernel_times(prof, args.steps)
    backends = {b: getattr(torch.backends.cuda, f"{b}_sdp_enabled")() for b in ("flash", "mem_efficient", "math")}
    print(f"{args.shape} b{args.batch} p{args.prompt} fp16 compiled: {ms:.3f} ms a step (median of {args.steps}), "
          f"{queued:.3f} queued, {sum(r['us'] for r in rows):.1f} us summed kernel time; SDPA enabled: {backends}")
    for r in rows[:12]:
        print(f"{r['us']:9.1f} {r['calls']:6.0f}  {r['name'][:110]}")
    wkvq = {}
    if args.wkvq:  # the W4KV4 step in the same process, both ways
        del model, cache, step
        torch.cuda.empty_cache()
        _, _, graph, ids = bp.wkvq_decode_graph(config, args.batch, args.prompt, 3 * args.steps)
        wkvq = bp.step_times(lambda: graph.step(ids), args.steps)
        print(f"wkvq: {wkvq['ms_per_token']:.3f} ms a step (median), {wkvq['queued_ms']:.3f} queued; fp16/wkvq "
              f"{ms / wkvq['ms_per_token']:.2f}x (median), {queued / wkvq['queued_ms']:.2f}x (queued)")
    Path(args.json).write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d %H:%M"), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
         "shape": args.shape, "batch": args.batch, "prompt": args.prompt, "steps": args.steps, "ms_per_token": ms,
         "queued_ms": queued, "wkvq": wkvq,
         "sdpa_enabled": backends, "kernels": [{**r, "name": r["name"][:200]} for r in rows]}, indent=1))


if __name__ == "__main__":
    main()
