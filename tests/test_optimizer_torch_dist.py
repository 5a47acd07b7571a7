"""torch_dist optimizer state (the distributed optimizer's dp_reshardable and
fully_reshardable sharding types), read from real Megatron-LM checkpoints: GPT-2-style fp32
models trained 10 iterations at TP1 DP2 (gpt2do_dist_tp1dp2, both sharding types) and at
TP2 PP2 (gpt2do_dist_tp2pp2, dp_reshardable; vocabulary 250 padded to 256), made by
tools/make_megatron_optimizer_fixtures.sh."""
import pytest
import torch

from ckptkit.layouts import open_checkpoint
from ckptkit.optimizer import read_optimizer_state
from ckptkit.optimizer.torch_dist import TorchDistOptimizerState
from ckptkit.optimizer.verify import masters_match_weights

from conftest import run_ckptkit, optimizer_values, fixture_path

SHARDINGS = ("dp_reshardable", "fully_reshardable")
KEYS = ("param", "exp_avg", "exp_avg_sq")


def assert_same_values(expected: dict, found: dict, *, real_rows: bool = False) -> None:
    """Every canonical tensor's master and moments (``optimizer_values``) in ``found`` are
    ``expected``'s bit for bit; ``real_rows``: on the rows both have (vocabularies padded
    for other TP sizes)."""
    for name, values in expected.items():
        for key in KEYS:
            want, got = values[key], found[name][key]
            if real_rows:
                rows = min(len(want), len(got))
                want, got = want[:rows], got[:rows]
            assert torch.equal(got, want), (name, key)


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_every_fp32_master_equals_the_stored_weight(sharding):
    path = fixture_path("gpt2do_dist_tp1dp2", sharding)
    with open_checkpoint(path) as weights, read_optimizer_state(weights) as state:
        assert isinstance(state, TorchDistOptimizerState) and state.sharding == sharding
        assert (state.info.kind, state.info.step, len(state.info.param_groups)) == ("distributed", 10.0, 2)
        assert state.info.source["dp"] == 2
        names = [tensor.name for tensor in state.canonical()]
        assert len(names) == 28
        for name in names:
            values = state.tensor(name)
            assert torch.equal(values["param"], weights.tensor(name)), name
            assert values["exp_avg_sq"].abs().sum() > 0 and values["exp_avg"].abs().sum() > 0, name
            assert values["exp_avg_sq"].min() >= 0, name


def test_both_sharding_types_of_the_same_run_hold_the_same_state():
    info_a, dp = optimizer_values(fixture_path("gpt2do_dist_tp1dp2", "dp_reshardable"))
    info_b, fully = optimizer_values(fixture_path("gpt2do_dist_tp1dp2", "fully_reshardable"))
    assert info_a.param_groups == info_b.param_groups and info_a.opt_param_scheduler == info_b.opt_param_scheduler
    for name, values in dp.items():
        for key in KEYS:
            assert torch.equal(values[key], fully[name][key]), (name, key)


def test_one_tensor_reads_only_its_own_regions(monkeypatch):
    from ckptkit.layouts.torch_dist import regions

    with read_optimizer_state(fixture_path("gpt2do_dist_tp1dp2", "dp_reshardable")) as state:
        seen = []
        original = regions._read_regions
        monkeypatch.setattr(state, "_read_regions", lambda files, rs, *a: seen.append(rs) or original(files, rs, *a))
        values = state.tensor("decoder.final_layernorm.bias")
        assert [sum(r.target.numel() for r in rs) for rs in seen] == [3 * 64]
        assert values["param"].shape == (64,)


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_reshard_from_torch_dist_carries_the_state_to_per_rank_files_and_back_keeps_every_value(tmp_path, sharding):
    source = fixture_path("gpt2do_dist_tp1dp2", sharding)
    info, original = optimizer_values(source)
    run_ckptkit("reshard", source, tmp_path / "tp2dp2", "--tp", 2, "--pp", 1, "--format", "torch")
    assert (tmp_path / "tp2dp2" / "iter_0000010" / "mp_rank_01" / "distrib_optim.pt").is_file()
    run_ckptkit("reshard", tmp_path / "tp2dp2", tmp_path / "pp2dp4", "--tp", 1, "--pp", 2, "--dp", 4, "--format", "torch")
    run_ckptkit("reshard", tmp_path / "pp2dp4", tmp_path / "back", "--tp", 1, "--pp", 1, "--dp", 2, "--format", "torch")
    for folder in ("tp2dp2", "pp2dp4", "back"):
        carried_info, carried = optimizer_values(tmp_path / folder)
        assert carried_info.step == info.step and carried_info.param_groups == info.param_groups, folder
        assert carried_info.opt_param_scheduler == info.opt_param_scheduler, folder
        for name, values in original.items():
            for key in KEYS:
                assert torch.equal(carried[name][key], values[key]), (folder, name, key)


def test_inspect_reports_the_torch_dist_state():
    from ckptkit.inspection import inspect_checkpoint

    summary = inspect_checkpoint(fixture_path("gpt2do_dist_tp1dp2", "dp_reshardable")).optimizer
    assert (summary.kind, summary.sharding, summary.step, summary.dp) == (
        "distributed", "torch_dist dp_reshardable", 10.0, 2)


def optimizer_entries(path):
    """Every optimizer entry of a torch_dist checkpoint (chained optimizers' too): tensors as
    (global shape, dtype, sorted chunks), bytes entries unpickled."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from ckptkit.layouts.torch_dist import TorchDistReader, load_pickled_bytes
    from ckptkit.layouts.torch_dist.keys import is_optimizer_key
    from ckptkit.layouts.torch_dist.regions import _read_regions

    with TorchDistReader(path) as reader:
        stored = reader.metadata.state_dict_metadata
        byte_keys = [key for key, entry in stored.items()
                     if is_optimizer_key(key) and isinstance(entry, BytesStorageMetadata)]
        raw = _read_regions(reader.files, [], byte_keys)
        found = {key: load_pickled_bytes(raw[key], key) for key in byte_keys}
        for key, entry in stored.items():
            if is_optimizer_key(key) and key not in found:
                found[key] = (tuple(entry.size), entry.properties.dtype,
                              sorted((tuple(chunk.offsets), tuple(chunk.sizes)) for chunk in entry.chunks))
        common = reader.common_state
        return found, {key: common.get(key) for key in ("optimizer", "opt_param_scheduler",
                                                         "num_floating_point_operations_so_far")}, \
            common["content_metadata"].get("distrib_optim_sharding_type")


def test_reshard_to_torch_dist_writes_dp_reshardable_state_as_megatron_does(tmp_path):
    source = fixture_path("gpt2do_dist_tp1dp2", "dp_reshardable")
    run_ckptkit("reshard", source, tmp_path / "again", "--tp", 1, "--pp", 1)
    # the same keys, global shapes, chunks (per parameter piece of each DP shard) and bytes entries
    assert optimizer_entries(tmp_path / "again") == optimizer_entries(source)
    info, original = optimizer_values(source)
    written_info, written = optimizer_values(tmp_path / "again")
    assert written_info.param_groups == info.param_groups and written_info.step == info.step
    assert_same_values(original, written)


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_torch_dist_to_per_rank_files_and_back_to_torch_dist_is_bit_identical(tmp_path, sharding):
    source = fixture_path("gpt2do_dist_tp1dp2", sharding)
    run_ckptkit("reshard", source, tmp_path / "tp2pp2", "--tp", 2, "--pp", 2, "--dp", 1, "--format", "torch")
    run_ckptkit("reshard", tmp_path / "tp2pp2", tmp_path / "back", "--tp", 1, "--pp", 1, "--dp", 2,
            "--format", "torch_dist")
    assert optimizer_entries(tmp_path / "back") == optimizer_entries(fixture_path("gpt2do_dist_tp1dp2",
                                                                                  "dp_reshardable"))
    info, original = optimizer_values(source)
    back_info, back = optimizer_values(tmp_path / "back")
    assert back_info.param_groups == info.param_groups and back_info.opt_param_scheduler == info.opt_param_scheduler
    assert_same_values(original, back)
    with open_checkpoint(tmp_path / "back") as weights, open_checkpoint(source) as weights_source:
        for name in original:
            assert torch.equal(weights.tensor(name), weights_source.tensor(name)), name


@pytest.mark.parametrize("layout", [("--tp", 2, "--pp", 1, "--dp", 2), ("--tp", 2, "--pp", 2, "--dp", 1),
                                    ("--tp", 1, "--pp", 2, "--dp", 3)])
def test_torch_dist_state_written_at_any_tp_pp_vpp_reads_back_every_value(tmp_path, layout):
    source = fixture_path("gpt2do_dist_tp1dp2", "dp_reshardable")
    run_ckptkit("reshard", source, tmp_path / "out", *layout)
    keys, _, sharding = optimizer_entries(tmp_path / "out")
    assert sharding == "dp_reshardable"
    tp, pp, vpp = layout[1], layout[3], layout[5] if "--vpp" in layout else 1
    # one domain per TP x PP rank (G = tp_rank + TP x pp_stage), one buffer per virtual chunk
    domains = {key.split(".")[2] for key in keys}
    assert domains == {f"dp_group_idx_{group}" for group in range(tp * pp)}
    assert {key.split(".")[3] for key in keys if ".gbuf_idx_" in key} == {f"gbuf_idx_{chunk}" for chunk in range(vpp)}
    info, original = optimizer_values(source)
    written_info, written = optimizer_values(tmp_path / "out")
    assert written_info.param_groups == info.param_groups and written_info.step == info.step
    assert_same_values(original, written)


def test_per_rank_files_to_torch_dist_and_back_return_every_distrib_optim_buffer_bit_for_bit(tmp_path):
    from ckptkit.safe_load import safe_torch_load

    source = fixture_path("gpt2do_tp2dp2", "legacy")  # Megatron's own TP2 DP2 distrib_optim.pt
    run_ckptkit("reshard", source, tmp_path / "dist", "--tp", 1, "--pp", 1, "--format", "torch_dist")
    assert optimizer_entries(tmp_path / "dist")[2] == "dp_reshardable"
    run_ckptkit("reshard", tmp_path / "dist", tmp_path / "back", "--tp", 2, "--pp", 1, "--dp", 2, "--format", "torch")
    for tp_rank in range(2):
        original, returned = (safe_torch_load(root / "iter_0000010" / f"mp_rank_{tp_rank:02d}" / "distrib_optim.pt")
                              for root in (source, tmp_path / "back"))
        for key in KEYS:
            assert torch.equal(returned[0][(torch.float32, torch.float32)][key],
                               original[0][(torch.float32, torch.float32)][key]), (tp_rank, key)


def test_real_tp2_pp2_state_is_found_in_the_domain_of_each_tp_rank_and_stage():
    # G = tp_rank + TP x pp_stage: a domain read as another rank's would give masters of
    # other shapes (another stage) or other rows (another TP rank) than the weights
    path = fixture_path("gpt2do_dist_tp2pp2")
    with open_checkpoint(path) as weights, read_optimizer_state(weights) as state:
        assert (state.sharding, state.info.step, state.info.source["tp"], state.info.source["pp"]) == \
            ("dp_reshardable", 10.0, 2, 2)
        assert masters_match_weights(state, weights) == []
        moments = state.tensor("decoder.layers.1.self_attention.linear_qkv.weight")
        assert moments["exp_avg_sq"].min() >= 0 and moments["exp_avg"].abs().sum() > 0
    keys = optimizer_entries(path)[0]
    assert {key.split(".")[2] for key in keys} == {f"dp_group_idx_{group}" for group in range(4)}


def test_real_tp2_pp2_state_through_per_rank_files_comes_back_as_megatron_wrote_it(tmp_path):
    source = fixture_path("gpt2do_dist_tp2pp2")
    run_ckptkit("reshard", source, tmp_path / "tp1", "--tp", 1, "--pp", 1, "--dp", 2, "--format", "torch")
    run_ckptkit("reshard", tmp_path / "tp1", tmp_path / "back", "--tp", 2, "--pp", 2, "--dp", 1,
            "--format", "torch_dist")
    assert optimizer_entries(tmp_path / "back") == optimizer_entries(source)
    info, original = optimizer_values(source)
    back_info, back = optimizer_values(tmp_path / "back")
    assert back_info.param_groups == info.param_groups and back_info.step == info.step
    assert_same_values(original, back)


def test_fully_reshardable_state_is_written_with_megatrons_entries_and_every_value(tmp_path):
    source = fixture_path("gpt2do_dist_tp1dp2", "fully_reshardable")
    run_ckptkit("reshard", source, tmp_path / "again", "--tp", 1, "--pp", 1)  # the source's sharding type
    assert optimizer_entries(tmp_path / "again") == optimizer_entries(source)
    # the dp_reshardable twin of the same run, asked for fully_reshardable, gives the same
    run_ckptkit("reshard", fixture_path("gpt2do_dist_tp1dp2", "dp_reshardable"), tmp_path / "twin", "--tp", 1,
            "--pp", 1, "--optimizer-sharding", "fully_reshardable")
    assert optimizer_entries(tmp_path / "twin") == optimizer_entries(source)
    info, original = optimizer_values(source)
    for written_path in (tmp_path / "again", tmp_path / "twin"):
        written_info, written = optimizer_values(written_path)
        assert written_info.param_groups == info.param_groups and written_info.step == info.step
        for name, values in original.items():
            for key in KEYS:
                assert torch.equal(written[name][key], values[key]), (written_path.name, name, key)


def test_fully_reshardable_at_tp2_pp2_reads_back_every_value(tmp_path):
    source = fixture_path("gpt2do_dist_tp2pp2")
    run_ckptkit("reshard", source, tmp_path / "fully", "--tp", 2, "--pp", 2, "--optimizer-sharding", "fully_reshardable")
    assert optimizer_entries(tmp_path / "fully")[2] == "fully_reshardable"
    _, original = optimizer_values(source)
    _, written = optimizer_values(tmp_path / "fully")
    assert_same_values(original, written)


# Megatron-LM's non-distributed optimizer in torch_dist, GPT-2 style, TP2: fp32 (vocabulary 250;
# the weights are the masters) and bf16 (vocabulary 120 padded to 256; masters as
# optimizer.state.fp32_param.*)
PLAIN = {"fp32": ("gpt2o_dist_plain_tp2",), "bf16": ("gpt2o_dist_plain_bf16_tp2",)}


@pytest.mark.parametrize("dtype", sorted(PLAIN))
def test_plain_optimizer_state_is_read_with_masters_that_are_the_weights(dtype):
    with open_checkpoint(fixture_path(*PLAIN[dtype])) as weights, read_optimizer_state(weights) as state:
        assert (state.sharding, state.info.kind, state.info.step) == ("plain", "non-distributed", 10.0)
        assert masters_match_weights(state, weights) == []
        for tensor in state.canonical():
            values = state.tensor(tensor.name)
            assert values["exp_avg_sq"].min() >= 0 and values["exp_avg_sq"].abs().sum() > 0, tensor.name


@pytest.mark.parametrize("dtype", sorted(PLAIN))
def test_plain_optimizer_state_through_per_rank_files_comes_back_as_megatron_wrote_it(dtype, tmp_path):
    source = fixture_path(*PLAIN[dtype])
    # per-rank at PP2 (TP2: the bf16 fixture's vocabulary of 120 is padded to 256 only at TP2)
    run_ckptkit("reshard", source, tmp_path / "pp2", "--tp", 2, "--pp", 2, "--format", "torch")
    run_ckptkit("reshard", tmp_path / "pp2", tmp_path / "back", "--tp", 2, "--pp", 1, "--format", "torch_dist")
    assert optimizer_entries(tmp_path / "back") == optimizer_entries(source)
    info, original = optimizer_values(source)
    back_info, back = optimizer_values(tmp_path / "back")
    assert back_info.param_groups == info.param_groups and back_info.step == info.step
    assert_same_values(original, back)


def test_distributed_state_becomes_plain_in_torch_dist_and_back(tmp_path):
    source = fixture_path("gpt2do_dist_tp2pp2")
    run_ckptkit("reshard", source, tmp_path / "plain", "--tp", 1, "--pp", 1, "--no-distributed-optimizer")
    assert optimizer_entries(tmp_path / "plain")[1]["optimizer"]["state"]["common_step"] == 10.0
    run_ckptkit("reshard", tmp_path / "plain", tmp_path / "back", "--tp", 2, "--pp", 2, "--dp", 1,
            "--distributed-optimizer")
    assert optimizer_entries(tmp_path / "back") == optimizer_entries(source)
    _, original = optimizer_values(source)
    _, back = optimizer_values(tmp_path / "back")
    assert_same_values(original, back)
