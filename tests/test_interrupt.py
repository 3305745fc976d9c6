"""A conversion killed at any moment (SIGKILL) leaves nothing at --out that validates; --resume then
completes it with tensors identical to an uninterrupted run with the same seed (CPU, tiny model)."""

import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from runtime import artifact
from runtime.artifact import ArtifactError

RECIPE = ["--nsamples", "4", "--seqlen", "32", "--epochs", "2", "--crr-k", "1", "--device", "cpu",
          "--seed", "7", "--calib-data"]


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    from tests.helpers import CORPUS

    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text(" ".join(CORPUS * 3))
    return p


def convert_cmd(model, out, text, *extra):
    return [sys.executable, "-m", "cli", "convert", str(model), "--out", str(out), *RECIPE, str(text), *extra]


def tensors(d):
    return load_file(str(d / artifact.WEIGHTS_FILE))


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, calib_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "q"
    r = subprocess.run(convert_cmd(tiny_llama_dir, out, calib_text), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return tensors(out)


def _is_valid(out) -> bool:
    try:
        artifact.verify(out)
        return True
    except ArtifactError:
        return False


def _wait_for(condition, proc, timeout=300.0) -> bool:
    """Poll until ``condition()`` holds (True) or the process ends / time runs out (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if condition():
            return True
        time.sleep(0.02)
    return False


KILL_POINTS = {
    "at-start": lambda out: True,
    "after-first-block": lambda out: any(out.parent.glob(f".{out.name}.wkvq-work/block_0000.safetensors")),
    "while-writing": lambda out: any(out.parent.glob(f".{out.name}.partial-*/model.safetensors")),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_resume_gives_identical_tensors(tiny_llama_dir, calib_text, reference, tmp_path, point):
    out = tmp_path / "q"
    proc = subprocess.Popen(convert_cmd(tiny_llama_dir, out, calib_text), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    reached = _wait_for(lambda: KILL_POINTS[point](out), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if reached:
        assert not _is_valid(out), "a killed conversion left a valid-looking artifact"
    r = subprocess.run(convert_cmd(tiny_llama_dir, out, calib_text, "--resume", "--overwrite"),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got, want = tensors(out), reference
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].equal(want[name]), name
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "q"]
    assert leftovers == [], "work and half-written directories are removed once the artifact is written"
