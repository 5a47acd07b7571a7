"""Trainer checkpoints are Megatron per-rank files; loading them (or Megatron's own) is exact."""
from __future__ import annotations

import dataclasses
import functools
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from click.testing import CliRunner

from ckptkit.cli import main as ckptkit_cli
from ckptkit.layouts import open_checkpoint
from ckptkit.safe_load import safe_torch_load
from ckptkit.spec import ModelSpec
from ckptkit.train import TrainConfig, train
from ckptkit.train.logits import megatron_logits
from ckptkit.train.optim import AdamConfig

from conftest import fixture_path, reference_logits

GPT2 = ModelSpec(family="gpt2", num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=4,
                 ffn_hidden_size=64, vocab_size=200, max_position_embeddings=32, head_dim=8)
MEGATRON_RANK_FILE_KEYS = ["args", "checkpoint_version", "iteration", "model", "optimizer", "opt_param_scheduler",
                           "rng_state", "num_floating_point_operations_so_far"]


def config(**changes) -> TrainConfig:
    base = TrainConfig(model=GPT2, tp=2, pp=2, steps=4, micro_batch_size=2, global_batch_size=4, seq_length=16,
                       make_vocab_size_divisible_by=64, optimizer=AdamConfig(lr=1e-3), device="cpu",
                       dtype="float32")
    return dataclasses.replace(base, **changes)


@functools.cache
def uninterrupted_run():
    """TP2 x PP2, 4 steps, saved at iterations 2 and 4 (one training, shared by the tests below)."""
    folder = Path(tempfile.mkdtemp(prefix="ckptkit-train-test-"))
    result = train(config(save=str(folder / "run"), save_interval=2))
    return folder, result


@pytest.fixture(scope="module", autouse=True)
def _remove_run_folder():
    yield
    if uninterrupted_run.cache_info().currsize:
        shutil.rmtree(uninterrupted_run()[0], ignore_errors=True)


def test_saved_checkpoint_reloads_and_training_continues_identically(tmp_path):
    folder, full = uninterrupted_run()
    resumed = train(config(load=str(folder / "run" / "iter_0000002"), save=str(tmp_path / "resumed")))
    assert resumed.start_iteration == 2
    assert [record.step for record in resumed.records] == [3, 4]
    assert resumed.losses == full.losses[2:]  # same layout: optimizer state restored, bit-identical
    assert [r.grad_norm for r in resumed.records] == [r.grad_norm for r in full.records[2:]]


def test_trainer_writes_the_entries_megatron_writes_in_each_rank_file():
    folder, _ = uninterrupted_run()
    root = folder / "run"
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    state = safe_torch_load(root / "iter_0000004" / "mp_rank_01_001" / "model_optim_rng.pt")
    assert sorted(state) == sorted(MEGATRON_RANK_FILE_KEYS)
    assert state["iteration"] == 4 and state["checkpoint_version"] == 3.0
    args = state["args"]
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.padded_vocab_size) == (2, 2, 256)
    assert set(state["rng_state"][0]) == {"random_rng_state", "np_rng_state", "torch_rng_state", "cuda_rng_state",
                                          "rng_tracker_states"}
    assert state["opt_param_scheduler"]["num_steps"] == 4 * 4  # Megatron counts samples
    adam = state["optimizer"]  # Megatron's non-distributed optimizer: torch's Adam state dict
    assert [group["wd_mult"] for group in adam["param_groups"]] == [1.0, 0.0]
    assert {value["step"].item() for value in adam["state"].values()} == {4.0}
    assert state["args"].use_distributed_optimizer is False
    model = state["model"]
    assert list(model)[:3] == ["decoder.layers.0.input_layernorm.weight", "decoder.layers.0.input_layernorm.bias",
                               "decoder.layers.0.self_attention.linear_proj.weight"]
    assert model["output_layer.weight"].shape == (128, 32)


def test_trainer_checkpoint_reads_back_through_open_checkpoint():
    folder, _ = uninterrupted_run()
    with open_checkpoint(folder / "run") as reader:
        assert reader.spec == GPT2
        assert (reader.meta.tp, reader.meta.pp, reader.meta.iteration) == (2, 2, 4)
        assert reader.validate() == []  # tied head copy equals the embeddings, replicas agree
        assert reader.tensor("decoder.layers.3.mlp.linear_fc1.weight").shape == (64, 32)


def test_loading_at_another_layout_restores_the_optimizer_state_and_follows_the_run():
    folder, full = uninterrupted_run()
    resumed = train(config(tp=1, pp=1, steps=4, load=str(folder / "run" / "iter_0000002")))
    # Megatron's optimizer state of the TP2 PP2 files, cut for TP1 PP1: float32 rounding only.
    assert resumed.losses == pytest.approx(full.losses[2:], abs=1e-6)
    assert resumed.iteration == 4


def test_megatron_logits_of_a_trainer_checkpoint_agree_at_tp2pp2_and_after_resharding_to_tp1pp1():
    folder, _ = uninterrupted_run()
    tokens = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    at_tp2pp2 = megatron_logits(folder / "run", tokens)
    assert at_tp2pp2.shape == (2, 16, 256)
    single = Path(tempfile.mkdtemp(prefix="ckptkit-train-test-"))
    try:
        # zero more steps: a reshard through training
        train(config(tp=1, pp=1, steps=4, load=str(folder / "run"), save=str(single / "tp1")))
        assert (at_tp2pp2 - megatron_logits(single / "tp1", tokens)).abs().max() < 1e-5
    finally:
        shutil.rmtree(single, ignore_errors=True)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")])])
def test_training_resumed_from_a_ckptkit_resharded_checkpoint_has_the_losses_of_loading_the_original(device,
                                                                                                     tmp_path):
    # TP2 (2 ranks) for 4 steps, saved at 2; `ckptkit reshard` of iteration 2 to TP1 PP2; resumed there.
    run = config(tp=2, pp=1, device=device, save=str(tmp_path / "tp2"), save_interval=2)
    full = train(run)
    result = CliRunner().invoke(ckptkit_cli, ["reshard", str(tmp_path / "tp2" / "iter_0000002"),
                                              str(tmp_path / "tp1pp2"), "--tp", "1", "--pp", "2"])
    assert result.exit_code == 0, result.output
    resumed = train(config(tp=1, pp=2, device=device, load=str(tmp_path / "tp1pp2")))
    # The trainer resharding the TP2 files itself as it loads them: the same weights, so the same run.
    loaded = train(config(tp=1, pp=2, device=device, load=str(tmp_path / "tp2" / "iter_0000002")))
    assert (resumed.start_iteration, [record.step for record in resumed.records]) == (2, [3, 4])
    # The first resumed loss comes before any update: the uninterrupted run's, to float32 rounding.
    assert resumed.losses[0] == pytest.approx(full.losses[2], abs=1e-5)
    # Both restore the TP2 run's optimizer state (carried by the reshard, or cut by the trainer as it
    # loads): the same losses throughout, and those of the uninterrupted run.
    assert resumed.losses == pytest.approx(loaded.losses, abs=1e-6)
    assert resumed.losses == pytest.approx(full.losses[2:], abs=1e-5)
    assert [r.grad_norm for r in resumed.records] == pytest.approx([r.grad_norm for r in loaded.records], rel=1e-6)


REAL_MEGATRON = [
    # (fixture, folder inside it, max abs, mean abs): float32 fixtures to rounding; bf16 to bf16 rounding
    ("gpt2_tp2pp2", ("conv", "torch"), 1e-5, 1e-6),
    ("legacy_gpt2_tp2pp2", ("c22",), 1e-5, 1e-6),
    ("vpp_tp2pp2v2", ("conv", "torch"), 1e-5, 1e-6),
    ("llama_tp2pp2", ("conv", "torch"), 0.06, 0.008),
    ("qwen3_tp2", ("dist",), 1e-5, 1e-6),  # --qk-layernorm, --kv-channels 32 with hidden 128 / 8 heads
    ("llama31_tp2", ("dist",), 1e-5, 1e-6),  # --use-rope-scaling
]


@pytest.mark.parametrize("name,parts,max_error,mean_error", REAL_MEGATRON, ids=[case[0] for case in REAL_MEGATRON])
def test_real_megatron_checkpoint_run_in_its_own_layout_reproduces_megatron_logits(name, parts, max_error,
                                                                                  mean_error):
    path = fixture_path(name, *parts)
    reference = reference_logits(name)
    vocab = reference["vocab"]
    ours = megatron_logits(path, reference["tokens"])
    assert ours.shape == reference["logits"].shape
    error = (ours[..., :vocab] - reference["logits"][..., :vocab].float()).abs()
    assert error.max().item() < max_error
    assert error.mean().item() < mean_error


def test_training_from_a_real_megatron_checkpoint_continues_from_its_iteration(tmp_path):
    path = fixture_path("gpt2_tp2pp2", "conv", "torch")
    with pytest.warns(UserWarning, match="fresh optimizer"):  # converted files: an empty optimizer entry
        result = train(TrainConfig(tp=1, pp=1, steps=12, micro_batch_size=2, seq_length=32, load=str(path),
                                   save=str(tmp_path / "continued"), device="cpu"))
    assert (result.start_iteration, result.iteration) == (10, 12)
    assert [record.step for record in result.records] == [11, 12]
    with open_checkpoint(tmp_path / "continued") as reader:
        assert reader.meta.iteration == 12 and reader.spec.num_layers == 6
