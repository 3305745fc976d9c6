"""What one dependent step costs on the GPU: a kernel boundary (plain, or with PDL) against a grid barrier inside
one persistent kernel. The question behind a persistent decode-layer kernel (runtime/kernels/NOTES.md round 17):
the decode step is ~8 dependent kernels a layer, and each boundary's latency is paid in full.

Every chain runs ``steps`` dependent steps over ``--programs`` one-warp programs. In step ``k`` program ``p`` reads
the value program ``p + 1`` wrote in step ``k - 1`` (ping-pong buffers) and writes its own, so each step needs the
whole step before it:

* ``launch``: one launch a step (CUDA graph), each after the one before has completed;
* ``pdl``: the same with programmatic dependent launch (:mod:`runtime.kernels.overlap`: launched early, each
  program waits with ``griddepcontrol.wait``);
* ``barrier``: one launch whose programs run all steps, separated by a grid barrier: each program adds 1 to a
  counter (release, after a CTA barrier) and polls it (acquire) until it reaches ``(k + 1) * programs``; every
  program must be resident (``--programs`` at most what fits at once); ``poll`` atomic (``atom.add 0``) or load
  (``ld.acquire.gpu``).

Each chain is timed at ``--steps`` and at 1 step (median of ``--reps`` graph replays); the cost a step is the
difference over ``steps - 1``, without the launch and the fixed costs. Checks the values each chain leaves.

    python3 benchmarks/boundary_bench.py --programs 528,1056,2112 --steps 64 --json boundary.json

Prints a table (µs a step) and writes the JSON record. CUDA only (sm_90 for PDL).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converter.bench import _time_ms
from runtime.kernels import overlap

POLL_ASM = tl.constexpr("ld.acquire.gpu.global.u32 $0, [$1];")


@triton.jit
def _step_kernel(buf_ptr, P, k, PDL: tl.constexpr):
    overlap.launch_dependents(PDL)
    overlap.wait_prior(PDL)
    pid = tl.program_id(0)
    src = buf_ptr + (k % 2) * P
    v = tl.load(src + (pid + 1) % P)
    tl.store(buf_ptr + ((k + 1) % 2) * P + pid, v + 1)


@triton.jit
def grid_arrive(cnt_ptr):
    """A flat grid barrier's arrival: the program adds 1 to the counter (release, after a CTA barrier)."""
    tl.debug_barrier()
    tl.atomic_add(cnt_ptr, 1, sem="release")


@triton.jit
def grid_wait(cnt_ptr, target, LOAD_POLL: tl.constexpr):
    """A flat grid barrier's wait: the program polls the counter (acquire; ``LOAD_POLL``: ``ld.acquire.gpu``
    loads, else ``atom.add 0``) until it reaches ``target``."""
    if LOAD_POLL:
        lane = tl.zeros((32,), tl.int32)
        cur = tl.max(tl.inline_asm_elementwise(POLL_ASM, "=r,l", [cnt_ptr + lane], dtype=tl.int32,
                                               is_pure=False, pack=1), 0)
        while cur < target:
            cur = tl.max(tl.inline_asm_elementwise(POLL_ASM, "=r,l", [cnt_ptr + lane], dtype=tl.int32,
                                                   is_pure=False, pack=1), 0)
    else:
        cur = tl.atomic_add(cnt_ptr, 0, sem="acquire")
        while cur < target:
            cur = tl.atomic_add(cnt_ptr, 0, sem="acquire")


@triton.jit
def _barrier_kernel(buf_ptr, cnt_ptr, P, steps, LOAD_POLL: tl.constexpr):
    pid = tl.program_id(0)
    for k in range(steps):
        v = tl.load(buf_ptr + (k % 2) * P + (pid + 1) % P, volatile=True)
        tl.store(buf_ptr + ((k + 1) % 2) * P + pid, v + 1)
        grid_arrive(cnt_ptr)
        grid_wait(cnt_ptr, (k + 1) * P, LOAD_POLL)


def write_record(path: str | None, rows: list[dict]) -> None:
    """The JSON record of a probe's rows (with the device's name) at ``path``, where one is given."""
    if path:
        Path(path).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


def _graph_ms(fn, reps: int) -> float:
    """Median ms of ``reps`` replays of ``fn`` captured in a CUDA graph (after two warm-up calls)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return _time_ms(g.replay, reps)


def chain(kind: str, programs: int, steps: int):
    """The chain's function (one call runs it once) and a check of the values it leaves."""
    buf = torch.zeros(2 * programs, dtype=torch.int32, device="cuda")
    cnt = torch.zeros(1, dtype=torch.int32, device="cuda")
    if kind in ("launch", "pdl"):
        opts = overlap.options(kind == "pdl")

        def run():
            buf.zero_()
            for k in range(steps):
                _step_kernel[(programs,)](buf, programs, k, **opts)
    else:
        def run():
            buf.zero_()
            cnt.zero_()
            _barrier_kernel[(programs,)](buf, cnt, programs, steps, LOAD_POLL=kind == "barrier-load", num_warps=1)

    def check():
        run()
        torch.cuda.synchronize()
        assert int(buf[(steps % 2) * programs:][:programs].min()) == steps, f"{kind}: a step read a stale value"
        if kind.startswith("barrier"):
            assert int(cnt.item()) == steps * programs, f"{kind}: counter {int(cnt.item())}"
    return run, check


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--programs", default="528,1056,2112", help="comma-separated grid sizes (one-warp programs)")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--kinds", default="launch,pdl,barrier-atom,barrier-load")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("boundary_bench: needs a CUDA GPU")
    kinds = args.kinds.split(",")
    if "pdl" in kinds and not overlap.pdl(torch.device("cuda"), "gemv"):
        kinds.remove("pdl")
    rows = []
    print(f"{torch.cuda.get_device_name()}: µs a dependent step ({args.steps} steps against 1)")
    print(f"{'kind':14} {'programs':>8} {'us/step':>8} {'one step us':>11}")
    for programs in (int(p) for p in args.programs.split(",")):
        for kind in kinds:
            run_n, check = chain(kind, programs, args.steps)
            check()
            run_1, _ = chain(kind, programs, 1)
            t_n, t_1 = _graph_ms(run_n, args.reps), _graph_ms(run_1, args.reps)
            per = (t_n - t_1) / (args.steps - 1) * 1e3
            rows.append({"kind": kind, "programs": programs, "steps": args.steps, "us_per_step": per,
                         "one_step_us": t_1 * 1e3})
            print(f"{kind:14} {programs:8d} {per:8.2f} {t_1 * 1e3:11.2f}")
    write_record(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
