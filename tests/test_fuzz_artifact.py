"""Fuzz the artifact reader: mutated headers, metadata and tensor bytes give ArtifactError, never a crash or hang."""

import json
import shutil
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from runtime import artifact, load
from runtime.artifact import ArtifactError

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def pristine(tiny_rtn_artifact):
    f = tiny_rtn_artifact / artifact.WEIGHTS_FILE
    return tiny_rtn_artifact, f.read_bytes(), (tiny_rtn_artifact / artifact.META_FILE).read_text()


def _fresh(pristine, tmp_path_factory):
    src, _, _ = pristine
    d = tmp_path_factory.mktemp("fuzz") / "a"
    shutil.copytree(src, d)
    return d


def _check(d):
    """verify() and load() either succeed or raise ArtifactError; nothing else."""
    try:
        artifact.verify(d)
    except ArtifactError as e:
        assert "\n" not in str(e)
        with pytest.raises(ArtifactError):
            load(d, device="cpu")
        return False
    return True


@FUZZ
@given(data=st.data())
def test_mutated_header_bytes(pristine, tmp_path_factory, data):
    d = _fresh(pristine, tmp_path_factory)
    raw = bytearray(pristine[1])
    (n,) = struct.unpack("<Q", raw[:8])
    pos = data.draw(st.integers(0, 8 + n - 1))
    raw[pos] = data.draw(st.integers(0, 255).filter(lambda b: b != raw[pos]))
    (d / artifact.WEIGHTS_FILE).write_bytes(bytes(raw))
    _check(d)


@FUZZ
@given(data=st.data())
def test_mutated_tensor_bytes_fail_checksum(pristine, tmp_path_factory, data):
    d = _fresh(pristine, tmp_path_factory)
    raw = bytearray(pristine[1])
    (n,) = struct.unpack("<Q", raw[:8])
    pos = data.draw(st.integers(8 + n, len(raw) - 1))
    raw[pos] ^= data.draw(st.integers(1, 255))
    (d / artifact.WEIGHTS_FILE).write_bytes(bytes(raw))
    assert not _check(d)


@FUZZ
@given(cut=st.integers(0, 10**9))
def test_truncated_anywhere(pristine, tmp_path_factory, cut):
    d = _fresh(pristine, tmp_path_factory)
    raw = pristine[1]
    (d / artifact.WEIGHTS_FILE).write_bytes(raw[: cut % len(raw)])
    assert not _check(d)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**12) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:3]):
            yield from _paths(v, prefix + (i,))


@FUZZ
@given(data=st.data())
def test_mutated_metadata(pristine, tmp_path_factory, data):
    d = _fresh(pristine, tmp_path_factory)
    meta = json.loads(pristine[2])
    paths = [p for p in _paths(meta) if p and p[0] != "tensors"][:400]
    path = data.draw(st.sampled_from(paths))
    target = meta
    for key in path[:-1]:
        target = target[key]
    if data.draw(st.booleans()):
        target[path[-1]] = data.draw(JSON_VALUES)
    elif isinstance(target, dict):
        del target[path[-1]]
    else:
        target[path[-1]] = None
    (d / artifact.META_FILE).write_text(json.dumps(meta))
    assert not _check(d) or json.loads(pristine[2]) == meta


def test_metadata_not_json(pristine, tmp_path_factory):
    d = _fresh(pristine, tmp_path_factory)
    (d / artifact.META_FILE).write_bytes(b"\xff\xfe{not json")
    assert not _check(d)
