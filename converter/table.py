"""The comparison table: every configuration evaluated in one run on the same windows.

Rows (:data:`ROW_NAMES`, in order): full precision; W4 only; KV4 only; W4KV4 RTN (built in
memory from the dense model, :mod:`converter.variants`); W4KV4 WKVQuant and its ablations
(artifacts given as ``--artifact NAME=DIR``; ``no-poq`` is the ``wkvquant`` artifact with POQ
off); W4A4 (W4KV4 RTN + every decoder Linear's input quantized per token); and transformers'
``QuantizedCache`` on the W4 RTN weights (:mod:`converter.baselines`, token by token on the first
few windows). A row that cannot run says why instead of a number.
"""

from __future__ import annotations

import copy
import gc
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

import runtime
from runtime.kvquant import KVQuantConfig

from . import evaluate, source
from .baselines import PeerConfig, backend_missing, peer_perplexity
from .evaluate import EvalConfig
from .export import WeightQuantConfig
from .variants import VariantConfig, build_variant, materialize_weights

log = logging.getLogger(__name__)

ARTIFACT_ROWS = {  # row name -> (label, artifact name, poq)
    "wkvquant": ("W4KV4 WKVQuant", "wkvquant", True),
    "no-poq": ("WKVQuant w/o POQ", "wkvquant", False),
    "no-smooth": ("WKVQuant w/o smoothing/shift", "no-smooth", True),
    "no-crr": ("WKVQuant w/o CRR (k = 0)", "no-crr", True),
    "no-lwc": ("WKVQuant w/o LWC", "no-lwc", True),
}
# What a third-party QuantizedCache backend raises on shapes or devices it does not support.
PEER_FAILURES = (AssertionError, RuntimeError, ValueError, TypeError, NotImplementedError, ImportError)
ROW_NAMES = ("fp16", "w4", "kv4", "w4kv4-rtn", *ARTIFACT_ROWS, "w4a4", "quantized-cache")
# Rows "NAME:PART" of an artifact NAME, only when asked for by --rows: where its error comes from
SPLITS = {"w": "its weights, full-precision KV cache", "kv": "dense weights, its KV quantization"}


@dataclass(frozen=True)
class TableConfig:
    """Everything ``wkvq eval MODEL --table`` measures. ``artifacts``: ``((name, dir), ...)``."""

    eval: EvalConfig = field(default_factory=EvalConfig)
    artifacts: tuple[tuple[str, str], ...] = ()
    rows: tuple[str, ...] | None = None  # None: every row
    weight: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    kv_bits: int = 4
    act_bits: int = 4
    peer: PeerConfig = field(default_factory=PeerConfig)
    long_seqlen: int | None = None  # decode-simulated perplexity on long windows too
    long_data: str = evaluate.LONG_DATA
    long_max_windows: int | None = None

    def __post_init__(self):
        names = [n for n, _ in self.artifacts]
        if len(set(names)) != len(names):
            raise ValueError(f"--artifact names must be unique, got {', '.join(names)}")
        known = self.all_rows(self.split_rows())
        for name in self.rows or ():
            if name not in known:
                raise ValueError(f"unknown row {name!r}; rows are {', '.join(self.all_rows())}, and NAME:"
                                 f"{' or NAME:'.join(SPLITS)} of an --artifact NAME")
        if self.long_seqlen is not None and self.long_seqlen < 2:
            raise ValueError(f"long seqlen must be at least 2, got {self.long_seqlen}")

    def extra_artifacts(self) -> tuple[str, ...]:
        known = {a for _, a, _ in ARTIFACT_ROWS.values()}
        return tuple(n for n, _ in self.artifacts if n not in known)

    def split_rows(self) -> tuple[str, ...]:
        """``NAME:w`` and ``NAME:kv`` of every ``--artifact NAME`` (:data:`SPLITS`)."""
        return tuple(f"{n}:{part}" for n, _ in self.artifacts for part in SPLITS)

    def all_rows(self, splits: tuple[str, ...] = ()) -> tuple[str, ...]:
        """Every row a table without ``rows`` has (in order), with ``splits`` after the artifacts."""
        return (*ROW_NAMES[:-2], *self.extra_artifacts(), *splits, *ROW_NAMES[-2:])

    def selected(self) -> tuple[str, ...]:
        if self.rows is None:
            return self.all_rows()
        return tuple(n for n in self.all_rows(self.split_rows()) if n in self.rows)


@dataclass(frozen=True)
class RowSpec:
    name: str
    label: str
    kind: str  # "memory", "artifact" or "peer"
    variant: VariantConfig | None = None
    artifact: str | None = None
    poq: bool = True
    part: str | None = None  # of SPLITS: only the artifact's weights or only its KV quantization


def row_specs(cfg: TableConfig, fp_label: str) -> list[RowSpec]:
    w, kv = cfg.weight, KVQuantConfig(cfg.kv_bits)
    memory = {
        "fp16": (fp_label, VariantConfig()),
        "w4": (f"W{w.bits} only (RTN)", VariantConfig(weight=w)),
        "kv4": (f"KV{kv.bits} only (RTN)", VariantConfig(kv=kv)),
        "w4kv4-rtn": (f"W{w.bits}KV{kv.bits} RTN", VariantConfig(weight=w, kv=kv)),
        "w4a4": (f"W{w.bits}A{cfg.act_bits} RTN (+KV{kv.bits})", VariantConfig(weight=w, kv=kv, act_bits=cfg.act_bits)),
    }
    specs = []
    for name in cfg.selected():
        if name in memory:
            specs.append(RowSpec(name, memory[name][0], "memory", variant=memory[name][1]))
        elif name in ARTIFACT_ROWS:
            label, art, poq = ARTIFACT_ROWS[name]
            specs.append(RowSpec(name, label, "artifact", artifact=art, poq=poq))
        elif name in cfg.split_rows():
            art, part = name.rsplit(":", 1)
            specs.append(RowSpec(name, f"artifact {art}: {SPLITS[part]}", "artifact", artifact=art, part=part))
        elif name == "quantized-cache":
            specs.append(RowSpec(name, f"W{w.bits} RTN + QuantizedCache ({cfg.peer.backend}, {cfg.peer.nbits}-bit)",
                                 "peer", variant=VariantConfig(weight=w)))
        else:
            specs.append(RowSpec(name, f"artifact {name}", "artifact", artifact=name))
    return specs


def _free(model) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _artifact_setup(model, path: str, poq: bool) -> tuple[str, dict]:
    """A one-line description of an artifact row and the details the JSON keeps."""
    meta = model.wkvq_metadata
    w, kv = meta["weight_quant"], meta["kv_quant"]
    line = (f"{meta['method']} artifact: W{w['bits']} g{w['group_size']} {w.get('clipping', 'minmax')}, "
            f"KV{kv['bits']} smoothing={kv['smoothing']}, {'POQ' if poq else 'no POQ'}")
    calib = {k: v for k, v in (meta.get("calibration") or {}).items() if k != "losses"}
    details = {"path": str(path), "method": meta["method"], "weight_quant": w, "kv_quant": {**kv, "poq": poq},
               "recipe": meta["recipe"], "calibration": calib}
    return line, details


def split_model(model, base, part: str):
    """Part ``part`` (:data:`SPLITS`) of the quantized ``model`` alone: ``w`` its weights with every layer's KV
    quantizer removed (a full-precision cache; ``model`` itself), ``kv`` a copy of the dense ``base`` (left
    unchanged) with ``model``'s KV quantizers."""
    if part == "w":
        for layer in model.model.layers:
            del layer.self_attn.kv_quant
        return model
    dense = copy.deepcopy(base)
    for mine, theirs in zip(dense.model.layers, model.model.layers, strict=True):
        mine.self_attn.register_module("kv_quant", theirs.self_attn.kv_quant)
    return dense.eval()


class RowUnavailable(Exception):
    """A row that cannot be computed here; its message is shown instead of a number."""


def row_model(spec: RowSpec, base, cfg: TableConfig, paths: dict[str, str]):
    """``(model, setup line, details)`` for one row; raises :class:`RowUnavailable`."""
    if spec.kind == "artifact":
        if spec.artifact not in paths:
            raise RowUnavailable(f"not run: no artifact given (--artifact {spec.artifact}=DIR)")
        device = next(base.parameters()).device
        model, _ = runtime.load(paths[spec.artifact], device=device, dtype=base.dtype, poq=spec.poq)
        line, details = _artifact_setup(model, paths[spec.artifact], spec.poq)
        if spec.part is None:
            return model, line, details
        return split_model(model, base, spec.part), f"{line}; {SPLITS[spec.part]}", {**details, "part": spec.part}
    if spec.kind == "peer":
        reason = backend_missing(cfg.peer.backend)
        if reason is not None:
            raise RowUnavailable(f"not run: {reason}")
        setup = f"{spec.variant.describe()}; {cfg.peer.describe(model_shape(base.config)['head_dim'])}"
        model = materialize_weights(build_variant(base, spec.variant))  # same values, no per-step unpack
        return model, setup, {"variant": spec.variant.describe(), "peer": cfg.peer.to_dict()}
    return build_variant(base, spec.variant), spec.variant.describe(), {"variant": spec.variant.describe()}


def run_row(spec: RowSpec, base, cfg: TableConfig, paths: dict, windows, long_windows) -> dict:
    """One row of the table: its perplexities (or why it has none), setup and details."""
    row = {"name": spec.name, "label": spec.label, "kind": spec.kind, "ppl": None, "long": None}
    try:
        model, setup, details = row_model(spec, base, cfg, paths)
    except RowUnavailable as e:
        log.warning("%s: %s", spec.label, e)
        return {**row, "setup": str(e), "note": str(e)}
    ev = cfg.eval
    if spec.kind == "peer":
        try:
            res = peer_perplexity(model, windows, cfg.peer, progress=ev.progress)
        except PEER_FAILURES as e:  # a third-party backend failing must not lose the other rows
            log.warning("%s failed: %s", spec.label, e)
            _free(model)
            return {**row, "setup": setup, "note": f"failed: {type(e).__name__}: {e}"[:300], "details": details}
        ref = evaluate.perplexity(model, windows[: res.windows], "prefill", ev.batch_size, progress=False)
        row.update(kv_mode="token-by-token decode", same_windows_fp_kv_ppl=ref.ppl,
                   note=f"first {res.windows} windows only, token by token; the same weights with a "
                        f"full-precision KV cache on those windows: {ref.ppl:.3f}")
    else:
        res = evaluate.perplexity(model, windows, ev.kv_mode, ev.batch_size, spec.label, ev.progress)
        row["kv_mode"] = ev.kv_mode
        if long_windows is not None:
            row["long"] = evaluate.perplexity(model, long_windows, ev.kv_mode, 1, f"{spec.label} (long)",
                                              ev.progress).to_dict()
    _free(model)
    log.info("%s: ppl %.4f", spec.label, res.ppl)
    return {**row, **res.to_dict(), "setup": setup, "details": details}


def fp_label(dtype: torch.dtype) -> str:
    return "FP16" if dtype == torch.float16 else f"Full precision ({str(dtype).removeprefix('torch.')})"


def check_artifacts(cfg: TableConfig) -> dict[str, str]:
    """Verify every ``--artifact`` before any long work; ``{name: dir}``."""
    for name, path in cfg.artifacts:
        try:
            runtime.verify(path)
        except runtime.ArtifactError as e:
            raise ValueError(f"--artifact {name}={path}: {e}") from None
    return dict(cfg.artifacts)


def run_table(target: str, cfg: TableConfig) -> dict:
    """Load the dense ``target`` once, then evaluate every selected row on the same windows."""
    if evaluate.is_artifact(target):
        raise ValueError(f"--table needs the full-precision model, got the artifact {target}; "
                         "pass artifacts with --artifact NAME=DIR")
    paths = check_artifacts(cfg)
    ev = cfg.eval
    device, dtype = ev.torch_device(), ev.torch_dtype()
    base, tok, src = source.load_model(target, dtype=dtype)
    source.check_seqlen(base.config, ev.seqlen)
    if cfg.long_seqlen is not None:
        source.check_seqlen(base.config, cfg.long_seqlen, "--long-seqlen")
    base = base.to(device)
    windows = evaluate.load_windows(tok, ev.data, ev.seqlen, ev.max_windows)
    long_windows = None
    if cfg.long_seqlen is not None:
        long_windows = evaluate.load_windows(tok, cfg.long_data, cfg.long_seqlen, cfg.long_max_windows)
    specs = row_specs(cfg, fp_label(dtype))
    rows = [run_row(spec, base, cfg, paths, windows, long_windows)
            for spec in tqdm(specs, desc="table", unit="row", disable=not ev.progress)]
    w, t = windows.shape
    long = None if long_windows is None else {"data": cfg.long_data, "seqlen": cfg.long_seqlen,
                                              "windows": long_windows.shape[0]}
    return {"target": target, "source": src.model, "data": ev.data, "seqlen": t, "windows": w, "tokens": w * (t - 1),
            "kv_mode": ev.kv_mode, "kv_mode_label": evaluate.KV_MODE_LABELS[ev.kv_mode], "device": str(device),
            "dtype": str(dtype).removeprefix("torch."), "long": long, "rows": rows,
            "model": model_shape(base.config)}


def model_shape(config) -> dict:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"num_layers": config.num_hidden_layers, "num_kv_heads": config.num_key_value_heads,
            "head_dim": head_dim, "max_position_embeddings": config.max_position_embeddings}


# ----------------------------------------------------------------------------- rendering


def _fmt(ppl) -> str:
    return "—" if ppl is None else f"{ppl:.3f}"


def markdown(table: dict) -> str:
    """The table as Markdown: a caption line, one row per configuration."""
    long = table["long"]
    cap = (f"Perplexity of {table['source']} on {table['data']}: {table['windows']} windows x {table['seqlen']} "
           f"tokens ({table['tokens']} predicted), KV mode: {table['kv_mode_label']}, "
           f"{table['dtype']} on {table['device']}.")
    if long:
        cap += f" Long context: {long['windows']} windows x {long['seqlen']} tokens of {long['data']}."
    head = "| Configuration | PPL |" + (f" PPL @{long['seqlen']} |" if long else "") + " Setup |"
    sep = "|---|---:|" + ("---:|" if long else "") + "---|"
    lines = [cap, "", head, sep]
    for r in table["rows"]:
        ppl = _fmt(r["ppl"]) + ("*" if r.get("kind") == "peer" and r["ppl"] is not None else "")
        cells = [r["label"], ppl] + ([_fmt((r["long"] or {}).get("ppl"))] if long else [])
        setup = r["setup"] + (f" ({r['note']})" if r.get("note") and r["ppl"] is not None else "")
        lines.append("| " + " | ".join(cells + [setup]) + " |")
    if any(r.get("kind") == "peer" and r["ppl"] is not None for r in table["rows"]):
        lines += ["", "\\* measured token by token through the cache on the first windows only (see Setup)."]
    return "\n".join(lines) + "\n"


def write_outputs(table: dict, json_path=None, markdown_path=None, plots_dir=None) -> list[Path]:
    """Write the JSON, the Markdown and the PNG plots that were asked for; the paths written."""
    written = []
    if json_path is not None:
        written.append(evaluate.write_json(table, json_path))
    if markdown_path is not None:
        path = Path(markdown_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(markdown(table))
        written.append(path)
    if plots_dir is not None:
        from . import plots

        plots_dir = Path(plots_dir)
        plots_dir.mkdir(parents=True, exist_ok=True)
        written.append(plots.ppl_chart(table, plots_dir / "perplexity.png"))
        written.append(plots.kv_bytes_chart(table["model"], plots_dir / "kv_cache_bytes.png"))
    return written
