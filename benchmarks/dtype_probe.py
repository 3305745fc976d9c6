"""Probe: how far the CUDA decode step (kernels, CUDA graph aside) is from the eager path in each model dtype.

A converted two-layer model with heads of 128 channels (the tensor-core attention), loaded in float32, float16 and
bfloat16: the logits of a 48-token prefill and five decode steps on the kernel path against the eager path in the
same dtype, and each against the float32 eager path. With a 4-bit cache a small difference in K or V can change a
code, so paths that round differently drift apart by far more than their arithmetic differs; what matters is that
the kernel path is no further from float32 than the eager path in the same dtype. Prints one line per dtype and
comparison (relative L2 errors: prefill, then the steps). For CUDA: under Triton's interpreter the bfloat16
kernels compute garbage (``tl.dot`` multiplies bfloat16 bit patterns there: triton-lang/triton#11584), so only
float32 and float16 mean anything on a CPU.

    PYTHONPATH=$PWD python3 benchmarks/dtype_probe.py [--json probe.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import runtime
from runtime.fast import FastLlama
from tests.helpers import fast_copy, heads128_rtn_artifact, rel_error

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def logits(art, ids, dtype, kernels: bool) -> list[torch.Tensor]:
    """The prefill's and five decode steps' logits of the artifact loaded in ``dtype``, eager or on the kernels."""
    model, _ = runtime.load(art, device=DEV, dtype=dtype)
    eager = FastLlama.from_hf(model, 128, use_kernels=False)
    m = fast_copy(eager) if kernels else eager
    c = m.new_cache(1, 64)
    out = [m.forward(ids[:, :48], c)]
    for i in range(48, 53):
        out.append(m.decode_step(ids[:, i], c) if kernels else m.forward(ids[:, i:i + 1], c))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args()
    art = heads128_rtn_artifact(Path(tempfile.mkdtemp()))
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (1, 56), device=DEV)
    ref = logits(art, ids, torch.float32, False)
    rows = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        e, f = logits(art, ids, dtype, False), logits(art, ids, dtype, True)
        for name, xs, ys in (("kernels-eager", f, e), ("kernels-eager32", f, ref), ("eager-eager32", e, ref)):
            errs = [rel_error(a, b) for a, b in zip(xs, ys)]
            rows.append({"dtype": str(dtype)[6:], "compare": name, "errors": errs})
            print(f"{str(dtype)[6:]:9} {name:16}", " ".join(f"{x:.2e}" for x in errs), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": str(DEV), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
