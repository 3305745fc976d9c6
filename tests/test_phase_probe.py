"""benchmarks/phase_probe.py's PTX edits (CPU): each ``gemv-...`` edit takes out exactly the instructions it names
and nothing else, so that a timing of an edited kernel means what its name says (an edit whose pattern stopped
matching would time the unedited kernel under another name)."""

import re
from collections import Counter

import pytest

from tests.helpers import load_benchmark

pytest.importorskip("triton")


def _launch_consts(tiles: int):
    """The PTX constants a one-row launch gives the GEMV (the parts the edits touch), group-major strides."""
    from runtime.kernels import w4_mma

    n = 4096
    gs = (64 * n, 2 * n, n)
    _, _, load, _, comp, comp_cons, _ = w4_mma._asm(tiles, False, 1, (64, 2, 1), gs)
    loadw, _, loadx, _ = w4_mma._split_load_asm(tiles, False, (64, 2, 1), gs)
    return {"LOAD": load, "LOADW": loadw, "LOADX": loadx, "COMP": comp, "COMP_CONS": comp_cons}


def _ops(asm: str) -> list[str]:
    """The PTX instructions' opcodes (with their type suffixes), in order (several a line counted each)."""
    ops = []
    for stmt in asm.split(";"):
        m = re.match(r"\s*[{}]?\s*(?:@\w+ )?([a-z][a-z0-9_.]*)\s", stmt.strip("{} \n") + " ")
        if m:
            ops.append(m.group(1))
    return ops


def _removed(before: str, after: str) -> dict[str, int]:
    """Opcode counts in ``before`` beyond those in ``after`` (negative where ``after`` has more)."""
    diff = Counter(_ops(before))
    diff.subtract(_ops(after))
    return {op: n for op, n in diff.items() if n}


@pytest.mark.parametrize("tiles", [1, 2])
def test_compute_edits_take_out_one_instruction_class(tiles, monkeypatch):
    probe = load_benchmark("phase_probe", monkeypatch)
    base = _launch_consts(tiles)
    comp = base["COMP"]
    # 16 x pairs a group; 2 sub and 2 fma an 8-code word, 4 words a row half, 2 halves a tile; 4 lop3 a word
    cases = {"noxp": {"prmt.b32": 16, "mov.b32": -16},
             "nohf": {"sub.f16x2": 16 * tiles, "fma.rn.f16x2": 16 * tiles},
             "nolop": {"lop3.b32": 32 * tiles, "mov.b32": -32 * tiles},
             # zfold: nohf, the zero points' float16 setup for a float32 conversion, the accumulators started by an
             # fma instead of a move and one more fma each at the end
             "zfold": {"sub.f16x2": 16 * tiles, "fma.rn.f16x2": 16 * tiles, "add.u32": 2 * tiles,
                       "mad.lo.u32": 2 * tiles, "cvt.rn.f32.u32": -2 * tiles, "mov.f32": 4 * tiles,
                       "fma.rn.f32": -8 * tiles},
             # zlate: zfold with the zero point's fma moved from the accumulators' start to their end
             "zlate": {"sub.f16x2": 16 * tiles, "fma.rn.f16x2": 16 * tiles, "add.u32": 2 * tiles,
                       "mad.lo.u32": 2 * tiles, "cvt.rn.f32.u32": -2 * tiles, "fma.rn.f32": -8 * tiles}}
    for edit, want in cases.items():
        out = probe.gemv_edit(base, (edit,))
        assert _removed(comp, out["COMP"]) == want, edit
        assert all(out[k] == base[k] for k in ("LOAD", "LOADW", "LOADX")), edit  # the loads untouched
    both = probe.gemv_edit(base, ("nohf", "nolop"))["COMP"]
    assert _removed(comp, both) == {"sub.f16x2": 16 * tiles, "fma.rn.f16x2": 16 * tiles, "lop3.b32": 32 * tiles,
                                    "mov.b32": -32 * tiles}


@pytest.mark.parametrize("tiles", [1, 2])
def test_load_edits_and_nomma(tiles, monkeypatch):
    probe = load_benchmark("phase_probe", monkeypatch)
    base = _launch_consts(tiles)
    nox = probe.gemv_edit(base, ("nox",))
    assert _removed(base["LOAD"], nox["LOAD"]) == {"ld.global.nc.v4.u32": 4, "mov.b32": -16}  # x: 4 16-byte loads
    assert _removed(base["LOADX"], nox["LOADX"]) == {"ld.global.v4.u32": 4, "mov.b32": -16}
    assert nox["LOADW"] == base["LOADW"] and nox["COMP"] == base["COMP"]
    nosz = probe.gemv_edit(base, ("nosz",))
    assert _removed(base["LOAD"], nosz["LOAD"]) == {"ld.global.nc.b16": 2 * tiles, "ld.global.nc.u8": 2 * tiles,
                                                    "mov.b16": -4 * tiles}
    nomma = probe.gemv_edit(base, ("nomma",))["COMP"]
    assert "mma.sync" not in nomma and "lop3" not in nomma
    # every loaded word still feeds the result (one xor each but the first), so no load is dead code
    words = base["COMP_CONS"].count("r")
    assert _ops(nomma).count("xor.b32") == words - 1
