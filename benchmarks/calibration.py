"""Calibration time and peak GPU memory of the full WKVQuant per-block recipe on a random model of a named shape.

Builds the decoder blocks of a random LLaMA lazily (never the whole model), calibrates the first
``--blocks`` of them with the real per-block recipe (CRR window of ``--crr-k`` following blocks,
``--nsamples`` x ``--seqlen`` random embeddings, ``--epochs``), measures seconds per block and the
peak GPU memory, and extrapolates the time to all blocks (labelled as an extrapolation). With ``--e2e-samples N``
it measures the end-to-end stage instead (``converter/e2e.py``: the blocks paged from the host onto the device one
at a time on CUDA unless ``--no-e2e-offload``, fp16 weights as for a float16 checkpoint, the full ``--nsamples``
teacher states on the host, as in a real run) over N samples and extrapolates its time to ``--nsamples``. Prints a
table and writes JSON::

    python benchmarks/calibration.py --shape llama2-7b --blocks 2 --json calib-7b.json
    python benchmarks/calibration.py --shape llama2-7b --e2e-samples 8 --e2e-epochs 2 --json e2e-7b.json
    python benchmarks/calibration.py --shape llama2-7b --e2e-samples 8 --e2e-epochs 2 --e2e-rounding --json e2e-7b-r.json
    python benchmarks/calibration.py --shape tiny --blocks 2 --nsamples 4 --seqlen 32 --epochs 1 --device cpu
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import click
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from converter import calibrate as C
from converter import e2e, lwc
from converter.export import WeightQuantConfig
from runtime import quant
from runtime.kvquant import KVQuantConfig, KVQuantizer

log = logging.getLogger("benchmarks.calibration")

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, vocab_size=32000),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0),
    "tiny": dict(hidden_size=160, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=320),
}


def shape_config(shape: str) -> LlamaConfig:
    if shape not in SHAPES:
        raise click.BadParameter(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    return LlamaConfig(max_position_embeddings=4096, **SHAPES[shape])


class LazyLayers:
    """``len()`` = the model's layers; ``[i]`` builds random block ``i`` on CPU (seeded by ``i``),
    keeping only the ``keep`` most recently built blocks in memory."""

    def __init__(self, config: LlamaConfig, seed: int = 0, keep: int = 8, std: float = 0.02,
                 dtype: torch.dtype = torch.float32):
        self.config, self.seed, self.keep, self.std, self.dtype = config, seed, keep, std, dtype
        self.cache: OrderedDict[int, torch.nn.Module] = OrderedDict()

    def __len__(self) -> int:
        return self.config.num_hidden_layers

    def __getitem__(self, i: int) -> torch.nn.Module:
        if not 0 <= i < len(self):
            raise IndexError(i)
        if i not in self.cache:
            self.cache[i] = self._build(i)
            while len(self.cache) > self.keep:
                self.cache.popitem(last=False)
        self.cache.move_to_end(i)
        return self.cache[i]

    def _build(self, i: int) -> torch.nn.Module:
        gen = torch.Generator().manual_seed(self.seed * 1000 + i)
        with torch.device("meta"):
            layer = LlamaDecoderLayer(self.config, i)
        state = {}
        for name, p in layer.state_dict().items():
            if name.endswith("norm.weight"):
                state[name] = torch.ones(p.shape)
            else:
                state[name] = torch.randn(p.shape, generator=gen) * self.std
        state = {k: v.to(self.dtype) for k, v in state.items()}
        layer.load_state_dict(state, assign=True)
        return layer.eval()


@dataclass(frozen=True)
class BenchResult:
    shape: str
    device: str
    blocks_measured: int
    num_layers: int
    recipe: dict
    compiled: bool
    block_train_seconds: list
    wall_seconds: float
    seconds_per_block: float
    extrapolated_total_seconds: float
    peak_gpu_memory_bytes: int | None


def run(shape: str, blocks: int, calib: C.CalibConfig, device: torch.device, seed: int = 0) -> BenchResult:
    config = shape_config(shape)
    layers = LazyLayers(config, seed, keep=calib.crr_k + 3)
    blocks = min(blocks, len(layers))
    dtype = C.resolve_compute_dtype(calib.compute_dtype, device)
    setup = C.BlockSetup(WeightQuantConfig(), KVQuantConfig(), calib, device, dtype, seed)
    gen = torch.Generator().manual_seed(seed)  # the embedded samples stay on CPU; the calibration copies them
    x0 = torch.randn(calib.nsamples, calib.seqlen, config.hidden_size, generator=gen, dtype=dtype).mul_(0.5)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    results = C.calibrate_blocks(layers, lwc.calib_model_config(config), LlamaRotaryEmbedding(config), x0, setup,
                                 num_blocks=blocks)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    per_block = wall / blocks
    return BenchResult(shape, str(device), blocks, len(layers), calib.to_dict(), calib.compile,
                       [round(r.seconds, 3) for r in results], round(wall, 3), round(per_block, 3),
                       round(per_block * len(layers), 1), peak)


class RandomLM(torch.nn.Module):
    """What the end-to-end stage reads of a causal LM: ``model.layers``, ``model.norm``, the LM head."""

    def __init__(self, config: LlamaConfig, layers, dtype: torch.dtype, seed: int = 0):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList(layers)
        self.model.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps).to(dtype)
        gen = torch.Generator().manual_seed(seed)
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.randn(self.lm_head.weight.shape, generator=gen) * 0.02)

    def get_output_embeddings(self):
        return self.lm_head


def initial_params(layer, config: LlamaConfig, wcfg: WeightQuantConfig, decisions: bool = False,
                   seed: int = 0) -> lwc.BlockParams:
    """Block parameters as the block-wise stage starts them: LWC clips at ``sigmoid(LWC_INIT)``,
    smoothing ``s = 1``, ``delta = 0``; with ``decisions`` also random rounding decisions (-1/0/+1 per weight), as
    blocks calibrated with ``--rounding learned`` carry (their memory, not their values, matters here)."""
    clip = torch.sigmoid(torch.tensor(lwc.LWC_INIT)).item()
    clips, rounding = {}, {}
    gen = torch.Generator().manual_seed(seed)
    for name in lwc.DECODER_LINEARS:
        lin = layer.get_submodule(name)
        shape = (lin.out_features, quant.num_groups(lin.in_features, wcfg.group_size))
        clips[name] = (torch.full(shape, clip), torch.full(shape, clip))
        if decisions:
            rounding[name] = torch.randint(-1, 2, lin.weight.shape, generator=gen, dtype=torch.int8)
    kv = dict(KVQuantizer(*lwc.kv_shape(config)).named_buffers())  # the RTN values s = 1, delta = 0
    return lwc.BlockParams(clips=clips, rounding=rounding, kv=kv)


@dataclass(frozen=True)
class E2EResult:
    shape: str
    device: str
    recipe: dict
    compiled: bool
    paged: bool
    samples_measured: int
    seconds_measured: float
    phase_seconds: dict  # setup, kl (both passes), train, fold: converter.e2e.Phases
    extrapolated_seconds: float
    peak_gpu_memory_bytes: int | None
    # paged: the measured peak plus the device states of the samples not measured (the KL passes hold every
    # sample's there, converter.e2e.mean_kl_paged)
    peak_gpu_memory_extrapolated_bytes: int | None = None


def run_e2e(shape: str, samples: int, calib: C.CalibConfig, device: torch.device, seed: int = 0) -> E2EResult:
    """The end-to-end stage over ``samples`` of the recipe's ``nsamples`` (the teacher states of all
    ``nsamples`` on the host, as in a real run; with ``--rounding learned`` the blocks carry rounding decisions, as
    learned blocks do); its time extrapolated to ``nsamples`` by :func:`extrapolate` (the KL passes and the
    training scaled by ``nsamples / samples``, building and folding the blocks once)."""
    config = shape_config(shape)
    samples = min(samples, calib.nsamples)
    dtype = C.resolve_compute_dtype(calib.compute_dtype, device)
    setup = C.BlockSetup(WeightQuantConfig(), KVQuantConfig(), calib, device, dtype, seed)
    # float16 weights as in a float16 checkpoint (LWCLinear keeps them in float16 on the device)
    layers = LazyLayers(config, seed, keep=config.num_hidden_layers, dtype=torch.float16)
    model = RandomLM(config, [layers[i] for i in range(len(layers))], dtype, seed)
    results = [initial_params(model.model.layers[i], config, setup.weight, calib.rounding == "learned", seed + i)
               for i in range(len(layers))]
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(samples, calib.seqlen, config.hidden_size, generator=gen, dtype=dtype).mul_(0.5)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    fp_out = torch.randn(calib.nsamples, calib.seqlen, config.hidden_size, generator=gen, dtype=dtype)  # on the host
    start = time.perf_counter()
    _, summary = e2e.tune(model, lwc.calib_model_config(config), x0, fp_out,
                          C.rope(LlamaRotaryEmbedding(config), calib.seqlen, device), results, setup)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    paged = e2e.offloaded(calib, device)
    more_states = (calib.nsamples - samples) * x0[0].numel() * x0.element_size() if paged else 0
    return E2EResult(shape, str(device), calib.to_dict(), calib.compile, paged, samples,
                     round(wall, 3), summary["phase_seconds"], round(extrapolate(summary["phase_seconds"], wall,
                                                                                   calib.nsamples / samples), 1),
                     peak, None if peak is None else peak + more_states)


def extrapolate(phases: dict, wall: float, scale: float) -> float:
    """The stage's seconds for ``scale`` times the measured samples: the KL passes and the training scale with the
    samples, building the students (``setup``), folding and the rest of ``wall`` do not."""
    per_sample = phases.get("kl", 0.0) + phases.get("train", 0.0)
    return wall + per_sample * (scale - 1)


def peak_text(peak: int | None) -> str:
    return "n/a (CPU)" if peak is None else f"{peak / 2**30:.2f} GiB"


def report(r, rows) -> str:
    """Shape, device, ``rows`` and the peak memory of result ``r`` as two aligned columns."""
    rows = [("shape", r.shape), ("device", r.device), *rows,
            ("peak GPU memory (measured)", peak_text(r.peak_gpu_memory_bytes))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def e2e_table(r: E2EResult) -> str:
    rec = r.recipe
    return report(r, [
        ("end-to-end stage", f"{rec['e2e_epochs']} epochs over {rec['nsamples']} x {rec['seqlen']} tokens, "
                             f"rounding offsets {'on' if rec['e2e_rounding'] else 'off'}, {rec['compute_dtype']}, "
                             + ("blocks paged from the host" if r.paged else "every block on the device")
                             + (", compiled fake quantization" if r.compiled else "")),
        ("samples measured", f"{r.samples_measured} of {rec['nsamples']}"),
        ("seconds measured", f"{r.seconds_measured:.1f} ("
                             + ", ".join(f"{k} {v:.1f}" for k, v in r.phase_seconds.items()) + ")"),
        (f"EXTRAPOLATED to {rec['nsamples']} samples (KL passes and training scaled)",
         f"{r.extrapolated_seconds / 60:.1f} min"),
        *([(f"peak GPU memory EXTRAPOLATED to {rec['nsamples']} samples (their KL states on the device)",
            peak_text(r.peak_gpu_memory_extrapolated_bytes))] if r.paged and r.peak_gpu_memory_bytes else []),
    ])


def table(r: BenchResult) -> str:
    return report(r, [
        ("recipe", f"{r.recipe['nsamples']} x {r.recipe['seqlen']} tokens, {r.recipe['epochs']} epochs, "
                   f"k={r.recipe['crr_k']}, batch {r.recipe['batch_size']}, {r.recipe['compute_dtype']}"
                   + (", compiled fake quantization" if r.compiled else "")),
        ("blocks measured", f"{r.blocks_measured} of {r.num_layers}"),
        ("training s per block", ", ".join(f"{s:.1f}" for s in r.block_train_seconds)),
        ("wall s per block (incl. targets, propagation)", f"{r.seconds_per_block:.1f}"),
        (f"EXTRAPOLATED total for {r.num_layers} blocks", f"{r.extrapolated_total_seconds / 60:.1f} min"),
    ])


@click.command()
@click.option("--shape", type=click.Choice(list(SHAPES)), default="llama2-7b", show_default=True)
@click.option("--blocks", type=int, default=2, show_default=True, help="Blocks to calibrate and time.")
@click.option("--nsamples", type=int, default=128, show_default=True)
@click.option("--seqlen", type=int, default=2048, show_default=True)
@click.option("--epochs", type=int, default=5, show_default=True)
@click.option("--crr-k", type=int, default=5, show_default=True)
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--calib-dtype", type=click.Choice(list(C.COMPUTE_DTYPES)), default="auto", show_default=True)
@click.option("--rounding", type=click.Choice(C.ROUNDINGS), default=C.CalibConfig.rounding, show_default=True)
@click.option("--tune-norms/--no-tune-norms", default=C.CalibConfig.tune_norms, show_default=True)
@click.option("--e2e-samples", type=int, default=0, show_default=True,
              help="Measure the end-to-end stage over this many samples instead of the block-wise recipe.")
@click.option("--e2e-epochs", type=int, default=C.CalibConfig.e2e_epochs, show_default=True)
@click.option("--e2e-rounding/--no-e2e-rounding", default=C.CalibConfig.e2e_rounding, show_default=True,
              help="The end-to-end stage learns rounding offsets too (the default recipe).")
@click.option("--e2e-offload/--no-e2e-offload", default=None, help="Page the stage's blocks from the host "
              "[default: on CUDA].")
@click.option("--compile", "compiled", is_flag=True, help="torch.compile the fake quantization (convert's --compile).")
@click.option("--device", default=None, help="cuda, cuda:N or cpu [default: cuda if available].")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the result here.")
def main(shape, blocks, nsamples, seqlen, epochs, crr_k, batch_size, calib_dtype, rounding, tune_norms, e2e_samples,
         e2e_epochs, e2e_rounding, e2e_offload, compiled, device, progress, json_path):
    """Time the full per-block calibration recipe on a random model of SHAPE."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if blocks <= 0:
        raise click.BadParameter(f"--blocks must be positive, got {blocks}")
    if e2e_samples < 0:
        raise click.BadParameter(f"--e2e-samples must be >= 0 (0: the block-wise recipe), got {e2e_samples}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    calib = C.CalibConfig(nsamples=nsamples, seqlen=seqlen, epochs=epochs, crr_k=crr_k, batch_size=batch_size,
                          compute_dtype=calib_dtype, rounding=rounding, tune_norms=tune_norms, compile=compiled,
                          progress=progress, e2e_epochs=e2e_epochs if e2e_samples else 0,
                          e2e_rounding=e2e_rounding and bool(e2e_samples), e2e_offload=e2e_offload)
    if e2e_samples:
        result = run_e2e(shape, e2e_samples, calib, dev)
        click.echo(e2e_table(result))
    else:
        result = run(shape, blocks, calib, dev)
        click.echo(table(result))
    if json_path is not None:
        json_path.write_text(json.dumps(result.__dict__, indent=1))
        click.echo(f"wrote {json_path}")


if __name__ == "__main__":
    main()
