"""Probe: what the tensor-core attention's reads of the per-token stats cost (7B, batch 1, 32 heads, rope).

The cache keeps the key/value steps and minima in four ``[B, H, S]`` float16 arrays, so each tile of 64 tokens
reads 4 KB of key codes, 4 KB of value codes (one contiguous block each) and four 128-byte pieces of stats from
four places. This times the table's config over a ring of caches (> L2, as ``benchmarks/attn_bench.py``) as is,
and with every layer of the ring sharing one layer's stats arrays (then they stay in L2: the time without their
DRAM reads). Prints both and writes a JSON record.

    python3 benchmarks/attn_stats_probe.py --json probe.json [--contexts 2048,32768]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.attn_bench import HEAD_DIM, HEADS, _inputs, attend
from benchmarks.gemlite_tune import RING_BYTES
from converter.bench_kernels import graph_ms
from runtime.kernels import kv4
from runtime.static_cache import StaticPOQCache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--contexts", default="2048,32768")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("attn_stats_probe: needs a CUDA device")
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": torch.cuda.get_device_name(), "rows": []}
    for context in (int(c) for c in args.contexts.split(",")):
        probe = StaticPOQCache(1, 1, context + 1, HEADS, HEAD_DIM, device="meta")
        layers = max(2, -(-RING_BYTES // probe.nbytes()))
        inputs = _inputs(1, context, HEADS, HEADS, HEAD_DIM, "cuda", layers, rope=True)
        cfg = kv4.attn_config(1, HEADS, context + 1)
        first = inputs.cache.layers[0]
        shared = [dataclasses.replace(s, k_step=first.k_step, k_min=first.k_min, v_step=first.v_step,
                                      v_min=first.v_min) for s in inputs.cache.layers]
        for name, stores in (("own stats", inputs.cache.layers), ("shared stats", shared)):
            def step(stores=stores, inputs=inputs, cfg=cfg):
                for s in stores:
                    attend(inputs, s, torch.float16, cfg)
            us = graph_ms(step, reps=10) * 1e3 / layers
            row = {"context": context, "stores": name, "config": cfg.label(), "us": us, "ring": layers}
            result["rows"].append(row)
            print(f"b1 p{context:<6} {cfg.label():<28} {name:<13} {us:8.2f} us", flush=True)
        del inputs, shared
        torch.cuda.empty_cache()
    Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
