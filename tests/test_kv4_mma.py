"""The tensor-core decode attention (:mod:`runtime.kernels.kv4_mma`) without a GPU: it compiles for sm_90 with
Triton's bundled ptxas. Its results against the reference run on CUDA (``tests/test_kernels.py``,
``test_mma_attention_matches_reference``)."""

from __future__ import annotations

import pytest

from tests.helpers import sm90_sass


def _attn_sass(tmp_path, *, tile=64, stages=2, qg=1, copies="mixed", rope=True, cap=0, keys_a=True, heads=4,
               splits=8, pdl=False, trigger=False, ready=False, stamps=False, arch=90, parts=1, group=1,
               aligned=False):
    """The sm_90 (or sm_``arch``) SASS and resource usage of the tensor-core attention compiled without a GPU
    (:func:`tests.helpers.sm90_sass`) with the PTX and constexprs a launch would give it (``heads`` KV heads)."""
    from runtime.kernels import kv4_mma

    init, issue, step, step_cons = kv4_mma._asm(tile, stages, qg, copies, cap, keys_a)
    consts = {"HQ": heads * qg, "HKV": heads, "QG": qg, "TILE": tile, "NSPLIT": splits, "STAGES": stages,
              "PDL": pdl, "COMBINE": True, "ROPE": rope, "INIT": init, "ISSUE": issue, "STEP": step,
              "STEP_CONS": step_cons, "TRIGGER": trigger, "KEYS_A": keys_a, "READY": ready, "STAMPS": stamps,
              "PARTS": parts, "GROUP": group}
    consts["HQ"] *= parts
    kinds = {"kc_ptr": "*u8", "vc_ptr": "*u8", "len_ptr": "*i32", "cnt_ptr": "*i32", "out_ptr": "*fp16",
             "sm_scale": "fp32", "S": "i32", "stride_qkv": "i32"}
    kinds.update(ready_ptr="*i32", ep_ptr="*i32", stamp_ptr="*i64", gcnt_ptr="*i32")
    kinds.update({n: "*fp16" for n in ("ks_ptr", "km_ptr", "vs_ptr", "vm_ptr")})
    return sm90_sass(kv4_mma._attn_mma_kernel, consts, kinds, "*fp32", 1, tmp_path, arch=arch, aligned=aligned)


@pytest.mark.parametrize("arch", [100, 120])
def test_mma_attention_compiles_for_blackwell(arch, tmp_path):
    """The tensor-core attention runs wherever the compute capability is 9 or more (``mma_attention_ok``): its launch
    in the decode step (64-token tiles, the keys as A, rope, PDL, the heads' flags) compiles for a B200 (sm_100) and
    an RTX 5090 (sm_120) too, with the same MMAs and no spills. Only the sm_90 build runs in the GPU tests."""
    pytest.importorskip("triton")
    sass, usage = _attn_sass(tmp_path, pdl=True, trigger=True, ready=True, arch=arch)
    assert sass.count("HMMA.16816.F32") == 16 * 64 // 16 and "ACQBULK" in sass and "LOCAL:0" in usage


@pytest.mark.parametrize("keys_a", [False, True])
@pytest.mark.parametrize("tile,stages,qg,bulk,rope,cap", [
    (16, 2, 1, "mixed", False, 0), (32, 4, 3, "mixed", False, 0), (64, 2, 4, "mixed", True, 0),
    (128, 2, 1, "mixed", False, 0), (64, 3, 1, "bulk", False, 0), (32, 2, 1, "lanes", True, 0),
    (128, 2, 3, "lanes", False, 0), (64, 2, 1, "mixed", True, 8), (32, 2, 1, "lanes", True, 5)])
def test_mma_attention_compiles_for_sm90(tile, stages, qg, bulk, rope, cap, keys_a, tmp_path):
    """The PTX is valid for sm_90; per tile 24 HMMA per 16 tokens (16 for the scores, 8 for the values; with
    ``keys_a`` the keys as A: 8 for the scores); per issue
    2 bulk copies of codes and the stats by each lane's ``cp.async`` (16 bytes at most an instruction), or 6 bulk
    copies with ``bulk``, issued ``stages - 1`` times before the loop and once in it; the shared ring as declared;
    no local memory (spills); the query's rows by 16-byte loads (its 32 channels a thread and their static key
    scales and shifts; with ``rope`` also the rotate-half partners, cos and sin); with a ``cap`` of programs a
    multiprocessor, the ring declared that large (:func:`cap_bytes`)."""
    pytest.importorskip("triton")
    from runtime.kernels import kv4_mma

    sass, usage = _attn_sass(tmp_path, tile=tile, stages=stages, qg=qg, copies=bulk, rope=rope, cap=cap,
                             keys_a=keys_a)
    assert sass.count("HMMA.16816.F32") == (16 if keys_a else 24) * tile // 16
    assert sass.count("UBLKCP") == {"bulk": 6, "mixed": 2, "lanes": 0}[bulk] * stages
    assert (sass.count("LDGSTS") == 0) == (bulk == "bulk")  # ptxas may split a predicated copy: no exact count
    shared = int(usage.split("SHARED:")[1].split()[0])  # the ring, plus Triton's scratch of the fused combine
    ring = kv4_mma.cap_bytes(kv4_mma.smem_bytes(tile, stages), cap)
    assert ring <= shared <= ring + 4096 and (ring > kv4_mma.smem_bytes(tile, stages)) == (cap > 0)
    assert "LOCAL:0" in usage
    assert sass.count("LDG.E.128") == 8 * (6 if rope else 3)


def test_mma_attention_query_parts_compile_as_one(tmp_path):
    """Eight query heads a KV head (LLaMA-2-70B) as two programs of four (``PARTS``): the same tile loop (MMAs, bulk
    copies, no spills) as one program of four; only the head indices differ."""
    pytest.importorskip("triton")

    one, usage1 = _attn_sass(tmp_path, qg=4, pdl=True, ready=True)
    two, usage2 = _attn_sass(tmp_path, qg=4, pdl=True, ready=True, parts=2)
    assert "LOCAL:0" in usage1 and "LOCAL:0" in usage2
    for op in ("HMMA.16816.F32", "UBLKCP", "ATOMG.E.EXCH", "ACQBULK"):
        assert two.count(op) == one.count(op), op


@pytest.mark.parametrize("aligned", [False, True])
def test_mma_attention_two_level_merge_compiles(aligned, tmp_path):
    """LLaMA-3-8B's launch at b1 p32768 (4 query heads a program, 128 splits, PDL, ready flags): with the merge in two
    levels (``GROUP`` 16, :func:`runtime.kernels.merge_group`) the tile loop is the one-level build's (MMAs, bulk
    copies, the wait), with one more count (the group's) and no spills."""
    pytest.importorskip("triton")
    from runtime.kernels import merge_group

    assert merge_group(4, 128) == 16
    one, usage1 = _attn_sass(tmp_path, qg=4, heads=8, splits=128, pdl=True, ready=True, aligned=aligned)
    two, usage2 = _attn_sass(tmp_path, qg=4, heads=8, splits=128, pdl=True, ready=True, group=16, aligned=aligned)
    assert "LOCAL:0" in usage1 and "LOCAL:0" in usage2
    for op in ("HMMA.16816.F32", "UBLKCP", "ATOMG.E.EXCH", "ACQBULK"):
        assert two.count(op) == one.count(op), op
    assert two.count("ATOMG.E.ADD") == one.count("ATOMG.E.ADD") + 1


@pytest.mark.parametrize("rope,qg", [(True, 1), (True, 2), (False, 1), (False, 4)])
@pytest.mark.parametrize("aligned", [False, True])  # as launched on unaligned views / on aligned tensors
def test_mma_attention_early_launch_reads_nothing_written_before_the_wait(rope, qg, aligned, tmp_path):
    """Launched early (PDL: the decode step's default), an attention program may read before its wait only what no
    kernel of the step writes: the cache length and its first tiles' copies of the past (``cp.async``). ptxas may
    move ``.nc`` loads across ``griddepcontrol.wait``: the query (the projection's output) must stay below it."""
    pytest.importorskip("triton")
    from runtime.kernels import kv4_mma, overlap

    if not overlap._triton_has_pdl():
        pytest.skip("this Triton has no grid dependency control")
    sass = _attn_sass(tmp_path, qg=qg, rope=rope, cap=kv4_mma.even_cap(1056, 132), heads=32 // qg, splits=32,
                      pdl=True, aligned=aligned)[0]
    before = sass[:sass.index("ACQBULK")]  # the attention programs' wait (the append program's comes later)
    assert before.count("LDG.E ") == 1 and "LDG.E." not in before.replace("LDGSTS.E.", "")  # the length only
    assert before.count("UBLKCP") == 2  # the first tile's key and value codes


def _placed(sass: str, usage: str, op: str) -> tuple[list[int], int]:
    """Where ``op`` stands in ``sass`` (its offsets) and where its first PDL wait (``ACQBULK``) stands; checks that
    nothing spilled."""
    assert "LOCAL:0" in usage
    return [i for i in range(len(sass)) if sass.startswith(op, i)], sass.index("ACQBULK")


@pytest.mark.parametrize("trigger", [False, True])
def test_mma_attention_trigger_placement(trigger, tmp_path):
    """Where a program lets the next kernel launch (``griddepcontrol.launch_dependents``, SASS ``PREEXIT``): nowhere
    without ``TRIGGER``; with it once, first thing (before the wait)."""
    pytest.importorskip("triton")

    at, wait = _placed(*_attn_sass(tmp_path, cap=9, heads=32, splits=32, pdl=True, trigger=trigger), "PREEXIT")
    assert (len(at) == 1 and at[0] < wait) if trigger else not at


def test_mma_attention_ready_flag(tmp_path):
    """``READY``: the combining program of a KV head, after storing the merged heads, sets the head's flag to the
    step's epoch with a release: after the output's stores a barrier, a GPU-scope fence, then one atomic exchange
    more than without it."""
    pytest.importorskip("triton")

    off = _attn_sass(tmp_path, cap=9, heads=32, splits=32, pdl=True)[0]
    on, usage = _attn_sass(tmp_path, cap=9, heads=32, splits=32, pdl=True, ready=True)
    assert "LOCAL:0" in usage
    xchg = on.rindex("ATOMG.E.EXCH")
    assert on.count("ATOMG.E.EXCH") == off.count("ATOMG.E.EXCH") + 1
    fence = on.rindex("MEMBAR.ALL.GPU", 0, xchg)
    assert on.rindex("STG.E.U16", 0, xchg) < on.rindex("BAR.SYNC", 0, fence) < fence


@pytest.mark.parametrize("rope", [True, False])
def test_mma_attention_merge_does_not_reload_the_position(rope, tmp_path):
    """The combining program ropes the current token at the position the program loaded at its start: after the
    count (an acquire: L1 invalidated, ``CCTL.IVALL``) a second load of it would be an L2 round trip that the rope
    rows' addresses, and every load the compiler places after them, wait for. The length's pointer (the one
    global load before the PDL wait) is read from the parameters once, before the count."""
    import re

    pytest.importorskip("triton")
    from runtime.kernels import overlap

    if not overlap._triton_has_pdl():
        pytest.skip("this Triton has no grid dependency control")
    sass, usage = _attn_sass(tmp_path, cap=9, heads=32, splits=32, pdl=True, ready=True, rope=rope)
    assert "LOCAL:0" in usage
    before = sass[:sass.index("ACQBULK")]
    reg = re.search(r"LDG\.E R\d+, desc\[UR\d+\]\[(R\d+)\.64\]", before).group(1)
    param = re.findall(rf"LDC\.64 {reg}, (c\[0x0\]\[0x[0-9a-f]+\])", before)[-1]  # the length's pointer
    count = sass.index("CCTL.IVALL")  # the merge's count (acq_rel) .. its head's flag (the append program follows)
    assert param not in sass[count:sass.index("ATOMG.E.EXCH", count)]


@pytest.mark.parametrize("rope", [True, False])
def test_mma_attention_stamps(rope, tmp_path):
    """``STAMPS`` (``WKVQ_STAMPS=1``, :mod:`runtime.kernels.stamps`): ``%globaltimer`` read at an attention program's
    start, after its wait, after its tiles and at its end (with ``rope`` the append program's too), no spills; none
    without it."""
    pytest.importorskip("triton")

    on, usage = _attn_sass(tmp_path, cap=9, heads=32, splits=32, pdl=True, rope=rope, stamps=True)
    off = _attn_sass(tmp_path, cap=9, heads=32, splits=32, pdl=True, rope=rope)[0]
    assert "LOCAL:0" in usage and "GLOBALTIMER" not in off
    assert on.count("GLOBALTIMER") >= 4 + (2 if rope else 0)  # the append: start, ready, end
    first, wait = on.index("GLOBALTIMER"), on.index("ACQBULK")
    assert first < wait < on.index("GLOBALTIMER", wait) < on.index("HMMA")


def test_even_cap():
    """The early launch's cap: the grid's even share of the multiprocessors, rounded up, plus one (7B b1 p32768:
    1056 programs on 132 multiprocessors, 9; 13B: 1320, 11)."""
    pytest.importorskip("triton")
    from runtime.kernels import kv4_mma

    assert kv4_mma.CAP_SLACK == 1
    assert kv4_mma.even_cap(1056, 132) == 9 and kv4_mma.even_cap(1320, 132) == 11 and kv4_mma.even_cap(1, 132) == 2


def test_cap_bytes():
    """The ring's declared size for a cap of programs a multiprocessor: cap of them fit in its 228 KB (Hopper; or
    the device's, e.g. ~100 KB) with the 1 KB each reserves and Triton's 1 KB of scratch, one more does not; no
    padding where the ring alone already allows no more (cap 12 at 17.5 KB), where it would pass the static limit
    (cap 3), or without a cap."""
    pytest.importorskip("triton")
    from runtime.kernels import kv4_mma

    ring = kv4_mma.smem_bytes(64, 2)
    for sm_shared, caps in ((kv4_mma.SM_SHARED, (5, 8)), (100 << 10, (3, 4))):  # Hopper; an RTX 5090's ~100 KB
        for cap in caps:
            per = kv4_mma.cap_bytes(ring, cap, sm_shared) + 2 * kv4_mma.CTA_RESERVED
            assert cap * per <= sm_shared < (cap + 1) * (per - kv4_mma.CTA_RESERVED), (sm_shared, cap)
    assert kv4_mma.cap_bytes(ring, 0) == kv4_mma.cap_bytes(ring, 12) == kv4_mma.cap_bytes(ring, 3) == ring
    assert kv4_mma.cap_bytes(ring, 5, 100 << 10) == ring  # 100 KB / 6 is under the ring: no padding
    # the launch declares it for the device's multiprocessors (the default, Hopper's, off CUDA)
    from runtime.kernels import shared_memory_per_multiprocessor

    assert shared_memory_per_multiprocessor("cpu", kv4_mma.SM_SHARED) == kv4_mma.SM_SHARED
    init = kv4_mma._asm(64, 2, 1, "mixed", 4, True, 100 << 10)[0]
    assert f"[{kv4_mma.cap_bytes(ring, 4, 100 << 10)}]" in init and f"[{kv4_mma.cap_bytes(ring, 4)}]" not in init
