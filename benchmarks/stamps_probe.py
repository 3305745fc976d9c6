"""When the decode step's attention and output projection programs start, get their input and end: the
per-program timestamps of ``runtime.kernels.stamps`` (``WKVQ_STAMPS=1``, set here) of the last layer of a captured
decode step of a random LLaMA-shaped W4KV4 model (the ``wkvq`` bench path), in µs after the attention's first
program started.

    python3 benchmarks/stamps_probe.py --shape 7b --prompt 32768 [--json stamps.json]

Prints, per point (attention: start, ready = after its PDL wait, tiles = after its tiles, end; "heads done": per
KV head, the end of its last program, i.e. its merged output; o: start, ready = its input there, end), the first,
10th, 50th, 90th percentile and last program. CUDA only; the tensor-core attention and GEMV only (the other
kernels write no stamps). The variables of the decode step (``WKVQ_FUSE``, ``WKVQ_PDL``, ...) apply as in the
bench.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.kernels import query_parts, stamps


def layer_report(attn: torch.Tensor, o: torch.Tensor | None, kv_rows: int, splits: int) -> dict:
    """The summary rows (:func:`runtime.kernels.stamps.summary`) of one layer: ``attn`` (``[kv_rows * (splits +
    1), 4]``: row ``kv_row + split * kv_rows``, split ``splits`` the append programs; a KV row is a KV head's part
    of its query heads, :func:`runtime.kernels.query_parts`), the attention programs' points, the append programs',
    "heads done" (per KV row, its splits' latest end) and ``o``'s, all after the earliest attention start."""
    attn = attn[: kv_rows * (splits + 1)].reshape(splits + 1, kv_rows, 4)
    parts, append = attn[:splits].reshape(-1, 4), attn[splits]
    live = parts[(parts != 0).all(dim=1)]
    base = int(live[:, 0].min()) if len(live) else 0
    report = {"attention": stamps.summary(parts, stamps.POINTS["attn"], base),
              "append": stamps.summary(append, stamps.POINTS["attn"], base)}
    done = attn[:splits, :, 3].max(dim=0).values  # per KV row: its splits' latest end (the merge)
    report["heads done"] = stamps.summary(done[:, None], ("end",), base)
    if o is not None:
        report["o"] = stamps.summary(o, stamps.POINTS["o"], base)
    return report


def print_report(report: dict) -> None:
    print(f"{'µs after the attention starts':<32} {'first':>8} {'p10':>8} {'p50':>8} {'p90':>8} {'last':>8}")
    for part, points in report.items():
        for point, q in points.items():
            print(f"{part + ' ' + point:<32} " + " ".join(f"{q[k]:8.2f}" for k in ("first", "p10", "p50", "p90",
                                                                                       "last")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("stamps_probe: needs a CUDA device")
    os.environ[stamps.STAMPS_ENV] = "1"  # before the step is captured
    from converter.bench import SHAPES, llama_config
    from converter.bench_paths import wkvq_decode_graph

    if args.shape not in SHAPES:
        sys.exit(f"stamps_probe: unknown shape {args.shape!r}; use one of {', '.join(sorted(SHAPES))}")
    config = llama_config(args.shape)
    model, cache, graph, ids = wkvq_decode_graph(config, args.batch, args.prompt, 2 * args.steps)
    for _ in range(args.steps):
        graph.step(ids)
    torch.cuda.synchronize()
    attn, o = stamps.read("cuda", "attn"), stamps.read("cuda", "o")
    if attn is None:
        sys.exit("stamps_probe: the attention wrote no stamps (not the tensor-core kernel at this shape)")
    splits = model.splits_for(cache)
    kv = config.num_key_value_heads  # a row of programs a KV head's part of its query heads (query_parts)
    report = layer_report(attn, o, args.batch * kv * query_parts(config.num_attention_heads // kv), splits)
    print(f"{args.shape} b{args.batch} p{args.prompt}, {splits} splits, the last layer of step {args.steps}:")
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "shape": args.shape,
                                               "batch": args.batch, "prompt": args.prompt, "splits": splits,
                                               "env": {k: v for k, v in os.environ.items() if k.startswith("WKVQ_")},
                                               "report": report}, indent=1))


if __name__ == "__main__":
    main()
