"""Megatron-Core torch_dist checkpoints: read as Megatron-LM wrote them, written as it writes them.

The real checkpoints are the ``dist/`` folders of ``gpt2_tp2pp2`` and ``llama_tp2pp2``
(Megatron-LM, TP2 PP2): in ``tests/fixtures`` when present, else unpacked from
``../shared/fixtures/*.tgz``.
"""
import io
import pickle
import shutil
import tarfile
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ckptkit.convert import hf_to_megatron, megatron_to_hf, reshard
from ckptkit.errors import BadInput, Unsupported
from ckptkit.layouts import open_checkpoint
from ckptkit.layouts import torch_dist
from ckptkit.layouts.megatron_legacy import TargetLayout
from ckptkit.safe_load import MegatronStandIn, pickled_globals, safe_torch_load

from conftest import converted_logits_error, FIXTURES, assert_same_state, fixture_path, hf_state, make_hf_model

SHARED_FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
PER_RANK = {  # the same weights, converted by Megatron's own --ckpt-convert-format torch
    "gpt2_tp2pp2": Path(__file__).resolve().parents[1] / "ckptkit" / "data" / "demo" / "gpt2_tp2pp2",
    "llama_tp2pp2": FIXTURES / "llama_tp2pp2" / "conv" / "torch",
}


@pytest.fixture(scope="session")
def real_dist(tmp_path_factory):
    """Path of a real Megatron torch_dist checkpoint root (with its tracker file)."""
    unpacked = {}

    def locate(name: str) -> Path:
        local = FIXTURES / name / "dist"
        if local.is_dir():
            return local
        if name not in unpacked:
            archive = SHARED_FIXTURES / f"{name}.tgz"
            if not archive.is_file():
                pytest.skip(f"neither {local} nor {archive} present")
            target = tmp_path_factory.mktemp(name)
            with tarfile.open(archive) as opened:
                try:
                    opened.extractall(target, filter="data")
                except TypeError:  # Python without extraction filters (< 3.10.12)
                    opened.extractall(target)
            unpacked[name] = target / "dist"
        return unpacked[name]

    return locate


def _per_rank(name: str) -> Path:
    if not PER_RANK[name].is_dir():
        pytest.skip(f"{PER_RANK[name]} not present")
    return PER_RANK[name]


def _tensor_layout(folder: Path) -> dict:
    """Every tensor key of a torch_dist folder -> (global shape, dtype, sorted chunk boxes)."""
    metadata = torch_dist.read_dcp_metadata(folder)
    return {key: (tuple(entry.size), entry.properties.dtype,
                  sorted((tuple(chunk.offsets), tuple(chunk.sizes)) for chunk in entry.chunks))
            for key, entry in metadata.state_dict_metadata.items() if isinstance(entry, TensorStorageMetadata)}


def _byte_keys(folder: Path) -> set:
    metadata = torch_dist.read_dcp_metadata(folder)
    return {key for key, entry in metadata.state_dict_metadata.items() if not isinstance(entry, TensorStorageMetadata)}


def _assert_same_canonical_tensors(a, b) -> None:
    assert a.spec == b.spec
    for canonical in a.canonical():
        mine, theirs = a.tensor(canonical.name), b.tensor(canonical.name)
        assert mine.dtype == theirs.dtype, canonical.name
        assert torch.equal(mine, theirs), canonical.name


def _rewrite_with(source_iter_dir: Path, target_iter_dir: Path, extra: dict) -> None:
    """A copy of a torch_dist folder (trusted: our own output) with ``extra`` entries added."""
    metadata = torch_dist.read_dcp_metadata(source_iter_dir)
    state = {}
    for key, entry in metadata.state_dict_metadata.items():
        state[key] = torch.empty(entry.size, dtype=entry.properties.dtype) \
            if isinstance(entry, TensorStorageMetadata) else io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single-process use of torch.distributed.checkpoint
        # Unflattened, so that bytes entries come back as the objects they hold and re-save as such.
        loader = DefaultLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)
        dcp.load(state, checkpoint_id=str(source_iter_dir), planner=loader, no_dist=True)
        state.update(extra)
        dcp.save(state, checkpoint_id=str(target_iter_dir), planner=DefaultSavePlanner(flatten_state_dict=False),
                 no_dist=True)
    shutil.copy(source_iter_dir / torch_dist.CONFIG_FILE, target_iter_dir / torch_dist.CONFIG_FILE)


# ---------------------------------------------------------------------------- real Megatron files

def test_real_torch_dist_gpt2_reproduces_megatron_logits(real_dist, tmp_path):
    error = converted_logits_error(real_dist("gpt2_tp2pp2"), "gpt2_tp2pp2", tmp_path)
    assert error.max().item() < 1e-5  # reaches 1.5e-6; tanh GeLU or a wrong layout is >= 6e-4 off


def test_real_torch_dist_llama_bf16_reproduces_megatron_logits_at_bf16_rounding(real_dist, tmp_path):
    error = converted_logits_error(real_dist("llama_tp2pp2"), "llama_tp2pp2", tmp_path)
    # Megatron computed in bf16: reaches 0.025 max, 0.0042 mean; a wrong layout is ~1 off.
    assert error.max().item() < 0.06
    assert error.mean().item() < 0.008


@pytest.mark.parametrize("name", ["gpt2_tp2pp2", "llama_tp2pp2"])
def test_torch_dist_reader_gives_the_per_rank_readers_tensors_bit_for_bit(real_dist, name):
    with open_checkpoint(real_dist(name)) as dist, open_checkpoint(_per_rank(name)) as per_rank:
        assert isinstance(dist, torch_dist.TorchDistReader)
        _assert_same_canonical_tensors(dist, per_rank)


def test_torch_dist_metadata_reports_args_layout_iteration_and_padded_vocab(real_dist):
    with open_checkpoint(real_dist("llama_tp2pp2")) as reader:
        meta = reader.meta
        assert (meta.layout, meta.tp, meta.pp, meta.iteration, meta.release) == ("torch_dist", 2, 2, 10, False)
        assert (meta.dtype, meta.padded_vocab_size, meta.checkpoint_version) == (torch.bfloat16, 1024, 3.0)
        assert meta.naming == "mcore-local"  # args say transformer_impl=local, though norms carry TE names
        assert meta.args.num_query_groups == 2 and reader.spec.vocab_size == 1000
        assert reader.stored_key("decoder.layers.2.input_layernorm.weight") == \
            "decoder.layers.self_attention.linear_qkv.layer_norm_weight"


def test_common_state_loads_without_megatron_and_stands_in_its_enums(real_dist):
    with open_checkpoint(real_dist("gpt2_tp2pp2")) as reader:
        common = reader.common_state
        assert common["iteration"] == 10 and common["checkpoint_version"] == 3.0
        assert isinstance(common["args"].attention_backend, MegatronStandIn)
        assert common["args"].attention_backend.qualified_name == "megatron.core.transformer.enums.AttnBackend"
        assert common["rerun_state_machine"]["mode"].qualified_name == "megatron.core.rerun_state_machine.RerunMode"


def test_extra_state_rerun_state_and_common_state_are_never_taken_as_weights(real_dist):
    with open_checkpoint(real_dist("gpt2_tp2pp2")) as reader:
        assert len(reader.skipped["extra_state"]) == 6 * 4  # one per layer and linear, left unread
        assert sorted(reader.skipped["other state"]) == ["common_state/shard_0_1"] + \
            [f"rerun_state_machine_state/shard_{rank}_4" for rank in range(4)]
        assert reader.validate() == []


def test_reading_one_layer_reads_only_that_layers_chunks(real_dist, region_reads):
    seen = region_reads
    with open_checkpoint(real_dist("llama_tp2pp2")) as reader:
        seen.clear()
        gate_up = reader.tensor("decoder.layers.3.mlp.linear_fc1.weight")
    assert gate_up.shape == (640, 128)
    assert {fqn for fqn, _ in seen} == {"decoder.layers.mlp.linear_fc1.weight"}
    assert sorted(offset for _, offset in seen) == [(3, rows, 0) for rows in (0, 160, 320, 480)]


# ---------------------------------------------------------------------------- writing

@pytest.mark.parametrize("name", ["gpt2_tp2pp2", "llama_tp2pp2"])
def test_written_torch_dist_has_the_real_files_keys_shapes_dtypes_and_chunks(real_dist, name, tmp_path):
    source = real_dist(name)
    with open_checkpoint(source) as reader:
        files = torch_dist.write(reader, tmp_path, TargetLayout(tp=2, pp=2, iteration=10, args_base=reader.meta.args))
    real, ours = source / "iter_0000010", tmp_path / "iter_0000010"
    assert "iter_0000010/.metadata" in files and "iter_0000010/metadata.json" in files
    assert _tensor_layout(ours) == _tensor_layout(real)
    # Per-rank rerun state belongs to the old job: Megatron skips it when the common state has none.
    assert _byte_keys(ours) == {key for key in _byte_keys(real) if not key.startswith("rerun_state_machine_state/")}
    assert (ours / "metadata.json").read_bytes() == (real / "metadata.json").read_bytes()
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "10"


def test_written_common_state_carries_target_args_and_iteration_without_foreign_globals(real_dist, tmp_path):
    reshard(real_dist("llama_tp2pp2"), tmp_path / "tp1", tp=1, pp=4, format="torch_dist")
    with open_checkpoint(tmp_path / "tp1") as reader:
        args, common = reader.meta.args, reader.common_state
        assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.world_size) == (1, 4, 4)
        assert (args.ckpt_format, args.use_dist_ckpt, args.no_save_optim, args.no_save_rng) == \
            ("torch_dist", True, True, True)
        assert (common["iteration"], common["checkpoint_version"]) == (10, 3.0)
        assert common["content_metadata"] == torch_dist.CONTENT_METADATA
        assert common["num_floating_point_operations_so_far"] == 25165824000.0
        assert "rerun_state_machine" not in common
        raw = torch_dist._read_regions(reader.files, [], [torch_dist.COMMON_STATE_KEY])[torch_dist.COMMON_STATE_KEY]
    payload = tmp_path / "common.pt"
    payload.write_bytes(raw)
    # Megatron unpickles this without ckptkit installed: no ckptkit (or stand-in) globals.
    assert not any(name.startswith(("ckptkit", "megatron")) for name in pickled_globals(payload))
    assert isinstance(safe_torch_load(payload)[0]["args"].attention_backend, int)


def test_hf_to_torch_dist_and_back_is_bit_identical(tmp_path):
    for family, dtype in (("llama", torch.bfloat16), ("gpt2", torch.float32)):
        hf_dir = make_hf_model(tmp_path / f"{family}_hf", family, dtype=dtype)
        result = hf_to_megatron(hf_dir, tmp_path / f"{family}_dist", tp=2, pp=2, format="torch_dist")
        assert result.target_layout["layout"] == "torch_dist"
        assert (tmp_path / f"{family}_dist" / "latest_checkpointed_iteration.txt").read_text() == "release"
        megatron_to_hf(tmp_path / f"{family}_dist", tmp_path / f"{family}_back")
        assert_same_state(hf_state(hf_dir), hf_state(tmp_path / f"{family}_back"))


def test_per_rank_to_torch_dist_to_per_rank_reshard_is_bit_identical(tmp_path):
    source = _per_rank("llama_tp2pp2")
    reshard(source, tmp_path / "dist", tp=1, pp=1, format="torch_dist")
    reshard(tmp_path / "dist", tmp_path / "back", tp=2, pp=2, format="torch")
    with open_checkpoint(source) as original, open_checkpoint(tmp_path / "back") as back:
        assert back.meta.layout == "megatron-legacy" and back.meta.iteration == 10
        _assert_same_canonical_tensors(original, back)
        for tp_rank in range(2):
            for pp_stage in range(2):
                assert set(back.rank_state(tp_rank, pp_stage)["model"]) == \
                    set(original.rank_state(tp_rank, pp_stage)["model"])


def test_writer_reads_each_canonical_tensor_once_and_closes_data_files_at_the_budget(real_dist, tmp_path):
    budget = 64 * 1024
    with open_checkpoint(real_dist("gpt2_tp2pp2")) as reader:
        reads = []
        original = reader.tensor
        reader.tensor = lambda name: reads.append(name) or original(name)
        files = torch_dist.write(reader, tmp_path, TargetLayout(tp=2, pp=2), max_file_bytes=budget)
        assert sorted(reads) == sorted(canonical.name for canonical in reader.canonical())
    data_files = [tmp_path / name for name in files if name.endswith(".distcp")]
    largest_chunk = 1024 // 2 * 96 * 4  # half the padded embedding rows, float32
    assert len(data_files) > 5
    assert all(path.stat().st_size <= budget + largest_chunk + 4096 for path in data_files)
    with open_checkpoint(tmp_path) as written, open_checkpoint(real_dist("gpt2_tp2pp2")) as real:
        _assert_same_canonical_tensors(written, real)


# ---------------------------------------------------------------------------- refusing bad input

def test_missing_distcp_file_is_refused_in_one_line_naming_it(real_dist, tmp_path):
    copy = tmp_path / "dist"
    shutil.copytree(real_dist("gpt2_tp2pp2"), copy)
    (copy / "iter_0000010" / "__2_0.distcp").unlink()
    with pytest.raises(BadInput) as refused:
        open_checkpoint(copy)
    message = str(refused.value)
    assert "__2_0.distcp" in message and "missing" in message and "\n" not in message


def test_truncated_distcp_file_is_refused_naming_it(real_dist, tmp_path):
    copy = tmp_path / "dist"
    shutil.copytree(real_dist("llama_tp2pp2"), copy)
    data = copy / "iter_0000010" / "__1_0.distcp"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(BadInput, match=r"__1_0\.distcp: truncated"):
        open_checkpoint(copy)


def test_metadata_pickle_naming_a_foreign_global_is_refused(real_dist, tmp_path):
    copy = tmp_path / "dist"
    shutil.copytree(real_dist("gpt2_tp2pp2"), copy)

    class Hostile:
        def __reduce__(self):
            return (print, ("this would run",))

    (copy / "iter_0000010" / ".metadata").write_bytes(pickle.dumps(Hostile()))
    with pytest.raises(BadInput, match=r"disallowed global 'builtins\.print'"):
        open_checkpoint(copy)


def test_weights_never_come_from_optimizer_entries(tmp_path):
    hf_dir = make_hf_model(tmp_path / "hf", "gpt2")
    hf_to_megatron(hf_dir, tmp_path / "dist", tp=1, pp=1, format="torch_dist")
    key = "embedding.word_embeddings.weight"
    with open_checkpoint(tmp_path / "dist") as reader:
        weights = reader.tensor(key)
    target = tmp_path / "with_optim" / "release"
    _rewrite_with(tmp_path / "dist" / "release", target,
                  {f"optimizer.state.exp_avg.{key}": torch.full_like(weights, 7.0),
                   f"optimizer.state.fp32_param.{key}": torch.full_like(weights, 9.0)})
    with open_checkpoint(target) as reader:
        assert torch.equal(reader.tensor(key), weights)
        assert reader.validate() == [f"{target}: 2 optimizer entries not read (weights come from the model keys only)"]


def test_unknown_model_tensor_is_unsupported_rather_than_dropped(tmp_path):
    hf_dir = make_hf_model(tmp_path / "hf", "llama")
    hf_to_megatron(hf_dir, tmp_path / "dist", tp=1, pp=1, format="torch_dist")
    target = tmp_path / "with_router" / "release"
    _rewrite_with(tmp_path / "dist" / "release", target, {"decoder.layers.mlp.router.weight": torch.ones(2, 4, 32)})
    with pytest.raises(Unsupported, match="unknown tensor decoder.layers.mlp.router.weight"):
        open_checkpoint(target)


def test_torch_dist_output_refuses_pre_core_names(tmp_path):
    with open_checkpoint(fixture_path("legacy_gpt2_tp2pp2", "c22")) as reader:
        with pytest.raises(Unsupported, match="Megatron-Core names"):
            torch_dist.write(reader, tmp_path, TargetLayout(tp=1, pp=1, naming="legacy"))


def test_library_callers_who_trust_the_metadata_pickle_are_warned(real_dist):
    folder = real_dist("gpt2_tp2pp2") / "iter_0000010"
    with pytest.warns(UserWarning, match="code inside this file can run"):
        trusted = torch_dist.read_dcp_metadata(folder, trust_remote_pickle=True)
    assert trusted.state_dict_metadata.keys() == torch_dist.read_dcp_metadata(folder).state_dict_metadata.keys()
