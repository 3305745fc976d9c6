"""The WKVQuant artifact: a directory that the converter writes and the runtime loads.

Layout::

    DIR/config.json, generation_config.json, tokenizer files   (Hugging Face, unchanged)
    DIR/model.safetensors    every tensor; header ``__metadata__["wkvq"]`` = the metadata JSON
    DIR/wkvq.json            the same metadata, validated by schemas/artifact.schema.json

Tensor names keep the model's prefixes. Per decoder Linear ``P`` (e.g.
``model.layers.3.mlp.up_proj``): ``P.qweight`` (uint8, packed codes), ``P.scales`` (float16),
``P.zeros`` (uint8), ``P.clip_hi`` / ``P.clip_lo`` (float16, the LWC factors as applied).
Per layer ``N``: ``model.layers.N.self_attn.kv_quant.{k_scale,k_shift,v_scale,v_shift}``
(float32). Everything else (embeddings, norms, lm_head) in the model dtype.

This module reads and verifies; writing is the converter's job. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "wkvq.json"
SCHEMA_FILE = "artifact.schema.json"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
DECODER_LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
LINEAR_TENSORS = ("qweight", "scales", "zeros", "clip_hi", "clip_lo")
KV_TENSORS = ("k_scale", "k_shift", "v_scale", "v_shift")
MAX_HEADER_BYTES = 100 * 1024 * 1024

_ST_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "F16": torch.float16, "BF16": torch.bfloat16,
              "F32": torch.float32, "I32": torch.int32, "I64": torch.int64, "F64": torch.float64}
_DTYPE_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_DTYPE_SIZES = {k: torch.tensor([], dtype=v).element_size() for k, v in _ST_DTYPES.items()}


class ArtifactError(ValueError):
    """The artifact is missing, incomplete, corrupted or of an unsupported format."""


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}"


def linear_tensor_names(prefix: str) -> dict[str, str]:
    return {kind: f"{prefix}.{kind}" for kind in LINEAR_TENSORS}


def kv_tensor_names(i: int) -> dict[str, str]:
    return {kind: f"{layer_prefix(i)}.self_attn.kv_quant.{kind}" for kind in KV_TENSORS}


def dtype_name(dtype: torch.dtype) -> str:
    """safetensors' name of a torch dtype (``torch.uint8 -> "U8"``)."""
    return _DTYPE_NAMES[dtype]


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes exactly as safetensors stores them (contiguous, little-endian)."""
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()


def load_schema() -> dict:
    return json.loads(resources.files("schemas").joinpath(SCHEMA_FILE).read_text())


def validate_metadata(meta: object) -> None:
    """Raise :class:`ArtifactError` with a one-line reason unless ``meta`` matches the schema."""
    import jsonschema  # only validation needs it; kept out of the import path of `runtime`

    if isinstance(meta, dict) and isinstance(meta.get("format_version"), int) \
            and meta["format_version"] > FORMAT_VERSION:
        raise ArtifactError(
            f"artifact format_version {meta['format_version']} is newer than this wkvquant supports "
            f"({FORMAT_VERSION}); upgrade wkvquant to load it"
        )
    validator = jsonschema.Draft202012Validator(load_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(meta))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        raise ArtifactError(f"metadata does not match the schema at {where}: {error.message[:200]}")


def read_metadata(directory: str | Path) -> dict:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise ArtifactError(f"{directory} is not a WKVQuant artifact: {META_FILE} is missing")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); re-create the artifact") from None
    validate_metadata(meta)
    return meta


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Parse a safetensors header without trusting it: ``(header, data_start)``."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ArtifactError(f"{path.name} is truncated (no header); re-create the artifact")
        (n,) = struct.unpack("<Q", raw)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise ArtifactError(f"{path.name} has a corrupted or truncated header; re-create the artifact")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ArtifactError(f"{path.name} has a corrupted header (not JSON); re-create the artifact") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path.name} has a corrupted header; re-create the artifact")
    return header, 8 + n


@dataclass(frozen=True)
class ArtifactSummary:
    path: Path
    method: str
    num_layers: int
    num_tensors: int
    bytes: int
    wbits: int
    group_size: int
    kv_bits: int

    def line(self) -> str:
        return (f"valid WKVQuant artifact: {self.method}, W{self.wbits} g{self.group_size} KV{self.kv_bits}, "
                f"{self.num_layers} layers, {self.num_tensors} tensors, {self.bytes / 2**20:.1f} MiB")


def _header_metadata(raw: object) -> object:
    """The metadata copy in the safetensors header, or None when absent or unreadable."""
    if not isinstance(raw, dict) or not isinstance(raw.get("wkvq"), str):
        return None
    try:
        return json.loads(raw["wkvq"])
    except json.JSONDecodeError:
        return None


def _check_entry(name: str, entry: object, expected: dict | None, data_start: int, size: int) -> tuple[int, int]:
    if expected is None:
        raise ArtifactError(f"tensor {name} is in {WEIGHTS_FILE} but not in the metadata; re-create the artifact")
    corrupted = ArtifactError(f"{WEIGHTS_FILE} is truncated or corrupted at tensor {name}; re-create the artifact")
    if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list) \
            or not isinstance(entry.get("data_offsets"), list) or len(entry["data_offsets"]) != 2:
        raise corrupted
    if entry.get("dtype") != expected["dtype"] or entry["shape"] != list(expected["shape"]):
        raise ArtifactError(
            f"tensor {name} is {entry.get('dtype')}{entry['shape']}, metadata says "
            f"{expected['dtype']}{list(expected['shape'])}; re-create the artifact"
        )
    begin, end = entry["data_offsets"]
    nbytes = _DTYPE_SIZES[expected["dtype"]] * math.prod(expected["shape"])
    if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin and end - begin == nbytes
            and data_start + end <= size):
        raise corrupted
    return begin, end


def verify(directory: str | Path, checksums: bool = True) -> ArtifactSummary:
    """Check metadata against the schema and every tensor's presence, dtype, shape and checksum.

    Raises :class:`ArtifactError` with a one-line reason; returns a summary when valid.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory} does not exist or is not a directory")
    meta = read_metadata(directory)
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; re-create the artifact")
    header, data_start = read_safetensors_header(path)
    if _header_metadata(header.pop("__metadata__", None)) != meta:
        raise ArtifactError(f"{META_FILE} and the metadata in {WEIGHTS_FILE} differ; re-create the artifact")
    expected = meta["tensors"]
    for name in expected:
        if name not in header:
            raise ArtifactError(f"tensor {name} is missing from {WEIGHTS_FILE}; re-create the artifact")
    size = path.stat().st_size
    with open(path, "rb") as f:
        for name, entry in header.items():
            begin, end = _check_entry(name, entry, expected.get(name), data_start, size)
            if checksums:
                f.seek(data_start + begin)
                digest = hashlib.sha256(f.read(end - begin)).hexdigest()
                if digest != expected[name]["sha256"]:
                    raise ArtifactError(f"tensor {name} does not match its checksum; the file is corrupted")
    w, kv = meta["weight_quant"], meta["kv_quant"]
    return ArtifactSummary(directory, meta["method"], len(meta["layers"]), len(expected), size,
                           w["bits"], w["group_size"], kv["bits"])
