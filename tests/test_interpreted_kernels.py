"""The Triton kernels' tests under Triton's interpreter, so that a CPU-only run (CI) checks the kernels'
algebra and masks against their references too.

``tests/test_kernels.py`` and ``tests/test_w4_gemv.py`` skip without CUDA unless ``TRITON_INTERPRET=1`` is
set before Triton is imported; this runs them in a subprocess with it set. On a CUDA machine they run
directly (compiled), and this test skips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime import kernels

ROOT = Path(__file__).resolve().parent.parent
FILES = ("tests/test_kernels.py", "tests/test_w4_gemv.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the kernel tests run compiled, not interpreted")
@pytest.mark.skipif(not kernels.triton_installed(), reason="needs Triton")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="already interpreting: the files run directly")
def test_kernel_tests_pass_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FILES], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1200)
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, tail
    assert " passed" in tail and " failed" not in tail, tail
