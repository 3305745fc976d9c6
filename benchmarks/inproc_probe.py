"""Why the W4KV4 decode step was 1-17% slower when timed in the same process after the fp16 compiled baseline
(thirty-third session, BENCHMARKS.md: 2.607 and 3.019 ms queued at 7B b1 p32768 against 2.586 alone): the step timed
alone, then beside an allocation as large as the baseline's (memory only), then after the baseline ran (its model,
cache and compiled graph still held), then after they are freed. Each stage queued and waited-for
(:func:`converter.bench_paths.queued_steps`, :func:`~converter.bench_paths.median_steps`), three times.

    python3 benchmarks/inproc_probe.py --shape 7b --prompt 32768 --json inproc.json      # CUDA only
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converter.bench import SHAPES, llama_config

STAGES = ("alone", "beside an allocation", "after fp16 compiled", "after it is freed")


def fp16_bytes(config, max_len: int) -> int:
    """The bytes the fp16 baseline holds: its parameters (counted on the meta device) and its static cache."""
    from transformers import LlamaForCausalLM

    from converter.bench_paths import hf_kv_bytes

    with torch.device("meta"):
        params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    return 2 * params + hf_kv_bytes(config, 1, max_len, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--prompt", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("inproc_probe: needs a CUDA device")
    from converter import bench_paths as bp

    config = llama_config(args.shape)
    per_stage = 2 * (args.steps + 1) * args.repeats
    _, _, graph, ids = bp.wkvq_decode_graph(config, 1, args.prompt, per_stage * len(STAGES))
    rows = []

    def time_stage(stage: str) -> None:
        for r in range(args.repeats):
            times = bp.step_times(lambda: graph.step(ids), args.steps)
            median, queued = times["ms_per_token"], times["queued_ms"]
            rows.append({"stage": stage, "repeat": r, "median_ms": median, "queued_ms": queued,
                         "allocated_GB": torch.cuda.memory_allocated() / 1e9})
            print(f"{stage:22} {r}  median {median:.3f}  queued {queued:.3f}  allocated "
                  f"{rows[-1]['allocated_GB']:.1f} GB", flush=True)

    time_stage(STAGES[0])
    held = fp16_bytes(config, args.prompt + 2 * args.steps + 8)  # hf_prefilled's cache
    block = torch.empty(held, dtype=torch.uint8, device="cuda")
    block.fill_(1)
    time_stage(STAGES[1])
    del block
    torch.cuda.empty_cache()
    model, cache, step = bp.hf_stepper(config, 1, args.prompt, 2 * args.steps, torch.float16)
    fp16 = bp.queued_steps(step, args.steps)
    print(f"fp16 compiled queued {fp16:.3f}", flush=True)
    time_stage(STAGES[2])
    del model, cache, step
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    time_stage(STAGES[3])
    Path(args.json).write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d %H:%M"), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
         "shape": args.shape, "prompt": args.prompt, "steps": args.steps, "fp16_queued_ms": fp16,
         "held_GB": held / 1e9, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
