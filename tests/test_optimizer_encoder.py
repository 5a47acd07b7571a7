"""Optimizer state of Megatron-LM's BertModel and T5Model, on real checkpoints: tiny bf16 models
trained 10 iterations by Megatron-LM d98e8a6 at TP2 DP2 with its distributed optimizer (per-rank
``distrib_optim.pt`` and torch_dist ``dp_reshardable``, BERT and T5) and with the plain optimizer
(BERT), and at TP1 PP2 DP2 (BERT, distributed)
(tools/megatron_encoder_optimizer.sh; tests/fixtures/{bert,t5}_optim_*/README.md).

ckptkit reads each state (every fp32 master rounds to its stored bf16 weight: state put in the
wrong place fails this), writes it back at its own layout as Megatron wrote it, and carries it
to other TP/PP/DP sizes and formats and back without changing a value."""
import pytest
import torch

from ckptkit.convert import reshard
from ckptkit.inspection import inspect_checkpoint
from ckptkit.layouts import open_checkpoint
from ckptkit.optimizer import read_optimizer_state
from ckptkit.optimizer.parameters import chunk_parameters
from ckptkit.optimizer.verify import masters_match_weights
from ckptkit.safe_load import safe_torch_load

from conftest import fixture_path, megatron_chunks, optimizer_values, run_ckptkit
from test_optimizer_torch_dist import optimizer_entries

KEYS = ("param", "exp_avg", "exp_avg_sq")
# name: (fixture parts, format, TP, PP, VPP, DP, optimizer kind)
REAL = {
    "bert-torch": (("bert_optim_tp2dp2", "torch"), "torch", 2, 1, 1, 2, "distributed"),
    "bert-dist": (("bert_optim_dist_tp2dp2", "dist"), "torch_dist", 2, 1, 1, 2, "distributed"),
    "bert-plain": (("bert_optim_plain_tp2dp2", "torch"), "torch", 2, 1, 1, 2, "non-distributed"),
    "bert-pp2": (("bert_optim_tp1pp2dp2", "torch"), "torch", 1, 2, 1, 2, "distributed"),
    "t5-torch": (("t5_optim_tp2dp2", "torch"), "torch", 2, 1, 1, 2, "distributed"),
    "t5-dist": (("t5_optim_dist_tp2dp2", "dist"), "torch_dist", 2, 1, 1, 2, "distributed"),
}
PER_RANK = [name for name, real in REAL.items() if real[1] == "torch"]
TORCH_DIST = [name for name, real in REAL.items() if real[1] == "torch_dist"]
# Megatron-written rank files whose model state dicts show the parameter order: the real fixtures
# above and the weights-only BERT TP2 PP2 and T5 TP2 of tools/megatron_encoder_fixtures.sh
ORDER = {"bert-core-tp2pp2": ("bert_core_tp2pp2", "torch"), "t5-tp2": ("t5_tp2", "torch"),
         **{name: REAL[name][0] for name in PER_RANK}}


def source(name):
    return fixture_path(*REAL[name][0])


def assert_same_values(expected: dict, found: dict) -> None:
    for name, values in expected.items():
        for key in KEYS:
            assert torch.equal(found[name][key], values[key]), (name, key)


def rank_files(path, name):
    """``name`` (distrib_optim.pt or model_optim_rng.pt) of every rank folder, by folder name."""
    return {file.parent.name: safe_torch_load(file) for file in sorted(path.glob(f"iter_*/mp_rank_*/{name}"))}


def first_names(model: dict) -> list[tuple[str, tuple]]:
    """The tensors of a rank file's model state dict as named_parameters() meets them: a module
    registered twice (T5's output layer and position embeddings) saves its tensors under both
    names, named_parameters() yields them once, under the first."""
    seen, names = set(), []
    for key, value in model.items():
        if isinstance(value, torch.Tensor):
            where = (value.untyped_storage().data_ptr(), value.storage_offset())
            if where not in seen:
                seen.add(where)
                names.append((key, tuple(value.shape)))
    return names


@pytest.mark.parametrize("name", ORDER)
def test_parameter_order_is_that_of_every_rank_file_megatron_wrote(name):
    with open_checkpoint(fixture_path(*ORDER[name])) as reader:
        for place, model in megatron_chunks(reader):
            ours = [(p.name, p.shape) for p in chunk_parameters(reader.spec, place, reader.meta.padded_vocab_size)]
            assert ours == first_names(model), place


@pytest.mark.parametrize("name", REAL)
def test_every_fp32_master_rounds_to_the_stored_bf16_weight(name):
    with open_checkpoint(source(name)) as weights, read_optimizer_state(weights) as state:
        assert weights.meta.dtype == torch.bfloat16
        assert (state.info.kind, state.info.step) == (REAL[name][6], 10.0)
        assert masters_match_weights(state, weights) == []
        for tensor in state.canonical():  # trained: every tensor has moments
            assert state.tensor(tensor.name, ("exp_avg_sq",))["exp_avg_sq"].abs().sum() > 0, tensor.name


@pytest.mark.parametrize("name", REAL)
def test_inspect_names_the_state(name):
    summary = inspect_checkpoint(source(name)).optimizer
    assert (summary.kind, summary.step, summary.dp) == (REAL[name][6], 10.0, REAL[name][5])


@pytest.mark.parametrize("name", PER_RANK)
def test_rewritten_at_its_own_layout_the_per_rank_state_is_megatron_s_bit_for_bit(name, tmp_path):
    _, fmt, tp, pp, vpp, dp, kind = REAL[name]
    reshard(source(name), tmp_path / "again", tp=tp, pp=pp, vpp=vpp, dp=dp)
    assert_same_rank_state(source(name), tmp_path / "again", kind)


def assert_same_rank_state(original, written, kind) -> None:
    """The optimizer entries of every rank file and, distributed, every distrib_optim.pt are
    equal (tensors bit for bit)."""
    theirs, ours = rank_files(original, "model_optim_rng.pt"), rank_files(written, "model_optim_rng.pt")
    assert sorted(ours) == sorted(theirs)
    for rank, state in theirs.items():
        assert_equal_nested(ours[rank]["optimizer"], state["optimizer"], rank)
        assert ours[rank]["opt_param_scheduler"] == state["opt_param_scheduler"]
    if kind == "distributed":
        theirs, ours = rank_files(original, "distrib_optim.pt"), rank_files(written, "distrib_optim.pt")
        assert sorted(ours) == sorted(theirs) and theirs
        for rank, state in theirs.items():
            assert_equal_nested(ours[rank], state, rank)


def assert_equal_nested(ours, theirs, where) -> None:
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor) and ours.dtype == theirs.dtype and torch.equal(ours, theirs), where
    elif isinstance(theirs, dict):
        assert sorted(ours, key=str) == sorted(theirs, key=str), where
        for key in theirs:
            assert_equal_nested(ours[key], theirs[key], (where, key))
    elif isinstance(theirs, (list, tuple)):
        assert len(ours) == len(theirs), where
        for index, (mine, their) in enumerate(zip(ours, theirs)):
            assert_equal_nested(mine, their, (where, index))
    else:
        assert ours == theirs, where


@pytest.mark.parametrize("name", TORCH_DIST)
def test_rewritten_at_its_own_layout_the_torch_dist_state_has_megatron_s_entries(name, tmp_path):
    _, fmt, tp, pp, vpp, dp, kind = REAL[name]
    run_ckptkit("reshard", source(name), tmp_path / "again", "--tp", tp, "--pp", pp, "--dp", dp)
    assert optimizer_entries(tmp_path / "again") == optimizer_entries(source(name))
    info, original = optimizer_values(source(name))
    written_info, written = optimizer_values(tmp_path / "again")
    assert written_info.param_groups == info.param_groups and written_info.step == info.step
    assert_same_values(original, written)


# (TP, PP, VPP, DP, distributed optimizer, format, sharding) of the way there
TRIPS = {
    "tp1-pp2-dp4": (1, 2, 1, 4, True, "torch", None),
    "tp1-pp2-vpp2-dp1": (1, 2, 2, 1, True, "torch", None),
    "tp4-dp1-plain": (4, 1, 1, 1, False, "torch", None),
    "tp1-pp4-torch-dist": (1, 4, 1, 2, True, "torch_dist", "dp_reshardable"),
    "tp2-pp2-fully-reshardable": (2, 2, 1, 1, True, "torch_dist", "fully_reshardable"),
}
T5_TRIPS = {name: trip for name, trip in TRIPS.items() if trip[1] == trip[2] == 1} | {
    "tp1-dp4": (1, 1, 1, 4, True, "torch", None),
    "tp4-torch-dist": (4, 1, 1, 1, True, "torch_dist", "dp_reshardable"),
    "tp1-fully-reshardable": (1, 1, 1, 3, True, "torch_dist", "fully_reshardable"),
}
CASES = [("bert-torch", trip) for trip in TRIPS] + [("t5-torch", trip) for trip in T5_TRIPS] + \
    [("bert-plain", "tp1-pp2-dp4"), ("bert-pp2", "tp1-pp2-vpp2-dp1"), ("bert-pp2", "tp4-dp1-plain")]


@pytest.mark.parametrize("name,trip", CASES, ids=[f"{name}-{trip}" for name, trip in CASES])
def test_state_goes_to_another_layout_and_back_as_megatron_wrote_it(name, trip, tmp_path):
    _, fmt, tp, pp, vpp, dp, kind = REAL[name]
    there_tp, there_pp, there_vpp, there_dp, distributed, there_format, sharding = (TRIPS | T5_TRIPS)[trip]
    reshard(source(name), tmp_path / "there", tp=there_tp, pp=there_pp, vpp=there_vpp, dp=there_dp,
            format=there_format, distributed_optimizer=distributed, optimizer_sharding=sharding)
    with open_checkpoint(tmp_path / "there") as weights, read_optimizer_state(weights) as state:
        assert masters_match_weights(state, weights) == []
    reshard(tmp_path / "there", tmp_path / "back", tp=tp, pp=pp, vpp=vpp, dp=dp, format="torch",
            distributed_optimizer=kind == "distributed")
    assert_same_rank_state(source(name), tmp_path / "back", kind)


@pytest.mark.parametrize("distributed", [True, False], ids=["fully-reshardable", "plain"])
def test_t5_model_space_state_is_kept_under_the_names_megatron_s_optimizer_loads(distributed, tmp_path):
    # T5Model saves its position embeddings and output bias under two names each; Megatron-LM,
    # loading a fully_reshardable T5 that had both, asked for position_embeddings.* and
    # output_layer.* and reported embedding.position_embeddings.* and lm_head.output_layer.* unused
    reshard(source("t5-torch"), tmp_path / "out", tp=2, pp=1, dp=2, format="torch_dist",
            distributed_optimizer=distributed, optimizer_sharding="fully_reshardable" if distributed else None)
    keys = optimizer_entries(tmp_path / "out")[0]
    copies = {"position_embeddings.weight", "embedding.position_embeddings.weight", "output_layer.bias",
              "lm_head.output_layer.bias"}
    assert {key.split(".", 3)[3] for key in keys if key.split(".", 3)[3] in copies} == \
        {"position_embeddings.weight", "output_layer.bias"}
    _, original = optimizer_values(source("t5-torch"))
    _, written = optimizer_values(tmp_path / "out")
    assert_same_values(original, written)
