"""RTN conversion end to end, the artifact's contract, and `wkvq validate` on corrupted copies."""

import json
import math
import shutil
import struct
import subprocess
import sys

import pytest
from click.testing import CliRunner

import cli
import torch
from safetensors.torch import load_file, save_file

from runtime import artifact, quant

SIZES = {"U8": 1, "F16": 2, "BF16": 2, "F32": 4}


def wkvq(*args):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    r = CliRunner().invoke(cli.main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def test_console_script_error_is_one_line_without_traceback(tmp_path):
    """The installed entry point itself (a subprocess), not only the click object."""
    r = subprocess.run([sys.executable, "-m", "cli", "validate", str(tmp_path / "nope")], capture_output=True,
                       text=True)
    assert_one_line_error(r.returncode, r.stdout, r.stderr)


def assert_one_line_error(code, out, err):
    assert code == 1, (out, err)
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("Warn", "WARNING"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), err


def test_cli_convert_and_validate(tiny_llama_dir, tmp_path):
    out = tmp_path / "q"
    code, stdout, err = wkvq("convert", tiny_llama_dir, "--out", out, "--method", "rtn", "--device", "cpu")
    assert code == 0, err
    code, stdout, err = wkvq("validate", out)
    assert code == 0 and stdout.startswith("valid WKVQuant artifact: rtn, W4 g128 KV4, 2 layers"), (stdout, err)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary leftovers"


def test_artifact_contents_match_the_quantizer(tiny_rtn_artifact, tiny_llama_dir):
    meta = artifact.read_metadata(tiny_rtn_artifact)
    assert meta["method"] == "rtn" and meta["weight_quant"]["bits"] == 4 and meta["kv_quant"]["poq"]
    tensors = load_file(str(tiny_rtn_artifact / artifact.WEIGHTS_FILE))
    src = load_file(str(tiny_llama_dir / "model.safetensors"))
    prefix = "model.layers.1.mlp.down_proj"  # in_features 192 = 128 + 64: a ragged group
    w = src[prefix + ".weight"].float()
    q = quant.unpack(tensors[prefix + ".qweight"], 4, w.shape[1])
    deq = quant.dequantize_weight(q, tensors[prefix + ".scales"], tensors[prefix + ".zeros"], 128)
    step = quant.expand_groups(tensors[prefix + ".scales"].float(), 128, w.shape[1])
    assert torch.all((deq - w).abs() <= step / 2 + 1e-3)
    assert torch.all(tensors[prefix + ".clip_hi"] == 1) and torch.all(tensors[prefix + ".clip_lo"] == 1)
    kv = artifact.kv_tensor_names(0)
    assert torch.all(tensors[kv["k_scale"]] == 1) and torch.all(tensors[kv["v_shift"]] == 0)
    assert prefix + ".weight" not in tensors and "lm_head.weight" not in tensors  # tied
    assert set(meta["layers"][1]["tensors"]) == {n for n in tensors if n.startswith("model.layers.1.")}
    header_meta = json.loads(open(tiny_rtn_artifact / artifact.WEIGHTS_FILE, "rb").read(8 + struct.unpack(
        "<Q", open(tiny_rtn_artifact / artifact.WEIGHTS_FILE, "rb").read(8))[0])[8:])["__metadata__"]
    assert json.loads(header_meta["wkvq"]) == meta


def test_schema_has_id_and_draft_2020_12():
    schema = artifact.load_schema()
    assert schema["$schema"].endswith("2020-12/schema") and schema["$id"].startswith("https://")


def _copy(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_truncated_file_is_rejected(tiny_rtn_artifact, tmp_path):
    d = _copy(tiny_rtn_artifact, tmp_path)
    f = d / artifact.WEIGHTS_FILE
    f.write_bytes(f.read_bytes()[: f.stat().st_size - 1000])
    assert_one_line_error(*wkvq("validate", d))


def test_schema_invalid_metadata_is_rejected(tiny_rtn_artifact, tmp_path):
    d = _copy(tiny_rtn_artifact, tmp_path)
    meta = json.loads((d / artifact.META_FILE).read_text())
    meta["weight_quant"]["bits"] = 12
    (d / artifact.META_FILE).write_text(json.dumps(meta))
    code, out, err = wkvq("validate", d)
    assert_one_line_error(code, out, err)
    assert "weight_quant/bits" in err


def test_future_format_version_is_rejected(tiny_rtn_artifact, tmp_path):
    d = _copy(tiny_rtn_artifact, tmp_path)
    meta = json.loads((d / artifact.META_FILE).read_text())
    meta["format_version"] = artifact.FORMAT_VERSION + 1
    (d / artifact.META_FILE).write_text(json.dumps(meta))
    code, out, err = wkvq("validate", d)
    assert_one_line_error(code, out, err)
    assert "newer" in err


def _rewrite_tensors(d, change):
    f = d / artifact.WEIGHTS_FILE
    header, _ = artifact.read_safetensors_header(f)
    tensors = load_file(str(f))
    change(tensors)
    save_file(tensors, str(f), metadata=header["__metadata__"])


def test_missing_tensor_is_rejected(tiny_rtn_artifact, tmp_path):
    d = _copy(tiny_rtn_artifact, tmp_path)
    _rewrite_tensors(d, lambda t: t.pop("model.layers.0.self_attn.k_proj.scales"))
    code, out, err = wkvq("validate", d)
    assert_one_line_error(code, out, err)
    assert "model.layers.0.self_attn.k_proj.scales is missing" in err


def test_changed_tensor_data_fails_its_checksum(tiny_rtn_artifact, tmp_path):
    d = _copy(tiny_rtn_artifact, tmp_path)

    def flip(t):
        t["model.layers.0.mlp.up_proj.qweight"][0, 0] ^= 0xFF

    _rewrite_tensors(d, flip)
    code, out, err = wkvq("validate", d)
    assert_one_line_error(code, out, err)
    assert "checksum" in err


def test_validate_nonexistent_directory(tmp_path):
    assert_one_line_error(*wkvq("validate", tmp_path / "nope"))


def test_unsupported_architecture_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    code, out, err = wkvq("convert", tmp_path / "gpt2", "--out", tmp_path / "q", "--method", "rtn")
    assert_one_line_error(code, out, err)
    assert "LlamaForCausalLM" in err
    assert not (tmp_path / "q").exists()


def test_existing_nonempty_out_is_refused(tiny_llama_dir, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    assert_one_line_error(*wkvq("convert", tiny_llama_dir, "--out", out, "--method", "rtn"))
    assert (out / "mine.txt").read_text() == "user data"


@pytest.mark.slow
def test_smollm2_rtn_decoder_bytes_and_load(smollm2_rtn_artifact):
    """The real model: ragged groups (576 = 4 x 128 + 64), GQA 9:3, tied embeddings, <= 35% of fp16."""
    meta = artifact.verify(smollm2_rtn_artifact)
    m = artifact.read_metadata(smollm2_rtn_artifact)
    decoder = sum(SIZES[t["dtype"]] * math.prod(t["shape"]) for n, t in m["tensors"].items()
                  if n.startswith("model.layers."))
    fp16 = sum(2 * lin["in_features"] * lin["out_features"] for layer in m["layers"]
               for lin in layer["linears"].values())
    fp16 += 2 * m["model"]["hidden_size"] * 2 * m["model"]["num_layers"]  # the two norms per layer
    assert decoder / fp16 <= 0.35, decoder / fp16
    assert meta.num_layers == 30 and m["tensors"]["model.layers.0.mlp.down_proj.scales"]["shape"] == [576, 12]
    assert m["tensors"]["model.layers.0.self_attn.q_proj.scales"]["shape"] == [576, 5]
