"""Held-out CRR loss of the first blocks of a model under calibration variants (CPU or GPU).

Calibrates blocks ``0..blocks-1`` in order on ``--nsamples`` windows of ``enwiki-sample:calib``
(as ``wkvq-convert`` does: CRR window k = 5, the quantized output of block i feeds block i+1) and
reports, per block, the loss before training, after training, and on ``--held-out`` further windows
never trained on (the applied block, as the artifact computes it). Prints one line per variant::

    python benchmarks/block_probe.py MODEL_DIR --seqlen 512 --nsamples 16 --blocks 8 --variants nearest,gptq
"""

from __future__ import annotations

import time

import click
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from converter import calibrate as C
from converter import data, lwc
from converter.export import WeightQuantConfig
from runtime.kvquant import KVQuantConfig

# the block-wise optimiser before the eighth session (constant rates), which the earlier probes ran with
CONSTANT = {"schedule": "constant", "lwc_lr": 1e-2, "smooth_lr": 5e-3, "round_lr": 5e-3}
VARIANTS = {  # CalibConfig fields over its defaults (rounding "learned" since the fifth session, cos2 since the eighth)
    "nearest": {**CONSTANT, "rounding": "nearest"},
    "gptq": {**CONSTANT, "rounding": "gptq"},
    "learned": {**CONSTANT, "rounding": "learned"},
    "norms": {**CONSTANT, "tune_norms": True, "norm_lr": 1e-3},
    "cos2": {"schedule": "cosine", "lwc_lr": 2e-2, "round_lr": 1e-2, "smooth_lr": 1e-2},  # the default now
}


def probe(model, tokens, variant: dict, seqlen: int, nsamples: int, held_out: int, blocks: int, epochs: int,
          dtype: torch.dtype, device: torch.device) -> list[tuple[float, float, float]]:
    samples = data.calibration_samples(tokens, nsamples + held_out, seqlen, 0)
    x0 = C.embed(model, samples, "cpu", torch.float32)
    config = lwc.calib_model_config(model.config)
    pe = C.rope(model.model.rotary_emb, seqlen, device)
    cc = C.CalibConfig(nsamples=nsamples, seqlen=seqlen, epochs=epochs, progress=False, **variant)
    setup = C.BlockSetup(WeightQuantConfig(), KVQuantConfig(), cc, device, dtype)
    layers, last = model.model.layers, len(model.model.layers) - 1
    x_fp, x_q = x0.to(device, dtype, copy=True), x0.to(device, dtype, copy=True)
    rows = []
    for i in range(blocks):
        window = [lwc.clone_layer(layers[j], config, j, device, dtype) for j in range(i, min(i + cc.crr_k, last) + 1)]
        C.run_blocks(window[:1], x_fp, pe, setup, inplace=True)
        target = C.run_blocks(window[1:], x_fp, pe, setup)
        p = C.calibrate_block(layers[i], config, i, window[1:], x_q[:nsamples], target[:nsamples], pe, setup)
        applied = lwc.applied_block(layers[i], config, i, p, setup.weight, setup.kv, device, dtype)
        held = C.run_blocks([applied, *window[1:]], x_q[nsamples:], pe, setup)
        rows.append((p.initial_loss, p.loss, float(C.crr_loss(held, target[nsamples:]))))
        C.run_blocks([applied], x_q, pe, setup, inplace=True)
    return rows


@click.command()
@click.argument("model_dir")
@click.option("--seqlen", type=int, default=512, show_default=True)
@click.option("--nsamples", type=int, default=16, show_default=True)
@click.option("--held-out", type=int, default=8, show_default=True)
@click.option("--blocks", type=int, default=8, show_default=True)
@click.option("--epochs", type=int, default=2, show_default=True)
@click.option("--variants", default="nearest,gptq", show_default=True, help=f"Of {', '.join(VARIANTS)}.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--device", default="cpu", show_default=True)
def main(model_dir, seqlen, nsamples, held_out, blocks, epochs, variants, dtype, device):
    """Per-block (initial, trained, held-out) CRR losses of MODEL_DIR (an HF folder) per variant."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens = data.tokenize(AutoTokenizer.from_pretrained(model_dir), data.load_text("enwiki-sample:calib"))
    for name in variants.split(","):
        if name not in VARIANTS:
            raise click.BadParameter(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        start = time.perf_counter()
        rows = probe(model, tokens, VARIANTS[name], seqlen, nsamples, held_out, blocks, epochs,
                     getattr(torch, dtype), torch.device(device))
        click.echo(f"{name:8s} held-out: " + " ".join(f"{r[2]:.4f}" for r in rows)
                   + f"   trained: {' '.join(f'{r[1]:.4f}' for r in rows)}"
                   + f"   (initial: {' '.join(f'{r[0]:.4f}' for r in rows)}; {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
