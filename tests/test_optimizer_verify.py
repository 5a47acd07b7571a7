"""Master copies rounded to the weights' dtype equal the stored weights: the check that
catches optimizer state attached to the wrong parameter."""
import doctest
import importlib
import shutil
import warnings

import torch

from ckptkit.convert import reshard
from ckptkit.layouts import open_checkpoint
from ckptkit.optimizer import OptimizerTarget, parameters, read_optimizer_state, write_optimizer_state
from ckptkit.optimizer.verify import masters_match_weights

from conftest import fixture_path

DISTRIBUTED = ("gpt2do_tp2dp2", "legacy")


def test_every_master_of_the_real_checkpoint_is_its_weight():
    with open_checkpoint(fixture_path(*DISTRIBUTED)) as weights, read_optimizer_state(weights) as state:
        assert masters_match_weights(state, weights) == []


def test_fp32_masters_of_a_bf16_reshard_round_to_its_weights(tmp_path):
    reshard(fixture_path(*DISTRIBUTED), tmp_path / "bf16", tp=1, pp=2, dtype="bf16")
    with warnings.catch_warnings(), read_optimizer_state(fixture_path(*DISTRIBUTED)) as state:
        warnings.simplefilter("ignore")
        write_optimizer_state(state, tmp_path / "bf16", OptimizerTarget(tp=1, pp=2, dp=2, iteration=10,
                                                                       param_dtype=torch.bfloat16))
    with open_checkpoint(tmp_path / "bf16") as weights, read_optimizer_state(weights) as state:
        assert weights.meta.dtype == torch.bfloat16
        assert masters_match_weights(state, weights) == []
        # the masters are fp32: most do not equal their bf16 weight without rounding
        master = state.tensor("decoder.layers.0.mlp.linear_fc1.weight", ("param",))["param"]
        assert (master != weights.tensor("decoder.layers.0.mlp.linear_fc1.weight").float()).float().mean() > 0.9


def test_state_read_in_the_canonical_order_instead_of_megatron_s_is_caught(monkeypatch):
    qkv_first = list(parameters._LAYER_ORDER)
    qkv_first[2:6] = qkv_first[4:6] + qkv_first[2:4]  # linear_qkv before linear_proj, as spec.py lists them
    monkeypatch.setattr(parameters, "_LAYER_ORDER", tuple(qkv_first))
    with open_checkpoint(fixture_path(*DISTRIBUTED)) as weights, read_optimizer_state(weights) as state:
        mismatches = masters_match_weights(state, weights)
    assert any(line.startswith("decoder.layers.0.self_attention.linear_proj.weight:") for line in mismatches)
    assert any("linear_qkv.weight: " in line for line in mismatches)


def test_docstring_example_runs(tmp_path, monkeypatch):
    (tmp_path / "checkpoints").mkdir()
    shutil.copytree(fixture_path(*DISTRIBUTED), tmp_path / "checkpoints" / "gpt2do")
    monkeypatch.chdir(tmp_path)
    results = doctest.testmod(importlib.import_module("ckptkit.optimizer.verify"))
    assert results.attempted > 0 and results.failed == 0
