"""Turn a (calibrated) full-precision model into the artifact's tensors and metadata, and write
the artifact atomically: it appears under ``--out`` only when complete."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import datetime
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from runtime import artifact, quant
from runtime.artifact import DECODER_LINEARS, FORMAT_VERSION, META_FILE, WEIGHTS_FILE
from runtime.kvquant import KVQuantConfig

from . import __version__
from .source import SourceInfo

log = logging.getLogger(__name__)


PARAMS_DTYPE = torch.float16  # clipping factors and scales as the artifact stores them


@dataclass(frozen=True)
class WeightQuantConfig:
    bits: int = 4
    group_size: int = 128

    def __post_init__(self):
        quant.check_bits(self.bits)
        quant.check_group_size(self.group_size)


@dataclass
class Calibration:
    """What the converter learned: LWC factors and learned rounding decisions per Linear prefix,
    s/delta per layer, tuned full-precision tensors (e.g. RMSNorm weights) by name, losses."""

    clips: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    rounding: dict[str, torch.Tensor] = field(default_factory=dict)
    kv: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    losses: list[float | None] = field(default_factory=list)
    info: dict = field(default_factory=dict)


def export_qparams(weight: torch.Tensor, cfg: WeightQuantConfig, clip_hi=None, clip_lo=None):
    """``(clip_hi, clip_lo, scale, zero)`` exactly as the artifact stores them: float16 factors
    (all ones without LWC), the float16 scale computed from them, integer zero points."""
    w = weight.detach().float()
    g = quant.num_groups(w.shape[1], cfg.group_size)
    hi = torch.ones(w.shape[0], g, device=w.device) if clip_hi is None else clip_hi.detach().float()
    lo = torch.ones(w.shape[0], g, device=w.device) if clip_lo is None else clip_lo.detach().float()
    hi, lo = hi.to(PARAMS_DTYPE), lo.to(PARAMS_DTYPE)  # quantize with exactly the stored factors
    scale, zero = quant.weight_qparams(w, cfg.bits, cfg.group_size, hi, lo)
    return hi, lo, scale.to(PARAMS_DTYPE), zero  # codes are computed with the scale exactly as stored


def linear_tensors(prefix: str, weight: torch.Tensor, cfg: WeightQuantConfig,
                   clip_hi: torch.Tensor | None = None, clip_lo: torch.Tensor | None = None,
                   rounding: torch.Tensor | None = None) -> dict:
    """The artifact tensors of one Linear: packed codes, scales, zeros and clipping factors.
    ``rounding``: int8 offsets per weight added to nearest rounding (learned rounding or GPTQ)."""
    hi, lo, scale, zero = export_qparams(weight, cfg, clip_hi, clip_lo)
    q = quant.quantize_weight(weight, scale.float(), zero, cfg.bits, cfg.group_size,
                              None if rounding is None else rounding.to(weight.device))
    names = artifact.linear_tensor_names(prefix)
    return {names["qweight"]: quant.pack(q, cfg.bits), names["scales"]: scale,
            names["zeros"]: zero.to(torch.uint8), names["clip_hi"]: hi, names["clip_lo"]: lo}


def model_tensors(model, wcfg: WeightQuantConfig, calib: Calibration, dtype: torch.dtype) -> dict:
    """Every tensor of the artifact, on CPU: quantized decoder Linears, KV smoothing, the rest in ``dtype``."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    tensors: dict[str, torch.Tensor] = {}
    quantized = set()
    for i, layer in enumerate(model.model.layers):
        for name in DECODER_LINEARS:
            prefix = f"{artifact.layer_prefix(i)}.{name}"
            lin = layer.get_submodule(name)
            tensors.update(linear_tensors(prefix, lin.weight, wcfg, *calib.clips.get(prefix, (None, None)),
                                          rounding=calib.rounding.get(prefix)))
            if lin.bias is not None:
                tensors[f"{prefix}.bias"] = lin.bias.detach().to(dtype)
            quantized.add(f"{prefix}.weight")
            quantized.add(f"{prefix}.bias")
        kv = calib.kv.get(i, {})
        for kind, name in artifact.kv_tensor_names(i).items():
            default = torch.ones if kind.endswith("scale") else torch.zeros
            t = kv.get(kind)
            tensors[name] = (default(cfg.num_key_value_heads, head_dim) if t is None else t.detach()).float()
    state = model.state_dict()
    unknown = sorted(set(calib.tensors) - set(state))
    if unknown:
        raise ValueError(f"calibrated tensors {unknown[:3]} are not in the model; they would be lost")
    for name, t in state.items():
        if name in quantized or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        tensors[name] = calib.tensors.get(name, t).detach().to(dtype)
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def build_metadata(model, tensors: dict, method: str, recipe: dict, wcfg: WeightQuantConfig,
                   kvcfg: KVQuantConfig, source: SourceInfo, dtype: torch.dtype, calib: Calibration) -> dict:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    layers = []
    for i, layer in enumerate(model.model.layers):
        p = artifact.layer_prefix(i)
        linears = {n: {"in_features": layer.get_submodule(n).in_features,
                       "out_features": layer.get_submodule(n).out_features,
                       "bias": layer.get_submodule(n).bias is not None} for n in DECODER_LINEARS}
        entry = {"index": i, "linears": linears,
                 "kv": {"num_kv_heads": cfg.num_key_value_heads, "head_dim": head_dim},
                 "tensors": sorted(n for n in tensors if n.startswith(p + "."))}
        if i < len(calib.losses):
            entry["calibration_loss"] = calib.losses[i]
        layers.append(entry)
    meta = {
        "format_version": FORMAT_VERSION,
        "producer": {"name": "wkvquant", "version": __version__,
                     "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        "source": asdict(source),
        "architecture": "LlamaForCausalLM",
        "method": method,
        "recipe": recipe,
        "dtype": str(dtype).removeprefix("torch."),
        "weight_quant": {"bits": wcfg.bits, "group_size": wcfg.group_size, "scheme": "asymmetric",
                         "zero_point": "integer", "packing": "u8-lsb-first",
                         "clipping": "lwc" if calib.clips else "minmax"},
        "kv_quant": {"bits": kvcfg.bits, "group_size": kvcfg.group_size or head_dim,
                     "granularity": "per-token", "poq": kvcfg.poq, "smoothing": bool(calib.kv)},
        "model": {"num_layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
                  "num_heads": cfg.num_attention_heads, "num_kv_heads": cfg.num_key_value_heads,
                  "head_dim": head_dim, "vocab_size": cfg.vocab_size,
                  "tie_word_embeddings": bool(cfg.tie_word_embeddings)},
        "layers": layers,
        "tensors": {n: {"dtype": artifact.dtype_name(t.dtype), "shape": list(t.shape),
                        "sha256": artifact.tensor_sha256(t)} for n, t in sorted(tensors.items())},
    }
    if calib.losses or calib.info:
        meta["calibration"] = {"losses": list(calib.losses), **calib.info}
    return meta


def _hf_config_dict(config) -> dict:
    d = config.to_dict()
    d.pop("quantization_config", None)
    d["architectures"] = ["LlamaForCausalLM"]
    return d


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty ``out`` unless ``overwrite``; call before long work."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty; pass --overwrite or choose another path")


def write_artifact(out: str | Path, tensors: dict, metadata: dict, model, tokenizer,
                   overwrite: bool = False) -> Path:
    """Write into a temporary sibling directory, verify, then move into place."""
    out = Path(out).resolve()
    check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(_hf_config_dict(model.config), indent=2))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "wkvq": json.dumps(metadata)})
        (tmp / META_FILE).write_text(json.dumps(metadata, indent=1))
        artifact.verify(tmp)
        _apply_umask(tmp)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s", out)
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(out: Path) -> None:
    """Delete half-written siblings ``.<out>.partial-<pid>-*`` left by killed conversions."""
    for p in out.parent.glob(f".{out.name}.partial-*"):
        pid = p.name.removeprefix(f".{out.name}.partial-").split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            log.info("removing %s, left by an interrupted conversion", p)
            shutil.rmtree(p, ignore_errors=True)


def _apply_umask(directory: Path) -> None:
    """mkdtemp creates 0700; give the artifact the permissions a plain mkdir would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for f in directory.iterdir():
        os.chmod(f, 0o666 & ~umask)


def _move_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
