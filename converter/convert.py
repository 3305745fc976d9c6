"""The conversion pipeline: load the source, (calibrate,) export, write the artifact."""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from runtime.kvquant import KVQuantConfig
from runtime.model import parse_device, parse_dtype

from . import export, source
from .export import Calibration, WeightQuantConfig

log = logging.getLogger(__name__)

METHODS = ("wkvquant", "rtn")


@dataclass(frozen=True)
class ConvertConfig:
    out: Path
    model: str | None = None
    method: str = "rtn"
    weight: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    kv: KVQuantConfig = field(default_factory=KVQuantConfig)
    device: str | None = None
    seed: int = 0
    dtype: str = "float16"
    overwrite: bool = False
    calibration: object | None = None  # converter.calibrate.CalibConfig for method "wkvquant"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        parse_dtype(self.dtype)

    def recipe(self) -> dict:
        r = {"method": self.method, "seed": self.seed, "weight": asdict(self.weight), "kv": self.kv.to_dict(),
             "dtype": self.dtype}
        if self.calibration is not None:
            r["calibration"] = self.calibration.to_dict()
        return r


def resolve_device(device: str | None) -> torch.device:
    """:func:`runtime.model.parse_device` with the converter's flag names in its message."""
    try:
        return parse_device(device)
    except ValueError as e:
        raise ValueError(f"--device: {e}".replace("use cpu", "use --device cpu")) from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def calibrate(model, tokenizer, cfg: ConvertConfig, device: torch.device) -> Calibration:
    """RTN: nothing learned (min-max clipping, s = 1, delta = 0); WKVQuant: see converter.calibrate."""
    if cfg.method == "rtn":
        return Calibration()
    from .calibrate import run_calibration  # the calibrated method's module, by design optional for RTN

    return run_calibration(model, tokenizer, cfg, device)


def resolved_recipe(cfg: ConvertConfig) -> ConvertConfig:
    """``cfg`` with the default calibration recipe filled in for method "wkvquant"."""
    if cfg.method != "wkvquant" or cfg.calibration is not None:
        return cfg
    from .calibrate import CalibConfig

    return replace(cfg, calibration=CalibConfig())


def convert(cfg: ConvertConfig) -> Path:
    cfg = resolved_recipe(cfg)
    out = Path(cfg.out)
    export.check_out_dir(out.resolve(), cfg.overwrite)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    if cfg.calibration is not None and cfg.method == "wkvquant":
        source.check_seqlen(source.load_config(cfg.model)[0], cfg.calibration.seqlen)
    load_dtype = torch.float32 if cfg.method == "wkvquant" else parse_dtype(cfg.dtype)
    model, tokenizer, info = source.load_model(cfg.model, dtype=load_dtype)
    calib = calibrate(model, tokenizer, cfg, device)
    dtype = parse_dtype(cfg.dtype)
    tensors = export.model_tensors(model, cfg.weight, calib, dtype)
    meta = export.build_metadata(model, tensors, cfg.method, cfg.recipe(), cfg.weight, cfg.kv, info, dtype, calib)
    path = export.write_artifact(out, tensors, meta, model, tokenizer, overwrite=cfg.overwrite)
    if cfg.method == "wkvquant" and not cfg.calibration.keep_work:
        from .calibrate import finish

        finish(out)  # the artifact is complete: drop the per-block resume state
    return path
