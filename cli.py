"""Command line: ``wkvq`` (convert, validate, ...) and ``wkvq-convert`` (= ``wkvq convert``).

This module only parses flags, builds configs and calls functions. Errors a user can fix are
printed as one line (``error: ...``) with exit code 1 (2 for bad flags); ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

# transformers' own warnings and progress bars would break the one-line error contract; -v brings logs back
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

USER_ERRORS = (ValueError, FileExistsError, FileNotFoundError, OSError)


class WkvqCommand(click.Command):
    """A command that turns user-fixable exceptions into one line and a non-zero exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            if _debug(ctx):
                raise
            click.echo(f"error: {_one_line(e)}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


class WkvqGroup(click.Group):
    command_class = WkvqCommand

    def main(self, args=None, prog_name=None, **kwargs):
        """Bad flags also get one line (``error: ...``, exit 2) instead of click's usage block."""
        try:
            rv = super().main(args=args, prog_name=prog_name, standalone_mode=False, **kwargs)
            sys.exit(rv if isinstance(rv, int) else 0)  # ctx.exit(n) comes back as n
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        except click.ClickException as e:
            path = e.ctx.command_path.replace("wkvq-convert convert", "wkvq-convert") if e.ctx else ""
            hint = f" (see {path} --help)" if path else ""
            click.echo(f"error: {_one_line(Exception(e.format_message()))}{hint}", err=True)
            sys.exit(e.exit_code)


def _debug(ctx) -> bool:
    while ctx is not None:
        if ctx.params.get("debug"):
            return True
        ctx = ctx.parent
    return False


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not verbose:  # transformers' own loading bars; our calibration/evaluation bars stay
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


debug_option = click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")


@click.group(cls=WkvqGroup)
@debug_option
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
def main(debug: bool, verbose: bool) -> None:
    """WKVQuant: W4KV4 post-training quantization for LLaMA-family models."""
    _setup_logging(verbose)


def _bits(ctx, param, value):
    if value is not None and not 2 <= value <= 8:
        raise click.BadParameter(f"must be between 2 and 8, got {value}")
    return value


def _positive(ctx, param, value):
    if value is not None and value <= 0:
        raise click.BadParameter(f"must be a positive integer, got {value}")
    return value


def convert_options(f):
    opts = [
        click.argument("model", required=False),
        click.option("--out", required=True, type=click.Path(path_type=Path), help="Artifact directory to create."),
        click.option("--method", type=click.Choice(["wkvquant", "rtn"]), default="wkvquant", show_default=True,
                     help="wkvquant: calibrated (LWC, K/V smoothing, CRR); rtn: round-to-nearest."),
        click.option("--wbits", type=int, default=4, show_default=True, callback=_bits),
        click.option("--group-size", type=int, default=128, show_default=True, callback=_positive),
        click.option("--kv-bits", type=int, default=4, show_default=True, callback=_bits),
        click.option("--kv-group-size", type=int, default=None, callback=_positive,
                     help="Channels per KV quantization group [default: head_dim]."),
        click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default="float16",
                     show_default=True, help="dtype of the non-quantized tensors."),
        click.option("--device", default=None, help="cpu, cuda, cuda:N [default: cuda if available]."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--overwrite", is_flag=True, help="Replace a non-empty --out."),
        debug_option,
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _non_negative(ctx, param, value):
    if value is not None and value < 0:
        raise click.BadParameter(f"must be >= 0, got {value}")
    return value


def calibration_options(f):
    """Flags of the wkvquant calibration (ignored by --method rtn); defaults are the paper's recipe."""
    opts = [
        click.option("--calib-data", default="enwiki-sample:calib", show_default=True,
                     help="enwiki-sample:calib, wikitext2 or a text file."),
        click.option("--nsamples", type=int, default=128, show_default=True, callback=_positive),
        click.option("--seqlen", type=int, default=2048, show_default=True, callback=_positive),
        click.option("--epochs", type=int, default=5, show_default=True, callback=_positive),
        click.option("--crr-k", type=int, default=5, show_default=True, callback=_non_negative,
                     help="Blocks after the calibrated one in the CRR loss (0: single-block reconstruction)."),
        click.option("--crr-output", type=click.Choice(["hidden", "kl"]), default="hidden", show_default=True,
                     help="Experimental: kl trains the blocks whose CRR window reaches the last block on the KL of "
                     "the next-token distribution (final norm + LM head) instead of the hidden states' MAE "
                     "(measured worse on SmolLM2, BENCHMARKS.md)."),
        click.option("--batch-size", type=int, default=1, show_default=True, callback=_positive),
        click.option("--lwc-lr", type=float, default=2e-2, show_default=True),
        click.option("--smooth-lr", type=float, default=1e-2, show_default=True),
        click.option("--no-lwc", is_flag=True, help="Ablation: min-max weight clipping instead of LWC."),
        click.option("--no-smooth", is_flag=True, help="Ablation: no K/V smoothing/shift (s = 1, delta = 0)."),
        click.option("--rounding", type=click.Choice(["nearest", "learned", "gptq"]), default="learned",
                     show_default=True, help="How weights are rounded on the learned grid: learned (per-weight "
                     "up/down offsets trained with the CRR loss; measured best, BENCHMARKS.md), nearest (the paper), "
                     "gptq (inverse-Hessian error feedback; measured worse on SmolLM2)."),
        click.option("--round-lr", type=float, default=1e-2, show_default=True,
                     help="Learning rate of the --rounding learned offsets."),
        click.option("--schedule", type=click.Choice(["constant", "cosine"]), default="cosine",
                     show_default=True, help="Learning-rate schedule of each block's training (cosine: decay to 0 "
                     "over the block's steps; constant: the paper's)."),
        click.option("--tune-norms/--no-tune-norms", default=False, show_default=True,
                     help="Experimental: also tune each block's RMSNorm weights (kept in full precision)."),
        click.option("--norm-lr", type=float, default=1e-4, show_default=True),
        click.option("--e2e-epochs", type=int, default=2, show_default=True, callback=_non_negative,
                     help="After the blocks, tune all quantization parameters end to end (KL to the full-precision "
                     "model's next-token distribution) for this many epochs; 0: the paper's block-wise recipe only."),
        click.option("--e2e-lr", type=float, default=3e-3, show_default=True,
                     help="Learning rate of the end-to-end stage (LWC and smoothing parameters)."),
        click.option("--e2e-rounding/--no-e2e-rounding", default=True, show_default=True, help="The end-to-end "
                     "stage also learns per-weight rounding offsets (at --e2e-round-lr; a float32 per weight with its "
                     "AdamW moments: 12 bytes a weight on the host when paged, checked before the calibration starts)."),
        click.option("--e2e-round-lr", type=float, default=2e-3, show_default=True,
                     help="Learning rate of the --e2e-rounding offsets."),
        click.option("--e2e-schedule", type=click.Choice(["constant", "cosine"]), default="cosine",
                     show_default=True, help="Learning-rate schedule of the end-to-end stage (cosine: decay to 0)."),
        click.option("--e2e-offload/--no-e2e-offload", default=None, help="Keep the end-to-end stage's blocks on "
                     "the host and page them onto the device one at a time (the device then holds ~3 blocks, not the "
                     "whole model and its trained state; the same result) [default: on CUDA devices]."),
        click.option("--calib-dtype", type=click.Choice(["auto", "bfloat16", "float32"]), default="auto",
                     show_default=True, help="Compute dtype of the frozen parts [auto: bfloat16 on CUDA]."),
        click.option("--resume", is_flag=True, help="Continue an interrupted calibration from its last block."),
        click.option("--compile", "compile", is_flag=True, help="Run the training's fake quantization through "
                     "torch.compile (fewer, fused kernels; the first steps pay the compilation; needs torch >= 2.13, where it "
                     "is verified exact)."),
        click.option("--keep-work", is_flag=True, help="Keep the per-block results next to --out after the "
                     "artifact is written (re-run later stages, e.g. other --e2e-* settings, with --resume)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _calib_config(method: str, calib: dict):
    if method != "wkvquant":
        return None
    from converter.calibrate import CalibConfig

    no_lwc, no_smooth, calib_dtype = calib.pop("no_lwc"), calib.pop("no_smooth"), calib.pop("calib_dtype")
    return CalibConfig(lwc=not no_lwc, smooth=not no_smooth, compute_dtype=calib_dtype, **calib)


@main.command("convert")
@convert_options
@calibration_options
@click.option("--push-to-hub", "push_to_hub", metavar="REPO_ID", default=None,
              help="Then push the artifact to this new Hub repo (token: HF_TOKEN or `hf auth login`).")
def convert_cmd(model, out, method, wbits, group_size, kv_bits, kv_group_size, dtype, device, seed, overwrite,
                debug, push_to_hub=None, **calib):
    """Quantize MODEL (Hub id, HF folder or .gguf; default: SmolLM2-135M-Instruct) into --out."""
    from converter.convert import ConvertConfig, convert
    from converter.export import WeightQuantConfig
    from runtime.kvquant import KVQuantConfig

    cfg = ConvertConfig(out=out, model=model, method=method, weight=WeightQuantConfig(wbits, group_size),
                        kv=KVQuantConfig(kv_bits, kv_group_size), device=device, seed=seed, dtype=dtype,
                        overwrite=overwrite, calibration=_calib_config(method, calib))
    if push_to_hub:  # token, id and a free repo name are checked before the long conversion
        from converter.hub import preflight

        preflight(push_to_hub)
    path = convert(cfg)
    from runtime.artifact import verify

    click.echo(f"{path}: {verify(path).line()}")
    if push_to_hub:
        from converter.hub import PushConfig

        _push_and_report(PushConfig(directory=path, repo_id=push_to_hub))


@main.command("validate")
@click.argument("directory", type=click.Path(path_type=Path))
@debug_option
def validate_cmd(directory, debug):
    """Check an artifact: metadata against the schema, every tensor against the metadata."""
    from runtime.artifact import verify

    click.echo(verify(directory).line())


def _non_negative_float(ctx, param, value):
    if value is not None and value < 0:
        raise click.BadParameter(f"must be >= 0 (0 = greedy), got {value}")
    return value


@main.command("generate")
@click.argument("model")
@click.argument("prompt")
@click.option("--max-new-tokens", type=int, default=128, show_default=True, callback=_positive)
@click.option("--chat", is_flag=True, help="Wrap PROMPT as a user turn of the tokenizer's chat template.")
@click.option("--temperature", type=float, default=0.0, show_default=True, callback=_non_negative_float,
              help="Sampling temperature; 0 = greedy.")
@click.option("--seed", type=int, default=None, help="Random seed for sampling.")
@click.option("--device", default=None, help="cpu, cuda, cuda:N [default: cuda if available].")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Compute dtype [default: the artifact's on CUDA, float32 on CPU].")
@click.option("--no-poq", is_flag=True, help="Past-Only Quantization off: the current token's K/V quantized too.")
@click.option("--fast", is_flag=True,
              help="Decode on runtime.fast.FastLlama: a static 4-bit POQ cache and, on CUDA, the Triton kernels with "
                   "each step one CUDA-graph replay (the path `wkvq bench` times). Not with --no-poq.")
@click.option("--revision", default=None, help="Branch, tag or commit when MODEL is a Hub id.")
@debug_option
def generate_cmd(model, prompt, max_new_tokens, chat, temperature, seed, device, dtype, no_poq, fast, revision,
                 debug):
    """Stream a completion of PROMPT by the artifact MODEL (directory or Hub id), 4-bit KV cache."""
    import torch
    from transformers import TextStreamer

    from runtime import load
    from runtime.model import prompt_inputs, sampling_kwargs

    if fast and no_poq:
        raise click.UsageError("--fast decodes with Past-Only Quantization only; drop --no-poq or --fast")
    gen = sampling_kwargs(temperature, max_new_tokens)
    lm, tokenizer = load(model, device=device, dtype=dtype, poq=not no_poq, revision=revision)
    inputs = prompt_inputs(tokenizer, prompt, chat=chat, device=lm.device)
    if seed is not None:
        torch.manual_seed(seed)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if not fast:
        lm.generate(**inputs, **gen, streamer=streamer)
        return
    from runtime.fast import FastLlama
    from runtime.fast import generate as fast_generate

    ids = inputs["input_ids"]
    cfg = lm.generation_config
    sampled = temperature > 0
    fl = FastLlama.from_hf(lm, ids.shape[1] + max_new_tokens)
    streamer.put(ids.cpu())
    fast_generate(fl, ids, max_new_tokens, temperature=temperature, top_k=(cfg.top_k or 0) if sampled else 0,
                  top_p=(cfg.top_p or 1.0) if sampled else 1.0, eos_token_id=cfg.eos_token_id,
                  on_token=lambda tok: streamer.put(tok.cpu()))
    streamer.end()


def _push_and_report(cfg) -> None:
    from converter.card import format_bytes
    from converter.hub import push

    result = push(cfg)
    for name, size in result.files:
        click.echo(f"  {name}  ({format_bytes(size)})")
    total = format_bytes(sum(size for _, size in result.files))
    if result.dry_run:
        click.echo(f"dry run: wrote {result.card}; would upload {len(result.files)} files ({total}) "
                   f"to {result.repo_id}@{result.branch}")
    else:
        click.echo(f"pushed {len(result.files)} files ({total}) to {result.repo_id}@{result.branch}: "
                   f"{result.commit_url}")


@main.command("push")
@click.argument("directory", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option("--revision", default=None, help="Branch to push to, created from main if missing [default: main].")
@click.option("--commit-message", default=None, help="[default: 'Upload W4KV4 <method> artifact ...']")
@click.option("--exist-ok", is_flag=True, help="Add a commit to main of a repo that already exists.")
@click.option("--base-model", default=None, help="Hub id of the source model for the card [default: from metadata].")
@click.option("--dry-run", is_flag=True, help="Write the model card into DIRECTORY and list the files; no network.")
@debug_option
def push_cmd(directory, repo_id, private, revision, commit_message, exist_ok, base_model, dry_run, debug):
    """Verify DIRECTORY, write its model card (README.md) and upload it to the Hub repo REPO_ID.

    The token comes from HF_TOKEN or `hf auth login`; it is never printed or written.
    """
    from converter.hub import PushConfig

    _push_and_report(PushConfig(directory=directory, repo_id=repo_id, private=private, revision=revision,
                                commit_message=commit_message, exist_ok=exist_ok, dry_run=dry_run,
                                base_model=base_model))


def _artifact_pairs(ctx, param, values):
    pairs = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"expected NAME=DIR (e.g. wkvquant=out/wkvq), got {v!r}")
        pairs.append((name, path))
    return tuple(pairs)


def _row_list(ctx, param, value):
    return None if value is None else tuple(r.strip() for r in value.split(",") if r.strip())


@main.command("eval")
@click.argument("target")
@click.option("--data", default="enwiki-sample:eval", show_default=True,
              help="enwiki-sample:eval, enwiki-sample:eval-long (long articles), wikitext2:test or a text file.")
@click.option("--seqlen", type=int, default=2048, show_default=True, callback=_positive)
@click.option("--max-windows", type=int, default=None, callback=_positive, help="Only the first N windows [all].")
@click.option("--kv-mode", type=click.Choice(["decode", "prefill"]), default="decode", show_default=True,
              help="decode: decode-simulated (quantized past K/V); prefill: the cache is never read quantized.")
@click.option("--no-poq", is_flag=True, help="Past-Only Quantization off: the current token's K/V quantized too.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the results here.")
@click.option("--device", default=None, help="cpu, cuda, cuda:N [default: cuda if available].")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Compute dtype [default: float16 on CUDA, float32 on CPU].")
@click.option("--batch-size", type=int, default=1, show_default=True, callback=_positive)
@click.option("--table", is_flag=True, help="TARGET is the dense model: evaluate every configuration of the table.")
@click.option("--artifact", "artifacts", multiple=True, callback=_artifact_pairs, metavar="NAME=DIR",
              help="With --table: a calibrated artifact row (wkvquant, no-crr, no-lwc, no-smooth or any name).")
@click.option("--rows", default=None, callback=_row_list,
              help="With --table: only these rows (comma-separated); NAME:w / NAME:kv of an --artifact NAME: its "
                   "weights alone (full-precision cache) / its KV quantization alone (dense weights).")
@click.option("--markdown", "markdown_path", type=click.Path(path_type=Path), default=None,
              help="With --table: also write the Markdown table here.")
@click.option("--plots", "plots_dir", type=click.Path(path_type=Path), default=None,
              help="With --table: write PNG plots into this directory (needs matplotlib).")
@click.option("--long-seqlen", type=int, default=None, callback=_positive,
              help="With --table: decode-simulated perplexity on long windows of this length too (e.g. 8192).")
@click.option("--long-data", default="enwiki-sample:eval-long", show_default=True)
@click.option("--long-max-windows", type=int, default=None, callback=_positive)
@click.option("--peer-backend", type=click.Choice(["hqq", "quanto"]), default="hqq", show_default=True,
              help="With --table: the transformers QuantizedCache backend.")
@click.option("--peer-windows", type=int, default=2, show_default=True, callback=_positive,
              help="With --table: windows of the QuantizedCache row (token-by-token decoding).")
@click.option("--peer-residual", type=int, default=128, show_default=True, callback=_positive,
              help="With --table: QuantizedCache's full-precision residual length (transformers' default 128).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@debug_option
def eval_cmd(target, data, seqlen, max_windows, kv_mode, no_poq, json_path, device, dtype, batch_size, table,
             artifacts, rows, markdown_path, plots_dir, long_seqlen, long_data, long_max_windows, peer_backend,
             peer_windows, peer_residual, no_progress, debug):
    """Perplexity of TARGET (artifact dir or Hub id; or a plain model: Hub id, HF folder, .gguf)."""
    from converter.evaluate import EvalConfig

    ev = EvalConfig(data=data, seqlen=seqlen, max_windows=max_windows, kv_mode=kv_mode, poq=not no_poq,
                    device=device, dtype=dtype, batch_size=batch_size, progress=not no_progress)
    if not table:
        if artifacts or rows or markdown_path or plots_dir or long_seqlen:
            raise click.UsageError("--artifact, --rows, --markdown, --plots and --long-seqlen need --table")
        from converter.evaluate import evaluate, summary_line, write_json

        result = evaluate(target, ev)
        if json_path:
            write_json(result, json_path)
        click.echo(summary_line(result))
        return
    from converter.baselines import PeerConfig
    from converter.table import TableConfig, markdown, run_table, write_outputs

    cfg = TableConfig(eval=ev, artifacts=artifacts, rows=rows, long_seqlen=long_seqlen, long_data=long_data,
                      long_max_windows=long_max_windows, peer=PeerConfig(backend=peer_backend, windows=peer_windows,
                                                            residual_length=peer_residual))
    if plots_dir:
        from converter.plots import require_matplotlib

        require_matplotlib()  # before the long run, not after it
    result = run_table(target, cfg)
    write_outputs(result, json_path=json_path, markdown_path=markdown_path, plots_dir=plots_dir)
    click.echo(markdown(result), nl=False)


def _int_list(ctx, param, value):
    try:
        vals = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"must be comma-separated integers, got {value!r}")
    if not vals or min(vals) <= 0:
        raise click.BadParameter(f"must be positive integers, got {value!r}")
    return vals


@main.command("bench")
@click.option("--shapes", default="7b,13b", show_default=True, callback=_row_list, help="7b, 13b, 8b (LLaMA-3), 70b, 3b (LLaMA-3.2), tiny.")
@click.option("--batches", default="1,8", show_default=True, callback=_int_list)
@click.option("--prompts", default="2048,32768", show_default=True, callback=_int_list)
@click.option("--paths", default="fp16_eager,fp16_compiled,int4_tinygemm,wkvq", show_default=True,
              callback=_row_list,
              help="Also wkvq-gemlite (projections on GemLite, optional package), wkvq-splitk (split-K projections).")
@click.option("--steps", type=int, default=20, show_default=True, callback=_positive)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=Path("bench.json"),
              show_default=True, help="Write the results here (updated after every row).")
@debug_option
def bench_cmd(shapes, batches, prompts, paths, steps, json_path, debug):
    """Decode ms/token and peak memory of W4KV4 vs fp16 / compiled / tinygemm int4 on random LLaMA shapes (CUDA).

    ms/token: the median step, each waited for (host time included); queued: steps queued back to back (GPU time).
    GB/step: the bytes a step must read; BW frac / q frac: their rate over the copy rate by either time. Under the
    table: wkvq's speedup over fp16_compiled by either time, beside the ratio of their bytes.
    """
    from converter.bench import BenchConfig, format_table, run_bench

    cfg = BenchConfig(shapes=shapes, batches=batches, prompts=prompts, paths=paths, steps=steps, out=json_path)
    click.echo(format_table(run_bench(cfg)))


def convert_main() -> None:
    """Entry point of ``wkvq-convert`` (the same as ``wkvq convert``)."""
    _setup_logging("-v" in sys.argv or "--verbose" in sys.argv)
    argv = [a for a in sys.argv[1:] if a not in ("-v", "--verbose")]
    main.main(args=["convert", *argv], prog_name="wkvq-convert")


if __name__ == "__main__":
    main()
