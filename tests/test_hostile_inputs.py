"""Broken and hostile inputs: ckptkit never runs code hidden in a file, never leaves an
output that looks complete but is not, and says in one line what is wrong.

Every case below is built by a small named factory from the real Megatron-LM fixtures
(copied first) or from tiny Hugging Face models, and run through the command line. The
shared contract (:func:`assert_refused_cleanly`): exit code 2, exactly one ``error:``
line naming the file (and the tensor where one is at fault), no traceback, nothing at
the destination, no hidden partial folder beside it, and no code from the file ran.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import struct
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ckptkit.cli import main
from ckptkit.safe_load import safe_torch_load

from conftest import fixture_path, make_hf_model

MEGATRON_GPT2 = ("gpt2_tp2pp2", "conv", "torch")
MEGATRON_GPT2_DIST = ("gpt2_tp2pp2", "dist")
ITERATION = "iter_0000010"
RANK_FILE = "model_optim_rng.pt"
TRACKER = "latest_checkpointed_iteration.txt"


# ---------------------------------------------------------------------------- helpers

def run(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


def output_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.strip()]


def leftovers(destination: Path) -> list[str]:
    """Hidden siblings a conversion into ``destination`` may have created."""
    if not destination.parent.is_dir():
        return []
    return sorted(path.name for path in destination.parent.iterdir()
                  if path.name.startswith(f".{destination.name}."))


def assert_refused_cleanly(result, destination: Path, *names: str, marker: Path | None = None,
                           exit_code: int = 2, destination_existed: bool = False) -> str:
    """The shared contract of every refusal; returns the error line."""
    lines = output_lines(result)
    assert result.exit_code == exit_code, result.output
    assert len(lines) == 1, f"expected one line, got:\n{result.output}"
    line = lines[0]
    assert line.startswith(("error:", "internal error:")), line
    assert "Traceback" not in result.output
    for name in names:
        assert name in line, f"{name!r} not named in: {line}"
    if not destination_existed:
        assert not destination.exists(), f"{destination} was left behind"
    assert leftovers(destination) == []
    if marker is not None:
        assert not marker.exists(), "code hidden in the file ran"
    return line


class RunsACommand:
    """Unpickling this runs ``touch MARKER`` (what a hostile checkpoint would do, less politely)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def rank_file(checkpoint: Path, tp_rank: int, pp_stage: int) -> Path:
    return checkpoint / ITERATION / f"mp_rank_{tp_rank:02d}_{pp_stage:03d}" / RANK_FILE


def edit_rank_file(path: Path, edit) -> None:
    """Load a rank file (allow-listed), let ``edit`` change the dict, save it back."""
    state = safe_torch_load(path, mmap=False)
    edit(state)
    torch.save(state, path)


def edit_tensor(path: Path, key: str, change) -> None:
    def edit(state):
        state["model"][key] = change(state["model"][key])
    edit_rank_file(path, edit)


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


# ---------------------------------------------------------------------------- workspace

@pytest.fixture(scope="module")
def tiny_hf_models(tmp_path_factory):
    """One tiny GPT-2 and one tiny Llama (4 heads, 2 query groups), built once and copied per test."""
    root = tmp_path_factory.mktemp("tiny-hf")
    return {"gpt2": make_hf_model(root / "gpt2", "gpt2"), "llama": make_hf_model(root / "llama", "llama")}


@dataclass
class Workspace:
    root: Path
    tiny_hf_models: dict
    monkeypatch: pytest.MonkeyPatch
    marker: Path = field(init=False)
    out: Path = field(init=False)

    def __post_init__(self):
        self.marker = self.root / "code-ran"
        self.out = self.root / "dst" / "out"
        self.out.parent.mkdir(parents=True)

    def megatron(self, *parts: str) -> Path:
        target = self.root / "src" / "megatron"
        shutil.copytree(fixture_path(*(parts or MEGATRON_GPT2)), target)
        return target

    def hf(self, family: str = "gpt2") -> Path:
        target = self.root / "src" / f"hf-{family}"
        shutil.copytree(self.tiny_hf_models[family], target)
        return target


@pytest.fixture
def workspace(tmp_path, tiny_hf_models, monkeypatch) -> Workspace:
    return Workspace(tmp_path, tiny_hf_models, monkeypatch)


@dataclass
class Case:
    """A command to run and the names its one-line error must contain."""

    args: list
    names: tuple[str, ...]
    exit_code: int = 2


def to_hf(source: Path, ws: Workspace, *names: str, extra=()) -> Case:
    return Case(["megatron-to-hf", source, ws.out, *extra], names)


def to_megatron(source: Path, ws: Workspace, *names: str, tp=1, pp=1, extra=()) -> Case:
    return Case(["hf-to-megatron", source, ws.out, "--tp", tp, "--pp", pp, *extra], names)


# ---------------------------------------------------------------------------- Megatron per-rank files

def truncated_rank_file(ws):
    checkpoint = ws.megatron()
    truncate(rank_file(checkpoint, 1, 1))
    return to_hf(checkpoint, ws, "mp_rank_01_001/model_optim_rng.pt")


def zero_length_rank_file(ws):
    checkpoint = ws.megatron()
    rank_file(checkpoint, 0, 1).write_bytes(b"")
    return to_hf(checkpoint, ws, "mp_rank_00_001/model_optim_rng.pt", "empty")


def first_rank_file_runs_a_command(ws):
    checkpoint = ws.megatron()
    torch.save({"model": {}, "args": RunsACommand(ws.marker)}, rank_file(checkpoint, 0, 0))
    return to_hf(checkpoint, ws, "mp_rank_00_000/model_optim_rng.pt", "system")


def later_rank_file_runs_a_command(ws):
    checkpoint = ws.megatron()
    edit_rank_file(rank_file(checkpoint, 1, 1), lambda state: state.update(payload=RunsACommand(ws.marker)))
    return to_hf(checkpoint, ws, "mp_rank_01_001/model_optim_rng.pt", "disallowed global", "system")


def plain_pickle_rank_file_runs_a_command(ws):
    checkpoint = ws.megatron()
    with open(rank_file(checkpoint, 1, 0), "wb") as handle:
        pickle.dump({"model": RunsACommand(ws.marker)}, handle)
    return to_hf(checkpoint, ws, "mp_rank_01_000/model_optim_rng.pt")


def missing_rank_folder(ws):
    checkpoint = ws.megatron()
    shutil.rmtree(rank_file(checkpoint, 1, 1).parent)
    return to_hf(checkpoint, ws, "mp_rank_01_001", "missing")


def missing_rank_file(ws):
    checkpoint = ws.megatron()
    rank_file(checkpoint, 1, 0).unlink()
    return to_hf(checkpoint, ws, "mp_rank_01_000/model_optim_rng.pt", "missing")


def tracker_with_garbage_text(ws):
    checkpoint = ws.megatron()
    (checkpoint / TRACKER).write_text("latest, probably\n")
    return to_hf(checkpoint, ws, TRACKER, "latest, probably")


def tracker_with_binary_garbage(ws):
    checkpoint = ws.megatron()
    (checkpoint / TRACKER).write_bytes(b"\x80\xff\x00\x13garbage")
    return to_hf(checkpoint, ws, TRACKER)


def empty_tracker(ws):
    checkpoint = ws.megatron()
    (checkpoint / TRACKER).write_text("")
    return to_hf(checkpoint, ws, TRACKER)


def tracker_naming_a_missing_iteration(ws):
    checkpoint = ws.megatron()
    (checkpoint / TRACKER).write_text("20")
    return to_hf(checkpoint, ws, TRACKER, "iter_0000020")


def shapes_mismatched_across_tp_ranks(ws):
    checkpoint = ws.megatron()
    key = "decoder.layers.0.mlp.linear_fc1.weight"
    edit_tensor(rank_file(checkpoint, 1, 0), key, lambda weight: weight[:-8].clone())
    return to_hf(checkpoint, ws, "mp_rank_01_000/model_optim_rng.pt", key, "(184, 96)", "(192, 96)")


def dtype_mismatched_across_tp_ranks(ws):
    checkpoint = ws.megatron()
    key = "decoder.layers.1.self_attention.linear_proj.weight"
    edit_tensor(rank_file(checkpoint, 1, 1), key, lambda weight: weight.to(torch.float16))
    return to_hf(checkpoint, ws, "mp_rank_01_001/model_optim_rng.pt", key, "float16")


def diverged_replicated_tensor_with_strict(ws):
    checkpoint = ws.megatron()
    key = "decoder.layers.1.input_layernorm.weight"
    edit_tensor(rank_file(checkpoint, 1, 0), key, lambda weight: weight + 0.25)
    return to_hf(checkpoint, ws, key, "differs across TP ranks", "0.25", extra=["--strict"])


def tied_head_differing_from_embeddings_with_strict(ws):
    checkpoint = ws.megatron()
    edit_tensor(rank_file(checkpoint, 0, 1), "output_layer.weight", lambda weight: weight + 1.0)
    return to_hf(checkpoint, ws, "mp_rank_00_001/model_optim_rng.pt", "output_layer.weight", "word embeddings",
                 extra=["--strict"])


def tensor_missing_on_one_tp_rank(ws):
    checkpoint = ws.megatron()
    key = "decoder.layers.2.mlp.linear_fc2.weight"
    edit_rank_file(rank_file(checkpoint, 1, 1), lambda state: state["model"].pop(key))
    return to_hf(checkpoint, ws, "mp_rank_01_001/model_optim_rng.pt", key, "missing")


def unknown_tensor_in_a_rank_file(ws):
    checkpoint = ws.megatron()
    edit_rank_file(rank_file(checkpoint, 0, 0),
                   lambda state: state["model"].update({"decoder.layers.0.mystery.weight": torch.zeros(3)}))
    return to_hf(checkpoint, ws, "mp_rank_00_000/model_optim_rng.pt", "decoder.layers.0.mystery.weight")


def rank_file_holding_a_list(ws):
    checkpoint = ws.megatron()
    torch.save([torch.zeros(2)], rank_file(checkpoint, 1, 1))
    return to_hf(checkpoint, ws, "mp_rank_01_001/model_optim_rng.pt", "list")


def rank_file_without_args(ws):
    checkpoint = ws.megatron()
    edit_rank_file(rank_file(checkpoint, 0, 0), lambda state: state.pop("args"))
    return to_hf(checkpoint, ws, "mp_rank_00_000/model_optim_rng.pt", "args")


def args_missing_num_layers(ws):
    checkpoint = ws.megatron()
    edit_rank_file(rank_file(checkpoint, 0, 0), lambda state: delattr(state["args"], "num_layers"))
    return to_hf(checkpoint, ws, "mp_rank_00_000/model_optim_rng.pt", "num_layers")


def args_naming_an_unknown_architecture(ws):
    checkpoint = ws.megatron()
    edit_rank_file(rank_file(checkpoint, 0, 0), lambda state: setattr(state["args"], "swiglu", True))
    return to_hf(checkpoint, ws, "linear_fc1.weight has shape (192, 96)", "expected (384, 96)")


def args_disagreeing_with_the_layers_in_the_files(ws):
    checkpoint = ws.megatron()
    edit_rank_file(rank_file(checkpoint, 0, 0), lambda state: setattr(state["args"], "num_layers", 8))
    return to_hf(checkpoint, ws, "num_layers=8", "6 layers")


def target_tp_not_dividing_heads(ws):
    return Case(["reshard", fixture_path(*MEGATRON_GPT2), ws.out, "--tp", 4, "--pp", 1],
                ("TP=4", "6 attention heads"))


def target_pp_not_dividing_layers(ws):
    return Case(["reshard", fixture_path(*MEGATRON_GPT2), ws.out, "--tp", 1, "--pp", 4],
                ("PP=4", "6 layers"))


def zip_with_a_path_traversal_member(ws):
    checkpoint = ws.megatron()
    archive = ws.root / "src" / "ckpt.zip"
    with zipfile.ZipFile(archive, "w") as opened:
        for path in sorted(checkpoint.rglob("*")):
            if path.is_file():
                opened.write(path, Path("ckpt") / path.relative_to(checkpoint))
        opened.writestr("../../escaped.txt", "written outside the extraction folder")
    return to_hf(archive, ws, "ckpt.zip", "../../escaped.txt", "outside")


def zip_wrapping_a_truncated_rank_file(ws):
    checkpoint = ws.megatron()
    truncate(rank_file(checkpoint, 0, 1))
    archive = ws.root / "src" / "ckpt.zip"
    with zipfile.ZipFile(archive, "w") as opened:
        for path in sorted(checkpoint.rglob("*")):
            if path.is_file():
                opened.write(path, Path("ckpt") / path.relative_to(checkpoint))
    return to_hf(archive, ws, "mp_rank_00_001/model_optim_rng.pt")


def zip_that_is_not_a_zip(ws):
    archive = ws.root / "src" / "ckpt.zip"
    archive.parent.mkdir(parents=True)
    archive.write_bytes(b"PK\x03\x04 this is not really an archive")
    return to_hf(archive, ws, "ckpt.zip")


# ---------------------------------------------------------------------------- Megatron torch_dist

def torch_dist_metadata_runs_a_command(ws):
    checkpoint = ws.megatron(*MEGATRON_GPT2_DIST)
    with open(checkpoint / ITERATION / ".metadata", "wb") as handle:
        pickle.dump(RunsACommand(ws.marker), handle)
    return to_hf(checkpoint, ws, ".metadata", "disallowed global", "system")


def torch_dist_truncated_data_file(ws):
    checkpoint = ws.megatron(*MEGATRON_GPT2_DIST)
    truncate(checkpoint / ITERATION / "__1_0.distcp")
    return to_hf(checkpoint, ws, "__1_0.distcp", "truncated")


# ---------------------------------------------------------------------------- Hugging Face folders

def _single_shard(folder: Path) -> Path:
    return folder / "model.safetensors"


def corrupt_safetensors_header(ws):
    folder = ws.hf()
    shard = _single_shard(folder)
    data = bytearray(shard.read_bytes())
    data[8:40] = b"{ this header is not JSON at all"
    shard.write_bytes(bytes(data))
    return to_megatron(folder, ws, "model.safetensors", "header")


def safetensors_header_length_past_the_end(ws):
    folder = ws.hf()
    shard = _single_shard(folder)
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", 1 << 40)
    shard.write_bytes(bytes(data))
    return to_megatron(folder, ws, "model.safetensors")


def truncated_safetensors(ws):
    folder = ws.hf()
    truncate(_single_shard(folder), keep=0.6)
    return to_megatron(folder, ws, "model.safetensors")


def zero_length_safetensors(ws):
    folder = ws.hf()
    _single_shard(folder).write_bytes(b"")
    return to_megatron(folder, ws, "model.safetensors")


def _write_index(folder: Path, weight_map) -> Path:
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


def _weight_names(folder: Path) -> list[str]:
    return sorted(load_file(_single_shard(folder)))


def malformed_index_json(ws):
    folder = ws.hf()
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {"transformer.wte.weight": ')
    return to_megatron(folder, ws, "model.safetensors.index.json", "malformed JSON")


def index_without_a_weight_map(ws):
    folder = ws.hf()
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}, "weight_map": ["model.safetensors"]}')
    return to_megatron(folder, ws, "model.safetensors.index.json", "not a shard index")


def index_naming_a_missing_shard(ws):
    folder = ws.hf()
    weight_map = {name: "model.safetensors" for name in _weight_names(folder)}
    weight_map["transformer.h.1.mlp.c_proj.weight"] = "model-00002-of-00002.safetensors"
    _write_index(folder, weight_map)
    return to_megatron(folder, ws, "model-00002-of-00002.safetensors", "missing")


def index_naming_a_shard_outside_the_folder(ws):
    folder = ws.hf()
    elsewhere = ws.root / "elsewhere"
    elsewhere.mkdir()
    shutil.move(_single_shard(folder), elsewhere / "model.safetensors")
    _write_index(folder, {name: "../../elsewhere/model.safetensors" for name in _weight_names(elsewhere)})
    return to_megatron(folder, ws, "model.safetensors.index.json", "../../elsewhere/model.safetensors")


def index_pointing_a_tensor_at_the_wrong_shard(ws):
    folder = ws.hf()
    state = load_file(_single_shard(folder))
    moved = "transformer.h.1.mlp.c_proj.weight"
    save_file({moved: state.pop(moved)}, folder / "model-00002-of-00002.safetensors")
    save_file(state, folder / "model-00001-of-00002.safetensors")
    _single_shard(folder).unlink()
    weight_map = {name: "model-00002-of-00002.safetensors" for name in state}  # all of them wrong
    weight_map[moved] = "model-00001-of-00002.safetensors"
    _write_index(folder, weight_map)
    return to_megatron(folder, ws, "model-0000", "transformer.")


def malformed_config_json(ws):
    folder = ws.hf()
    (folder / "config.json").write_text('{"model_type": "gpt2", "n_layer": 2,,}')
    return to_megatron(folder, ws, "config.json", "malformed JSON")


def config_that_is_not_an_object(ws):
    folder = ws.hf()
    (folder / "config.json").write_text('["gpt2"]')
    return to_megatron(folder, ws, "config.json")


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def config_missing_a_field(ws):
    folder = ws.hf()
    _edit_config(folder, lambda config: config.pop("n_layer"))
    return to_megatron(folder, ws, "config.json", "n_layer")


def config_field_of_the_wrong_type(ws):
    folder = ws.hf()
    _edit_config(folder, lambda config: config.update(n_head="four"))
    return to_megatron(folder, ws, "config.json", "n_head")


def config_with_zero_heads(ws):
    folder = ws.hf()
    _edit_config(folder, lambda config: config.update(n_head=0))
    return to_megatron(folder, ws, "config.json", "n_head")


def config_of_an_unknown_architecture(ws):
    folder = ws.hf()
    _edit_config(folder, lambda config: config.update(architectures=["BertForMaskedLM"], model_type="bert"))
    return to_megatron(folder, ws, "config.json", "BertForMaskedLM", "unsupported architecture")


def tensor_shape_disagreeing_with_config(ws):
    folder = ws.hf()
    _edit_config(folder, lambda config: config.update(n_inner=128))
    return to_megatron(folder, ws, "model.safetensors", "transformer.h.0.mlp.c_fc.weight", "(32, 64)")


def tensor_missing_from_the_shards(ws):
    folder = ws.hf()
    state = load_file(_single_shard(folder))
    del state["transformer.h.1.attn.c_attn.bias"]
    save_file(state, _single_shard(folder), metadata={"format": "pt"})
    return to_megatron(folder, ws, "transformer.h.1.attn.c_attn.bias", "missing")


def bin_checkpoint_running_a_command(ws):
    folder = ws.hf()
    state = load_file(_single_shard(folder))
    _single_shard(folder).unlink()
    torch.save({**state, "lm_head.extra": RunsACommand(ws.marker)}, folder / "pytorch_model.bin")
    return to_megatron(folder, ws, "pytorch_model.bin", "disallowed global", "system")


def truncated_bin_checkpoint(ws):
    folder = ws.hf()
    state = load_file(_single_shard(folder))
    _single_shard(folder).unlink()
    torch.save(state, folder / "pytorch_model.bin")
    truncate(folder / "pytorch_model.bin")
    return to_megatron(folder, ws, "pytorch_model.bin")


def target_tp_not_dividing_query_groups(ws):
    return to_megatron(ws.hf("llama"), ws, "TP=4", "2 query groups", tp=4)


def target_pp_and_vpp_not_dividing_layers(ws):
    return to_megatron(ws.hf(), ws, "PP=2 x VPP=2", "2 layers", pp=2, extra=["--vpp", 2])


def vocab_padding_multiple_of_zero(ws):
    return to_megatron(ws.hf(), ws, "make-vocab-size-divisible-by", tp=2,
                       extra=["--make-vocab-size-divisible-by", 0])


def shard_size_that_is_not_a_size(ws):
    return to_hf(fixture_path(*MEGATRON_GPT2), ws, "max-shard-size", "lots", extra=["--max-shard-size", "lots"])


# ---------------------------------------------------------------------------- destinations

def destination_that_is_a_file(ws):
    ws.out.write_text("not a folder")
    return to_hf(fixture_path(*MEGATRON_GPT2), ws, str(ws.out), "is a file")


def destination_not_empty_without_overwrite(ws):
    ws.out.mkdir()
    (ws.out / "keep.txt").write_text("mine")
    return to_hf(fixture_path(*MEGATRON_GPT2), ws, str(ws.out), "--overwrite")


def destination_parent_missing(ws):
    shutil.rmtree(ws.out.parent)
    return to_hf(fixture_path(*MEGATRON_GPT2), ws, str(ws.out.parent), "does not exist")


def read_only_destination_parent(ws):
    ws.out.parent.chmod(0o555)
    real_access = os.access
    # root ignores permission bits: deny as a read-only mount would
    ws.monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == ws.out.parent
                           else real_access(path, mode, **kw))
    return to_hf(fixture_path(*MEGATRON_GPT2), ws, str(ws.out.parent), "not writable")


def destination_parent_refusing_new_folders(ws):
    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
    ws.monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    return to_hf(fixture_path(*MEGATRON_GPT2), ws, str(ws.out.parent), "Permission denied")


CASES = [
    truncated_rank_file, zero_length_rank_file, first_rank_file_runs_a_command, later_rank_file_runs_a_command,
    plain_pickle_rank_file_runs_a_command, missing_rank_folder, missing_rank_file, tracker_with_garbage_text,
    tracker_with_binary_garbage,
    empty_tracker, tracker_naming_a_missing_iteration,
    shapes_mismatched_across_tp_ranks, dtype_mismatched_across_tp_ranks, diverged_replicated_tensor_with_strict,
    tied_head_differing_from_embeddings_with_strict, tensor_missing_on_one_tp_rank, unknown_tensor_in_a_rank_file,
    rank_file_holding_a_list, rank_file_without_args, args_missing_num_layers, args_naming_an_unknown_architecture,
    args_disagreeing_with_the_layers_in_the_files, target_tp_not_dividing_heads, target_pp_not_dividing_layers,
    zip_with_a_path_traversal_member, zip_wrapping_a_truncated_rank_file, zip_that_is_not_a_zip,
    torch_dist_metadata_runs_a_command, torch_dist_truncated_data_file,
    corrupt_safetensors_header, safetensors_header_length_past_the_end, truncated_safetensors,
    zero_length_safetensors, malformed_index_json, index_without_a_weight_map, index_naming_a_missing_shard,
    index_naming_a_shard_outside_the_folder,
    index_pointing_a_tensor_at_the_wrong_shard, malformed_config_json, config_that_is_not_an_object,
    config_missing_a_field, config_field_of_the_wrong_type, config_with_zero_heads,
    config_of_an_unknown_architecture, tensor_shape_disagreeing_with_config, tensor_missing_from_the_shards,
    bin_checkpoint_running_a_command, truncated_bin_checkpoint, target_tp_not_dividing_query_groups,
    target_pp_and_vpp_not_dividing_layers, vocab_padding_multiple_of_zero, shard_size_that_is_not_a_size,
    destination_that_is_a_file, destination_not_empty_without_overwrite, destination_parent_missing,
    read_only_destination_parent, destination_parent_refusing_new_folders,
]


def _name(case) -> str:
    return getattr(case, "__name__", None) or case.values[0].__name__


@pytest.mark.parametrize("factory", CASES, ids=[_name(case) for case in CASES])
def test_broken_or_hostile_input_is_refused_in_one_line_naming_what_is_wrong(workspace, factory, monkeypatch):
    scratch = workspace.root / "scratch"  # where a .zip source is unpacked
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    case = factory(workspace)
    existed = workspace.out.exists()
    before = sorted(path.name for path in workspace.out.iterdir()) if workspace.out.is_dir() else None
    result = run(*case.args)
    assert_refused_cleanly(result, workspace.out, *case.names, marker=workspace.marker,
                           exit_code=case.exit_code, destination_existed=existed)
    if before is not None:
        assert sorted(path.name for path in workspace.out.iterdir()) == before  # left as it was
    assert list(scratch.iterdir()) == []  # nothing unpacked is left behind
    assert not (workspace.root / "escaped.txt").exists()


def test_the_corpus_covers_at_least_thirty_distinct_inputs():
    assert len({_name(case) for case in CASES}) == len(CASES) >= 30


# ---------------------------------------------------------------------------- warnings that --strict makes errors

def test_diverged_replicated_tensor_is_a_warning_naming_it_and_the_max_difference(workspace):
    checkpoint = workspace.megatron()
    key = "decoder.layers.1.input_layernorm.weight"
    edit_tensor(rank_file(checkpoint, 1, 0), key, lambda weight: weight + 0.25)
    result = run("megatron-to-hf", checkpoint, workspace.out, "--json")
    assert result.exit_code == 0, result.output
    notes = json.loads(result.stdout)["notes"]
    assert any(key in note and "max abs diff 0.25" in note and "TP rank 0" in note for note in notes), notes


def test_tied_head_differing_from_embeddings_is_a_warning_naming_the_file(workspace):
    checkpoint = workspace.megatron()
    edit_tensor(rank_file(checkpoint, 0, 1), "output_layer.weight", lambda weight: weight + 1.0)
    result = run("megatron-to-hf", checkpoint, workspace.out, "--json")
    assert result.exit_code == 0, result.output
    notes = json.loads(result.stdout)["notes"]
    assert any("mp_rank_00_001/model_optim_rng.pt" in note and "max abs diff 1" in note for note in notes), notes


def test_trust_remote_pickle_is_the_only_way_past_the_allow_list_and_says_so_loudly(workspace):
    case = bin_checkpoint_running_a_command(workspace)
    refused = run(*case.args)
    assert refused.exit_code == 2 and not workspace.marker.exists()
    with pytest.warns(UserWarning, match="code inside this file can run"):
        trusted = run(*case.args, "--trust-remote-pickle")
    assert trusted.exit_code == 0, trusted.output
    assert workspace.marker.exists()  # the flag means it: the file's code ran
    assert "warning:" in trusted.stderr and "can run" in trusted.stderr


def test_debug_shows_the_traceback_of_a_refusal(workspace):
    case = truncated_rank_file(workspace)
    result = CliRunner().invoke(main, ["--debug", *map(str, case.args)])
    assert result.exit_code != 0 and "mp_rank_01_001/model_optim_rng.pt" in str(result.exception)
    assert not workspace.out.exists() and leftovers(workspace.out) == []


# ---------------------------------------------------------------------------- failures while writing

def _fails_on_call(original, number: int, error):
    """``original`` that raises ``error(self)`` on its ``number``-th call (1-based)."""
    calls = {"count": 0}

    def wrapper(self, *args, **kwargs):
        calls["count"] += 1
        if calls["count"] == number:
            raise error(self)
        return original(self, *args, **kwargs)

    return wrapper


def _disk_full(writer):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(getattr(writer, "path", "")) or None)


def _permission_denied(writer):
    return PermissionError(errno.EACCES, os.strerror(errno.EACCES))


def _interrupted(writer):
    return KeyboardInterrupt()


def _patch_writer(monkeypatch, target: str, error):
    from ckptkit.layouts import torch_dist
    from ckptkit.safetensors_stream import StreamingSafetensorsWriter
    from ckptkit.torch_stream import StreamingTorchWriter

    owner, method, number = {
        "hf": (StreamingSafetensorsWriter, "write", 5),
        "torch": (StreamingTorchWriter, "add_tensor", 7),
        "torch_dist": (torch_dist._BoundedFileSystemWriter, "write_data", 1),
    }[target]
    original = getattr(owner, method)
    if target == "torch_dist":
        # Let the data files be written, then fail as a full disk would on the last one.
        def write_then_fail(self, plan, planner):
            original(self, plan, planner).wait()
            raise error(self)
        monkeypatch.setattr(owner, method, write_then_fail)
    else:
        monkeypatch.setattr(owner, method, _fails_on_call(original, number, error))


def _conversion(target: str, workspace) -> list:
    if target == "hf":
        return ["megatron-to-hf", fixture_path(*MEGATRON_GPT2), workspace.out]
    return ["hf-to-megatron", workspace.hf(), workspace.out, "--tp", 2, "--pp", 2, "--format", target]


@pytest.mark.parametrize("target", ["hf", "torch", "torch_dist"])
@pytest.mark.parametrize("error, message", [(_disk_full, "No space left on device"),
                                            (_permission_denied, "Permission denied")],
                         ids=["disk-full", "permission-denied"])
def test_write_failure_ends_in_one_line_with_nothing_at_the_destination(workspace, monkeypatch, target,
                                                                       error, message):
    _patch_writer(monkeypatch, target, error)
    result = run(*_conversion(target, workspace))
    line = assert_refused_cleanly(result, workspace.out, message)
    assert ".ckptkit-partial" not in line  # names the destination, not a hidden folder


def test_a_write_error_without_errno_on_a_full_disk_is_reported_as_disk_full(workspace, monkeypatch):
    from ckptkit import atomic

    # torch's zip writer reports a full disk as "file write failed", with no errno
    _patch_writer(monkeypatch, "torch", lambda writer: RuntimeError("PytorchStreamWriter failed writing file"))
    monkeypatch.setattr(atomic, "_nearly_full", lambda folder: True)
    result = run(*_conversion("torch", workspace))
    assert_refused_cleanly(result, workspace.out, str(workspace.out), "no space left on device",
                           "PytorchStreamWriter failed writing file")


@pytest.mark.parametrize("target", ["hf", "torch", "torch_dist"])
def test_write_failure_with_overwrite_keeps_the_existing_destination(workspace, monkeypatch, target):
    workspace.out.mkdir()
    (workspace.out / "keep.txt").write_text("mine")
    _patch_writer(monkeypatch, target, _disk_full)
    result = run(*_conversion(target, workspace), "--overwrite")
    assert_refused_cleanly(result, workspace.out, "No space left on device", destination_existed=True)
    assert [path.name for path in workspace.out.iterdir()] == ["keep.txt"]
    assert (workspace.out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("target", ["hf", "torch", "torch_dist"])
def test_ctrl_c_mid_write_leaves_nothing_and_keeps_the_existing_destination(workspace, monkeypatch, target):
    workspace.out.mkdir()
    (workspace.out / "keep.txt").write_text("mine")
    _patch_writer(monkeypatch, target, _interrupted)
    result = run(*_conversion(target, workspace), "--overwrite")
    assert result.exit_code == 130
    assert output_lines(result) == ["interrupted: nothing was written to the destination"]
    assert (workspace.out / "keep.txt").read_text() == "mine" and len(list(workspace.out.iterdir())) == 1
    assert leftovers(workspace.out) == []


# ---------------------------------------------------------------------------- the output is checked before it appears

def test_a_hugging_face_output_that_differs_from_its_plan_never_appears(workspace, monkeypatch):
    from ckptkit.layouts import hf as hf_layout

    original = hf_layout.write

    def drops_a_tensor(reader, out_dir, family, **options):
        written = original(reader, out_dir, family, **options)
        state = load_file(out_dir / written[0])
        state.pop("transformer.h.0.ln_1.bias")
        save_file(state, out_dir / written[0], metadata={"format": "pt"})
        return written

    monkeypatch.setattr(hf_layout, "write", drops_a_tensor)
    result = run("megatron-to-hf", fixture_path(*MEGATRON_GPT2), workspace.out)
    assert_refused_cleanly(result, workspace.out, "model.safetensors", "transformer.h.0.ln_1.bias", exit_code=1)


def test_a_megatron_output_that_differs_from_its_plan_never_appears(workspace, monkeypatch):
    from ckptkit.layouts.megatron_legacy import RankFilesWriter

    original = RankFilesWriter.write
    key = "decoder.layers.0.mlp.linear_fc2.weight"  # global layer 1: stage 1's first

    def shrinks_a_tensor(self, reader, plan, out, files=None, progress=None):
        written = original(self, reader, plan, out, files, progress)
        path = out / written[-1]
        state = safe_torch_load(path, mmap=False)
        state["model"][key] = state["model"][key][:, :3].clone()
        torch.save(state, path)
        return written

    monkeypatch.setattr(RankFilesWriter, "write", shrinks_a_tensor)
    result = run("hf-to-megatron", workspace.hf(), workspace.out, "--tp", 2, "--pp", 2)
    assert_refused_cleanly(result, workspace.out, "mp_rank_01_001/model_optim_rng.pt", key, exit_code=1)


# ---------------------------------------------------------------------------- ckptkit verify DIR

def _converted(workspace, *extra) -> Path:
    assert run("megatron-to-hf", fixture_path(*MEGATRON_GPT2), workspace.out, *extra).exit_code == 0
    return workspace.out


def _verify_alone(folder: Path, *names: str) -> None:
    result = run("verify", folder)
    assert result.exit_code == 2, result.output
    assert "NOT intact" in result.output
    problems = [line for line in output_lines(result) if line.startswith("problem:")]
    assert problems and all(any(name in line for line in problems) for name in names), result.output


def test_verify_accepts_a_complete_conversion(workspace):
    assert run("verify", _converted(workspace, "--max-shard-size", "500KB")).exit_code == 0


def test_verify_refuses_an_index_naming_a_missing_shard(workspace):
    folder = _converted(workspace, "--max-shard-size", "500KB")
    (folder / "model-00003-of-00007.safetensors").unlink()
    _verify_alone(folder, "model-00003-of-00007.safetensors", "missing")


def test_verify_refuses_a_shard_with_a_tensor_the_index_does_not_list(workspace):
    folder = _converted(workspace, "--max-shard-size", "500KB")
    shard = folder / "model-00002-of-00007.safetensors"
    save_file({**load_file(shard), "stowaway": torch.zeros(2)}, shard, metadata={"format": "pt"})
    _verify_alone(folder, "model-00002-of-00007.safetensors", "stowaway")


def test_verify_refuses_a_truncated_shard(workspace):
    folder = _converted(workspace, "--max-shard-size", "500KB")
    truncate(folder / "model-00004-of-00007.safetensors", keep=0.9)
    _verify_alone(folder, "model-00004-of-00007.safetensors")


def test_verify_refuses_a_megatron_checkpoint_without_its_tracker(workspace):
    checkpoint = workspace.megatron()
    (checkpoint / TRACKER).unlink()
    _verify_alone(checkpoint, TRACKER)


def test_verify_refuses_a_megatron_checkpoint_with_a_truncated_rank_file(workspace):
    checkpoint = workspace.megatron()
    truncate(rank_file(checkpoint, 1, 1))
    _verify_alone(checkpoint, "mp_rank_01_001/model_optim_rng.pt")
