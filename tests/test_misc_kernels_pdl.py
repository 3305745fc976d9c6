"""The decode step's small kernels (:mod:`runtime.kernels.misc`: RMSNorm, the SiLU product) as launched with PDL,
compiled for sm_90 without a GPU: what they read before ``griddepcontrol.wait`` (SASS ``ACQBULK``). Their input
is what the kernel before writes; ptxas may move loads across the wait, so only the norm weight may be read above
it. The tensor-core GEMV and attention have their own such tests (``tests/test_w4_mma.py``,
``tests/test_kv4_mma.py``)."""

from __future__ import annotations

import pytest

from tests.helpers import sm90_sass


def _ops(sass: str) -> list[str]:
    """The SASS instructions in order (without addresses and encodings)."""
    out = []
    for line in sass.splitlines():
        line = line.strip()
        if line.startswith("/*") and "*/" in line:
            ins = line.split("*/", 1)[1].split(";")[0].strip()
            if ins:
                out.append(ins)
    return out


def _loads_before_their_wait(ops: list[str]) -> list[str]:
    """The global loads above the wait of their stretch of straight-line code: the SASS split at each unconditional
    ``EXIT`` or ``BRA`` (a branch's code, in whichever order ptxas lays the branches out: Triton 3.6 puts the
    norm's clearing branch, with its own wait, after the norm's reads; 3.9 before them), the loads before the
    stretch's first ``ACQBULK`` (all of a stretch's loads where it has none)."""
    out, waited = [], False
    for op in ops:
        if "ACQBULK" in op:
            waited = True
        elif "LDG" in op and not waited:
            out.append(op)
        if op.split()[0] in ("EXIT", "BRA"):
            waited = False
    return out


@pytest.mark.parametrize("aligned", [False, True])  # as launched on unaligned views / on aligned tensors
def test_rmsnorm_reads_only_its_weight_before_the_wait(aligned, tmp_path):
    """The norm's program loads the norm weight (float16, ``LDG.E.U16``) before its wait and ``x`` (float32) after;
    the clearing programs read nothing."""
    pytest.importorskip("triton")
    from runtime.kernels import misc, overlap

    if not overlap._triton_has_pdl():
        pytest.skip("this Triton has no grid dependency control")
    kinds = {"x_ptr": "*fp32", "w_ptr": "*fp16", "y_ptr": "*fp16", "clr_ptr": "*fp32", "eps": "fp32"}
    ops = _ops(sm90_sass(misc._rmsnorm_kernel, {"BLOCK": 4096, "PDL": True}, kinds, "i32", 4, tmp_path,
                         aligned=aligned)[0])
    before = _loads_before_their_wait(ops)
    assert before and all(".U16" in op for op in before)  # the weight's halves only
    assert any("LDG.E" in op and ".U16" not in op for op in ops)  # x is read, below the wait


@pytest.mark.parametrize("aligned", [False, True])  # as launched on unaligned views / on aligned tensors
def test_silu_reads_nothing_before_the_wait(aligned, tmp_path):
    pytest.importorskip("triton")
    from runtime.kernels import misc, overlap

    if not overlap._triton_has_pdl():
        pytest.skip("this Triton has no grid dependency control")
    kinds = {"gu_ptr": "*fp32", "y_ptr": "*fp16"}
    ops = _ops(sm90_sass(misc._silu_mul_kernel, {"BLOCK": 1024, "CLEAR": True, "PDL": True}, kinds, "i32", 4,
                         tmp_path, aligned=aligned)[0])
    assert not _loads_before_their_wait(ops) and any("LDG" in op for op in ops)
