"""Where one decode step's GPU time goes: the CUDA-graph decode step of a random LLaMA-shaped W4KV4 model
(the ``wkvq`` bench path, any projections backend) replayed under ``torch.profiler``, kernel time summed by
kernel name, per step.

    python3 benchmarks/decode_profile.py --shape 7b --prompt 2048 --projections gemv --json prof.json

Prints one row per kernel name (time per step, calls per step, share of the summed kernel time) and the
step's wall time by graph replay (the gap to the summed kernel time is launch latency and idle time between
kernels). CUDA only. With PDL (``WKVQ_PDL``, on by default for the projections, norms and SiLU) a kernel launched
early counts its wait for the one before in its time, and the summed time exceeds the wall time: run with
``WKVQ_PDL=0`` for each kernel's own cost (the record notes which it was).

Then the last step's timeline (:func:`step_timeline`): the idle time between kernels, per kernel name what it adds
to the step's span, the idle time before its starts and its overlap with the kernels before it (PDL), one layer's
kernels with their start, duration, gap and what they add, and what each part of a layer adds (:func:`layer_roles`:
the projections by their order in the layer).

    python3 benchmarks/decode_profile.py --compare a.json b.json [...]

sets the records of earlier runs side by side (no GPU): what each part adds a layer, and the step's wall time,
recomputed from each record's timeline (:func:`record_roles`; records from before the ``adds`` column too).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converter.bench import SHAPES, llama_config  # noqa: E402
from converter.bench_paths import wkvq_decode_graph  # noqa: E402


def kernel_times(prof, steps: int) -> list[dict]:
    """``[{name, us, calls}]`` per step, summed over the profiler's CUDA kernel events, slowest first."""
    us, calls = defaultdict(float), defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            us[ev.name] += ev.device_time / steps if hasattr(ev, "device_time") else ev.cuda_time / steps
            calls[ev.name] += 1
    return sorted(({"name": n, "us": us[n], "calls": calls[n] / steps} for n in us), key=lambda r: -r["us"])


def step_timeline(kernels: list[tuple[str, float, float]], steps: int) -> list[dict]:
    """The last step's kernels in start order (``kernels``: ``(name, start_us, end_us)`` of ``steps`` equal
    steps), each with its ``start`` from the step's first start, its ``dur``, its ``gap``: its start less the
    latest end of the kernels before it in the step (positive: the GPU ran none of them in between; negative:
    it started that much before the last one ended, e.g. launched early by PDL), and what it ``adds``: its end
    less that latest end, if later (the step's span is the first start to the last end, i.e. the sum of what
    each kernel adds plus the idle gaps: with PDL a kernel's duration counts its wait, what it adds does not)."""
    kernels = sorted(kernels, key=lambda k: k[1])
    if not kernels or len(kernels) % steps:
        raise ValueError(f"{len(kernels)} kernel events do not split into {steps} equal steps")
    last = kernels[-(len(kernels) // steps):]
    t0, busy = last[0][1], last[0][1]
    rows = []
    for name, start, end in last:
        rows.append({"name": name, "start": start - t0, "dur": end - start, "gap": start - busy,
                     "adds": max(end - max(busy, start), 0.0)})
        busy = max(busy, end)
    return rows


def timeline_summary(rows: list[dict]) -> list[dict]:
    """Per kernel name of a :func:`step_timeline`: calls, time, what it adds to the step's span, the idle time
    before its starts (positive gaps) and its overlap with the kernels before it (negative gaps), per step; most
    idle first."""
    out: dict[str, dict] = {}
    for r in rows:
        o = out.setdefault(r["name"], {"name": r["name"], "calls": 0, "us": 0.0, "adds": 0.0, "idle_before": 0.0,
                                       "overlap": 0.0})
        o["calls"] += 1
        o["us"] += r["dur"]
        o["adds"] += r["adds"]
        o["idle_before"] += max(r["gap"], 0.0)
        o["overlap"] += max(-r["gap"], 0.0)
    return sorted(out.values(), key=lambda o: -o["idle_before"])


PROJECTION_KERNELS = ("_w4_mma_kernel", "_w4_splitk_kernel", "_w4_gemv_rows_kernel", "_w4_gemv_kernel", "gemlite")
PROJECTIONS = ("qkv", "o", "gate_up", "down")  # their order in a layer
ROLES = ("norm", "qkv", "rope", "attention", "o", "gate_up", "silu", "down", "other")


def role_of(name: str, projection_index: int) -> str:
    """The part of a layer a kernel of a :func:`step_timeline` does: a projection by its order among the step's
    projection kernels (``projection_index``: how many came before it), else by its name."""
    if any(k in name for k in PROJECTION_KERNELS):
        return PROJECTIONS[projection_index % len(PROJECTIONS)]
    for key, role in (("rmsnorm", "norm"), ("silu", "silu"), ("rope_append", "rope"), ("attn", "attention")):
        if key in name:
            return role
    return "other"


def layer_roles(rows: list[dict], layers: int) -> list[dict]:
    """What each part of a layer adds to the step (:func:`step_timeline`'s ``adds``), per step and per layer (the
    step's ``layers``; "other" holds the embedding, the final norm's share of "norm" aside, and the lm_head), in
    :data:`ROLES` order; parts that did not run are left out."""
    out = {role: {"role": role, "calls": 0, "adds": 0.0} for role in ROLES}
    done = 0
    for r in rows:
        role = role_of(r["name"], done)
        done += role in PROJECTIONS
        out[role]["calls"] += 1
        out[role]["adds"] += r["adds"]
    return [{**o, "per_layer": o["adds"] / layers} for o in out.values() if o["calls"]]


def record_roles(record: dict) -> dict[str, float]:
    """What each part adds a layer (:func:`layer_roles`) in a record this script wrote, from its timeline (one step:
    each kernel's name, start and duration), for the record's shape; "other" per step."""
    rows = step_timeline([(r["name"], r["start"], r["start"] + r["dur"]) for r in record["timeline"]], 1)
    layers = llama_config(record["shape"]).num_hidden_layers
    return {o["role"]: o["adds"] if o["role"] == "other" else o["per_layer"] for o in layer_roles(rows, layers)}


def compare(records: dict[str, dict]) -> list[tuple[str, list[float | None]]]:
    """Rows of :func:`print_compare`: per part of a layer (:data:`ROLES` order), what it adds in each record
    (:func:`record_roles`; None where it did not run), then "layer" (their sum but "other"), "other" (per step) and
    "wall" (the step's wall time)."""
    roles = [record_roles(r) for r in records.values()]
    out = [(role, [r.get(role) for r in roles]) for role in ROLES if role != "other" and any(role in r for r in roles)]
    out.append(("layer", [sum(v for k, v in r.items() if k != "other") for r in roles]))
    out.append(("other", [r.get("other") for r in roles]))
    out.append(("wall", [r["wall_us"] for r in records.values()]))
    return out


def print_compare(records: dict[str, dict]) -> None:
    """:func:`compare` as a table: one column per record (its name), and the last one's difference to the first."""
    names = ["/".join(Path(n).parts[-2:])[-24:] for n in records]  # the record's folder and file name
    print(f"{'us':>10} " + " ".join(f"{n:>24}" for n in names) + f" {'last - first':>13}")
    for role, vals in compare(records):
        cells = " ".join(f"{'-' if v is None else f'{v:.2f}':>24}" for v in vals)
        diff = (f"{vals[-1] - vals[0]:+13.2f}" if len(vals) > 1 and None not in (vals[0], vals[-1]) else "")
        print(f"{role:>10} {cells} {diff}")
    print("(a layer's parts per layer; other and wall per step)")


def print_timeline(rows: list[dict], anchor: str, width: int = 10) -> None:
    """The step's idle time, the per-kernel summary and ``width`` kernels from two before the middle call of
    the kernel named ``anchor`` (e.g. the attention: about one layer)."""
    idle = sum(max(r["gap"], 0.0) for r in rows)
    span = max(r["start"] + r["dur"] for r in rows)
    print(f"\ntimeline of the last step: span {span:.1f} us, idle {idle:.1f} us between kernels")
    print(f"{'calls':>6} {'us':>8} {'adds':>8} {'idle before':>12} {'overlap':>8}  kernel")
    for o in timeline_summary(rows):
        print(f"{o['calls']:6d} {o['us']:8.1f} {o['adds']:8.1f} {o['idle_before']:12.1f} {o['overlap']:8.1f}  "
              f"{o['name'][:80]}")
    at = [i for i, r in enumerate(rows) if r["name"] == anchor]
    if at:
        i0 = max(at[len(at) // 2] - 2, 0)
        print(f"\none layer (from two kernels before the middle {anchor[:40]}):")
        print(f"{'start':>9} {'dur':>7} {'gap':>7} {'adds':>7}  kernel")
        for r in rows[i0:i0 + width]:
            print(f"{r['start']:9.1f} {r['dur']:7.1f} {r['gap']:7.1f} {r['adds']:7.1f}  {r['name'][:80]}")


def probe_args(name: str, doc: str, prompt: int, print_records, extra=lambda ap: None) -> argparse.Namespace | None:
    """The step probes' command line (this one's and ``fp16_probe.py``'s): ``--shape --batch --prompt --steps
    --json`` (and what ``extra`` adds to the parser), or ``--compare RECORD...``, whose records ``print_records``
    sets side by side (then None). Without either, a one-line usage error; without a CUDA device (needed for
    anything but ``--compare``), the one line ``NAME: needs a CUDA device``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=prompt)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", help="where to write the record (required unless --compare)")
    ap.add_argument("--compare", nargs="+", metavar="RECORD", help="records of earlier runs to set side by side")
    extra(ap)
    args = ap.parse_args()
    if args.compare:
        print_records({path: json.loads(Path(path).read_text()) for path in args.compare})
        return None
    if not args.json:
        ap.error("--json is required (or --compare RECORD ...)")
    if not torch.cuda.is_available():
        sys.exit(f"{name}: needs a CUDA device")
    return args


def main() -> None:
    args = probe_args("decode_profile", __doc__, 2048, print_compare,
                      lambda ap: ap.add_argument("--projections", default="gemv", help="triton, gemlite or gemv"))
    if args is None:
        return
    _, _, graph, ids = wkvq_decode_graph(llama_config(args.shape), args.batch, args.prompt, 2 * args.steps,
                                         args.projections)
    for _ in range(3):
        graph.step(ids)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.steps):
        graph.step(ids)
    torch.cuda.synchronize()
    wall_us = (time.perf_counter() - t) / args.steps * 1e6
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            graph.step(ids)
        torch.cuda.synchronize()
    from runtime.kernels import (
        overlap,  # Triton: not needed by the timeline's functions
    )

    rows = kernel_times(prof, args.steps)
    timeline = step_timeline([(ev.name, ev.time_range.start, ev.time_range.end) for ev in prof.events()
                              if ev.device_type == torch.autograd.DeviceType.CUDA], args.steps)
    total = sum(r["us"] for r in rows)
    pdl = sorted(k for k in overlap.KINDS if overlap.pdl("cuda", k))
    if pdl:
        print(f"PDL on for {', '.join(pdl)} (WKVQ_PDL): those kernels' times include their early launch's wait; "
              "WKVQ_PDL=0 gives each kernel's own cost")
    print(f"{args.shape} b{args.batch} p{args.prompt} projections={args.projections}: step {wall_us:.1f} us wall, "
          f"{total:.1f} us summed kernel time, {sum(r['calls'] for r in rows):.0f} kernels per step")
    print(f"{'us/step':>9} {'calls':>6} {'share':>6}  kernel")
    for r in rows:
        print(f"{r['us']:9.1f} {r['calls']:6.0f} {r['us'] / max(total, 1e-9):6.1%}  {r['name'][:110]}")
    attn = [r["name"] for r in rows if "attn" in r["name"]]
    print_timeline(timeline, attn[0] if attn else rows[0]["name"])
    layers = llama_config(args.shape).num_hidden_layers
    roles = layer_roles(timeline, layers)
    print(f"\nwhat each part adds to the step ({layers} layers), us:")
    print("  ".join(f"{o['role']} {o['per_layer']:.2f}/layer" for o in roles if o["role"] != "other")
          + "  other " + f"{sum(o['adds'] for o in roles if o['role'] == 'other'):.1f}/step")
    Path(args.json).write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d %H:%M"), "device": torch.cuda.get_device_name(), "shape": args.shape,
         "batch": args.batch, "prompt": args.prompt, "projections": args.projections, "steps": args.steps,
         "pdl": pdl, "wall_us": wall_us, "kernel_us": total, "kernels": rows, "roles": roles,
         "timeline": [{**r, "name": r["name"][:120]} for r in timeline]}, indent=1))


if __name__ == "__main__":
    main()
