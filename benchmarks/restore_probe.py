"""Which of a calibrated artifact's weights cost the most perplexity (CPU or GPU).

Loads the artifact's weights alone (its KV quantizers removed: a full-precision cache, as the table row
``NAME:w``), then, one group at a time, restores a group of decoder Linears to the dense model's weights: each
projection kind over every layer, and each third of the layers whole. Prints the decode-simulated perplexity
on the first ``--windows`` held-back windows per group (``none``: nothing restored)::

    python benchmarks/restore_probe.py SmolLM2.gguf ARTIFACT_DIR --windows 4

Read with care: the calibration trains a block's Linears together and each block on the quantized output of
the ones before, so a restored group can raise the perplexity (its quantized neighbours compensated its error).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import runtime
from converter import evaluate, source
from converter.table import split_model
from converter.variants import _replace
from runtime.artifact import DECODER_LINEARS


def groups(num_layers: int) -> dict[str, tuple[tuple[str, ...], range]]:
    """Group name -> (Linears, layers) to restore: none, each projection kind, each third of the layers."""
    out = {"none": ((), range(0))}
    out.update({name.split(".")[1]: ((name,), range(num_layers)) for name in DECODER_LINEARS})
    cuts = [round(num_layers * j / 3) for j in range(4)]
    out.update({f"layers{lo}-{hi - 1}": (DECODER_LINEARS, range(lo, hi)) for lo, hi in itertools.pairwise(cuts)})
    return out


def restored(model, base, names, layers):
    """``model`` with ``names`` of ``layers`` replaced by ``base``'s modules (shared, not copied)."""
    for i in layers:
        for name in names:
            _replace(model.model.layers[i], name, base.model.layers[i].get_submodule(name))
    return model


@click.command()
@click.argument("model")
@click.argument("artifact")
@click.option("--windows", type=int, default=4, show_default=True, help="First N windows of enwiki-sample:eval.")
@click.option("--seqlen", type=int, default=2048, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@torch.no_grad()
def main(model, artifact, windows, seqlen, device):
    """Decode-simulated PPL of ARTIFACT's weights with each group restored to MODEL's (the dense source)."""
    base, tok, _ = source.load_model(model, dtype=torch.float32)
    base = base.to(device).eval()
    ids = evaluate.load_windows(tok, "enwiki-sample:eval", seqlen, windows)
    for name, (names, layers) in groups(base.config.num_hidden_layers).items():
        quant, _ = runtime.load(artifact, device=device, dtype=torch.float32)
        probe = restored(split_model(quant, base, "w"), base, names, layers)
        print(f"{name:14s} {evaluate.perplexity(probe, ids, 'decode', progress=False).ppl:.4f}", flush=True)
        del quant, probe


if __name__ == "__main__":
    main()
