"""What bounds the INT4 GEMV (:mod:`runtime.kernels.w4_gemv`) at batch 1: its memory reads or its arithmetic.

For each LLaMA-2-7B projection shape at M = 1, with the config the decode step uses (``default_config``), all timed
by CUDA-graph replay over a ring of >= 256 MB of weights (so every call reads DRAM), per call:

* ``gemv``: the kernel itself;
* ``gemv_no_dram``: the same kernel and grid on one weight whose rows all alias row 0 (stride 0): the same
  instructions with every load an L1/L2 hit, i.e. the kernel's arithmetic and issue ceiling;
* ``stream``: a kernel that only loads the same code words with the same programs (rows, steps, split) and adds
  them up: the read ceiling of that access pattern; ``stream_best``: the best of a few tilings;
* ``flat``: the same number of bytes read as one contiguous array in 16 KB blocks: the read ceiling of a
  kernel of that size.

    python3 benchmarks/gemv_probe.py --json gemv_probe.json

Prints a table (us and GB/s of the codes + scales + zeros per call) and writes the JSON record. CUDA only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converter.bench_kernels import SHAPES_7B, ring_ms, weight_ring
from runtime.kernels.w4_gemv import default_config, w4_gemv_accumulate

RING_BYTES = 256 << 20


@triton.jit
def _stream_kernel(w_ptr, out_ptr, KW, stride, ROWS: tl.constexpr, BW: tl.constexpr, SPLIT: tl.constexpr):
    """Program ``(i, j)``: rows ``[i ROWS, (i + 1) ROWS)``, range ``j`` of ``SPLIT`` over the ``BW``-word steps."""
    i, j = tl.program_id(0), tl.program_id(1)
    rows = i * ROWS + tl.arange(0, ROWS)
    steps = tl.cdiv(KW, BW)
    lo = (j * steps // SPLIT) * BW
    hi = ((j + 1) * steps // SPLIT) * BW
    acc = tl.zeros((ROWS, BW), tl.int32)
    cols = tl.arange(0, BW)
    for k0 in range(lo, hi, BW):
        acc += tl.load(w_ptr + rows[:, None].to(tl.int64) * stride + k0 + cols[None, :], mask=(k0 + cols < KW)[None, :],
                       other=0)
    tl.store(out_ptr + i * SPLIT + j, tl.sum(tl.sum(acc, 1), 0))


@triton.jit
def _flat_kernel(w_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    offs = i * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, tl.sum(tl.load(w_ptr + offs, mask=offs < n, other=0), 0))


def _per_call(launch, items) -> float:
    return ring_ms(launch, items) * 1e3  # us


def probe_shape(n: int, k: int) -> dict:
    ring, nbytes = weight_ring(n, k, RING_BYTES)
    cfg = default_config(n, k, 1, 128, True)
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    out = torch.zeros(1, n, device="cuda")
    row = {"shape": f"{n}x{k}", "config": list(cfg), "label": cfg.label(), "bytes": nbytes, "ring": len(ring)}
    row["gemv"] = _per_call(lambda w: w4_gemv_accumulate(x, *w, 128, out, config=cfg), ring)
    qw, s, z = ring[0]
    alias = (qw[:1].expand(n, -1), s[:1].expand(n, -1), z[:1].expand(n, -1))
    row["gemv_no_dram"] = _per_call(lambda w: w4_gemv_accumulate(x, *w, 128, out, config=cfg), [alias] * len(ring))
    kw = k // 8
    sink = torch.empty(1 << 20, dtype=torch.int32, device="cuda")

    def stream(rows, bw, split, warps):
        grid = (triton.cdiv(n, rows), split)
        return _per_call(lambda w: _stream_kernel[grid](w[0].view(torch.int32), sink, kw, kw, ROWS=rows, BW=bw,
                                                        SPLIT=split, num_warps=warps), ring)

    row["stream"] = stream(cfg.block_n, cfg.block_k // 8, cfg.split, cfg.num_warps)
    tries = {}
    for rows, bw, split, warps in itertools.product((8, 16, 32), (32, 64, 128), (1, 2, 4), (2, 4)):
        if rows * bw // (32 * warps) < 4 or split * 2 * bw > kw:  # >= one 16-byte vector a thread, >= 2 steps a range
            continue
        tries[f"r{rows}_bw{bw}_x{split}_w{warps}"] = stream(rows, bw, split, warps)
    best = min(tries, key=tries.get)
    row["stream_best"], row["stream_best_label"] = tries[best], best
    row["stream_tries"] = tries
    flat_n, copies = nbytes // 4, len(ring)
    flats = [torch.empty(flat_n, dtype=torch.int32, device="cuda") for _ in range(copies)]
    row["flat"] = _per_call(lambda w: _flat_kernel[(triton.cdiv(flat_n, 4096),)](w, sink, flat_n, BLOCK=4096,
                                                                                  num_warps=4), flats)
    del flats
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gemv_probe: needs a CUDA device")
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": torch.cuda.get_device_name(), "rows": []}
    cols = ("gemv", "gemv_no_dram", "stream", "stream_best", "flat")
    print(f"{'shape':>12} {'config':<28} " + " ".join(f"{c:>16}" for c in cols) + "  (us, GB/s)")
    for n, k in SHAPES_7B:
        row = probe_shape(n, k)
        result["rows"].append(row)
        cells = " ".join(f"{row[c]:7.2f} {row['bytes'] / row[c] / 1e3:7.0f}" for c in cols)
        print(f"{row['shape']:>12} {row['label']:<28} {cells}  best stream: {row['stream_best_label']}", flush=True)
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
