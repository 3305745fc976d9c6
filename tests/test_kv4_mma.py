"""The tensor-core decode attention (:mod:`runtime.kernels.kv4_mma`) without a GPU: it compiles for sm_90 with
Triton's bundled ptxas. Its results against the reference run on CUDA (``tests/test_kernels.py``,
``test_mma_attention_matches_reference``)."""

from __future__ import annotations

import os
import subprocess

import pytest


@pytest.mark.parametrize("tile,stages,qg,bulk", [(16, 2, 1, "mixed"), (32, 4, 3, "mixed"), (64, 2, 4, "mixed"),
                                               (128, 2, 1, "mixed"), (64, 3, 1, "bulk"), (32, 2, 1, "lanes"),
                                               (128, 2, 3, "lanes")])
def test_mma_attention_compiles_for_sm90(tile, stages, qg, bulk, tmp_path):
    """The PTX is valid for sm_90; per tile 24 HMMA per 16 tokens (16 for the scores, 8 for the values); per issue
    2 bulk copies of codes and the stats by each lane's ``cp.async`` (16 bytes at most an instruction), or 6 bulk
    copies with ``bulk``, issued ``stages - 1`` times before the loop and once in it; the shared ring as declared;
    no local memory (spills)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from runtime.kernels import kv4_mma

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        pytest.skip("Triton's bundled cuobjdump is not there")
    init, issue, step, step_cons = kv4_mma._asm(tile, stages, qg, bulk)
    consts = {"HQ": 4 * qg, "HKV": 4, "QG": qg, "TILE": tile, "NSPLIT": 8, "STAGES": stages, "PDL": False,
              "COMBINE": True, "INIT": init, "ISSUE": issue, "STEP": step, "STEP_CONS": step_cons}
    names = list(kv4_mma._attn_mma_kernel.arg_names)
    kinds = {"kc_ptr": "*u8", "vc_ptr": "*u8", "len_ptr": "*i32", "cnt_ptr": "*i32", "out_ptr": "*fp16",
             "sm_scale": "fp32", "S": "i32"}
    kinds.update({n: "*fp16" for n in ("ks_ptr", "km_ptr", "vs_ptr", "vm_ptr")})
    sig = {n: "constexpr" if n in consts else kinds.get(n, "*fp32") for n in names}
    src = ASTSource(fn=kv4_mma._attn_mma_kernel, signature=sig,
                    constexprs={(names.index(k),): v for k, v in consts.items()})
    try:
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})
    except Exception as e:  # a Triton without this compile API: nothing to check here
        if "ptxas" in str(e).lower() or "PTX" in str(e):
            raise
        pytest.skip(f"this Triton cannot compile for sm_90 here: {type(e).__name__}: {str(e)[:120]}")
    cubin = tmp_path / "attn.cubin"
    cubin.write_bytes(k.asm["cubin"])
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                           check=True).stdout
    assert sass.count("HMMA.16816.F32") == 24 * tile // 16
    assert sass.count("UBLKCP") == {"bulk": 6, "mixed": 2, "lanes": 0}[bulk] * stages
    assert (sass.count("LDGSTS") == 0) == (bulk == "bulk")  # ptxas may split a predicated copy: no exact count
    shared = int(usage.split("SHARED:")[1].split()[0])  # the ring, plus Triton's scratch of the fused combine
    assert kv4_mma.smem_bytes(tile, stages) <= shared <= kv4_mma.smem_bytes(tile, stages) + 4096
    assert "LOCAL:0" in usage
