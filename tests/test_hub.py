"""Hub push / load-by-id, for real: huggingface_hub talks HTTP to tests/hub_server.py on 127.0.0.1.

Nothing of HfApi is mocked. The client is configured as a user would (HF_ENDPOINT, HF_TOKEN,
HF_HUB_CACHE); Xet is switched off (HF_HUB_DISABLE_XET) because the test server speaks Git LFS.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
from pathlib import Path

import huggingface_hub
import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import ModelCard
from safetensors import safe_open

from converter import card as card_mod
from converter.hub import PushConfig, push
from runtime.artifact import ArtifactError, read_metadata
from runtime.hub import HubError, resolve_artifact
from tests.hub_server import HubServer

TOKEN = "hf_TestSecretToken0123456789"
OTHER = "hf_BobsToken9876543210"


@pytest.fixture(scope="module")
def hub():
    with HubServer(tokens={TOKEN: "alice", OTHER: "bob"}, lfs_threshold=64 * 1024, lifetime=600) as server:
        yield server


@pytest.fixture
def env(hub, monkeypatch, tmp_path):
    """The client as a user would set it up, pointed at the local server; no stored login."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    # what HF_ENDPOINT does when set before the import: the library's own side calls stay local too
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    return tmp_path / "hf-cache"


@pytest.fixture
def art(tiny_rtn_artifact, tmp_path) -> Path:
    """A private copy of the tiny artifact (push writes README.md into it)."""
    return Path(shutil.copytree(tiny_rtn_artifact, tmp_path / "artifact"))


def cli(*args):
    from cli import main

    return CliRunner().invoke(main, list(args))


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def tree_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def assert_no_token(*texts_or_dirs) -> None:
    for item in texts_or_dirs:
        if isinstance(item, Path):
            for f in item.rglob("*"):
                if f.is_file():
                    assert TOKEN.encode() not in f.read_bytes(), f
        else:
            assert TOKEN not in item


def one_error_line(result) -> str:
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


# -- the model card -------------------------------------------------------------------------------


def with_extras(meta: dict) -> dict:
    meta = json.loads(json.dumps(meta))
    meta["source"].update(model="someorg/tiny-llama", revision="main", license="apache-2.0")
    meta["evaluation"] = {"dataset": "wikitext2", "seq_len": 256,
                          "rows": [{"name": "fp16", "ppl": 12.3456}, {"name": "w4kv4 | rtn", "ppl": 14.5, "kv": 4}]}
    return meta


def test_card_front_matter_parses_as_a_hub_card(tiny_rtn_artifact):
    meta = with_extras(read_metadata(tiny_rtn_artifact))
    text = card_mod.render_card(meta, "alice/tiny-w4kv4", [("model.safetensors", 1234)])
    data = ModelCard(text).data.to_dict()
    assert data["base_model"] == "someorg/tiny-llama"
    assert data["base_model_relation"] == "quantized"
    assert data["license"] == "apache-2.0" and data["library_name"] == "wkvquant"
    assert data["quantized_by"] == "alice"
    assert {"wkvquant", "int4", "w4kv4", "kv-cache-quantization"} <= set(data["tags"])
    body = ModelCard(text).text
    for needle in ("## Method", "## Recipe", "## Memory", "from runtime import load", 'load("alice/tiny-w4kv4")',
                   "| name | ppl | kv |", "| fp16 | 12.35 |  |", "| w4kv4 \\| rtn | 14.5 | 4 |", "- seq_len: 256"):
        assert needle in body, needle


def test_card_without_evaluation_or_hub_source(tiny_rtn_artifact):
    meta = read_metadata(tiny_rtn_artifact)  # local source folder, no license, no evaluation
    data = ModelCard(card_mod.render_card(meta, "alice/x")).data.to_dict()
    assert "base_model" not in data and "license" not in data
    assert "## Evaluation" not in card_mod.render_card(meta, "alice/x")
    assert card_mod.front_matter(meta, "alice/x", "org/base")["base_model"] == "org/base"  # --base-model


@pytest.mark.parametrize("evaluation, titles, settings", [
    ([{"name": "a", "ppl": 1.0}], ["results"], {}),
    ({"wikitext2": [{"name": "a", "ppl": 1.0}], "c4": [{"name": "a", "ppl": 2.0}], "n": 3}, ["wikitext2", "c4"],
     {"n": 3}),
    ({"fp16": {"ppl": 10.0}, "w4kv4": {"ppl": 11.0}}, ["results"], {}),
    (None, [], {}),
])
def test_evaluation_shapes(evaluation, titles, settings):
    tables, found = card_mod.evaluation_tables(evaluation)
    assert [t for t, _ in tables] == titles and found == settings
    assert all(rows and all("name" in r for r in rows) for _, rows in tables)


def test_memory_figures_against_the_tensors_and_the_runtime_cache(tiny_rtn_artifact, tiny_llama_dir):
    meta = read_metadata(tiny_rtn_artifact)
    fig = card_mod.memory_figures(meta)
    with safe_open(str(tiny_rtn_artifact / "model.safetensors"), "pt") as f:
        stored = sum(f.get_tensor(k).nbytes for k in f.keys())
    assert fig["weights_artifact"] == stored
    with safe_open(str(tiny_llama_dir / "model.safetensors"), "pt") as f:  # the dense source, tied lm_head
        dense = sum(f.get_tensor(k).numel() * 2 for k in f.keys() if k != "lm_head.weight")
    assert fig["weights_fp16"] == dense
    from runtime import CACHE_KWARG, load, new_cache

    model, _ = load(str(tiny_rtn_artifact), device="cpu")
    cache, tokens = new_cache(model), 7
    with torch.no_grad():  # the runtime's POQ cache holds every token of the prompt quantized afterwards
        model(torch.arange(1, tokens + 1)[None], **{CACHE_KWARG: cache}, use_cache=True)
    assert cache.nbytes == tokens * fig["kv_quant_per_token"]
    m = meta["model"]
    assert fig["kv_fp16_per_token"] == 2 * m["num_layers"] * m["num_kv_heads"] * m["head_dim"] * 2


# -- push -----------------------------------------------------------------------------------------


def test_dry_run_writes_the_card_without_network_or_token(art, monkeypatch, hub):
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    monkeypatch.delenv("HF_TOKEN", raising=False)
    before = len(hub.requests)
    result = cli("push", str(art), "alice/dry", "--dry-run")
    assert result.exit_code == 0, result.output
    assert (art / "README.md").is_file() and "alice/dry" in (art / "README.md").read_text()
    for name in ("README.md", "model.safetensors", "wkvq.json", "config.json", "tokenizer.json"):
        assert f"  {name}  (" in result.stdout
    assert "would upload" in result.stdout and len(hub.requests) == before


def test_push_then_load_round_trips_byte_for_byte(art, env, hub, caplog):
    caplog.set_level(logging.DEBUG)
    result = cli("-v", "push", str(art), "alice/tiny-rt", "--commit-message", "first")
    assert result.exit_code == 0, result.output
    local = tree_bytes(art)
    assert set(local) >= {"README.md", "model.safetensors", "wkvq.json", "config.json"}
    assert {p: hub.file_bytes("alice/tiny-rt", "main", p) for p in local} == local  # on the server
    assert any("/info/lfs/objects/batch" in p for _, p in hub.requests)  # the weights went through LFS
    assert f"Bearer {TOKEN}" in hub.auth_headers  # the token was used ...
    path = resolve_artifact("alice/tiny-rt")
    assert tree_bytes(path) == local  # ... and the artifact came back byte for byte
    assert_no_token(result.output, caplog.text, art, env, (art / "README.md").read_text())


def test_load_by_repo_id_matches_the_local_load(art, env):
    from runtime import load

    push(PushConfig(art, "alice/tiny-load"))
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    local_model, _ = load(str(art), device="cpu")
    hub_model, tok = load("alice/tiny-load", device="cpu")
    assert tok is not None
    with torch.no_grad():
        assert torch.equal(local_model(ids).logits, hub_model(ids).logits)


def test_pinned_revision_and_branch(art, env, hub):
    first = push(PushConfig(art, "alice/tiny-rev"))
    (art / "README.md").write_text("# hand-written card\n")  # no generated mark: kept and uploaded as is
    second = push(PushConfig(art, "alice/tiny-rev", revision="dev", commit_message="dev card"))
    assert second.branch == "dev" and first.commit_oid != second.commit_oid
    assert (resolve_artifact("alice/tiny-rev", revision=first.commit_oid) / "README.md").read_text().startswith("---")
    assert (resolve_artifact("alice/tiny-rev", revision="dev") / "README.md").read_text() == "# hand-written card\n"
    assert hub.file_bytes("alice/tiny-rev", "main", "README.md").startswith(b"---")  # main untouched


def test_private_repo_needs_the_token(art, env, monkeypatch):
    push(PushConfig(art, "alice/tiny-private", private=True))
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="not found .*private"):
        resolve_artifact("alice/tiny-private")
    assert resolve_artifact("alice/tiny-private", token=TOKEN).is_dir()


def test_a_corrupted_cache_is_downloaded_again(art, env):
    push(PushConfig(art, "alice/tiny-cache"))
    path = resolve_artifact("alice/tiny-cache")
    weights = (path / "model.safetensors").resolve()  # the cache's blob behind the snapshot link
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    again = resolve_artifact("alice/tiny-cache")
    assert (again / "model.safetensors").read_bytes() == (art / "model.safetensors").read_bytes()


# -- failures: one clear line ---------------------------------------------------------------------


def test_push_without_a_token(art, env, monkeypatch, hub):
    monkeypatch.delenv("HF_TOKEN")
    before = len(hub.requests)
    line = one_error_line(cli("push", str(art), "alice/no-token"))
    assert "no Hugging Face token" in line and "HF_TOKEN" in line
    assert len(hub.requests) == before


def test_push_with_a_rejected_token(art, env, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    line = one_error_line(cli("push", str(art), "alice/bad-token"))
    assert "401" in line and "rejected the token" in line and "hf_wrong" not in line


def test_push_to_another_namespace_is_forbidden(art, env):
    line = one_error_line(cli("push", str(art), "bob/not-yours"))
    assert "403" in line


def test_push_to_an_existing_repo(art, env, hub):
    assert cli("push", str(art), "alice/tiny-exists").exit_code == 0
    line = one_error_line(cli("push", str(art), "alice/tiny-exists"))
    assert "already exists" in line and "--exist-ok" in line
    result = cli("push", str(art), "alice/tiny-exists", "--exist-ok", "--commit-message", "again")
    assert result.exit_code == 0, result.output


def test_push_to_an_unreachable_server(art, env, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    line = one_error_line(cli("push", str(art), "alice/unreachable"))
    assert "cannot reach the Hub" in line
    assert_no_token(line)


def test_push_refuses_a_broken_artifact_or_bad_id(art, env):
    (art / "wkvq.json").write_text("{}")
    assert "metadata does not match the schema" in one_error_line(cli("push", str(art), "alice/broken"))
    assert "not a Hub repo id" in one_error_line(cli("push", str(art), "no-namespace"))


def test_download_failures(art, env, monkeypatch):
    push(PushConfig(art, "alice/tiny-dl"))
    with pytest.raises(HubError, match="repo alice/missing not found"):
        resolve_artifact("alice/missing")
    with pytest.raises(HubError, match="revision 'nope' of alice/tiny-dl does not exist"):
        resolve_artifact("alice/tiny-dl", revision="nope")
    with pytest.raises(ArtifactError, match="neither a local artifact directory nor a Hub repo id"):
        resolve_artifact("./not/a/dir")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(HubError, match="401"):
        resolve_artifact("alice/tiny-dl")
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    with pytest.raises(HubError, match="cannot reach the Hub .* not in the local cache"):
        resolve_artifact("alice/tiny-dl")


def test_a_repo_that_is_not_an_artifact(env, hub, tmp_path):
    api = huggingface_hub.HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo("alice/plain")
    api.upload_file(path_or_fileobj=b'{"a": 1}', path_in_repo="config.json", repo_id="alice/plain")
    with pytest.raises(HubError, match="not a WKVQuant artifact"):
        resolve_artifact("alice/plain")


# -- convert --push-to-hub ------------------------------------------------------------------------


def test_convert_push_to_hub(tiny_llama_dir, env, hub, tmp_path):
    out = tmp_path / "converted"
    args = ("convert", str(tiny_llama_dir), "--out", str(out), "--method", "rtn", "--device", "cpu",
            "--dtype", "float32", "--push-to-hub", "alice/tiny-converted")
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert "pushed" in result.stdout
    assert tree_bytes(resolve_artifact("alice/tiny-converted")) == tree_bytes(out)
    # the repo exists now: a second run fails before converting anything
    out2 = tmp_path / "converted2"
    line = one_error_line(cli(*[str(out2) if a == str(out) else a for a in args]))
    assert "already exists" in line and not out2.exists()


# -- the real model -------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_push_and_load_by_id(smollm2_rtn_artifact, env, hub, tmp_path):
    from runtime import load

    art = Path(shutil.copytree(smollm2_rtn_artifact, tmp_path / "smollm2"))
    base = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the fixture's source is a local folder: name the base
    result = push(PushConfig(art, "alice/SmolLM2-135M-Instruct-W4KV4", base_model=base))
    data = ModelCard((art / "README.md").read_text()).data.to_dict()
    assert data["base_model"] == base and data["base_model_relation"] == "quantized"
    assert dict(result.files)["model.safetensors"] > 100 * 2**20
    path = resolve_artifact("alice/SmolLM2-135M-Instruct-W4KV4")
    assert tree_bytes(path) == tree_bytes(art)
    local = load(str(art), device="cpu")[0].state_dict()
    remote = load("alice/SmolLM2-135M-Instruct-W4KV4", device="cpu")[0].state_dict()
    assert local.keys() == remote.keys() and all(torch.equal(local[k], remote[k]) for k in local)


def test_generate_and_eval_take_a_repo_id(art, env, tmp_path):
    first = push(PushConfig(art, "alice/tiny-cli"))
    result = cli("generate", "alice/tiny-cli", "The quick brown fox", "--max-new-tokens", "3", "--device", "cpu",
                 "--revision", first.commit_oid)
    assert result.exit_code == 0, result.output
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(["The quick brown fox jumps over the lazy dog."] * 40))
    result = cli("eval", "alice/tiny-cli", "--data", str(text), "--seqlen", "32", "--max-windows", "2",
                 "--device", "cpu", "--json", str(tmp_path / "eval.json"))
    assert result.exit_code == 0, result.output
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["kind"] == "artifact" and evaluated["weight_quant"]["bits"] == 4 and evaluated["ppl"] > 1
    line = one_error_line(cli("generate", "alice/tiny-cli", "hi", "--device", "cpu", "--revision", "nope"))
    assert "revision 'nope' of alice/tiny-cli does not exist" in line
