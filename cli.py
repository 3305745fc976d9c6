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
        click.option("--method", type=click.Choice(["wkvquant", "rtn"]), default="rtn", show_default=True),
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


@main.command("convert")
@convert_options
@click.option("--push-to-hub", "push_to_hub", metavar="REPO_ID", default=None,
              help="Then push the artifact to this new Hub repo (token: HF_TOKEN or `hf auth login`).")
def convert_cmd(model, out, method, wbits, group_size, kv_bits, kv_group_size, dtype, device, seed, overwrite,
                debug, push_to_hub=None):
    """Quantize MODEL (Hub id, HF folder or .gguf; default: SmolLM2-135M-Instruct) into --out."""
    from converter.convert import ConvertConfig, convert
    from converter.export import WeightQuantConfig
    from runtime.kvquant import KVQuantConfig

    cfg = ConvertConfig(out=out, model=model, method=method, weight=WeightQuantConfig(wbits, group_size),
                        kv=KVQuantConfig(kv_bits, kv_group_size), device=device, seed=seed, dtype=dtype,
                        overwrite=overwrite)
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


def convert_main() -> None:
    """Entry point of ``wkvq-convert`` (the same as ``wkvq convert``)."""
    _setup_logging("-v" in sys.argv or "--verbose" in sys.argv)
    argv = [a for a in sys.argv[1:] if a not in ("-v", "--verbose")]
    main.main(args=["convert", *argv], prog_name="wkvq-convert")


if __name__ == "__main__":
    main()
