"""Operations and time of one calibration training step of a quantized block, eager vs ``--compile``.

One LWC block (all seven Linears with learnable clipping, optionally rounding offsets; learnable K/V
smoothing, POQ fake quantization) of a named shape, forward + backward on ``--tokens`` random tokens:
the number of top-level operations the profiler sees (each one a dispatch, and on CUDA a kernel
launch or more) and the median wall time per step. The calibration's small-tensor steps are bound by
that count on a GPU. Prints a table and writes JSON::

    python benchmarks/train_step.py --shape smollm2-135m --tokens 2048 --json train_step.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import click
import torch
from torch.profiler import ProfilerActivity, profile
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibration import SHAPES, LazyLayers, shape_config  # noqa: E402

from converter import calibrate as C  # noqa: E402
from converter import lwc  # noqa: E402
from converter.export import WeightQuantConfig  # noqa: E402
from runtime.kvquant import KVQuantConfig, KVQuantizer  # noqa: E402


def block(shape: str, rounding: bool, compiled: bool, device: torch.device):
    config = shape_config(shape)
    mc = lwc.calib_model_config(config)
    blk = lwc.quant_block(LazyLayers(config, keep=1)[0], mc, 0, WeightQuantConfig(), True, device, rounding=rounding,
                          compiled=compiled)
    h, d = lwc.kv_shape(mc)
    rtn = dict(KVQuantizer(h, d, device=device).named_buffers())  # s = 1, delta = 0
    blk.self_attn.register_module("kv_quant", lwc.SmoothedKV(rtn, KVQuantConfig(), compiled))
    return blk.train(), config


def measure(shape: str, tokens: int, rounding: bool, compiled: bool, device: torch.device, steps: int) -> dict:
    blk, config = block(shape, rounding, compiled, device)
    pe = C.rope(LlamaRotaryEmbedding(config), tokens, device)
    x = torch.randn(1, tokens, config.hidden_size, device=device)

    def step():
        blk(x, position_embeddings=pe).float().pow(2).mean().backward()

    for _ in range(2):  # warm-up (compilation)
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ops = sum(1 for e in prof.events() if e.cpu_parent is None)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return {"shape": shape, "tokens": tokens, "rounding": rounding, "compiled": compiled, "device": str(device),
            "top_level_ops": ops, "ms_per_step": round(1e3 * statistics.median(times), 3)}


@click.command()
@click.option("--shape", type=click.Choice(list(SHAPES)), default="smollm2-135m", show_default=True)
@click.option("--tokens", type=int, default=2048, show_default=True)
@click.option("--steps", type=int, default=5, show_default=True, help="Timed steps (median).")
@click.option("--device", default=None, help="cuda, cuda:N or cpu [default: cuda if available].")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def main(shape, tokens, steps, device, json_path):
    """Top-level operations and ms per training step of one quantized block, eager vs compiled."""
    if tokens <= 0 or steps <= 0:
        raise click.BadParameter("--tokens and --steps must be positive")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = [measure(shape, tokens, r, c, dev, steps) for r in (False, True) for c in (False, True)]
    click.echo(f"{'rounding offsets':<17} {'fake quantization':<18} {'top-level ops':>13} {'ms/step':>9}")
    for r in rows:
        click.echo(f"{'on' if r['rounding'] else 'off':<17} {'compiled' if r['compiled'] else 'eager':<18} "
                   f"{r['top_level_ops']:>13} {r['ms_per_step']:>9.2f}")
    if json_path is not None:
        json_path.write_text(json.dumps(rows, indent=1))
        click.echo(f"wrote {json_path}")


if __name__ == "__main__":
    main()
