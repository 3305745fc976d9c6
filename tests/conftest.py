"""Fixtures: tiny random LLaMAs for logic, the real SmolLM2 (cached as an HF folder) for end-to-end checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import make_tiny_llama

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A saved random 2-layer LLaMA (hidden 160: ragged group-128; GQA 4:2; tied embeddings)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_rtn_artifact(tiny_llama_dir, tmp_path_factory) -> Path:
    from converter.convert import ConvertConfig, convert

    out = tmp_path_factory.mktemp("tiny-rtn") / "q"
    return convert(ConvertConfig(out=out, model=str(tiny_llama_dir), method="rtn", device="cpu", dtype="float32"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a dense HF folder (float32), made once from the embedded GGUF and cached."""
    from converter.source import cache_dir, load_model

    target = cache_dir() / "test-smollm2-hf"
    if not (target / "model.safetensors").is_file():
        model, tok, _ = load_model(None, dtype=torch.float32)
        tmp = target.with_name(target.name + ".partial")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(target)
    return target


@pytest.fixture(scope="session")
def smollm2_rtn_artifact(smollm2_dir, tmp_path_factory) -> Path:
    from converter.convert import ConvertConfig, convert

    out = tmp_path_factory.mktemp("smollm2-rtn") / "q"
    return convert(ConvertConfig(out=out, model=str(smollm2_dir), method="rtn", device="cpu"))
