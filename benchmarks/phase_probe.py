"""How fast can the projections' weights stream across the dependent steps of a decode layer? The bytes of the 7B
projections' codes (qkv, o, gate_up, down: 101 MB a layer, three layers read in turn so that they come from DRAM)
read by one read-only kernel in phases, one phase a projection, with the steps between phases done five ways:

* ``launch``: one launch a phase (a CUDA graph), each after the one before has completed;
* ``pdl``: the same with programmatic dependent launch, each program waiting first thing;
* ``pdl-pre``: ... each program loading its first block before it waits (the GEMVs' preload, ``w4_mma`` ``PRE``);
* ``barrier``: one launch whose programs run every phase, a grid barrier between phases (the flat counter of
  ``boundary_bench.py``), the next phase's first block loaded after it;
* ``barrier-pre``: ... loaded between the program's arrival and its wait (the weights stream while the barrier
  completes; before the arrival, its release fence would wait for them);
* ``stream``: one launch, no step between phases (the ceiling: one read of 303 MB);
* ``gemv``: the decode step's tensor-core GEMVs themselves (:func:`runtime.kernels.w4_mma.w4_mma_accumulate` at one
  row, the tables' configs, PDL and the preload as the step launches them) over random weights of the same shapes
  in the group-major layout: codes, float16 scales and uint8 zeros (4.7% more bytes; GB/s counts them all), not
  checked against the others; ``gemv-nox``, ``gemv-nosz``, ``gemv-nomma`` (and joined, ``gemv-nox-nomma``): the
  same launches with the ``x`` loads, the scale and zero loads or the dequantization and MMAs taken out of their
  PTX (:func:`gemv_edit`; wrong products, only the time counts): which part keeps the GEMVs below a read-only chain.

A persistent decode kernel (runtime/kernels/NOTES.md round 21) is worth building only if ``barrier-pre`` beats
``pdl-pre`` by more than its other costs; the GEMVs' arithmetic, the attention and the norms are not in this
probe. Each program reads an equal contiguous share of a phase's ``2 KB x warps`` blocks (16 bytes a lane a load,
``.cg``), xors them and stores one checksum a phase, so the variants check each other.

    python3 benchmarks/phase_probe.py --per-sm 16,4 --warps 1,4 --json phase.json

Prints µs a layer and GB/s per variant and writes the JSON record. CUDA only (sm_90 for PDL).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from boundary_bench import _graph_ms, grid_arrive, grid_wait, write_record

from runtime.kernels import multiprocessors, overlap

PROJECTIONS = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
LAYERS = 3  # read in turn: 303 MB, six times the L2
KINDS = ("launch", "pdl", "pdl-pre", "barrier", "barrier-pre", "stream", "gemv")


@triton.jit
def _first(buf_ptr, N0, N1, N2, N3, ph, p, P, idx, BW: tl.constexpr):
    """Phase ``ph``'s share of program ``p`` of ``P`` (blocks ``[w, w_end)`` of the phase's blocks of ``BW`` words:
    projection ``ph % 4`` of layer ``ph // 4``, each layer ``N0 .. N3`` blocks) and the four loads of its first
    block (zeros for an empty share); no memory read before them."""
    j = ph % 4
    n = tl.where(j == 0, N0, tl.where(j == 1, N1, tl.where(j == 2, N2, N3)))
    start = (ph // 4) * (N0 + N1 + N2 + N3) + tl.where(j > 0, N0, 0) + tl.where(j > 1, N1, 0) + tl.where(j > 2, N2, 0)
    w, w_end = start + p * n // P, start + (p + 1) * n // P
    ptrs = buf_ptr + w.to(tl.int64) * BW + idx
    ok = (idx >= 0) & (w < w_end)
    Q: tl.constexpr = BW // 4
    return (w, w_end, tl.load(ptrs, mask=ok, other=0, cache_modifier=".cg"),
            tl.load(ptrs + Q, mask=ok, other=0, cache_modifier=".cg"),
            tl.load(ptrs + 2 * Q, mask=ok, other=0, cache_modifier=".cg"),
            tl.load(ptrs + 3 * Q, mask=ok, other=0, cache_modifier=".cg"))


@triton.jit
def _phases_kernel(buf_ptr, N0, N1, N2, N3, out_ptr, cnt_ptr, ph0, nph, WARPS: tl.constexpr, PDL: tl.constexpr,
                   PRE: tl.constexpr, SYNC: tl.constexpr):
    """Phases ``[ph0, ph0 + nph)``: program ``p`` xors its share of each and stores the sum of the xor's words at
    ``out[ph, p]``; ``SYNC``: a grid barrier between phases; ``PRE``: each phase's first block loaded before the
    wait (PDL) or barrier before it, else after."""
    overlap.launch_dependents(PDL)
    p, P = tl.program_id(0), tl.num_programs(0)
    BW: tl.constexpr = 512 * WARPS  # words a block: 2 KB a warp
    Q: tl.constexpr = 128 * WARPS  # words a load (16 bytes a lane)
    idx = tl.arange(0, Q)
    if not PRE:
        overlap.wait_prior(PDL)
    w, w_end, a, b, c, d = _first(buf_ptr, N0, N1, N2, N3, ph0, p, P, idx, BW)
    if PRE:
        overlap.wait_prior(PDL)
    for ph in range(ph0, ph0 + nph):
        acc = a ^ b ^ c ^ d
        w += 1
        while w < w_end:
            ptrs = buf_ptr + w.to(tl.int64) * BW + idx
            acc = acc ^ tl.load(ptrs, cache_modifier=".cg") ^ tl.load(ptrs + Q, cache_modifier=".cg")
            acc = acc ^ tl.load(ptrs + 2 * Q, cache_modifier=".cg") ^ tl.load(ptrs + 3 * Q, cache_modifier=".cg")
            w += 1
        tl.store(out_ptr + ph * P + p, tl.sum(acc, 0))
        if ph + 1 < ph0 + nph:
            if SYNC:  # arrive first: its release fence would wait for the preload's loads
                grid_arrive(cnt_ptr)
            if PRE:
                w, w_end, a, b, c, d = _first(buf_ptr, N0, N1, N2, N3, ph + 1, p, P, idx, BW)
            if SYNC:
                grid_wait(cnt_ptr, (ph - ph0 + 1) * P, False)
            if not PRE:
                w, w_end, a, b, c, d = _first(buf_ptr, N0, N1, N2, N3, ph + 1, p, P, idx, BW)


def blocks_per_layer(warps: int) -> tuple[int, ...]:
    """Blocks of ``2 KB x warps`` of each of :data:`PROJECTIONS`' codes (``n k / 2`` bytes, rounded down)."""
    return tuple(n * k // 2 // (2048 * warps) for n, k in PROJECTIONS.values())


def variant(kind: str, buf, out, cnt, programs: int, warps: int):
    """The function that runs ``kind`` once (every phase of :data:`LAYERS` layers)."""
    nph, nb = 4 * LAYERS, blocks_per_layer(warps)
    if kind in ("launch", "pdl", "pdl-pre"):
        opts = overlap.options(kind != "launch")

        def run():
            for i in range(nph):
                _phases_kernel[(programs,)](buf, *nb, out, cnt, i, 1, WARPS=warps, PRE=kind == "pdl-pre",
                                            SYNC=False, num_warps=warps, **opts)
    else:
        def run():
            cnt.zero_()
            _phases_kernel[(programs,)](buf, *nb, out, cnt, 0, nph, WARPS=warps, PDL=False,
                                        PRE=kind != "barrier", SYNC=kind != "stream", num_warps=warps)
    return run


# what a "gemv-..." kind takes out of the kernel's PTX (gemv_edit)
GEMV_EDITS = ("nox", "nosz", "nomma", "noxp", "nohf", "nolop", "zfold", "zlate")


def _trivial_comp(cons: str) -> str:
    """PTX with the compute block's constraints (``n`` float accumulators out and in, then the loaded words) that
    keeps every loaded word alive (one xor chain, added to the first accumulator) and does no dequantization or
    MMA."""
    n = cons.count("=f")
    words = cons.count("r")
    lines = ["{", ".reg .b32 t;", ".reg .f32 f;", f"mov.b32 t, ${2 * n};"]
    lines += [f"xor.b32 t, t, ${2 * n + i};" for i in range(1, words)]
    lines += ["mov.b32 f, t;", f"add.f32 $0, ${n}, f;"] + [f"mov.f32 ${i}, ${n + i};" for i in range(1, n)]
    return "\n".join(lines + ["}"])


def gemv_edit(consts: dict, edits: tuple[str, ...]) -> dict:
    """The launch's keyword arguments (:func:`runtime.kernels.w4_mma.launch_args`) with parts of the tensor-core
    GEMV's PTX taken out: "nox" (``x`` words set to 1.0 pairs instead of loaded: no wait for ``x`` before the first
    MMAs), "nosz" (scales and zeros set instead of
    loaded), "nomma" (the compute block replaced by :func:`_trivial_comp`); inside the compute block, one class of
    instruction at a time: "noxp" (the ``x`` words taken as the MMA's pairs as they are: no ``prmt``, 16 a group),
    "nohf" (no float16 ``sub``/``fma`` of the codes: 32 a tile and group, and the zero points' setup with them),
    "nolop" (no ``lop3`` extracting the codes: 32 a tile and group); "zfold": "nohf" plus the float32 work that
    would take the zero points and the codes' offsets off after the MMAs if the kernels writing ``x`` also wrote
    each group's sums of ``x`` (a design, not built: each zero point converted to float32, each accumulator started
    at ``-P - z Q`` and ended with an extra ``fma``, the sums themselves constants here); "zlate": the same, but the
    accumulators started at a constant and the zero point applied by one more ``fma`` at the end, so that the MMAs
    wait for nothing but the codes and ``x``. The products are wrong; only the time counts."""
    import re

    out = dict(consts)
    for key in ("LOAD", "LOADW", "LOADX"):
        asm = out[key]
        if "nox" in edits:  # the x words are v0 .. v15
            asm = re.sub(r"(@pk )?ld\.global(\.nc)?\.v4\.u32 \{(v(?:0|4|8|12)),(v\d+),(v\d+),(v\d+)\}, \[ad\+\d+\];",
                         lambda m: " ".join(f"mov.b32 {r}, 0x3c003c00;" for r in m.groups()[2:]), asm)
        if "nosz" in edits:
            asm = re.sub(r"ld\.global(\.nc)?\.b16 (s16[ab]), \[[^]]*\];", r"mov.b16 \2, 0x2000;", asm)
            asm = re.sub(r"ld\.global(\.nc)?\.u8 (z16[ab]), \[[^]]*\];", r"mov.b16 \2, 8;", asm)
        out[key] = asm
    comp = out["COMP"]
    if "noxp" in edits:
        comp = re.sub(r"prmt\.b32 (xp\d+), (\$\d+), (\$\d+), 0x5410;", r"mov.b32 \1, \2;", comp)
        comp = re.sub(r"prmt\.b32 (xp\d+), (\$\d+), (\$\d+), 0x7632;", r"mov.b32 \1, \3;", comp)
    if {"nohf", "zfold", "zlate"} & set(edits):  # zfold, zlate: nohf, then the float32 corrections
        comp = re.sub(r"(sub|fma\.rn)\.f16x2 h\d+, [^;]*;", "", comp)
    if {"zfold", "zlate"} & set(edits):
        late = "zlate" in edits  # the zero point's fma at the accumulator's end instead of its start

        def start(m) -> str:
            i = int(m.group(1))
            return f"mov.f32 d{i}, 0fC0000000;" if late else f"fma.rn.f32 d{i}, zl{i // 2}, 0fBF800000, 0fC0000000;"

        def end(m) -> str:
            d, i = m.group(2), int(m.group(2)[1:])
            zero = f"fma.rn.f32 {d}, zl{i // 2}, 0fBF800000, {d};\n" if late else ""
            return f"fma.rn.f32 {d}, {d}, 0f3D800000, {d};\n{zero}{m.group(1)}"

        comp = comp.replace(".reg .f32 d<4>,", ".reg .f32 zl<2>, d<4>,")
        comp = re.sub(r"add\.u32 zs(\d), zq, 0x64006400;", r"cvt.rn.f32.u32 zl\1, zq;", comp)
        comp = re.sub(r"mad\.lo\.u32 zf\d, zq, 16, 0xD400D400;", "", comp)
        comp = re.sub(r"mov\.f32 d(\d), 0f00000000;", start, comp)
        comp = re.sub(r"(fma\.rn\.f32 r\d+, sc\d, (d\d), [^;]*;)", end, comp)
    if "nolop" in edits:
        comp = re.sub(r"lop3\.b32 (h\d+), ([^,]+), m[01], mag, 0xEA;", r"mov.b32 \1, \2;", comp)
    out["COMP"] = comp
    if "nomma" in edits:
        out["COMP"] = _trivial_comp(out["COMP_CONS"])
    return out


def gemv_chain(edits: tuple[str, ...] = ()):
    """The function that runs the tensor-core GEMVs of :data:`LAYERS` layers of :data:`PROJECTIONS` once (random
    group-major weights, one row of ``x``; launched as :func:`runtime.kernels.w4_mma.w4_mma_accumulate` launches
    them, :func:`runtime.kernels.w4_mma.launch_args`, with :func:`gemv_edit`'s ``edits``), and the bytes they read."""
    from runtime import quant
    from runtime.kernels import w4_mma

    launches, nbytes = [], 0
    for _ in range(LAYERS):
        for n, k in PROJECTIONS.values():
            qw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
            sc = (torch.rand(n, k // 128, device="cuda") * 1e-3).half()
            z = torch.randint(0, 16, (n, k // 128), dtype=torch.uint8, device="cuda")
            qw, sc, z = quant.group_major(qw, sc, z)
            x = torch.randn(1, k, device="cuda").half()
            grid, args, kwargs = w4_mma.launch_args(x, qw, sc, z, 128, torch.zeros(1, n, device="cuda"))
            launches.append((grid, args, gemv_edit(kwargs, edits)))
            nbytes += sum(t.numel() * t.element_size() for t in (qw, sc, z))

    def run():
        for grid, args, kwargs in launches:
            w4_mma._w4_mma_kernel[grid](*args, **kwargs)
    return run, nbytes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-sm", default="16,4", help="comma-separated programs a multiprocessor (all resident)")
    ap.add_argument("--warps", default="1,4", help="comma-separated warps a program (paired with --per-sm)")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("phase_probe: needs a CUDA GPU")
    kinds = args.kinds.split(",")
    if not overlap.pdl(torch.device("cuda"), "gemv"):
        kinds = [k for k in kinds if not k.startswith("pdl")]
    sms = multiprocessors(torch.device("cuda"))
    rows = []
    print(f"{torch.cuda.get_device_name()}: µs a layer ({LAYERS} layers of the 7B projections' codes in turn) and GB/s")
    print(f"{'kind':12} {'programs':>8} {'warps':>5} {'us/layer':>9} {'GB/s':>7}")
    reads = [k for k in kinds if not k.startswith("gemv")]
    for per, warps in zip((int(v) for v in args.per_sm.split(",")), (int(v) for v in args.warps.split(","))):
        if not reads:
            break
        if per * warps > 32:
            raise SystemExit(f"phase_probe: {per} programs of {warps} warps a multiprocessor may not all be "
                             "resident (the barrier would hang); keep per-sm x warps <= 32")
        blocks = LAYERS * sum(blocks_per_layer(warps))
        buf = torch.randint(-2**31, 2**31 - 1, (blocks * 512 * warps,), dtype=torch.int32, device="cuda")
        nbytes = buf.numel() * 4
        programs = per * sms
        cnt = torch.zeros(1, dtype=torch.int32, device="cuda")
        ref = None
        for kind in reads:
            out = torch.zeros(4 * LAYERS, programs, dtype=torch.int32, device="cuda")
            run = variant(kind, buf, out, cnt, programs, warps)
            run()
            torch.cuda.synchronize()
            ref = out.clone() if ref is None else ref
            assert torch.equal(out, ref), f"{kind}: the checksums differ from {reads[0]}'s"
            ms = _graph_ms(run, args.reps)
            rows.append({"kind": kind, "programs": programs, "warps": warps, "us_per_layer": ms * 1e3 / LAYERS,
                         "GBps": nbytes / (ms * 1e-3) / 1e9})
            print(f"{kind:12} {programs:8d} {warps:5d} {ms * 1e3 / LAYERS:9.2f} {rows[-1]['GBps']:7.0f}")
        del buf
    for kind in (k for k in kinds if k.startswith("gemv")):
        edits = tuple(kind.split("-")[1:])
        if any(e not in GEMV_EDITS for e in edits):
            raise SystemExit(f"phase_probe: {kind}: the gemv kinds take {', '.join(GEMV_EDITS)} after 'gemv-'")
        run, nbytes = gemv_chain(edits)
        ms = _graph_ms(run, args.reps)
        rows.append({"kind": kind, "us_per_layer": ms * 1e3 / LAYERS, "GBps": nbytes / (ms * 1e-3) / 1e9})
        print(f"{kind:12} {'table':>8} {'':>5} {ms * 1e3 / LAYERS:9.2f} {rows[-1]['GBps']:7.0f}")
    write_record(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
