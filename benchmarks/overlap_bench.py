"""The W4KV4 decode step with and without the kernels' overlap features (:mod:`runtime.kernels.overlap`), side by
side in one process: one random LLaMA-shaped model (GEMV projections), one filled cache per prompt, the step
captured in a CUDA graph once per variant (environment switches such as ``WKVQ_PDL``, ``WKVQ_GEMV_L2``,
``WKVQ_ATTN_L2``, ``WKVQ_MMA``; each variant sets its own, the others keep the last value set)
and timed by replay (median of ``--steps``). Each variant's first logits are compared with the first variant's
(same cache state and token): a race between overlapped kernels would show there.

    python3 benchmarks/overlap_bench.py --shape 7b --prompts 2048,32768 --json overlap.json

Prints a table (ms/token, the fraction of the copy rate the step's bytes would need, the logits' difference) and
writes the JSON record. CUDA only.
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

from converter.bench import SHAPES, _time_ms, copy_bandwidth, llama_config
from converter.bench_paths import _fill_random, _weight_bytes, random_fast_llama
from runtime.fast import DecodeGraph

# name -> environment. "base" twice: the logits' run-to-run difference (the order of float32 atomic adds)
OFF = {"WKVQ_PDL": "0", "WKVQ_GEMV_L2": "0", "WKVQ_ATTN_L2": "0"}
VARIANTS = {
    "base": OFF,
    "base2": OFF,
    "pdl": {**OFF, "WKVQ_PDL": "1"},
    "pdl-gemv": {**OFF, "WKVQ_PDL": "gemv"},
    "pdl-attn": {**OFF, "WKVQ_PDL": "attn,attn_mma"},
    "pdl-small": {**OFF, "WKVQ_PDL": "rope,norm,silu"},
    "pdl-nogemv": {**OFF, "WKVQ_PDL": "attn,attn_mma,rope,norm,silu"},
    "pdl-default": {**OFF, "WKVQ_PDL": "gemv,norm,silu,attn_mma"},  # overlap.PDL_DEFAULT
    "gemv_l2": {**OFF, "WKVQ_GEMV_L2": "1"},
    "attn_l2a4": {**OFF, "WKVQ_ATTN_L2": "4"},
}


def parse_variants(text: str) -> dict[str, dict[str, str]]:
    """Names of :data:`VARIANTS` and/or ``name:VAR=value,VAR=value`` specs, separated by ``;`` (e.g.
    ``base;mma0:WKVQ_MMA=0``)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, spec = part.partition(":")
        if spec:
            try:
                out[name] = dict(item.split("=", 1) for item in spec.split(","))
            except ValueError:
                raise SystemExit(f"overlap_bench: variant {part!r}: write name:VAR=value,VAR=value") from None
        elif name in VARIANTS:
            out[name] = VARIANTS[name]
        else:
            raise SystemExit(f"overlap_bench: unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    return out


def time_step(model, cache, ids, prompt: int, steps: int) -> tuple[float, torch.Tensor]:
    """The decode step captured for ``cache`` filled to ``prompt`` tokens (under the current environment): the
    median ms of ``steps`` replays (the past grows by ``steps`` tokens) and the logits of the first replay."""
    cache.length = prompt
    cache.pos.fill_(prompt)
    graph = DecodeGraph(model, cache)
    logits = graph.step(ids).float().clone()
    cache.length = prompt
    cache.pos.fill_(prompt)
    graph.step(ids)
    return _time_ms(lambda: graph.step(ids), steps), logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompts", default="2048,32768")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--variants", default=";".join(VARIANTS))
    ap.add_argument("--projections", default="gemv")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("overlap_bench: needs a CUDA device")
    variants = parse_variants(args.variants)
    prompts = [int(p) for p in args.prompts.split(",")]
    config = llama_config(args.shape)
    model = random_fast_llama(config, max(prompts) + args.steps + 16).with_projections(args.projections)
    ids = torch.randint(0, config.vocab_size, (args.batch,), device="cuda")
    copy = copy_bandwidth()
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "shape": args.shape, "batch": args.batch, "steps": args.steps,
              "copy_bandwidth_GBps": copy / 1e9, "rows": []}
    print(f"{args.shape} b{args.batch}, copy rate {copy / 1e9:.0f} GB/s")
    print(f"{'prompt':>7} {'variant':<14} {'ms/token':>9} {'of copy':>8} {'logits diff':>12}")
    for prompt in prompts:
        cache = model.new_cache(args.batch, prompt + args.steps + 16)
        _fill_random(cache, prompt)
        nbytes = _weight_bytes(model) + cache.nbytes() * prompt // cache.max_len
        first = None
        for name, env in variants.items():
            os.environ.update(env)
            ms, logits = time_step(model, cache, ids, prompt, args.steps)
            first = logits if first is None else first
            diff = ((logits - first).norm() / first.norm()).item()
            row = {"prompt": prompt, "variant": name, "env": env, "ms_per_token": ms,
                   "bytes_per_step": nbytes, "bandwidth_fraction": nbytes / (ms / 1e3) / copy,
                   "logits_rel_diff": diff}
            result["rows"].append(row)
            print(f"{prompt:7d} {name:<14} {ms:9.3f} {row['bandwidth_fraction']:8.1%} {diff:12.2e}", flush=True)
            Path(args.json).write_text(json.dumps(result, indent=1))
        del cache
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
