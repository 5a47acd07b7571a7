"""Trainer checkpoints hold Megatron's optimizer state: a run resumes exactly at its own
layout and, after ``ckptkit.convert.reshard``, at another TP/PP/DP, with or without the
distributed optimizer; resharding away and back returns every optimizer buffer."""
from __future__ import annotations

import dataclasses
import functools
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from ckptkit.convert import reshard
from ckptkit.layouts import open_checkpoint
from ckptkit.optimizer import read_optimizer_state
from ckptkit.optimizer.verify import masters_match_weights
from ckptkit.safe_load import safe_torch_load
from ckptkit.spec import ModelSpec
from ckptkit.train import TrainConfig, train
from ckptkit.train.optim import AdamConfig

from conftest import fixture_path

GPT2 = ModelSpec(family="gpt2", num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=4,
                 ffn_hidden_size=64, vocab_size=200, max_position_embeddings=32, head_dim=8)
STEPS, SAVED = 5, 2  # the uninterrupted run, and the iteration it is resumed from
# Runs of different layouts differ by the order of float32 reductions only (TP splits the matrix
# products, DP the gradient sums): resumed at another layout the largest loss difference measured is
# 4.8e-7, one float32 step at these losses (5.5); a fresh optimizer instead is 2.3e-2 off by the second step.
LOSS_ATOL = 1e-6
BUFFERS = ("param", "exp_avg", "exp_avg_sq")

LAYOUTS = {
    "TP2-distributed": dict(tp=2, distributed_optimizer=True),
    "TP1-PP2-DP2-distributed": dict(pp=2, dp=2, distributed_optimizer=True),
    "DP2-distributed": dict(dp=2, distributed_optimizer=True),
    "TP2": dict(tp=2),
    "PP2": dict(pp=2),
    "TP2-DP2-distributed": dict(tp=2, dp=2, distributed_optimizer=True),
    "TP1-PP2-DP4": dict(pp=2, dp=4),
}
# (L1, L2): TP, PP and DP all change, the distributed optimizer on at least one side
PAIRS = [("TP2-distributed", "TP1-PP2-DP2-distributed"), ("DP2-distributed", "TP2"), ("PP2", "TP2-DP2-distributed")]


def config(layout: str, **changes) -> TrainConfig:
    # lr 1e-2: large enough that Adam's moments move the weights visibly within three steps
    base = TrainConfig(model=GPT2, steps=STEPS, micro_batch_size=1, global_batch_size=4, seq_length=16,
                       make_vocab_size_divisible_by=64, optimizer=AdamConfig(lr=1e-2, warmup_steps=1),
                       device="cpu", dtype="float32", **LAYOUTS[layout])
    return dataclasses.replace(base, **changes)


_FOLDER = Path(tempfile.mkdtemp(prefix="ckptkit-train-optimizer-"))


@functools.cache
def uninterrupted(layout: str):
    """``STEPS`` steps at ``layout``, saved at ``SAVED`` (shared by the tests below)."""
    result = train(config(layout, save=str(_FOLDER / layout), save_interval=SAVED))
    return _FOLDER / layout / f"iter_{SAVED:07d}", result


@pytest.fixture(scope="module", autouse=True)
def _remove_runs():
    yield
    shutil.rmtree(_FOLDER, ignore_errors=True)


def resharded(source: Path, destination: Path, layout: str, **options) -> Path:
    sizes = LAYOUTS[layout]
    reshard(source, destination, tp=sizes.get("tp", 1), pp=sizes.get("pp", 1), dp=sizes.get("dp", 1),
            distributed_optimizer=sizes.get("distributed_optimizer", False), **options)
    return destination


# ---------------------------------------------------------------------------- the files

def test_distributed_run_writes_distrib_optim_files_that_ckptkit_reads_as_its_state():
    saved, _ = uninterrupted("TP2-distributed")
    assert sorted(path.name for path in saved.iterdir()) == ["mp_rank_00", "mp_rank_01"]  # nothing left beside them
    for tp_rank in range(2):
        buffers = safe_torch_load(saved / f"mp_rank_{tp_rank:02d}" / "distrib_optim.pt")
        assert buffers["buckets_coalesced"] and set(buffers[0]) == {(torch.float32, torch.float32)}
        entry = safe_torch_load(saved / f"mp_rank_{tp_rank:02d}" / "model_optim_rng.pt")
        assert [group["step"] for group in entry["optimizer"]["optimizer"]["param_groups"]] == [2.0, 2.0]
        assert entry["opt_param_scheduler"]["num_steps"] == SAVED * 4  # samples, as Megatron counts
        assert entry["args"].use_distributed_optimizer and entry["args"].data_parallel_size == 1
        assert set(entry["rng_state"][0]) >= {"torch_rng_state", "np_rng_state"}
    with open_checkpoint(saved) as weights, read_optimizer_state(weights) as state:
        assert (state.info.kind, state.info.step, state.info.source["tp"]) == ("distributed", 2.0, 2)
        assert masters_match_weights(state, weights) == []  # every master in its parameter's place
        moments = state.tensor("decoder.layers.1.self_attention.linear_qkv.weight")["exp_avg_sq"]
        assert moments.shape == (96, 32) and (moments > 0).all()


def test_non_distributed_run_writes_adam_state_dicts_with_a_step_per_parameter():
    saved, _ = uninterrupted("PP2")
    for stage in range(2):
        adam = safe_torch_load(saved / f"mp_rank_00_{stage:03d}" / "model_optim_rng.pt")["optimizer"]
        assert {value["step"].item() for value in adam["state"].values()} == {2.0}
        assert [group["wd_mult"] for group in adam["param_groups"]] == [1.0, 0.0]
    assert not list(saved.rglob("distrib_optim.pt"))
    with open_checkpoint(saved) as weights, read_optimizer_state(weights) as state:
        assert state.info.kind == "non-distributed" and masters_match_weights(state, weights) == []


def test_a_bf16_run_keeps_fp32_master_copies_apart_and_resumes_bit_for_bit(tmp_path):
    run = config("PP2", dtype="bfloat16", steps=4, save=str(tmp_path / "run"), save_interval=SAVED)
    full = train(run)
    saved = tmp_path / "run" / f"iter_{SAVED:07d}"
    entry = safe_torch_load(saved / "mp_rank_00_000" / "model_optim_rng.pt")
    masters = [master for group in entry["optimizer"]["fp32_from_fp16_params"] for master in group]
    assert {master.dtype for master in masters} == {torch.float32}
    assert {weight.dtype for weight in entry["model"].values() if weight is not None} == {torch.bfloat16}
    with open_checkpoint(saved) as weights, read_optimizer_state(weights) as state:
        assert masters_match_weights(state, weights) == []  # each master rounds to its bf16 weight
        master = state.tensor("decoder.layers.0.mlp.linear_fc1.weight")["param"]
        assert not torch.equal(master, master.to(torch.bfloat16).float())  # finer than the weights
    resumed = train(dataclasses.replace(run, load=str(saved), save=None))
    assert resumed.losses == full.losses[SAVED:]


# ---------------------------------------------------------------------------- resuming

@pytest.mark.parametrize("layout", sorted({layout for pair in PAIRS for layout in pair[:1]}))
def test_resuming_at_the_same_layout_continues_the_run_bit_for_bit(layout):
    saved, full = uninterrupted(layout)
    resumed = train(config(layout, load=str(saved)))
    assert [record.step for record in resumed.records] == [3, 4, 5]
    assert resumed.losses == full.losses[SAVED:]
    assert [r.grad_norm for r in resumed.records] == [r.grad_norm for r in full.records[SAVED:]]


@functools.cache
def resumed_after_reshard(first: str, second: str):
    """The run of ``first`` resharded at ``SAVED`` to ``second`` and resumed there."""
    saved, _ = uninterrupted(first)
    destination = resharded(saved, _FOLDER / f"{first}-as-{second}", second)
    return train(config(second, load=str(destination)))


@pytest.mark.parametrize("first,second", PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_resuming_a_resharded_checkpoint_at_another_layout_follows_the_uninterrupted_run(first, second):
    _, full = uninterrupted(first)
    resumed = resumed_after_reshard(first, second)
    assert resumed.start_iteration == SAVED
    assert resumed.losses == pytest.approx(full.losses[SAVED:], abs=LOSS_ATOL)
    assert [r.grad_norm for r in resumed.records] == pytest.approx([r.grad_norm for r in full.records[SAVED:]],
                                                                   rel=1e-5)


def test_the_trainer_reads_another_layouts_state_itself_as_the_reshard_writes_it():
    first, second = PAIRS[0]
    saved, _ = uninterrupted(first)
    direct = train(config(second, load=str(saved)))  # TP2 state cut for TP1 PP2 DP2 as the trainer loads it
    assert direct.losses == resumed_after_reshard(first, second).losses
    assert [r.grad_norm for r in direct.records] == [r.grad_norm for r in resumed_after_reshard(first, second).records]


def test_without_the_optimizer_state_the_resumed_run_leaves_the_uninterrupted_one(tmp_path):
    # What the agreement above rests on: a fresh Adam takes other steps from the same weights.
    first, second = PAIRS[0]
    saved, full = uninterrupted(first)
    resumed = train(config(second, load=str(resharded(saved, tmp_path / second, second, optimizer=False))))
    assert resumed.losses[0] == pytest.approx(full.losses[SAVED], abs=LOSS_ATOL)  # same weights
    assert max(abs(a - b) for a, b in zip(resumed.losses[1:], full.losses[SAVED + 1:])) > 1000 * LOSS_ATOL


# ---------------------------------------------------------------------------- resharding and back

def _assert_same(original, returned, where: str) -> None:
    """Equal objects, tensors bit for bit."""
    if isinstance(original, torch.Tensor):
        assert isinstance(returned, torch.Tensor) and original.dtype == returned.dtype, where
        assert torch.equal(original, returned), where
    elif isinstance(original, dict):
        assert list(original) == list(returned), where
        for key in original:
            _assert_same(original[key], returned[key], f"{where}[{key!r}]")
    elif isinstance(original, (list, tuple)):
        assert len(original) == len(returned), where
        for index, (left, right) in enumerate(zip(original, returned)):
            _assert_same(left, right, f"{where}[{index}]")
    else:
        assert original == returned, where


ROUND_TRIPS = [("TP2-distributed", "TP1-PP2-DP4"), ("PP2", "TP2-DP2-distributed")]


@pytest.mark.parametrize("first,second", ROUND_TRIPS, ids=[f"{a}->{b}->{a}" for a, b in ROUND_TRIPS])
def test_resharding_a_trainer_checkpoint_away_and_back_returns_every_optimizer_buffer_bit_for_bit(first, second,
                                                                                               tmp_path):
    saved, _ = uninterrupted(first)
    back = resharded(resharded(saved, tmp_path / second, second), tmp_path / "back", first)
    rank_folders = sorted(path.name for path in saved.iterdir())
    assert sorted(path.name for path in (back / saved.name).iterdir()) == rank_folders
    for folder in rank_folders:
        original, returned = saved / folder, back / saved.name / folder
        if LAYOUTS[first].get("distributed_optimizer"):
            _assert_same(safe_torch_load(original / "distrib_optim.pt"), safe_torch_load(returned / "distrib_optim.pt"),
                         f"{folder}/distrib_optim.pt")
        original, returned = (safe_torch_load(path / "model_optim_rng.pt") for path in (original, returned))
        for entry in ("optimizer", "opt_param_scheduler", "num_floating_point_operations_so_far"):
            _assert_same(original[entry], returned[entry], f"{folder}/model_optim_rng.pt[{entry!r}]")


# ---------------------------------------------------------------------------- Megatron's own state

def test_a_real_megatron_distributed_optimizer_state_goes_through_the_trainer_unchanged(tmp_path):
    # Megatron-LM's TP2 DP2 run (fp32, distributed optimizer), loaded at TP1 DP1 without the
    # distributed optimizer and saved again without a step: every canonical state tensor is kept.
    source = fixture_path("gpt2do_tp2dp2", "legacy")
    result = train(TrainConfig(steps=10, micro_batch_size=2, seq_length=32, load=str(source),
                               make_vocab_size_divisible_by=256, save=str(tmp_path / "trainer"), device="cpu"))
    assert (result.start_iteration, result.iteration) == (10, 10)
    with read_optimizer_state(source) as megatron, read_optimizer_state(tmp_path / "trainer") as ours:
        assert (ours.info.kind, ours.info.step, megatron.info.step) == ("non-distributed", 10.0, 10.0)
        assert ours.padded_vocab_size == megatron.padded_vocab_size == 1024
        for canonical in megatron.canonical():
            expected, written = megatron.tensor(canonical.name), ours.tensor(canonical.name)
            for key in BUFFERS:
                assert torch.equal(written[key], expected[key]), (canonical.name, key)
