"""hf-to-megatron --optimizer fresh: a Hugging Face model converted with the optimizer state
Megatron builds before its first step (fp32 master copies at the source's full precision,
zero moments, step 0), at iteration 0, for a run at any DP size, distributed or not."""
import doctest
import importlib
import json
import pickle

import pytest
import torch
from click.testing import CliRunner

from ckptkit.cli import main
from ckptkit.convert import hf_to_megatron, megatron_to_hf, reshard
from ckptkit.errors import BadInput, Unsupported
from ckptkit.layouts import open_checkpoint
from ckptkit.optimizer import read_optimizer_state
from ckptkit.optimizer.fresh import FreshStateOf, TrainingRun
from ckptkit.optimizer.verify import masters_match_weights
from ckptkit.safe_load import safe_torch_load

from conftest import fixture_path, make_hf_model

# The flags of the run that wrote the real fixtures (tools/make_megatron_fixtures.sh).
FIXTURE_RUN = ("--micro-batch-size 2 --global-batch-size 8 --train-iters 10 --lr 5e-4 --min-lr 5e-5 "
               "--lr-decay-style cosine --lr-warmup-iters 2 --weight-decay 0.01 --clip-grad 1.0 --seed 42")
RUN = "--lr 3e-4 --train-iters 100 --global-batch-size 16"


def rank_file(root, rank_dir, name="model_optim_rng.pt"):
    return safe_torch_load(root / "iter_0000000" / rank_dir / name)


@pytest.mark.parametrize("distributed", [True, False], ids=["distributed", "non-distributed"])
def test_an_fp32_model_converted_to_bf16_keeps_fp32_master_copies(distributed, tmp_path):
    hf = make_hf_model(tmp_path / "hf", "llama")
    hf_to_megatron(hf, tmp_path / "out", tp=2, pp=1, dtype="bf16", optimizer="fresh", dp=4,
                   distributed_optimizer=distributed, megatron_args=RUN)
    with open_checkpoint(hf) as source, open_checkpoint(tmp_path / "out") as weights, \
            read_optimizer_state(weights) as state:
        assert weights.meta.dtype == torch.bfloat16 and state.info.step == 0
        assert state.info.kind == ("distributed" if distributed else "non-distributed")
        for canonical in source.canonical():
            full = source.tensor(canonical.name)
            assert full.dtype == torch.float32
            values = state.tensor(canonical.name)
            assert torch.equal(values["param"][:full.shape[0]], full), canonical.name  # every fp32 bit
            assert not values["exp_avg"].any() and not values["exp_avg_sq"].any()
        assert masters_match_weights(state, weights) == []
        master = state.tensor("decoder.layers.0.mlp.linear_fc1.weight", ("param",))["param"]
        assert (master != weights.tensor("decoder.layers.0.mlp.linear_fc1.weight").float()).float().mean() > 0.9


def test_a_bf16_model_gives_master_copies_equal_to_its_bf16_values(tmp_path):
    hf = make_hf_model(tmp_path / "hf", "gpt2", dtype=torch.bfloat16)
    hf_to_megatron(hf, tmp_path / "out", tp=1, pp=2, optimizer="fresh", megatron_args=RUN)
    with open_checkpoint(hf) as source, read_optimizer_state(tmp_path / "out") as state:
        for canonical in source.canonical():
            full = source.tensor(canonical.name)
            assert full.dtype == torch.bfloat16
            assert torch.equal(state.tensor(canonical.name, ("param",))["param"][:full.shape[0]], full.float())


def test_the_state_is_written_at_iteration_0_because_megatron_loads_none_from_a_release(tmp_path):
    hf = make_hf_model(tmp_path / "hf", "gpt2")
    result = hf_to_megatron(hf, tmp_path / "out", tp=1, pp=1, optimizer="fresh", megatron_args=RUN)
    assert (tmp_path / "out" / "latest_checkpointed_iteration.txt").read_text() == "0"
    assert result.target_layout["iteration"] == 0 and result.target_layout["release"] is False
    saved = rank_file(tmp_path / "out", "mp_rank_00")
    assert saved["iteration"] == 0 and saved["num_floating_point_operations_so_far"] == 0
    assert "rng_state" not in saved and any("--no-load-rng" in note for note in result.notes)
    # without --optimizer fresh the output stays a release
    hf_to_megatron(hf, tmp_path / "weights", tp=1, pp=1)
    assert (tmp_path / "weights" / "latest_checkpointed_iteration.txt").read_text() == "release"


def test_for_the_flags_of_the_run_that_wrote_the_llama_fixture_it_is_the_fresh_state_megatron_wrote(tmp_path):
    """The real Llama fixture's rank files hold the optimizer Megatron built for its flags
    (bf16, non-distributed, before any step). Converted to Hugging Face and back with those
    flags, every rank gets the same parameter groups (with their params lists), the same
    fp32 masters and the same LR schedule. ckptkit writes the zero moments and step 0 that
    Adam would create at its first step, where Megatron's entry has no state yet."""
    source = fixture_path("llama_tp2pp2", "conv", "torch")
    megatron_to_hf(source, tmp_path / "hf")
    hf_to_megatron(tmp_path / "hf", tmp_path / "out", tp=2, pp=2, optimizer="fresh", megatron_args=FIXTURE_RUN)
    for rank_dir in ("mp_rank_00_000", "mp_rank_01_000", "mp_rank_00_001", "mp_rank_01_001"):
        megatron = safe_torch_load(source / "iter_0000010" / rank_dir / "model_optim_rng.pt")
        ours = rank_file(tmp_path / "out", rank_dir)
        assert ours["opt_param_scheduler"] == megatron["opt_param_scheduler"]
        groups = [{key: value for key, value in group.items() if key != "bias_correction"}
                  for group in ours["optimizer"]["optimizer"]["param_groups"]]
        assert groups == megatron["optimizer"]["optimizer"]["param_groups"]
        tp_rank = int(rank_dir[8:10])
        for group_ours, group_megatron in zip(ours["optimizer"]["fp32_from_fp16_params"],
                                              megatron["optimizer"]["fp32_from_fp16_params"]):
            for master, expected in zip(group_ours, group_megatron, strict=True):
                assert master.dtype == torch.float32 and master.shape == expected.shape
                rows = min(len(master), 1000 - 512 * tp_rank) if len(master) == 512 else len(master)  # vocab padding
                assert torch.equal(master[:rows], expected[:rows])
        adam = ours["optimizer"]["optimizer"]["state"]
        assert megatron["optimizer"]["optimizer"]["state"] == {}
        assert all(entry["step"].item() == 0 and not entry["exp_avg"].any() for entry in adam.values())
        assert ours["args"].use_distributed_optimizer is False and ours["args"].data_parallel_size == 1


def test_distributed_state_for_dp4_is_laid_out_for_dp4_and_the_args_say_so(tmp_path):
    hf = make_hf_model(tmp_path / "hf", "llama")
    hf_to_megatron(hf, tmp_path / "out", tp=2, pp=2, dtype="bf16", optimizer="fresh", dp=4,
                   megatron_args=RUN + " --use-distributed-optimizer")
    for rank_dir in ("mp_rank_00_000", "mp_rank_01_001"):
        saved = rank_file(tmp_path / "out", rank_dir)
        assert saved["args"].use_distributed_optimizer is True and saved["args"].data_parallel_size == 4
        assert [group["step"] for group in saved["optimizer"]["optimizer"]["param_groups"]] == [0, 0]
        buffers = rank_file(tmp_path / "out", rank_dir, "distrib_optim.pt")
        entry = buffers[0][(torch.bfloat16, torch.float32)]
        assert not entry["exp_avg"].any() and not entry["exp_avg_sq"].any()
    with read_optimizer_state(tmp_path / "out") as state:
        assert state.info.source["dp"] == 4


def test_the_fresh_state_reshards_like_any_other(tmp_path):
    hf = make_hf_model(tmp_path / "hf", "llama")
    hf_to_megatron(hf, tmp_path / "fresh", tp=2, pp=1, dtype="bf16", optimizer="fresh", dp=2,
                   distributed_optimizer=True, megatron_args=RUN)
    reshard(tmp_path / "fresh", tmp_path / "tp1pp2", tp=1, pp=2, dp=4)
    with open_checkpoint(hf) as source, read_optimizer_state(tmp_path / "tp1pp2") as state:
        assert (state.info.kind, state.info.step, state.info.source["dp"]) == ("distributed", 0, 4)
        full = source.tensor("decoder.layers.1.self_attention.linear_qkv.weight")
        assert torch.equal(state.tensor("decoder.layers.1.self_attention.linear_qkv.weight")["param"], full)


def test_megatron_s_scheduler_values_follow_its_flags():
    by_iterations = TrainingRun.from_megatron_args("--lr 1e-3 --lr-warmup-fraction 0.1 --lr-decay-iters 50 "
                                                   "--train-iters 100 --micro-batch-size 4")
    assert by_iterations.scheduler_state(dp=2) == {
        "max_lr": 1e-3, "lr_warmup_steps": 0.1 * 50 * 8, "num_steps": 0, "lr_decay_style": "linear",
        "lr_decay_steps": 50 * 8, "min_lr": 0.0, "start_wd": 0.01, "end_wd": 0.01, "wd_incr_style": "constant",
        "wd_incr_steps": 100 * 8}  # global batch = micro batch x DP when not given
    by_samples = TrainingRun.from_megatron_args(["--lr", "1e-3", "--train-samples", "1000", "--lr-warmup-samples",
                                                 "10", "--weight-decay-incr-style", "linear",
                                                 "--start-weight-decay", "0.0", "--end-weight-decay", "0.1"])
    state = by_samples.scheduler_state()
    assert (state["lr_warmup_steps"], state["lr_decay_steps"], state["wd_incr_steps"]) == (10, 1000, 1000)
    assert [group["weight_decay"] for group in by_samples.param_groups()] == [0.0, 0.0]
    assert [group["lr"] for group in by_samples.param_groups()] == [0.0, 0.0]  # warmup starts at --lr-warmup-init
    groups = TrainingRun.from_megatron_args("--lr 2e-4 --min-lr 2e-5 --adam-beta2 0.95 --adam-eps 1e-5").param_groups()
    assert [(group["max_lr"], group["min_lr"], group["betas"], group["eps"], group["wd_mult"]) for group in groups] \
        == [(2e-4, 2e-5, (0.9, 0.95), 1e-5, 1.0), (2e-4, 2e-5, (0.9, 0.95), 1e-5, 0.0)]
    assert not TrainingRun.from_megatron_args("--lr 1e-4").knows_schedule()


def test_an_unknown_run_length_leaves_the_schedule_open_and_says_how_to_start(tmp_path):
    hf = make_hf_model(tmp_path / "hf", "gpt2")
    result = hf_to_megatron(hf, tmp_path / "out", tp=1, pp=1, optimizer="fresh", megatron_args="--lr 1e-4")
    assert any("--override-opt-param-scheduler" in note for note in result.notes)
    scheduler = rank_file(tmp_path / "out", "mp_rank_00")["opt_param_scheduler"]
    assert scheduler["num_steps"] == 0 and scheduler["max_lr"] == 1e-4 and scheduler["lr_decay_steps"] is None


@pytest.mark.parametrize("distributed, dtype", [(True, "bf16"), (False, "fp32"), (False, "bf16")])
def test_torch_dist_output_holds_the_same_fresh_state_as_per_rank_files(distributed, dtype, tmp_path):
    hf = make_hf_model(tmp_path / "hf", "llama")
    options = dict(tp=2, pp=1, dtype=dtype, optimizer="fresh", dp=2, distributed_optimizer=distributed,
                   megatron_args=RUN)
    hf_to_megatron(hf, tmp_path / "dist", format="torch_dist", **options)
    hf_to_megatron(hf, tmp_path / "torch", format="torch", **options)
    with open_checkpoint(tmp_path / "dist") as weights, read_optimizer_state(weights) as dist, \
            read_optimizer_state(tmp_path / "torch") as per_rank:
        assert dist.info.step == per_rank.info.step == 0 and dist.info.param_groups == per_rank.info.param_groups
        assert dist.info.kind == ("distributed" if distributed else "non-distributed")
        assert masters_match_weights(dist, weights) == []
        for tensor in dist.canonical():
            ours, theirs = dist.tensor(tensor.name), per_rank.tensor(tensor.name)
            assert all(torch.equal(ours[key], theirs[key]) for key in ours), tensor.name
            assert ours["exp_avg"].abs().sum() == 0 and ours["exp_avg_sq"].abs().sum() == 0


def test_what_megatron_would_not_load_is_refused_before_anything_is_written(tmp_path):
    hf = make_hf_model(tmp_path / "hf", "gpt2")
    with pytest.raises(BadInput, match="needs the training run's --lr"):
        hf_to_megatron(hf, tmp_path / "out", tp=1, pp=1, optimizer="fresh")
    with pytest.raises(BadInput, match="add --optimizer fresh"):
        hf_to_megatron(hf, tmp_path / "out", tp=1, pp=1, dp=4)
    with pytest.raises(Unsupported, match="default parameter groups"):
        hf_to_megatron(hf, tmp_path / "out", tp=1, pp=1, optimizer="fresh", megatron_args="--lr 1 --decoupled-lr 2")
    with pytest.raises(Unsupported, match="fresh plain optimizer in an fp16 torch_dist"):
        hf_to_megatron(hf, tmp_path / "out", tp=1, pp=1, dtype="fp16", format="torch_dist", optimizer="fresh",
                       megatron_args=RUN)
    assert not (tmp_path / "out").exists()


def test_from_the_command_line_with_a_plan_and_in_worker_processes(tmp_path):
    hf = make_hf_model(tmp_path / "hf", "llama")
    args = ["hf-to-megatron", str(hf), str(tmp_path / "out"), "--tp", "2", "--pp", "1", "--dtype", "bf16",
            "--optimizer", "fresh", "--dp", "2", "--distributed-optimizer", "--megatron-args", RUN, "--json"]
    planned = CliRunner().invoke(main, args + ["--dry-run"])
    assert planned.exit_code == 0, planned.output
    plan = json.loads(planned.stdout)["plan"]
    assert plan["target"]["optimizer"] == {"distributed": True, "dp": 2}
    assert "iter_0000000/mp_rank_01/distrib_optim.pt" in plan["finish_files"]
    written = CliRunner().invoke(main, args + ["--workers", "2"])
    assert written.exit_code == 0, written.output
    with open_checkpoint(tmp_path / "out") as weights, read_optimizer_state(weights) as state:
        assert masters_match_weights(state, weights) == []
    assert pickle.loads(pickle.dumps(FreshStateOf(TrainingRun.from_megatron_args(RUN), True, 2))).dp == 2


def test_docstring_examples_run(tmp_path, monkeypatch):
    make_hf_model(tmp_path / "llama-hf", "llama")
    monkeypatch.chdir(tmp_path)
    results = doctest.testmod(importlib.import_module("ckptkit.optimizer.fresh"))
    assert results.attempted > 0 and results.failed == 0
