"""POQ decode attention on the tensor cores, fed by async copies into shared memory (CUDA sm_90+).

The same result as :func:`runtime.kernels.kv4.decode_attention` (the splits' partial results, merged with the
current token by :func:`runtime.kernels.kv4._combine_if_last`) for head_dim 128, one step/minimum per token (KV group
= head_dim) and any number of query heads per KV head: up to 4 in one program, more in
:func:`runtime.kernels.query_parts` programs of up to 4 that share each split (LLaMA-2-70B's 8: two of 4; the
later ones find most of the tiles in L2; 70B b1 p32768 23.03 -> 13.16 ms a step against the split kernel,
thirtieth session).

Why: the split kernel of :mod:`runtime.kernels.kv4` holds its tiles in registers and spends ~3 instructions a
code on float32 arithmetic; at 7B b1 p32768 it reads the 4-bit cache at ~1.7 TB/s, at p2048 at ~0.8 TB/s (a
chain of dependent loads per program). Here:

* **Loads**: whole tiles (the key and value codes of ``TILE`` tokens, 64 bytes each, contiguous in the cache, and
  their four float16 stats) go into a ring of ``STAGES`` shared-memory stages, each with an ``mbarrier``; ``STAGES
  - 1`` tiles are in flight while one is computed, without registers. ``copies``
  (:data:`runtime.kernels.kv4.COPIES`): lane 0 issues ``cp.async.bulk`` copies (the mbarrier counts their bytes) of
  the codes and the stats ("bulk"), of the codes only while every lane copies its share of the stats with
  ``cp.async`` ("mixed", the default), or every lane copies everything ("lanes"); a lane's ``cp.async`` copies
  arrive on the mbarrier when they land. The cache's slots are
  padded to a multiple of 16 (:class:`runtime.static_cache.StaticPOQCache`), so every copy is 16-byte aligned.
* **Scores** ``q' . c`` (``q' = q * s * sm_scale``, the static scale folded in) by ``mma.sync.m16n8k16`` with the
  query as A (row ``g``: the query's float16 part, row ``g + 8``: the float16 rounding error of it, so the products
  sum to ``q'`` to ~2^-22) and 8 tokens' codes as B (thread ``(g, t)``, ``g = lane / 4``, ``t = lane % 4``, gives
  token ``g``'s words ``4t .. 4t + 3``, unpacked to exact float16 pairs as in :mod:`runtime.kernels.w4_mma`: the
  ``K`` slots of an MMA are any 16 channels as long as A uses the same ones). The C fragment leaves each thread the
  scores of tokens ``2t, 2t + 1`` — exactly the B fragment the value MMA needs: no shuffles.
* **Values** ``sum_j p_j step_j c_j`` by ``mma.sync`` with 16 dims of the codes as A (rows; each token's codes
  paired with the next token's by ``prmt``) and ``p step`` as B (column ``n``: thread group ``n``; even columns
  the float16 value, odd ones its rounding error, again ~2^-22), so each thread's C holds, per dim, the two
  halves of one query's sum.
* Online softmax in float32 (base-2 exponentials), once a tile: the maximum shared by the 4 threads of a token
  quad by two shuffles, a new maximum only when it grows by more than 8 (``exp(8)`` bounds the unscaled weights
  and their float16 products), the accumulators multiplied by the factor (1 when it holds) without a branch, so a
  tile is one basic block and its 16-token blocks' MMA chains overlap.

Measured on an H200 (fourteenth session, BENCHMARKS.md): 7B b1 p32768 46.5 µs a layer (3.07 TB/s) against the
split kernel's 79.8; b8 p32768 345 against 572; b1 p2048 8.9 against 10.0 (a fixed cost of ~4.8 µs dominates).

With ``rope`` (:func:`runtime.kernels.kv4.rope_attention`, the decode step's default) the programs rope the
query from the projection's output themselves and one more program per KV head appends the token's key and value
(no ``rope_append`` launch: 7B b1 2.115 -> 2.064 ms a step at p2048, 3.391 -> 3.307 at p32768, fifteenth
session). The query's rows are read 8 channels (two 16-byte loads) at a time.

``keys_a`` (:func:`_step_asm_ka`, the table's form since the eighteenth session): the keys' codes as the score MMAs'
A operand (16 tokens an MMA) and the query as B: half the score MMAs, and each thread finishes the scores of 8
tokens a 64-token tile instead of 16 (b1 p32768 48.1 -> 43.7 us, b8 p32768 332 -> 294).

Query heads (query as A): row ``g`` of the score MMA is query ``(g / 2) % QG`` of the KV head, so thread
``(g, t)`` keeps the softmax state of that query, while its value accumulators (columns ``2t, 2t + 1``) belong to
query ``t % QG``: rescale factors and the minimum term come from lane ``8t`` (a shuffle; none when ``QG == 1``).
One program per (sequence, KV head, split), one warp; its last program per KV head (a count, as in kv4) merges the
splits.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from . import (
    cuda_major,
    multiprocessors,
    overlap,
    part_heads,
    query_parts,
    shared_memory_per_multiprocessor,
    stamps,
)
from .kv4 import (
    MMA_BAR_BYTES,
    MMA_STAGE_BYTES,
    _append_kv,
    _combine_if_last,
    merge_buffers,
)
from .kv4 import mma_smem_bytes as smem_bytes

HEAD_DIM = 128
_D = tl.constexpr(HEAD_DIM)
SMEM = "wkvq_attn_smem"  # the shared memory the init PTX declares at the function's scope
# a stage of TILE tokens: key codes, value codes (64 bytes a token each), then the key steps, key minima, value
# steps and value minima (float16, 2 TILE bytes each), after the MMA_BAR_BYTES of the stages' mbarriers
_BAR = tl.constexpr(MMA_BAR_BYTES)
_STAGE_PER_TOKEN = tl.constexpr(MMA_STAGE_BYTES)


def mma_attention_ok(store, head_dim: int, groups: int, qg: int, rows=()) -> bool:
    """Whether :func:`launch` takes this cache: an sm_90+ GPU outside the interpreter, head_dim 128, one
    step/minimum per token, any number of query heads a KV head (up to :data:`runtime.kernels.MAX_QG` a program,
    :func:`query_parts`), cache slots a multiple of 8 (aligned bulk copies), and
    ``rows`` (the float32 tensors whose head rows it reads 8 channels at a time, :func:`_ld8`: the query or
    ``qkv``, ``cos``, ``sin``, the static key scale and shift) 16-byte aligned with unit stride in their last dim
    and rows a multiple of 16 bytes apart."""
    codes = store.k_codes
    return (codes.is_cuda and cuda_major(codes.device) >= 9 and head_dim == HEAD_DIM and groups == 1
            and qg >= 1 and codes.shape[2] % 8 == 0 and codes.is_contiguous()
            and all(t.is_contiguous() for t in (store.k_step, store.k_min, store.v_codes, store.v_step, store.v_min))
            and all(_rows_aligned(t) for t in rows))


def _rows_aligned(t) -> bool:
    """float32, unit stride in the last dim, the others multiples of 4 elements, 16-byte aligned."""
    return (t.dtype == torch.float32 and t.stride(-1) == 1 and all(st % 4 == 0 for st in t.stride()[:-1])
            and t.data_ptr() % 16 == 0)


# ------------------------------------------------------------------------------------------------ inline PTX


SM_SHARED = 228 << 10  # shared memory of a Hopper multiprocessor: the cap's default (launch asks the device)
CTA_RESERVED = 1 << 10  # what the hardware reserves a resident program
CAP_LIMIT = 46 << 10  # the most a cap declares: static shared memory stops at 48 KB, with room for Triton's own
CAP_ENV = "WKVQ_ATTN_CAP"  # 0: no cap when the attention is launched early
# Programs a multiprocessor over the grid's even share that the cap allows. At the even share exactly a
# multiprocessor that the kernel before still holds when the last programs are placed makes them wait for it: 13B
# b1 p32768 4.94 ms early against 4.65 launched late; one over it, 4.59-4.63 (7B 2.69-2.78 against 2.74-2.84),
# two over it no better (twentieth session, benchmarks/results/r23).
CAP_SLACK = 1


def even_cap(programs: int, sms: int) -> int:
    """Programs a multiprocessor that an early-launched grid of ``programs`` may place on one: its even share
    plus :data:`CAP_SLACK`."""
    return -(-programs // sms) + CAP_SLACK


def cap_bytes(ring: int, cap: int, sm_shared: int = SM_SHARED) -> int:
    """Shared bytes to declare for a ring of ``ring`` bytes so that at most ``cap`` programs fit on one
    multiprocessor of ``sm_shared`` bytes: just over the share of ``cap + 1`` (``ring`` where that is no more than
    ``ring``, or more than :data:`CAP_LIMIT`, or ``cap`` is 0). With PDL the programs land where the kernel before
    frees room first, up to the residency limit: a cap near the grid's even share (:func:`even_cap`) keeps a one-wave
    grid balanced."""
    padded = sm_shared // (cap + 1) - CTA_RESERVED + 128 if cap > 0 else 0
    return padded if ring < padded <= CAP_LIMIT else ring


def _init_asm(tile: int, stages: int, copies: str, cap: int = 0, sm_shared: int = SM_SHARED) -> str:
    """PTX that declares the shared ring (function scope; :func:`cap_bytes` of it with a ``cap``), lets lane 0
    initialise the stages' mbarriers (the arrivals of a phase: lane 0's, plus one per lane for its ``cp.async``
    copies unless ``copies`` is "bulk", :func:`_issue_asm`), and returns the ring's shared address. Constraints
    ``=r,r``."""
    count = 1 if copies == "bulk" else 33
    inits = [f"@p mbarrier.init.shared::cta.b64 [a+{8 * s}], {count};" for s in range(stages)]
    return "\n".join([
        f".shared .align 128 .b8 {SMEM}[{cap_bytes(smem_bytes(tile, stages), cap, sm_shared)}];",
        "{", ".reg .pred p;", ".reg .u32 lane, a;", "mov.u32 lane, %laneid;", "setp.eq.u32 p, lane, 0;",
        f"mov.u32 a, {SMEM};", *inits, "fence.mbarrier_init.release.cluster;", "fence.proxy.async.shared::cta;",
        "bar.warp.sync -1;", "mov.u32 $0, a;", "}"])


def _cap_on() -> bool:
    """``WKVQ_ATTN_CAP`` (default 1): when launched early (PDL), the programs a multiprocessor capped near the
    grid's even share (:func:`even_cap`, :func:`cap_bytes`)."""
    return os.environ.get(CAP_ENV, "1") != "0"


def _lane_copies(tile: int, region: int, size: int, ptr: str, row_bytes: int, valid: str) -> list[str]:
    """Every lane's ``cp.async`` share of a ``size``-byte region of the stage at byte ``region`` (16-byte chunks,
    lane ``l`` takes chunks ``l, l + 32, ..``; ``size < 512``: ``size / 32`` bytes a lane), read from ``ptr`` at the
    tile's first row (``row_bytes`` a token), those chunks below ``valid`` bytes only."""
    part = min(16, size // 32)
    L = [f"mul.wide.u32 off, $4, {row_bytes};", f"add.u64 sp, {ptr}, off;", f"mul.lo.u32 o, lane, {part};",
         "cvt.u64.u32 off, o;", "add.u64 sp, sp, off;", f"add.u32 so, $3, {region};", "add.u32 so, so, o;"]
    for k in range(size // (32 * part)):
        step = 32 * part * k
        L += [f"add.u32 r, o, {step};", f"setp.lt.and.u32 pv, r, {valid}, pg;",
              f"@pv cp.async.{'cg' if part == 16 else 'ca'}.shared.global [so+{step}], [sp+{step}], {part};"]
    return L


def _issue_asm(tile: int, copies: str) -> str:
    """PTX that starts the copies of one tile into a stage (when the flag ``go`` is set): ``n`` tokens from token
    row ``row``: the key and value codes (``64 n`` bytes each) and the four stats (``2 n`` bytes each, rounded up
    to 8 tokens: the slots are a multiple of 8, so this stays inside the head). ``copies``
    (:data:`runtime.kernels.kv4.COPIES`): "bulk": lane 0 issues 6 ``cp.async.bulk`` copies and expects their bytes
    on the stage's mbarrier; "mixed": the codes so, the stats by every lane's ``cp.async`` (``tile / 4`` bytes a
    lane); "lanes": all by every lane's ``cp.async`` (16-byte chunks). A lane's ``cp.async`` copies arrive on the
    mbarrier when they land (``cp.async.mbarrier.arrive.noinc``: the mbarrier then counts 33 arrivals,
    :func:`_init_asm`). Inputs: ``go``, the mbarrier and stage addresses, ``row``, ``n``, the six cache pointers
    (codes, then key step, key minimum, value step, value minimum)."""
    c = 64 * tile
    L = ["{", ".reg .pred p, pg, pv;", ".reg .u32 lane, nc, n8, tot, so, o, r;", ".reg .u64 off, src, sp;",
         "mov.u32 lane, %laneid;", "setp.ne.u32 pg, $1, 0;", "setp.eq.and.u32 p, lane, 0, pg;",
         "bar.warp.sync -1;",  # every lane done with the stage (its reads consumed) before it is overwritten
         "shl.b32 nc, $5, 6;", "add.u32 n8, $5, 7;", "and.b32 n8, n8, -8;", "shl.b32 n8, n8, 1;"]
    if copies == "lanes":
        L.append("@p mbarrier.arrive.shared::cta.b64 _, [$2];")
        L += _lane_copies(tile, 0, c, "$6", 64, "nc") + _lane_copies(tile, c, c, "$7", 64, "nc")
    else:
        L += ["shl.b32 tot, nc, 1;"] + (["mad.lo.u32 tot, n8, 4, tot;"] if copies == "bulk" else [])
        L += ["@p mbarrier.arrive.expect_tx.shared::cta.b64 _, [$2], tot;",
              "mul.wide.u32 off, $4, 64;",
              "add.u64 src, $6, off;",
              "@p cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [$3], [src], nc, [$2];",
              "add.u64 src, $7, off;",
              f"@p cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [$3+{c}], [src], nc, [$2];",
              "mul.wide.u32 off, $4, 2;"]
    if copies == "bulk":
        for i, ptr in enumerate(("$8", "$9", "$10", "$11")):
            L += [f"add.u64 src, {ptr}, off;",
                  (f"@p cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [$3+{2 * c + 2 * tile * i}],"
                   " [src], n8, [$2];")]
    else:
        for i, ptr in enumerate(("$8", "$9", "$10", "$11")):
            if tile > 64:  # per stat: 2 tile bytes over the lanes
                L += _lane_copies(tile, 2 * c + 2 * tile * i, 2 * tile, ptr, 2, "n8")
        if tile <= 64:  # all four stats in one pass: lane l copies tile / 4 bytes (4, 8, 16)
            size = tile // 4
            L += [f"mul.lo.u32 so, lane, {size};",  # the lane's offset in the stage's stats
                  f"shr.u32 r, so, {(2 * tile).bit_length() - 1};", f"and.b32 o, so, {2 * tile - 1};",
                  ".reg .pred q<3>;", "setp.eq.u32 q0, r, 0;", "setp.eq.u32 q1, r, 1;", "setp.eq.u32 q2, r, 2;",
                  "selp.b64 sp, $10, $11, q2;", "selp.b64 sp, $9, sp, q1;", "selp.b64 sp, $8, sp, q0;",
                  "mul.wide.u32 off, $4, 2;", "add.u64 sp, sp, off;", "cvt.u64.u32 off, o;", "add.u64 sp, sp, off;",
                  f"add.u32 so, so, {2 * c};", "add.u32 so, so, $3;", "setp.lt.and.u32 pv, o, n8, pg;",
                  f"@pv cp.async.{'cg' if size == 16 else 'ca'}.shared.global [so], [sp], {size};"]
        L.append("@pg cp.async.mbarrier.arrive.noinc.shared::cta.b64 [$2];")
    L += ["mov.u32 $0, 0;", "}"]
    return "\n".join(L)


MMA = "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"
# the registers :func:`_nibble` reads (declared .b32 by the step)
_UNPACK_CONSTS = ("mov.b32 mag, 0x64006400;", "mov.b32 m0, 0x000F000F;", "mov.b32 m1, 0x00F000F0;",
                  "mov.b32 k16, 0x2C002C00;", "mov.b32 k64, 0xD400D400;")


def _nibble(word: str, high: int, out: str) -> list[str]:
    """The exact float16 pair of nibble 0 (``high`` 0) or 1 (``high`` 1) of each 16-bit half of ``word`` (low
    nibble: ``lop3`` into the mantissa of 1024 and ``sub`` 1024; high nibble: into the mantissa as 16 c, times 1/16
    minus 64)."""
    if high:
        return [f"lop3.b32 {out}, {word}, m1, mag, 0xEA;", f"fma.rn.f16x2 {out}, {out}, k16, k64;"]
    return [f"lop3.b32 {out}, {word}, m0, mag, 0xEA;", f"sub.f16x2 {out}, {out}, mag;"]


def _unpack(word: str, out: tuple[str, str, str, str], tmp: str) -> list[str]:
    """Four exact float16 pairs of a word's nibbles (:func:`_nibble`): ``out[i]`` = (nibble ``i``, nibble ``i + 4``)
    of each 16-bit half, i.e. ``(c_i, c_{i+4})`` of a word of 8 codes. 9 instructions."""
    return (_nibble(word, 0, out[0]) + _nibble(word, 1, out[1]) + [f"shr.u32 {tmp}, {word}, 8;"]
            + _nibble(tmp, 0, out[2]) + _nibble(tmp, 1, out[3]))


def _values_asm(nsub: int) -> list[str]:
    """The value MMAs of a tile of ``nsub`` 16-token blocks (:func:`_step_asm`): 16 dims of the codes as A, the
    B fragments ``bb{2j}``, ``bb{2j + 1}`` (``p step`` of tokens ``2t, 2t + 1`` and ``2t + 8, 2t + 9`` of block
    ``j``) into ``acc0 .. acc31``."""
    L = []
    for j in range(nsub):
        vb = 1024 * j
        L += [f"ld.shared.v2.b32 {{vw0,vw1}}, [va+{vb}];", f"ld.shared.v2.b32 {{vw2,vw3}}, [va+{vb + 64}];",
              f"ld.shared.v2.b32 {{vw4,vw5}}, [va+{vb + 512}];", f"ld.shared.v2.b32 {{vw6,vw7}}, [va+{vb + 576}];"]
        for half, sel in ((0, "0x5410"), (1, "0x7632")):
            # pp[2 pair + k]: word k of the pair's two tokens, nibbles 4 half .. 4 half + 3 of each side by side
            # (low 16 bits: the pair's first token); ps: the same shifted right by 8 (nibbles 2, 3)
            for pair in range(2):
                for k in range(2):
                    L += [f"prmt.b32 pp{2 * pair + k}, vw{4 * pair + k}, vw{4 * pair + 2 + k}, {sel};",
                          f"shr.u32 ps{2 * pair + k}, pp{2 * pair + k}, 8;"]
            for e in range(4):  # nibble 4 half + e: dims 16 g + i (word 0) and 16 g + 8 + i (word 1), i = 4 half + e
                for pk in range(4):
                    L += _nibble(f"{'pp' if e < 2 else 'ps'}{pk}", e % 2, f"vh{pk}")
                i = 4 * half + e
                cc = f"{{acc{4 * i},acc{4 * i + 1},acc{4 * i + 2},acc{4 * i + 3}}}"
                L.append(f"{MMA} {cc}, {{vh0,vh1,vh2,vh3}}, {{bb{2 * j},bb{2 * j + 1}}}, {cc};")
    return L


def _state_and_wait(st_in: list[str], const: str, bar: str, par: str) -> list[str]:
    """A step's first lines after its setup: the running state from its inputs (``m``, ``l``, ``pm``, the 32
    value accumulators; ``cst``), then the wait for the stage's copies (the mbarrier's phase ``par``)."""
    return [f"mov.f32 m, {st_in[0]};", f"mov.f32 l, {st_in[1]};", f"mov.f32 pm, {st_in[2]};",
            f"mov.f32 cst, {const};", *[f"mov.f32 acc{i}, {st_in[3 + i]};" for i in range(32)],
            "WAIT:", f"mbarrier.try_wait.parity.shared::cta.b64 pw, [{bar}], {par};", "@!pw bra WAIT;"]


def _key_loads(j: int) -> list[str]:
    """The thread's key words of 16-token block ``j`` (tokens ``16j + g``: ``kw0..3``, ``16j + 8 + g``: ``kw4..7``,
    its words ``4t .. 4t + 3``) and the block's 8 score accumulators ``d[8j ..]`` zeroed."""
    return ([f"ld.shared.v4.b32 {{kw0,kw1,kw2,kw3}}, [ka+{1024 * j}];",
             f"ld.shared.v4.b32 {{kw4,kw5,kw6,kw7}}, [ka+{1024 * j + 512}];"]
            + [f"mov.f32 d{8 * j + i}, 0f00000000;" for i in range(8)])


def _step_asm(tile: int, qg: int) -> tuple[str, str]:
    """PTX of one tile for one thread (the whole warp runs it together: ``mma.sync``, shuffles): wait for the
    stage's mbarrier (phase parity), then the score MMAs of every 16 tokens of the tile, the online softmax once
    for the tile (one maximum: two shuffles; one rescale), the value MMAs of every 16 tokens. The tile is one
    basic block after the wait (no branch: the rescale multiplies by 1 when the maximum holds), so ptxas overlaps
    the independent MMA chains of its 16-token blocks (a branch per 16 tokens measured ~0.44 us a block: latency).

    Inputs: mbarrier address, parity, stage address, ``n`` valid tokens of the tile, the 16 + 16 query fragments
    (:func:`_attn_mma_kernel`), ``qsum`` (the query's ``sum q'``: the keys' minima term), ``const`` (the query's dot
    product with the keys' static shift), then the state: ``m`` (running maximum, base-e units), ``l`` (this
    thread's sum of weights), ``pmin`` (its sum of ``p * value minimum``), 32 value accumulators. Outputs: the
    state. Returns (asm, constraints)."""
    nst, nsub = 35, tile // 16
    ns = 4 * nsub  # scores a thread holds: tokens 2t, 2t + 1 of each 8-token block
    bar, par, sdata, n = (f"${nst + i}" for i in range(4))
    qh = [f"${nst + 4 + i}" for i in range(16)]
    ql = [f"${nst + 20 + i}" for i in range(16)]
    qsum, const = f"${nst + 36}", f"${nst + 37}"
    st_in = [f"${nst + 38 + i}" for i in range(nst)]
    c = 64 * tile
    L = ["{",
         f".reg .pred pw, pr, po, pk<{ns}>;",
         ".reg .u32 lane, g, t, t2, ka, va, sa, src, tmp, nm;",
         (f".reg .b32 mag, m0, m1, k16, k64, kw<8>, h<4>, vw<8>, pp<4>, vh<4>, ps<4>, hb, lb, bb<{2 * nsub}>,"
          f" sk<{2 * nsub}>, mk<{2 * nsub}>, sv<{2 * nsub}>, mv<{2 * nsub}>;"),
         ".reg .b16 lo16, hi16;",
         (f".reg .f32 m, l, pm, al, alo, mt, mn, ml, x, cst, f0, f1, r0, r1, d<{8 * nsub}>, sc<{ns}>, p<{ns}>,"
          f" kst<{ns}>, kmn<{ns}>, vst<{ns}>, vmn<{ns}>, xv<{ns}>;"),
         ".reg .f32 acc<32>;",
         *_UNPACK_CONSTS,
         "mov.u32 lane, %laneid;", "shr.u32 g, lane, 2;", "and.b32 t, lane, 3;", "shl.b32 t2, t, 1;",
         "shl.b32 src, t, 3;",  # lane 8t: a thread whose score rows are the query of this thread's columns
         "and.b32 tmp, g, 1;", "setp.ne.u32 po, tmp, 0;",  # odd g: this thread's B column is the rounding error
         f"mad.lo.u32 ka, g, 64, {sdata};", "mad.lo.u32 ka, t, 16, ka;",
         f"mad.lo.u32 va, t2, 64, {sdata};", "mad.lo.u32 va, g, 8, va;", f"add.u32 va, va, {c};",
         f"mad.lo.u32 sa, t2, 2, {sdata};", f"add.u32 sa, sa, {2 * c};",
         *_state_and_wait(st_in, const, bar, par)]
    # ---- raw scores: block 2j + b (tokens 16j + 8b + col), accumulators d[4 (2j + b) ..]
    for j in range(nsub):
        L += _key_loads(j)
        for w in range(4):
            for b in range(2):
                L += _unpack(f"kw{4 * b + w}", ("h0", "h1", "h2", "h3"), "tmp")
                o = 4 * (2 * j + b)
                cc = f"{{d{o},d{o + 1},d{o + 2},d{o + 3}}}"
                for u in range(2):
                    a = f"{{{qh[4 * w + 2 * u]},{ql[4 * w + 2 * u]},{qh[4 * w + 2 * u + 1]},{ql[4 * w + 2 * u + 1]}}}"
                    L.append(f"{MMA} {cc}, {a}, {{h{2 * u},h{2 * u + 1}}}, {cc};")
    # ---- stats of tokens 2t, 2t + 1 of each block (float16 pairs), scores (hi + lo rows) masked from n
    for blk in range(2 * nsub):
        off = 16 * blk
        L += [f"ld.shared.b32 sk{blk}, [sa+{off}];", f"ld.shared.b32 mk{blk}, [sa+{off + 2 * tile}];",
              f"ld.shared.b32 sv{blk}, [sa+{off + 4 * tile}];", f"ld.shared.b32 mv{blk}, [sa+{off + 6 * tile}];"]
        for reg, dst in ((f"sk{blk}", "kst"), (f"mk{blk}", "kmn"), (f"sv{blk}", "vst"), (f"mv{blk}", "vmn")):
            L += [f"mov.b32 {{lo16, hi16}}, {reg};", f"cvt.f32.f16 {dst}{2 * blk}, lo16;",
                  f"cvt.f32.f16 {dst}{2 * blk + 1}, hi16;"]
        for odd in range(2):
            e = 2 * blk + odd
            L += [f"add.f32 sc{e}, d{4 * blk + odd}, d{4 * blk + 2 + odd};",
                  f"fma.rn.f32 x, kmn{e}, {qsum}, cst;", f"fma.rn.f32 sc{e}, kst{e}, sc{e}, x;",
                  f"sub.s32 nm, {n}, {8 * blk + odd};", f"setp.lt.s32 pk{e}, t2, nm;",
                  f"selp.f32 sc{e}, sc{e}, 0fFF800000, pk{e};",
                  f"selp.f32 vst{e}, vst{e}, 0f00000000, pk{e};", f"selp.f32 vmn{e}, vmn{e}, 0f00000000, pk{e};"]
    # ---- the tile's maximum over the quad's tokens; lazy rescale (a new maximum only when it grows by > 8)
    L.append("max.f32 mt, sc0, sc1;")
    L += [f"max.f32 mt, mt, sc{e};" for e in range(2, ns)]
    L += ["shfl.sync.bfly.b32 x, mt, 1, 0x1f, -1;", "max.f32 mt, mt, x;",
          "shfl.sync.bfly.b32 x, mt, 2, 0x1f, -1;", "max.f32 mt, mt, x;",
          "add.f32 x, m, 0f41000000;", "setp.gt.f32 pr, mt, x;", "selp.f32 mn, mt, m, pr;",
          "sub.f32 x, m, mn;", "mul.f32 x, x, 0f3FB8AA3B;", "ex2.approx.ftz.f32 al, x;",
          "selp.f32 al, al, 0f3F800000, pr;", "mov.f32 m, mn;",
          "mul.f32 l, l, al;", "mul.f32 pm, pm, al;",
          "mov.f32 alo, al;" if qg == 1 else "shfl.sync.idx.b32 alo, al, src, 0x1f, -1;",
          *[f"mul.f32 acc{i}, acc{i}, alo;" for i in range(32)],
          "mul.f32 ml, m, 0fBFB8AA3B;"]  # -m log2(e)
    for e in range(ns):
        L += [f"fma.rn.f32 x, sc{e}, 0f3FB8AA3B, ml;", f"ex2.approx.ftz.f32 p{e}, x;",
              f"add.f32 l, l, p{e};", f"fma.rn.f32 pm, p{e}, vmn{e}, pm;", f"mul.f32 xv{e}, p{e}, vst{e};"]
    # B of the value MMAs: (p step) of tokens 2t, 2t + 1 per block, float16 (even g) or its rounding error (odd g)
    for blk in range(2 * nsub):
        L += [f"cvt.rn.f16x2.f32 hb, xv{2 * blk + 1}, xv{2 * blk};",
              "mov.b32 {lo16, hi16}, hb;", "cvt.f32.f16 f0, lo16;", "cvt.f32.f16 f1, hi16;",
              f"sub.f32 r0, xv{2 * blk}, f0;", f"sub.f32 r1, xv{2 * blk + 1}, f1;",
              "cvt.rn.f16x2.f32 lb, r1, r0;", f"selp.b32 bb{blk}, lb, hb, po;"]
    L += _values_asm(nsub)
    L += ["mov.f32 $0, m;", "mov.f32 $1, l;", "mov.f32 $2, pm;", *[f"mov.f32 ${3 + i}, acc{i};" for i in range(32)],
          "}"]
    cons = ",".join(["=f"] * nst + ["r", "r", "r", "r"] + ["r"] * 32 + ["f", "f"] + ["f"] * nst)
    return "\n".join(L), cons


def _step_asm_ka(tile: int, qg: int) -> tuple[str, str]:
    """:func:`_step_asm` with the keys as the score MMAs' A operand (``keys_a``): 16 tokens' codes as A (thread
    ``(g, t)``: tokens ``g`` and ``g + 8``, its words ``4t .. 4t + 3``, the loads of :func:`_step_asm`) and the
    query as B (column ``n``: query ``(n / 2) % QG``, even columns the float16 value, odd ones its rounding
    error), so one MMA covers 16 tokens instead of 8 (half the score MMAs) and each thread finishes, exponentiates
    and keeps the stats of 2 tokens a 16-token block for its query ``t % QG`` instead of 4: per-token work and
    registers halve. The weights reach the value MMAs' B fragment (tokens ``2t, 2t + 1`` and ``2t + 8, 2t + 9``)
    by two shuffles a block (four above two query heads): the owner of tokens ``g, g + 8`` packs ``p step`` of both
    as float16 and rounding error, and a thread takes the pair of its column's query and part from lanes ``8t +
    tq``, ``8t + 4 + tq``. The maximum is shared over ``g`` (three shuffles); the value accumulators' columns
    belong to the thread's own query, so the rescale needs no shuffle.

    Inputs: mbarrier address, parity, stage address, ``n`` valid tokens, the 16 query B fragments (hi or lo by
    ``g``'s parity), ``qsum`` and ``const`` of query ``t % QG``, the lane (``8t + tq``) of the first shuffle, then the
    state as :func:`_step_asm`. Returns (asm, constraints)."""
    nst, nsub = 35, tile // 16
    ns = 2 * nsub  # tokens a thread owns: g and g + 8 of each 16-token block
    bar, par, sdata, n = (f"${nst + i}" for i in range(4))
    qb = [f"${nst + 4 + i}" for i in range(16)]
    qsum, const, src = f"${nst + 20}", f"${nst + 21}", f"${nst + 22}"
    st_in = [f"${nst + 23 + i}" for i in range(nst)]
    c = 64 * tile
    four = qg > 2  # the hi and lo pairs shuffled apart (no spare lane bit for the part)
    L = ["{",
         f".reg .pred pr, po, pw, pu, pk<{ns}>;",
         ".reg .u32 lane, g, t, ka, va, sa, tmp, nm, srcb;",
         (f".reg .b32 mag, m0, m1, k16, k64, kw<8>, h<4>, e<4>, vw<8>, pp<4>, vh<4>, ps<4>, hb, lb, ob, xa, xb,"
          f" ya, yb, bb<{2 * nsub}>;"),
         ".reg .b16 s16, lo16, hi16;",
         (f".reg .f32 m, l, pm, al, mt, mn, ml, x, cst, f0, f1, r0, r1, d<{8 * nsub}>, sc<{ns}>, p<{ns}>,"
          f" kst<{ns}>, kmn<{ns}>, vst<{ns}>, vmn<{ns}>, xv<{ns}>;"),
         ".reg .f32 acc<32>;",
         *_UNPACK_CONSTS,
         "mov.u32 lane, %laneid;", "shr.u32 g, lane, 2;", "and.b32 t, lane, 3;",
         "and.b32 tmp, g, 1;", "setp.ne.u32 po, tmp, 0;",  # odd g: this thread's B columns are rounding errors
         f"setp.ge.u32 pu, t, {qg};" if not four else "setp.ne.u32 pu, 0, 0;",  # owner lanes t >= QG send the lo pair
         f"add.u32 srcb, {src}, 4;",
         f"mad.lo.u32 ka, g, 64, {sdata};", "mad.lo.u32 ka, t, 16, ka;",
         "shl.b32 tmp, t, 1;", f"mad.lo.u32 va, tmp, 64, {sdata};", "mad.lo.u32 va, g, 8, va;",
         f"add.u32 va, va, {c};",
         f"mad.lo.u32 sa, g, 2, {sdata};", f"add.u32 sa, sa, {2 * c};",
         *_state_and_wait(st_in, const, bar, par)]
    # ---- raw scores of block j (tokens 16j + g, 16j + 8 + g): two chains of 4 MMAs (u), accumulators d[8j + 4u ..]
    for j in range(nsub):
        L += _key_loads(j)
        for w in range(4):
            L += _unpack(f"kw{w}", ("h0", "h1", "h2", "h3"), "tmp") + _unpack(f"kw{4 + w}", ("e0", "e1", "e2", "e3"),
                                                                             "tmp")
            for u in range(2):
                o = 8 * j + 4 * u
                cc = f"{{d{o},d{o + 1},d{o + 2},d{o + 3}}}"
                a = f"{{h{2 * u},e{2 * u},h{2 * u + 1},e{2 * u + 1}}}"
                L.append(f"{MMA} {cc}, {a}, {{{qb[4 * w + 2 * u]},{qb[4 * w + 2 * u + 1]}}}, {cc};")
    # ---- stats and finished scores of tokens 16j + 8h + g (e = 2j + h), masked from n
    for j in range(nsub):
        for h in range(2):
            e, tok = 2 * j + h, 16 * j + 8 * h
            for k, dst in enumerate(("kst", "kmn", "vst", "vmn")):
                L += [f"ld.shared.b16 s16, [sa+{2 * tok + 2 * tile * k}];", f"cvt.f32.f16 {dst}{e}, s16;"]
            o = 8 * j + 2 * h
            L += [f"add.f32 sc{e}, d{o}, d{o + 1};", f"add.f32 x, d{o + 4}, d{o + 5};", f"add.f32 sc{e}, sc{e}, x;",
                  f"fma.rn.f32 x, kmn{e}, {qsum}, cst;", f"fma.rn.f32 sc{e}, kst{e}, sc{e}, x;",
                  f"sub.s32 nm, {n}, {tok};", f"setp.lt.s32 pk{e}, g, nm;",
                  f"selp.f32 sc{e}, sc{e}, 0fFF800000, pk{e};",
                  f"selp.f32 vst{e}, vst{e}, 0f00000000, pk{e};", f"selp.f32 vmn{e}, vmn{e}, 0f00000000, pk{e};"]
    # ---- the tile's maximum over the query's tokens (the 8 lanes g of a t); lazy rescale as _step_asm
    L.append("max.f32 mt, sc0, sc1;")
    L += [f"max.f32 mt, mt, sc{e};" for e in range(2, ns)]
    for s in (4, 8, 16):
        L += [f"shfl.sync.bfly.b32 x, mt, {s}, 0x1f, -1;", "max.f32 mt, mt, x;"]
    L += ["add.f32 x, m, 0f41000000;", "setp.gt.f32 pr, mt, x;", "selp.f32 mn, mt, m, pr;",
          "sub.f32 x, m, mn;", "mul.f32 x, x, 0f3FB8AA3B;", "ex2.approx.ftz.f32 al, x;",
          "selp.f32 al, al, 0f3F800000, pr;", "mov.f32 m, mn;",
          "mul.f32 l, l, al;", "mul.f32 pm, pm, al;",
          *[f"mul.f32 acc{i}, acc{i}, al;" for i in range(32)],
          "mul.f32 ml, m, 0fBFB8AA3B;"]
    for e in range(ns):
        L += [f"fma.rn.f32 x, sc{e}, 0f3FB8AA3B, ml;", f"ex2.approx.ftz.f32 p{e}, x;",
              f"add.f32 l, l, p{e};", f"fma.rn.f32 pm, p{e}, vmn{e}, pm;", f"mul.f32 xv{e}, p{e}, vst{e};"]
    # ---- B of the value MMAs: block j's (p step) of tokens (g, g + 8) packed here, taken by the lanes that need them
    for j in range(nsub):
        a, b = 2 * j, 2 * j + 1
        L += [f"cvt.rn.f16x2.f32 hb, xv{b}, xv{a};", "mov.b32 {lo16, hi16}, hb;", "cvt.f32.f16 f0, lo16;",
              "cvt.f32.f16 f1, hi16;", f"sub.f32 r0, xv{a}, f0;", f"sub.f32 r1, xv{b}, f1;",
              "cvt.rn.f16x2.f32 lb, r1, r0;"]
        if four:
            L += [f"shfl.sync.idx.b32 xa, hb, {src}, 0x1f, -1;", "shfl.sync.idx.b32 xb, hb, srcb, 0x1f, -1;",
                  f"shfl.sync.idx.b32 ya, lb, {src}, 0x1f, -1;", "shfl.sync.idx.b32 yb, lb, srcb, 0x1f, -1;",
                  "selp.b32 xa, ya, xa, po;", "selp.b32 xb, yb, xb, po;"]
        else:
            L += ["selp.b32 ob, lb, hb, pu;", f"shfl.sync.idx.b32 xa, ob, {src}, 0x1f, -1;",
                  "shfl.sync.idx.b32 xb, ob, srcb, 0x1f, -1;"]
        L += [f"prmt.b32 bb{a}, xa, xb, 0x5410;", f"prmt.b32 bb{b}, xa, xb, 0x7632;"]
    L += _values_asm(nsub)
    L += ["mov.f32 $0, m;", "mov.f32 $1, l;", "mov.f32 $2, pm;", *[f"mov.f32 ${3 + i}, acc{i};" for i in range(32)],
          "}"]
    cons = ",".join(["=f"] * nst + ["r", "r", "r", "r"] + ["r"] * 16 + ["f", "f", "r"] + ["f"] * nst)
    return "\n".join(L), cons


LANE_ASM = tl.constexpr("{ .reg .u32 lane; mov.u32 lane, %laneid; shr.u32 $0, lane, 2; and.b32 $1, lane, 3; }")
QUAD_SUM_ASM = tl.constexpr("{ .reg .f32 a, b; shfl.sync.bfly.b32 a, $1, 1, 0x1f, -1; add.f32 a, a, $1;"
                " shfl.sync.bfly.b32 b, a, 2, 0x1f, -1; add.f32 $0, a, b; }")
# keys_a: the sum over the 8 lanes g of a t (the tokens of a query)
G_SUM_ASM = tl.constexpr("{ .reg .f32 a, b; shfl.sync.bfly.b32 a, $1, 4, 0x1f, -1; add.f32 a, a, $1;"
             " shfl.sync.bfly.b32 b, a, 8, 0x1f, -1; add.f32 a, a, b; shfl.sync.bfly.b32 b, a, 16, 0x1f, -1;"
             " add.f32 $0, a, b; }")
# the value of lane $2 (e.g. lane 8t, t = lane % 4, whose score rows are the query of this lane's value columns)
FROM_ASM = tl.constexpr("shfl.sync.idx.b32 $0, $1, $2, 0x1f, -1;")


@functools.cache
def _asm(tile: int, stages: int, qg: int, copies: str = "mixed", cap: int = 0, keys_a: bool = False,
         sm_shared: int = SM_SHARED):
    step, step_cons = (_step_asm_ka if keys_a else _step_asm)(tile, qg)
    return _init_asm(tile, stages, copies, cap, sm_shared), _issue_asm(tile, copies), step, step_cons


# ------------------------------------------------------------------------------------------------ the kernel


@triton.jit
def _stage(base, st, TILE: tl.constexpr):
    """The shared address of stage ``st``'s data (its mbarrier: ``base + 8 st``)."""
    return base + _BAR + st * (TILE * _STAGE_PER_TOKEN)


@triton.jit
def _issue(base, it, ntiles, row0, span, kc_ptr, vc_ptr, ks_ptr, km_ptr, vs_ptr, vm_ptr, TILE: tl.constexpr,
           STAGES: tl.constexpr, ISSUE: tl.constexpr):
    """Starts the copies (:func:`_issue_asm`) of tile ``it`` of the slice (when it exists) into stage
    ``it % STAGES``."""
    st = it % STAGES
    n = tl.minimum(span - it * TILE, TILE)
    tl.inline_asm_elementwise(ISSUE, "=r,r,r,r,r,r,l,l,l,l,l,l",
                              [base * 0 + (it < ntiles).to(tl.int32), base + 8 * st, _stage(base, st, TILE),
                               row0 + it * TILE, n,
                               kc_ptr, vc_ptr, ks_ptr, km_ptr, vs_ptr, vm_ptr], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _pack_pair(a, b):
    """float16 ``a`` (low half) and ``b`` (high half) as one int32."""
    return (a.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | (b.to(tl.int16, bitcast=True).to(tl.int32) << 16)


@triton.jit
def _hi_lo(a, b):
    """The float16 pair ``(a, b)`` rounded (hi), and the pair of its rounding errors (lo), each as one int32."""
    ha, hb = a.to(tl.float16), b.to(tl.float16)
    return _pack_pair(ha, hb), _pack_pair((a - ha.to(tl.float32)).to(tl.float16),
                                          (b - hb.to(tl.float32)).to(tl.float16))


LD8_ASM = tl.constexpr("ld.global.v4.f32 {$0,$1,$2,$3}, [$8]; ld.global.v4.f32 {$4,$5,$6,$7}, [$8+16];")


@triton.jit
def _ld8(ptr):
    """The 8 float32 at ``ptr`` (a pointer per thread, 16-byte aligned: :func:`mma_attention_ok`): two vector
    loads instead of eight scalar ones."""
    return tl.inline_asm_elementwise(LD8_ASM, "=f,=f,=f,=f,=f,=f,=f,=f,l", [ptr], dtype=(tl.float32,) * 8,
                                     is_pure=True, pack=1)


@triton.jit
def _query8(q_row, e, t, cos_row, sin_row, ROPE: tl.constexpr):
    """Channels ``32 t + e .. 32 t + e + 7`` of the query: read at ``q_row`` (the head's channel ``32 t``), or with
    ``ROPE`` roped from the projection's output (``q_row``: the head's channel 0 in ``qkv``; HF rotate-half, the
    arithmetic of :func:`runtime.kernels.kv4._rope`) at the position of ``cos_row``, ``sin_row``."""
    if ROPE:
        x = _ld8(q_row + 32 * t + e)
        y = _ld8(q_row + (32 * t + 64) % 128 + e)  # the rotate-half partners
        c = _ld8(cos_row + 32 * t + e)
        s = _ld8(sin_row + 32 * t + e)
        sign = tl.where(t < 2, -1.0, 1.0)
        return (x[0] * c[0] + sign * y[0] * s[0], x[1] * c[1] + sign * y[1] * s[1],
                x[2] * c[2] + sign * y[2] * s[2], x[3] * c[3] + sign * y[3] * s[3],
                x[4] * c[4] + sign * y[4] * s[4], x[5] * c[5] + sign * y[5] * s[5],
                x[6] * c[6] + sign * y[6] * s[6], x[7] * c[7] + sign * y[7] * s[7])
    else:
        return _ld8(q_row + e)


@triton.jit
def _query_word(q, sc, sh, sm_scale):
    """The query fragments of 8 channels ``q`` (their static key scales ``sc`` and shifts ``sh``; tuples of 8, a
    tensor per thread): the float16 pairs ``(q'_i, q'_{i+4})``, ``i < 4``, of ``q' = q s sm_scale`` (hi: rounded,
    lo: the rounding error), and the thread's parts of ``sum q'`` and ``sm_scale sum q delta``."""
    shift = (q[0] * sh[0] + q[1] * sh[1] + q[2] * sh[2] + q[3] * sh[3] + q[4] * sh[4] + q[5] * sh[5]
             + q[6] * sh[6] + q[7] * sh[7]) * sm_scale
    x0, x1, x2, x3 = q[0] * sc[0] * sm_scale, q[1] * sc[1] * sm_scale, q[2] * sc[2] * sm_scale, q[3] * sc[3] * sm_scale
    x4, x5, x6, x7 = q[4] * sc[4] * sm_scale, q[5] * sc[5] * sm_scale, q[6] * sc[6] * sm_scale, q[7] * sc[7] * sm_scale
    hi0, lo0 = _hi_lo(x0, x4)
    hi1, lo1 = _hi_lo(x1, x5)
    hi2, lo2 = _hi_lo(x2, x6)
    hi3, lo3 = _hi_lo(x3, x7)
    return (hi0, hi1, hi2, hi3), (lo0, lo1, lo2, lo3), x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7, shift


@triton.jit
def _query_fragments(q_row, sc_row, sh_row, e, t, cos_row, sin_row, sm_scale, ROPE: tl.constexpr):
    """:func:`_query_word` of channels ``32 t + e ..`` (:func:`_query8`; ``sc_row``, ``sh_row``: the KV head's
    static key scale and shift at channel ``32 t``)."""
    return _query_word(_query8(q_row, e, t, cos_row, sin_row, ROPE), _ld8(sc_row + e), _ld8(sh_row + e), sm_scale)


@triton.jit
def _store_dims(row, i, A, pq, mask):
    """Dims ``i`` and ``8 + i`` of the thread's 16 (``row``: their pointer at dim 0): the two halves of each
    column pair plus the minimum term."""
    tl.store(row + i, A[4 * i] + A[4 * i + 1] + pq, mask=mask)
    tl.store(row + 8 + i, A[4 * i + 2] + A[4 * i + 3] + pq, mask=mask)


@triton.jit
def _attn_mma_kernel(q_ptr, kc_ptr, ks_ptr, km_ptr, vc_ptr, vs_ptr, vm_ptr, kscale_ptr, kshift_ptr, len_ptr,
                     m_ptr, l_ptr, acc_ptr, S, sm_scale, cnt_ptr, kcur_ptr, vcur_ptr, vscale_ptr, vshift_ptr,
                     out_ptr, qkv_ptr, cos_ptr, sin_ptr, stride_qkv, HQ: tl.constexpr, HKV: tl.constexpr,
                     QG: tl.constexpr, TILE: tl.constexpr, NSPLIT: tl.constexpr, STAGES: tl.constexpr,
                     PDL: tl.constexpr, COMBINE: tl.constexpr, ROPE: tl.constexpr, INIT: tl.constexpr,
                     ISSUE: tl.constexpr, STEP: tl.constexpr, STEP_CONS: tl.constexpr, TRIGGER: tl.constexpr = False,
                     KEYS_A: tl.constexpr = False, ready_ptr=None, ep_ptr=None, READY: tl.constexpr = False,
                     stamp_ptr=None, STAMPS: tl.constexpr = False, PARTS: tl.constexpr = 1, gcnt_ptr=None,
                     gm_ptr=None, gl_ptr=None, gacc_ptr=None, GROUP: tl.constexpr = 1):
    """See the module docstring. One warp; program ``((b * HKV + kh) * PARTS + part, split)``; the partial results
    (``m``, ``l``, ``acc``: as :func:`runtime.kernels.kv4._attn_split_kernel` writes them) per query head of the
    program's part of the KV head: ``PARTS`` (:func:`query_parts`) programs share a KV head's split, each with ``QG``
    of its ``QG * PARTS`` query heads (their ids adjacent, so they stream the same tiles at the same time and the
    later ones find most of them in L2), each part with its own count, merge and ready flag (``cnt_ptr``,
    ``ready_ptr [B * HKV * PARTS]``).

    ``ROPE`` (:func:`runtime.kernels.kv4.rope_attention`): the query, the current key and value come from the
    projection's output ``qkv`` (roped at position ``length``; ``q_ptr``, ``kcur_ptr``, ``vcur_ptr`` unused), and
    one more program per KV head (split ``NSPLIT``) appends the token's key and value to the cache at slot
    ``length`` (:func:`runtime.kernels.kv4._append_kv`), which no program of this launch reads (past only; the
    stats copies of a last tile may cover that slot, and its scores and values are masked): the ``rope_append``
    launch goes, and the append's latency is off the attention programs' chains. ``TRIGGER``: each program lets the
    next kernel launch first thing (it waits for the heads' flags, ``READY``, or for this kernel). ``READY``
    (with ``COMBINE``): the combining program of each KV head's part then sets its flag in ``ready_ptr [B * HKV *
    PARTS]`` to the epoch at ``ep_ptr`` (:func:`runtime.kernels.kv4._combine_if_last`). ``STAMPS``: each program writes
    ``%globaltimer`` at its start, once its query is there, after its tiles and at its end into row ``bkp + sp *
    (B * HKV * PARTS)`` of ``stamp_ptr`` (:mod:`runtime.kernels.stamps`; the append program: start, after its wait,
    twice at its end). ``GROUP > 1``: the merge in two levels (:func:`runtime.kernels.kv4._combine_if_last`; group
    counts at ``gcnt_ptr [B * HKV * PARTS * NSPLIT / GROUP]``, the groups' partials in ``gm``, ``gl``, ``gacc``)."""
    overlap.launch_dependents(TRIGGER)
    bkp, sp = tl.program_id(0), tl.program_id(1)
    bk, part = bkp // PARTS, bkp % PARTS
    b, kh = bk // HKV, bk % HKV
    me = bkp + sp * tl.num_programs(0)
    if STAMPS:
        stamps.stamp(stamp_ptr, me, 0, 4)
    if sp < NSPLIT:
        _attend(b, kh, part, sp, q_ptr, kc_ptr, ks_ptr, km_ptr, vc_ptr, vs_ptr, vm_ptr, kscale_ptr, kshift_ptr,
                len_ptr, m_ptr, l_ptr, acc_ptr, S, sm_scale, cnt_ptr, kcur_ptr, vcur_ptr, vscale_ptr, vshift_ptr,
                out_ptr, qkv_ptr, cos_ptr, sin_ptr, stride_qkv, HQ, HKV, QG, TILE, NSPLIT, STAGES, PDL, COMBINE,
                ROPE, INIT, ISSUE, STEP, STEP_CONS, KEYS_A, ready_ptr, ep_ptr, READY, stamp_ptr, me, STAMPS, PARTS,
                gcnt_ptr, gm_ptr, gl_ptr, gacc_ptr, GROUP)
    else:
        if ROPE and part == 0:  # split NSPLIT: the append (once a KV head)
            overlap.wait_prior(PDL)
            if STAMPS:
                stamps.stamp(stamp_ptr, me, 1, 4)
            length = tl.load(len_ptr)
            jj = tl.arange(0, _D // 2)[None, :]  # the packed bytes of one group ([G, D / 2 / G], G = 1)
            _append_kv(qkv_ptr + b * stride_qkv, b, kh, length, jj, cos_ptr + length * _D, sin_ptr + length * _D,
                       kc_ptr, ks_ptr, km_ptr, vc_ptr, vs_ptr, vm_ptr, kscale_ptr, kshift_ptr, vscale_ptr,
                       vshift_ptr, S, HQ, HKV, _D, 1, 15)
            if STAMPS:
                stamps.stamp(stamp_ptr, me, 2, 4)
                stamps.stamp(stamp_ptr, me, 3, 4)


@triton.jit
def _attend(b, kh, part, sp, q_ptr, kc_ptr, ks_ptr, km_ptr, vc_ptr, vs_ptr, vm_ptr, kscale_ptr, kshift_ptr,
            len_ptr, m_ptr, l_ptr, acc_ptr, S, sm_scale, cnt_ptr, kcur_ptr, vcur_ptr, vscale_ptr, vshift_ptr, out_ptr,
            qkv_ptr, cos_ptr, sin_ptr, stride_qkv, HQ: tl.constexpr, HKV: tl.constexpr, QG: tl.constexpr,
            TILE: tl.constexpr, NSPLIT: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr,
            COMBINE: tl.constexpr, ROPE: tl.constexpr, INIT: tl.constexpr, ISSUE: tl.constexpr, STEP: tl.constexpr,
            STEP_CONS: tl.constexpr, KEYS_A: tl.constexpr, ready_ptr=None, ep_ptr=None, READY: tl.constexpr = False,
            stamp_ptr=None, me=0, STAMPS: tl.constexpr = False, PARTS: tl.constexpr = 1, gcnt_ptr=None, gm_ptr=None,
            gl_ptr=None, gacc_ptr=None, GROUP: tl.constexpr = 1):
    """The attention program ``((b * HKV + kh) * PARTS + part, sp)`` of :func:`_attn_mma_kernel`: query heads
    ``kh * QG * PARTS + part * QG ..`` (``h0``)."""
    D: tl.constexpr = _D
    bk = b * HKV + kh
    bkp = bk * PARTS + part
    h0 = kh * QG * PARTS + part * QG
    length = tl.load(len_ptr)
    chunk = tl.cdiv(tl.cdiv(length, NSPLIT), TILE) * TILE
    start = sp * chunk
    span = tl.minimum(start + chunk, length) - start
    ntiles = tl.cdiv(tl.maximum(span, 0), TILE)
    row0 = (b * HKV + kh) * S + start
    z = tl.zeros((32,), tl.int32)
    g, t = tl.inline_asm_elementwise(LANE_ASM, "=r,=r,r", [z], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
    base = tl.inline_asm_elementwise(INIT, "=r,r", [z], dtype=tl.int32, is_pure=False, pack=1)
    for k in tl.static_range(STAGES - 1):  # the past is not written by the kernels before (PDL): start at once
        _issue(base, k, ntiles, row0, span, kc_ptr, vc_ptr, ks_ptr, km_ptr, vs_ptr, vm_ptr, TILE, STAGES, ISSUE)
    overlap.wait_prior(PDL)
    if STAMPS:
        stamps.stamp(stamp_ptr, me, 1, 4)
    qh = h0 + (g // 2) % QG  # the query of this thread's score rows
    cos_row, sin_row = cos_ptr + length * D, sin_ptr + length * D
    if ROPE:
        q_row = qkv_ptr + b * stride_qkv + qh * D
    else:
        q_row = q_ptr + (b * HQ + qh) * D + 32 * t
    sc_row, sh_row = kscale_ptr + kh * D + 32 * t, kshift_ptr + kh * D + 32 * t
    H0, L0, s0, c0 = _query_fragments(q_row, sc_row, sh_row, 0, t, cos_row, sin_row, sm_scale, ROPE)
    H1, L1, s1, c1 = _query_fragments(q_row, sc_row, sh_row, 8, t, cos_row, sin_row, sm_scale, ROPE)
    H2, L2, s2, c2 = _query_fragments(q_row, sc_row, sh_row, 16, t, cos_row, sin_row, sm_scale, ROPE)
    H3, L3, s3, c3 = _query_fragments(q_row, sc_row, sh_row, 24, t, cos_row, sin_row, sm_scale, ROPE)
    qsum = tl.inline_asm_elementwise(QUAD_SUM_ASM, "=f,f", [s0 + s1 + s2 + s3], dtype=tl.float32, is_pure=False,
                                     pack=1)
    const = tl.inline_asm_elementwise(QUAD_SUM_ASM, "=f,f", [c0 + c1 + c2 + c3], dtype=tl.float32, is_pure=False,
                                      pack=1)
    if KEYS_A:  # the query as B (column g: hi or lo by g's parity); qsum, const of the thread's query t % QG
        odd = g % 2 == 1
        B0 = (tl.where(odd, L0[0], H0[0]), tl.where(odd, L0[1], H0[1]), tl.where(odd, L0[2], H0[2]),
              tl.where(odd, L0[3], H0[3]))
        B1 = (tl.where(odd, L1[0], H1[0]), tl.where(odd, L1[1], H1[1]), tl.where(odd, L1[2], H1[2]),
              tl.where(odd, L1[3], H1[3]))
        B2 = (tl.where(odd, L2[0], H2[0]), tl.where(odd, L2[1], H2[1]), tl.where(odd, L2[2], H2[2]),
              tl.where(odd, L2[3], H2[3]))
        B3 = (tl.where(odd, L3[0], H3[0]), tl.where(odd, L3[1], H3[1]), tl.where(odd, L3[2], H3[2]),
              tl.where(odd, L3[3], H3[3]))
        # the lane whose (p step) pair this thread's B column takes (_step_asm_ka): query (g / 2) % QG, and its
        # part (hi / lo) in the owner's t where QG <= 2
        src = 8 * t + (g // 2) % QG + (QG * (g % 2) if QG <= 2 else 0)
        if QG > 1:  # lane 8 (t % QG): g = 2 (t % QG) holds query t % QG
            qsum = tl.inline_asm_elementwise(FROM_ASM, "=f,f,r", [qsum, 8 * (t % QG)], dtype=tl.float32,
                                             is_pure=False, pack=1)
            const = tl.inline_asm_elementwise(FROM_ASM, "=f,f,r", [const, 8 * (t % QG)], dtype=tl.float32,
                                              is_pure=False, pack=1)
    f0 = tl.zeros((32,), tl.float32)
    m_i = f0 - 1.0e30
    l_i = f0
    pm = f0
    A = (f0, f0, f0, f0, f0, f0, f0, f0, f0, f0, f0, f0, f0, f0, f0, f0,
         f0, f0, f0, f0, f0, f0, f0, f0, f0, f0, f0, f0, f0, f0, f0, f0)
    for it in range(ntiles):
        _issue(base, it + STAGES - 1, ntiles, row0, span, kc_ptr, vc_ptr, ks_ptr, km_ptr, vs_ptr, vm_ptr, TILE,
               STAGES, ISSUE)
        st = it % STAGES
        if KEYS_A:
            R = tl.inline_asm_elementwise(
                STEP, STEP_CONS,
                [base + 8 * st, z + (it // STAGES) % 2, _stage(base, st, TILE),
                 z + tl.minimum(span - it * TILE, TILE),
                 B0[0], B0[1], B0[2], B0[3], B1[0], B1[1], B1[2], B1[3], B2[0], B2[1], B2[2], B2[3],
                 B3[0], B3[1], B3[2], B3[3], qsum, const, src, m_i, l_i, pm,
                 A[0], A[1], A[2], A[3], A[4], A[5], A[6], A[7], A[8], A[9], A[10], A[11], A[12], A[13], A[14],
                 A[15], A[16], A[17], A[18], A[19], A[20], A[21], A[22], A[23], A[24], A[25], A[26], A[27], A[28],
                 A[29], A[30], A[31]],
                dtype=(tl.float32,) * 35, is_pure=False, pack=1)
        else:
            R = tl.inline_asm_elementwise(
                STEP, STEP_CONS,
                [base + 8 * st, z + (it // STAGES) % 2, _stage(base, st, TILE),
                 z + tl.minimum(span - it * TILE, TILE),
                 H0[0], H0[1], H0[2], H0[3], H1[0], H1[1], H1[2], H1[3], H2[0], H2[1], H2[2], H2[3],
                 H3[0], H3[1], H3[2], H3[3], L0[0], L0[1], L0[2], L0[3], L1[0], L1[1], L1[2], L1[3],
                 L2[0], L2[1], L2[2], L2[3], L3[0], L3[1], L3[2], L3[3], qsum, const, m_i, l_i, pm,
                 A[0], A[1], A[2], A[3], A[4], A[5], A[6], A[7], A[8], A[9], A[10], A[11], A[12], A[13], A[14],
                 A[15], A[16], A[17], A[18], A[19], A[20], A[21], A[22], A[23], A[24], A[25], A[26], A[27], A[28],
                 A[29], A[30], A[31]],
                dtype=(tl.float32,) * 35, is_pure=False, pack=1)
        m_i, l_i, pm = R[0], R[1], R[2]
        A = (R[3], R[4], R[5], R[6], R[7], R[8], R[9], R[10], R[11], R[12], R[13], R[14], R[15], R[16], R[17],
             R[18], R[19], R[20], R[21], R[22], R[23], R[24], R[25], R[26], R[27], R[28], R[29], R[30], R[31],
             R[32], R[33], R[34])
    if STAMPS:
        stamps.stamp(stamp_ptr, me, 2, 4)
    if KEYS_A:  # every lane's state is query t % QG's: sums over the lanes g; m, l of query t from lane (0, t)
        lq = tl.inline_asm_elementwise(G_SUM_ASM, "=f,f", [l_i], dtype=tl.float32, is_pure=False, pack=1)
        pq = tl.inline_asm_elementwise(G_SUM_ASM, "=f,f", [pm], dtype=tl.float32, is_pure=False, pack=1)
        head_q = (b * HQ + h0 + t) * NSPLIT + sp
        ml_mask = (g == 0) & (t < QG)
    else:
        lq = tl.inline_asm_elementwise(QUAD_SUM_ASM, "=f,f", [l_i], dtype=tl.float32, is_pure=False, pack=1)
        pq = tl.inline_asm_elementwise(QUAD_SUM_ASM, "=f,f", [pm], dtype=tl.float32, is_pure=False, pack=1)
        pq = tl.inline_asm_elementwise(FROM_ASM, "=f,f,r", [pq, 8 * t], dtype=tl.float32, is_pure=False, pack=1)
        # m, l of query j from lane (g = 2j, t = 0); the values of query t (t < QG) from every g: dims 16g ..
        head_q = (b * HQ + h0 + g // 2) * NSPLIT + sp
        ml_mask = (t == 0) & (g % 2 == 0) & (g // 2 < QG)
    tl.store(m_ptr + head_q, m_i, mask=ml_mask)
    tl.store(l_ptr + head_q, lq, mask=ml_mask)
    row = acc_ptr + ((b * HQ + h0 + t) * NSPLIT + sp) * D + 16 * g
    vmask = t < QG
    _store_dims(row, 0, A, pq, vmask)
    _store_dims(row, 1, A, pq, vmask)
    _store_dims(row, 2, A, pq, vmask)
    _store_dims(row, 3, A, pq, vmask)
    _store_dims(row, 4, A, pq, vmask)
    _store_dims(row, 5, A, pq, vmask)
    _store_dims(row, 6, A, pq, vmask)
    _store_dims(row, 7, A, pq, vmask)
    if COMBINE:  # the last program of the KV head's part merges its query heads
        _combine_if_last(cnt_ptr + bkp, b, h0, q_ptr, kcur_ptr, vcur_ptr, m_ptr, l_ptr, acc_ptr, vscale_ptr,
                         vshift_ptr, out_ptr, sm_scale, qkv_ptr, cos_ptr, sin_ptr, len_ptr, stride_qkv, HQ, HKV, D,
                         QG * PARTS, NSPLIT, QG, ROPE, ready_ptr + bkp, ep_ptr, READY, length, sp,
                         gcnt_ptr + bkp * (NSPLIT // GROUP), gm_ptr, gl_ptr, gacc_ptr, GROUP)
    if STAMPS:
        stamps.stamp(stamp_ptr, me, 3, 4)


# ------------------------------------------------------------------------------------------------ host side


def launch(b: int, hq: int, q, k_cur, v_cur, rope, store, length, kv_params, sm_scale: float, m, l_, acc, out,
           counts, splits: int, tile: int, stages: int, combine: bool, copies: str = "mixed", pdl: bool = False,
           trigger: bool = False, keys_a: bool = False, ready: tuple[torch.Tensor, torch.Tensor] | None = None,
           stamps_kind: str | None = None) -> None:
    """The kernel for :func:`runtime.kernels.kv4.decode_attention` (``q [b, hq, D]``, ``k_cur``, ``v_cur``) or, with
    ``rope = (qkv, cos, sin)``, :func:`runtime.kernels.kv4.rope_attention` (``q``, ``k_cur``, ``v_cur`` unused; see
    :func:`mma_attention_ok`): the splits' partials into ``m, l_ [B, Hq, splits]``, ``acc [B, Hq, splits, D]`` and,
    with ``combine``, their merge into ``out [B, Hq, D]`` (``counts``: a zeroed int32 buffer of at least ``B * Hkv *
    parts`` counts, one a KV head's part, :func:`query_parts`; without ``combine`` the caller merges them,
    :func:`runtime.kernels.kv4._attn_combine_kernel`).
    ``pdl``: launched early (PDL, Hopper), the programs a multiprocessor capped at one over the grid's even share
    (:func:`even_cap`, :func:`cap_bytes`; unless ``WKVQ_ATTN_CAP=0``); ``trigger``: the next kernel may launch early
    (the programs let it first thing); ``keys_a``: the keys as the score MMAs' A operand (:func:`_step_asm_ka`);
    ``ready = (flags, epoch)`` (with ``combine``): ``int32
    [B * Hkv * parts]`` flags, one a KV head's part (its ``hq / hkv / parts`` query heads), that the combining
    program sets to ``epoch`` (``int32 [1]``) once that part's output is stored; ``stamps_kind``: where
    ``WKVQ_STAMPS=1``, the programs' timestamps go to that kind's buffer (:mod:`runtime.kernels.stamps`, a row a
    program of the grid). With ``combine``, the merge takes two levels where :func:`runtime.kernels.kv4.group_of`
    says so."""
    hkv, s = store.k_codes.shape[1], store.k_codes.shape[2]
    parts = query_parts(hq // hkv)
    qg = part_heads(hq // hkv)  # query heads a program
    k_scale, k_shift, v_scale, v_shift = kv_params
    qkv, cos, sin = rope if rope is not None else (m, m, m)
    grid = (b * hkv * parts, splits + (rope is not None))
    device = store.k_codes.device
    cap = even_cap(grid[0] * grid[1], multiprocessors(device)) if pdl and _cap_on() else 0
    init, issue, step, step_cons = _asm(tile, stages, qg, copies, cap, keys_a,
                                        shared_memory_per_multiprocessor(device, SM_SHARED))
    on = bool(stamps_kind) and stamps.enabled()
    st = stamps.buffer(store.k_codes.device, stamps_kind, grid[0] * grid[1]) if on else None
    group, (gcnt, gm, gl, gacc) = merge_buffers(acc, grid[0], qg, splits, combine, counts)
    _attn_mma_kernel[grid](
        q, store.k_codes, store.k_step, store.k_min, store.v_codes, store.v_step, store.v_min, k_scale, k_shift,
        length, m, l_, acc, s, sm_scale, counts, k_cur, v_cur, v_scale, v_shift, out, qkv, cos, sin,
        qkv.stride(0) if rope is not None else 0,
        HQ=hq, HKV=hkv, QG=qg, PARTS=parts, TILE=tile, NSPLIT=splits, STAGES=stages, COMBINE=combine,
        ROPE=rope is not None, INIT=init, ISSUE=issue, STEP=step, STEP_CONS=step_cons, num_warps=1, TRIGGER=trigger,
        KEYS_A=keys_a,
        ready_ptr=ready[0] if ready is not None else counts,
        ep_ptr=ready[1] if ready is not None else counts, READY=ready is not None and combine,
        stamp_ptr=st if st is not None else counts, STAMPS=st is not None,
        gcnt_ptr=gcnt, gm_ptr=gm, gl_ptr=gl, gacc_ptr=gacc, GROUP=group,
        **overlap.options(pdl))

