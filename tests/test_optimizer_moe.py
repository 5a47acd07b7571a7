"""Optimizer state of a mixture of experts, read and written as Megatron-LM keeps it: two
chained optimizers, the experts' apart (``is_expert_parallel``), checked on real Megatron-LM
checkpoints (tests/fixtures/moe_optim_ep2: Mixtral style, hidden 32, 4 experts of ffn 16,
top-2, TP1 EP2 DP2, fp32, vocabulary 120 padded to 128, 10 iterations of one seed;
tools/make_megatron_optimizer_fixtures.sh) saved three ways: per-rank files with the
distributed optimizer (with the logits Megatron computes from them), torch_dist
(dp_reshardable), and per-rank files with the plain optimizer."""

import pytest
import torch

from ckptkit.layouts import open_checkpoint
from ckptkit.optimizer import read_optimizer_state
from ckptkit.optimizer.verify import masters_match_weights
from ckptkit.safe_load import safe_torch_load

from conftest import fixture_path, make_hf_model, optimizer_values, run_ckptkit
from test_optimizer_torch_dist import assert_same_values, optimizer_entries

KEYS = ("param", "exp_avg", "exp_avg_sq")
SAVED = ("torch_distributed", "dist", "torch_plain")
EXPERTS = [f"decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc1.weight"
           for layer in range(2) for expert in range(4)]


def same(a, b) -> bool:
    """Equal objects, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def rank_files(root, names=("distrib_optim.pt", "model_optim_rng.pt")):
    """What each EP rank's files hold of the optimizer: distrib_optim.pt whole, the optimizer entry."""
    found = {}
    for ep_rank in range(2):
        for name in names:
            path = root / "iter_0000010" / f"mp_rank_00_{ep_rank:03d}" / name
            if path.is_file():
                loaded = safe_torch_load(path)
                found[(ep_rank, name)] = loaded["optimizer"] if name == "model_optim_rng.pt" else loaded
    return found


@pytest.mark.parametrize("saved", SAVED)
def test_every_master_is_its_weight_the_experts_read_from_their_own_ep_rank(saved):
    with open_checkpoint(fixture_path("moe_optim_ep2", saved)) as weights, read_optimizer_state(weights) as state:
        assert state.info.step == 10.0
        assert [(group["is_expert_parallel"], group["wd_mult"]) for group in state.info.param_groups] == \
            [(False, 1.0), (False, 0.0), (True, 1.0)]  # the non-expert optimizer's pair, then the experts'
        assert masters_match_weights(state, weights) == []
        for name in EXPERTS:
            moments = state.tensor(name, ("exp_avg_sq",))["exp_avg_sq"]
            assert moments.min() >= 0 and moments.sum() > 0, name


def test_the_distributed_state_saved_per_rank_and_as_torch_dist_is_the_same_run():
    # two runs of one seed: the same state but for the last bits of the GPUs' reductions
    info, per_rank = optimizer_values(fixture_path("moe_optim_ep2", "torch_distributed"))
    dist_info, dist = optimizer_values(fixture_path("moe_optim_ep2", "dist"))
    assert info.param_groups == dist_info.param_groups and info.opt_param_scheduler == dist_info.opt_param_scheduler
    for name, values in per_rank.items():
        for key in KEYS:
            assert torch.allclose(values[key], dist[name][key], rtol=1e-5, atol=1e-7), (name, key)


@pytest.mark.parametrize("saved, names", [("torch_distributed", ("distrib_optim.pt", "model_optim_rng.pt")),
                                          ("torch_plain", ("model_optim_rng.pt",))])
def test_rewritten_at_their_own_layout_per_rank_files_are_megatrons(saved, names, tmp_path):
    # distrib_optim.pt: a list of two states, EP rank 1's non-expert one None (EP rank 0 holds it)
    source = fixture_path("moe_optim_ep2", saved)
    run_ckptkit("reshard", source, tmp_path / "again", "--tp", 1, "--pp", 1, "--ep", 2)
    written, original = rank_files(tmp_path / "again", names), rank_files(source, names)
    assert written.keys() == original.keys()
    for key, value in original.items():
        assert same(written[key], value), key


def test_rewritten_at_its_own_layout_torch_dist_state_is_megatrons(tmp_path):
    source = fixture_path("moe_optim_ep2", "dist")
    run_ckptkit("reshard", source, tmp_path / "again", "--tp", 1, "--pp", 1, "--ep", 2)
    assert optimizer_entries(tmp_path / "again") == optimizer_entries(source)


def test_per_rank_state_written_as_torch_dist_is_megatrons_torch_dist_of_the_same_run(tmp_path):
    source = fixture_path("moe_optim_ep2", "torch_distributed")
    run_ckptkit("reshard", source, tmp_path / "dist", "--tp", 1, "--pp", 1, "--ep", 2, "--format", "torch_dist")
    assert optimizer_entries(tmp_path / "dist") == optimizer_entries(fixture_path("moe_optim_ep2", "dist"))
    _, written = optimizer_values(tmp_path / "dist")
    _, original = optimizer_values(source)
    assert_same_values(original, written)


@pytest.mark.parametrize("saved, names", [("torch_distributed", ("distrib_optim.pt", "model_optim_rng.pt")),
                                          ("torch_plain", ("model_optim_rng.pt",))])
def test_other_tp_pp_ep_dp_and_back_gives_megatrons_files_bit_for_bit(saved, names, tmp_path):
    source = fixture_path("moe_optim_ep2", saved)
    run_ckptkit("reshard", source, tmp_path / "wide", "--tp", 2, "--pp", 2, "--ep", 4, "--dp", 4)
    with open_checkpoint(tmp_path / "wide") as weights, read_optimizer_state(weights) as state:
        assert state.info.source["ep"] == 4 and masters_match_weights(state, weights) == []
    run_ckptkit("reshard", tmp_path / "wide", tmp_path / "back", "--tp", 1, "--pp", 1, "--ep", 2, "--dp", 2)
    written, original = rank_files(tmp_path / "back", names), rank_files(source, names)
    for key, value in original.items():
        assert same(written[key], value), key


def test_torch_dist_state_at_other_tp_pp_ep_reads_back_every_value(tmp_path):
    source = fixture_path("moe_optim_ep2", "dist")
    run_ckptkit("reshard", source, tmp_path / "wide", "--tp", 2, "--pp", 2, "--ep", 4, "--dp", 4)
    keys = optimizer_entries(tmp_path / "wide")[0]
    # the non-expert optimizer: one domain per TP x PP rank; the experts': per TP x EP x PP rank
    assert {key.split(".")[3] for key in keys if key.startswith("chained_0.")} == {f"dp_group_idx_{g}" for g in range(4)}
    assert {key.split(".")[3] for key in keys if key.startswith("chained_1.")} == {f"dp_group_idx_{g}" for g in range(16)}
    _, original = optimizer_values(source)
    _, written = optimizer_values(tmp_path / "wide")
    assert_same_values(original, written, real_rows=True)  # TP2 pads the vocabulary to 256, not 128


def test_a_fresh_optimizer_for_a_hugging_face_mixtral_has_the_experts_group(tmp_path):
    hf = make_hf_model(tmp_path / "hf", "mixtral")
    run_ckptkit("hf-to-megatron", hf, tmp_path / "out", "--tp", 1, "--pp", 1, "--ep", 2, "--optimizer", "fresh",
            "--dp", 2, "--distributed-optimizer", "--megatron-args", "--lr 1e-4 --train-iters 10 --global-batch-size 8")
    with open_checkpoint(tmp_path / "out") as weights, read_optimizer_state(weights) as state:
        assert [(group["is_expert_parallel"], group["wd_mult"]) for group in state.info.param_groups] == \
            [(False, 1.0), (False, 0.0), (True, 1.0)]
        assert state.info.step == 0 and masters_match_weights(state, weights) == []


@pytest.mark.parametrize("saved, kind", [("torch_distributed", "distributed"), ("dist", "distributed"),
                                         ("torch_plain", "non-distributed")])
def test_inspect_reads_the_state_and_names_the_experts_own_optimizer(saved, kind):
    from ckptkit.inspection import inspect_checkpoint

    summary = inspect_checkpoint(fixture_path("moe_optim_ep2", saved)).optimizer
    assert (summary.kind, summary.step, summary.dp) == (kind, 10.0, 2)
    assert "the experts' own optimizer" in summary.sharding and "EP=2" in summary.sharding


@pytest.mark.parametrize("saved, names", [("torch_distributed", ("distrib_optim.pt", "model_optim_rng.pt")),
                                          ("torch_plain", ("model_optim_rng.pt",))])
def test_at_ep1_the_experts_join_the_one_optimizer_and_come_back_apart_at_ep2(saved, names, tmp_path):
    # Megatron chains an experts' optimizer only with expert parallelism: at EP 1 the experts'
    # weights reduce over the whole DP group like the rest (allreduce stays True)
    source = fixture_path("moe_optim_ep2", saved)
    run_ckptkit("reshard", source, tmp_path / "ep1", "--tp", 1, "--pp", 1, "--ep", 1)
    entry = safe_torch_load(tmp_path / "ep1" / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt")["optimizer"]
    inner = entry["optimizer"] if "optimizer" in entry else entry
    assert isinstance(entry, dict) and [group["is_expert_parallel"] for group in inner["param_groups"]] == [False] * 2
    with open_checkpoint(tmp_path / "ep1") as weights, read_optimizer_state(weights) as state:
        assert masters_match_weights(state, weights) == []
    _, original = optimizer_values(source)
    _, ep1 = optimizer_values(tmp_path / "ep1")
    assert_same_values(original, ep1)
    run_ckptkit("reshard", tmp_path / "ep1", tmp_path / "back", "--tp", 1, "--pp", 1, "--ep", 2)
    written, megatrons = rank_files(tmp_path / "back", names), rank_files(source, names)
    for key, value in megatrons.items():
        assert same(written[key], value), key
