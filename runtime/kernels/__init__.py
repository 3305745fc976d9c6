"""Triton kernels for the CUDA decode path (INT4 weights, 4-bit POQ KV cache).

Triton is optional: CI and CPU-only installs do not have it. :func:`available` says whether the
kernels can run on tensors of a given device: on CUDA when Triton is installed, and on CPU
tensors only under Triton's interpreter (``TRITON_INTERPRET=1``, for tests).
"""

from __future__ import annotations

import importlib.util
import os

import torch


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(device) -> bool:
    """Whether the Triton kernels can run on tensors on ``device``."""
    device = torch.device(device)
    if not triton_installed():
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and interpreting()
