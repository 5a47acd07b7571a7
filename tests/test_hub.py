"""Publishing to the Hub, against the loopback fake Hub in tests/hub_server.py (nothing leaves 127.0.0.1).

huggingface_hub reads HF_HUB_DISABLE_XET, HF_HUB_OFFLINE and the token path once, at import, so the
``hub`` fixture sets both the environment variables and the module constants they were read into.
HF_ENDPOINT needs only the variable: ckptkit.hub reads it on every push.
"""
from __future__ import annotations

import base64
import json
import logging
import socket
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hub_server import MiB, FakeHub
from safetensors.torch import save_file

from ckptkit import atomic
from ckptkit.cli import main
from ckptkit.commands.push import push
from ckptkit.errors import BadInput
from ckptkit.hub import PushResult, check_model_folder, push_folder
from ckptkit.model_card import TAGS, build_model_card, write_model_card

from conftest import fixture_path

TOKEN = "hf_ckptkitTestToken0123456789abcdef"
USER = "ckptkit-tester"
LARGE_SHARD = "model-00001-of-00002.safetensors"
SMALL_SHARD = "model-00002-of-00002.safetensors"
# huggingface_hub's own LFS upload hands a file object to httpx2, which deprecates that.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
CARD_INFO = {
    "source_format": "megatron-legacy",
    "source_layout": {"tp": 2, "pp": 2, "vpp": 1, "iteration": 10, "checkpoint_version": 3.0, "naming": "mcore-local"},
    "architecture": "GPT2LMHeadModel", "family": "gpt2", "num_parameters": 2_883_584, "dtype": "float32",
    "ckptkit_version": "0.1.0",
    "verification": {"logits_max_abs_diff": 1.4e-6, "tokens": 64, "reference": "Megatron-LM logits"},
    "spec": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4},
}


# ---- factories and fixtures ------------------------------------------------------------------------

def make_model_folder(folder: Path, large_shard_bytes: int = 11 * MiB) -> Path:
    """A sharded HF model folder: config.json, a shard above the Hub's 10 MiB LFS line, a small one, an index."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    large = {"transformer.wte.weight": torch.randn(large_shard_bytes // 4, generator=generator)}
    small = {"lm_head.weight": torch.randn(8, 4, generator=generator)}
    save_file(large, folder / LARGE_SHARD)
    save_file(small, folder / SMALL_SHARD)
    weight_map = {**dict.fromkeys(large, LARGE_SHARD), **dict.fromkeys(small, SMALL_SHARD)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    return folder


def make_small_model_folder(folder: Path) -> Path:
    """config.json and a single small model.safetensors: enough for tests about everything but LFS."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"lm_head.weight": torch.ones(4, 4)}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    return folder


def local_files(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def requests_to(hub: FakeHub, method: str, path_part: str):
    return [request for request in hub.requests if request.method == method and path_part in request.path]


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got {lines}"
    return lines[0]


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running fake Hub that accepts TOKEN for USER (and the org ckptkit-org); the client points at it."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")  # Xet storage is a separate service the fake does not emulate
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-login" / "token"))
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with FakeHub(tokens={TOKEN: USER}, orgs=("ckptkit-org",)) as fake_hub:
        monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
        yield fake_hub
    assert fake_hub.server_errors == []


@pytest.fixture(scope="session")
def built_model(tmp_path_factory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("built") / "gpt2-hf")


@pytest.fixture
def model_folder(built_model, tmp_path) -> Path:
    """A fresh copy of the sharded model folder, safe to modify."""
    folder = tmp_path / "gpt2-hf"
    folder.mkdir()
    for name, content in local_files(built_model).items():
        (folder / name).write_bytes(content)
    return folder


def run_push(*args: str):
    return CliRunner().invoke(push, [str(arg) for arg in args])


# ---- pushing -------------------------------------------------------------------------------------

def test_every_file_arrives_byte_identical(hub, model_folder):
    result = push_folder(model_folder, f"{USER}/gpt2")

    remote = hub.files(f"{USER}/gpt2")
    assert remote.pop(".gitattributes")  # the Hub's own, from the repository's first commit
    assert remote == local_files(model_folder)
    assert result.files == sorted(local_files(model_folder))
    assert result.total_bytes == sum(len(content) for content in local_files(model_folder).values())


def test_weight_shards_go_through_lfs_and_json_files_inline_in_the_commit(hub, model_folder):
    push_folder(model_folder, f"{USER}/gpt2")

    commit_body = requests_to(hub, "POST", "/commit/main")[0].body
    operations = {line["value"]["path"]: line for line in map(json.loads, commit_body.splitlines())
                  if line["key"] != "header"}
    shards = {name: (model_folder / name).read_bytes() for name in (LARGE_SHARD, SMALL_SHARD)}
    assert len(shards[LARGE_SHARD]) > 10 * MiB
    for name, content in shards.items():  # *.safetensors is an LFS pattern of the Hub's .gitattributes
        assert operations[name]["key"] == "lfsFile"
        assert operations[name]["value"]["size"] == len(content)
    lfs_puts = requests_to(hub, "PUT", "/lfs-storage/")
    assert sorted(request.body for request in lfs_puts) == sorted(shards.values())
    for name in ("config.json", "model.safetensors.index.json"):
        assert operations[name]["key"] == "file"
        assert base64.b64decode(operations[name]["value"]["content"]) == (model_folder / name).read_bytes()


def test_large_shard_is_sent_in_parts_when_the_hub_asks_for_multipart(hub, model_folder):
    hub.multipart_chunk_size = 4 * MiB

    push_folder(model_folder, f"{USER}/gpt2")

    parts = requests_to(hub, "PUT", "/part/")
    last_part = (model_folder / LARGE_SHARD).stat().st_size - 8 * MiB
    assert [len(part.body) for part in parts] == [4 * MiB, 4 * MiB, last_part]
    assert hub.files(f"{USER}/gpt2")[LARGE_SHARD] == (model_folder / LARGE_SHARD).read_bytes()


def test_token_is_sent_only_in_the_authorization_header(hub, model_folder, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")  # it logs every request's method and URL

    result = run_push(model_folder, f"{USER}/gpt2", "--private", "--revision", "dev")

    assert result.exit_code == 0, result.output
    assert hub.requests
    for request in hub.requests:
        assert TOKEN not in request.path
        assert TOKEN.encode() not in request.body
        for name, value in request.headers.items():
            if TOKEN in value:
                assert (name, value) == ("authorization", f"Bearer {TOKEN}")
    api_calls = [request for request in hub.requests if not request.path.startswith("/lfs-storage/")]
    assert all(request.headers.get("authorization") == f"Bearer {TOKEN}" for request in api_calls)
    # Large-file storage URLs are pre-signed on the Hub: the token must not follow the file there.
    assert all("authorization" not in request.headers for request in requests_to(hub, "PUT", "/lfs-storage/"))
    captured = capsys.readouterr()
    for text in (result.stdout, result.stderr, caplog.text, captured.out, captured.err):
        assert TOKEN not in text


def test_missing_repository_is_created(hub, model_folder):
    assert f"{USER}/gpt2" not in hub.repos

    push_folder(model_folder, f"{USER}/gpt2")

    assert f"{USER}/gpt2" in hub.repos
    create = requests_to(hub, "POST", "/api/repos/create")
    assert [json.loads(request.body)["name"] for request in create] == ["gpt2"]


def test_existing_repository_gets_a_new_commit_on_top_of_its_history(hub, model_folder):
    existing = hub.add_repo(f"{USER}/gpt2")
    first_commit = existing.refs["main"]

    result = push_folder(model_folder, f"{USER}/gpt2")

    head = hub.head(f"{USER}/gpt2")
    assert (head.oid, head.parent) == (result.commit_oid, first_commit)
    assert ".gitattributes" in head.tree


def test_revision_creates_the_branch_and_leaves_main_untouched(hub, model_folder):
    result = push_folder(model_folder, f"{USER}/gpt2", revision="megatron-iter-10")

    assert result.revision == "megatron-iter-10"
    assert requests_to(hub, "POST", "/api/models/ckptkit-tester/gpt2/branch/megatron-iter-10")
    assert hub.files(f"{USER}/gpt2", "megatron-iter-10")[LARGE_SHARD] == (model_folder / LARGE_SHARD).read_bytes()
    assert set(hub.files(f"{USER}/gpt2", "main")) == {".gitattributes"}


def test_revision_that_already_exists_receives_the_commit(hub, tmp_path):
    folder = make_small_model_folder(tmp_path / "small")
    first = push_folder(folder, f"{USER}/gpt2", revision="dev")
    (folder / "config.json").write_text('{"model_type": "gpt2", "n_layer": 3}')

    second = push_folder(folder, f"{USER}/gpt2", revision="dev")

    assert hub.head(f"{USER}/gpt2", "dev").parent == first.commit_oid
    assert hub.head(f"{USER}/gpt2", "dev").oid == second.commit_oid
    assert hub.files(f"{USER}/gpt2", "dev")["config.json"] == b'{"model_type": "gpt2", "n_layer": 3}'


def test_private_is_sent_when_the_repository_is_created(hub, tmp_path):
    push_folder(make_small_model_folder(tmp_path / "small"), f"{USER}/gpt2", private=True)

    create = json.loads(requests_to(hub, "POST", "/api/repos/create")[0].body)
    assert create["visibility"] == "private"
    assert hub.repos[f"{USER}/gpt2"].private


def test_without_private_the_hub_default_visibility_applies(hub, tmp_path):
    push_folder(make_small_model_folder(tmp_path / "small"), f"{USER}/gpt2")

    assert "visibility" not in json.loads(requests_to(hub, "POST", "/api/repos/create")[0].body)
    assert not hub.repos[f"{USER}/gpt2"].private


def test_private_push_to_an_existing_public_repository_is_refused_before_any_upload(hub, tmp_path):
    hub.add_repo(f"{USER}/gpt2", private=False)

    with pytest.raises(BadInput, match="already exists and is public"):
        push_folder(make_small_model_folder(tmp_path / "small"), f"{USER}/gpt2", private=True)

    assert not requests_to(hub, "POST", "/preupload/") and not requests_to(hub, "POST", "/commit/")
    assert set(hub.files(f"{USER}/gpt2")) == {".gitattributes"}


def test_create_pr_opens_a_pull_request_and_leaves_main_untouched(hub, tmp_path):
    hub.add_repo("ckptkit-org/gpt2")

    result = push_folder(make_small_model_folder(tmp_path / "small"), "ckptkit-org/gpt2", create_pr=True)

    assert result.revision == "refs/pr/1"
    assert result.pr_url == f"{hub.url}/ckptkit-org/gpt2/discussions/1"
    assert "model.safetensors" in hub.files("ckptkit-org/gpt2", "refs/pr/1")
    assert set(hub.files("ckptkit-org/gpt2", "main")) == {".gitattributes"}


def test_create_pr_with_a_revision_is_refused(hub, tmp_path):
    with pytest.raises(BadInput, match="pull request is always opened against main"):
        push_folder(make_small_model_folder(tmp_path / "small"), f"{USER}/gpt2", revision="dev", create_pr=True)
    assert hub.requests == []


def test_endpoint_argument_overrides_hf_endpoint(hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")

    result = push_folder(make_small_model_folder(tmp_path / "small"), f"{USER}/gpt2", endpoint=hub.url)

    assert result.endpoint == hub.url
    assert "model.safetensors" in hub.files(f"{USER}/gpt2")


def test_explicit_token_argument_is_used_instead_of_hf_token(hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "hf_someoneElsesToken")

    push_folder(make_small_model_folder(tmp_path / "small"), f"{USER}/gpt2", token=TOKEN)

    api_calls = [request for request in hub.requests if not request.path.startswith("/lfs-storage/")]
    assert {request.headers.get("authorization") for request in api_calls} == {f"Bearer {TOKEN}"}


# ---- failures: one line, exit code 2 -----------------------------------------------------------------

def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_missing_token_exits_2_with_one_line_before_any_request(hub, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN")

    result = run_push(make_small_model_folder(tmp_path / "small"), f"{USER}/gpt2")

    assert result.exit_code == 2
    assert "no Hugging Face token" in one_line(result.stderr)
    assert result.stdout == ""
    assert hub.requests == []


def test_rejected_token_exits_2_with_one_line(hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "hf_revokedToken")

    result = run_push(make_small_model_folder(tmp_path / "small"), f"{USER}/gpt2")

    assert result.exit_code == 2
    line = one_line(result.stderr)
    assert "rejected the token (401" in line and "hf_revokedToken" not in line


def test_namespace_without_write_access_exits_2_naming_the_repository(hub, tmp_path):
    result = run_push(make_small_model_folder(tmp_path / "small"), "someone-else/gpt2")

    assert result.exit_code == 2
    assert "may not write to someone-else/gpt2 (403" in one_line(result.stderr)


def test_repository_not_found_during_upload_exits_2_with_one_line(hub, tmp_path):
    hub.fail("POST", r"/preupload/", 404, error_code="RepoNotFound", message="Repository not found")

    result = run_push(make_small_model_folder(tmp_path / "small"), f"{USER}/gpt2")

    assert result.exit_code == 2
    assert f"{USER}/gpt2: repository not found at {hub.url}" in one_line(result.stderr)


def test_unreachable_hub_exits_2_with_one_line(hub, monkeypatch, tmp_path):
    unreachable = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", unreachable)

    result = run_push(make_small_model_folder(tmp_path / "small"), f"{USER}/gpt2")

    assert result.exit_code == 2
    assert f"cannot reach the Hub at {unreachable}" in one_line(result.stderr)


def test_folder_without_config_json_is_refused_with_one_line(hub, tmp_path):
    folder = make_small_model_folder(tmp_path / "small")
    (folder / "config.json").unlink()

    result = run_push(folder, f"{USER}/gpt2")

    assert result.exit_code == 2
    assert "no config.json" in one_line(result.stderr)
    assert hub.requests == []


def test_index_naming_a_missing_shard_is_refused_with_one_line(hub, model_folder):
    (model_folder / SMALL_SHARD).unlink()

    result = run_push(model_folder, f"{USER}/gpt2")

    assert result.exit_code == 2
    line = one_line(result.stderr)
    assert "model.safetensors.index.json names 1 shard(s) that are missing" in line and SMALL_SHARD in line
    assert hub.requests == []


def test_folder_without_weights_is_refused(tmp_path):
    folder = make_small_model_folder(tmp_path / "small")
    (folder / "model.safetensors").unlink()

    with pytest.raises(BadInput, match="no weights"):
        check_model_folder(folder)


def test_repository_id_without_owner_is_refused(hub, tmp_path):
    result = run_push(make_small_model_folder(tmp_path / "small"), "gpt2")

    assert result.exit_code == 2
    assert "expected OWNER/NAME" in one_line(result.stderr)


# ---- the command ----------------------------------------------------------------------------------

def test_push_json_output_parses_describes_the_commit_and_is_all_that_is_printed(hub, model_folder):
    result = run_push(model_folder, f"{USER}/gpt2", "--revision", "dev", "--commit-message", "iteration 10", "--json")

    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # no progress bars either
    payload = json.loads(result.stdout)
    head = hub.head(f"{USER}/gpt2", "dev")
    assert payload == PushResult(repo_id=f"{USER}/gpt2", revision="dev", commit_oid=head.oid,
                                 commit_url=f"{hub.url}/{USER}/gpt2/commit/{head.oid}", endpoint=hub.url,
                                 files=sorted(local_files(model_folder)),
                                 total_bytes=sum(map(len, local_files(model_folder).values()))).to_dict()
    assert head.summary == "iteration 10"


def test_push_without_json_prints_a_summary_table(hub, tmp_path):
    result = run_push(make_small_model_folder(tmp_path / "small"), f"{USER}/gpt2", "--create-pr")

    assert result.exit_code == 0, result.output
    for text in (f"{hub.url}/{USER}/gpt2", "refs/pr/1", "pull request", "2 ("):
        assert text in result.stdout


def test_push_help_shows_an_example():
    result = CliRunner().invoke(push, ["--help"])

    assert result.exit_code == 0
    assert "ckptkit push gpt2-hf/ my-org/gpt2-converted" in result.output
    for option in ("--private", "--revision", "--commit-message", "--create-pr", "--json"):
        assert option in result.output


def test_push_is_a_subcommand_of_the_main_cli():
    assert main.commands["push"] is push


# ---- converting and publishing in one command -------------------------------------------------------

def convert_and_push(destination: Path, repo_id: str, *extra: str):
    """``ckptkit megatron-to-hf`` of the real GPT-2 checkpoint (3 MB) in 1 MB shards, pushed to ``repo_id``."""
    source = fixture_path("gpt2_tp2pp2", "conv", "torch")
    arguments = ["megatron-to-hf", source, destination, "--max-shard-size", "1MB", "--push-to-hub", repo_id, *extra]
    return CliRunner().invoke(main, [str(argument) for argument in arguments])


def test_megatron_to_hf_push_to_hub_uploads_config_shards_and_model_card(hub, tmp_path):
    destination = tmp_path / "gpt2-hf"

    result = convert_and_push(destination, f"{USER}/gpt2", "--json")

    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # --json: neither ckptkit's progress nor huggingface_hub's
    remote = hub.files(f"{USER}/gpt2")
    assert remote.pop(".gitattributes")
    assert remote == local_files(destination)
    shards = set(json.loads(remote["model.safetensors.index.json"])["weight_map"].values())
    assert len(shards) > 1 and shards <= set(remote)
    assert {"config.json", "generation_config.json", "README.md"} <= set(remote)
    readme = remote["README.md"].decode()
    assert readme.startswith("---\nlibrary_name: transformers\n") and "- megatron-lm" in readme
    for row in ("| format | megatron-legacy |", "| tensor parallel (TP) | 2 |", "| iteration | 10 |",
                "| architecture | GPT2LMHeadModel |", "| parameters | 773,376 (773.4K) |"):
        assert row in readme
    payload = json.loads(result.stdout)
    assert sorted(payload["files"]) == sorted(remote)
    assert payload["bytes_written"] == sum(map(len, remote.values()))
    assert f"pushed to {USER}/gpt2 (main)" in payload["notes"]


def test_megatron_to_hf_writes_the_model_card_before_the_output_is_published(hub, monkeypatch, tmp_path):
    published = {}
    rename_into_place = atomic._replace

    def record_then_rename(partial: Path, destination: Path) -> None:
        published[destination] = sorted(path.name for path in partial.iterdir())
        rename_into_place(partial, destination)

    monkeypatch.setattr(atomic, "_replace", record_then_rename)

    result = convert_and_push(tmp_path / "gpt2-hf", f"{USER}/gpt2", "--revision", "iter-10")

    assert result.exit_code == 0, result.output
    assert published[tmp_path / "gpt2-hf"] == sorted(local_files(tmp_path / "gpt2-hf"))
    assert "README.md" in published[tmp_path / "gpt2-hf"]
    assert "README.md" in hub.files(f"{USER}/gpt2", "iter-10")


def test_megatron_to_hf_without_push_to_hub_writes_no_model_card(tmp_path):
    source = fixture_path("gpt2_tp2pp2", "conv", "torch")

    result = CliRunner().invoke(main, ["megatron-to-hf", str(source), str(tmp_path / "gpt2-hf")])

    assert result.exit_code == 0, result.output
    assert not (tmp_path / "gpt2-hf" / "README.md").exists()


# ---- the model card -----------------------------------------------------------------------------------

def test_model_card_has_transformers_metadata_and_ckptkit_tags():
    card = build_model_card(CARD_INFO)

    assert card.data.library_name == "transformers"
    assert card.data.tags == list(TAGS) == ["ckptkit", "megatron-lm", "converted"]
    assert card.content.startswith("---\n")


def test_model_card_contains_source_architecture_and_verification_figure():
    text = build_model_card(CARD_INFO).text

    for section in ("## Source", "## Architecture", "## Verification"):
        assert section in text
    for row in ("| tensor parallel (TP) | 2 |", "| pipeline parallel (PP) | 2 |", "| iteration | 10 |",
                "| checkpoint version | 3.0 |", "| parameter naming | mcore-local |", "| format | megatron-legacy |",
                "| architecture | GPT2LMHeadModel |", "| parameters | 2,883,584 (2.9M) |", "| hidden_size | 32 |"):
        assert row in text
    assert "maximum absolute difference of **1.4e-06**" in text
    assert "Megatron-LM logits over 64 tokens" in text


def test_model_card_needs_only_the_architecture():
    text = build_model_card({"architecture": "LlamaForCausalLM"}).text

    assert "No numerical check was recorded" in text


def test_model_card_without_architecture_is_refused():
    with pytest.raises(BadInput, match="architecture"):
        build_model_card({"family": "gpt2"})


def test_model_card_built_over_an_existing_readme_keeps_its_text_and_metadata():
    existing = "---\nlicense: apache-2.0\ntags:\n- gpt2\n---\n# My GPT-2\n\nTrained on my data.\n"

    card = build_model_card(CARD_INFO, existing_readme=existing)
    rebuilt = build_model_card({**CARD_INFO, "verification": {"logits_max_abs_diff": 2.5e-7}},
                               existing_readme=card.content)

    assert card.data.license == "apache-2.0"
    assert card.data.tags == ["gpt2", "ckptkit", "megatron-lm", "converted"]
    assert "# My GPT-2\n\nTrained on my data." in card.text and "1.4e-06" in card.text
    assert rebuilt.text.count("## Verification") == 1
    assert "2.5e-07" in rebuilt.text and "1.4e-06" not in rebuilt.text


def test_write_model_card_keeps_an_existing_readme(tmp_path):
    (tmp_path / "README.md").write_text("# Hand-written card\n")

    written = write_model_card(tmp_path, CARD_INFO)

    assert written is None
    assert (tmp_path / "README.md").read_text() == "# Hand-written card\n"


def test_write_model_card_replaces_an_existing_readme_when_asked(tmp_path):
    (tmp_path / "README.md").write_text("# Hand-written card\n")

    written = write_model_card(tmp_path, CARD_INFO, overwrite_readme=True)

    assert written == tmp_path / "README.md"
    assert "1.4e-06" in written.read_text()
    assert [path.name for path in tmp_path.iterdir()] == ["README.md"]


def test_pushed_model_card_carries_metadata_and_verification_figure(hub, tmp_path):
    folder = make_small_model_folder(tmp_path / "small")
    write_model_card(folder, CARD_INFO)

    push_folder(folder, f"{USER}/gpt2")

    readme = hub.files(f"{USER}/gpt2")["README.md"].decode()
    assert readme.startswith("---\nlibrary_name: transformers\n")
    assert "- megatron-lm" in readme and "**1.4e-06**" in readme
    assert requests_to(hub, "POST", "/api/validate-yaml")


def test_existing_readme_is_pushed_unchanged(hub, tmp_path):
    folder = make_small_model_folder(tmp_path / "small")
    (folder / "README.md").write_text("# Hand-written card\n")
    write_model_card(folder, CARD_INFO)

    push_folder(folder, f"{USER}/gpt2")

    assert hub.files(f"{USER}/gpt2")["README.md"] == b"# Hand-written card\n"


def test_fake_hub_serves_only_the_loopback_interface(hub):
    assert hub.url.startswith("http://127.0.0.1:")
    assert hub._server.server_address[0] == "127.0.0.1"
