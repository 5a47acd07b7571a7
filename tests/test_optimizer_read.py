"""Optimizer state read into canonical form: per canonical tensor, the full fp32 master
copy and Adam moments, merged from the TP pieces by the tensor's own rule."""
import doctest
import importlib
import shutil

import pytest
import torch

from ckptkit.errors import BadInput
from ckptkit.layouts import open_checkpoint
from ckptkit.optimizer import read_optimizer_state
from ckptkit.optimizer.parameters import ChunkPlace, chunk_parameters
from ckptkit.optimizer.per_rank import group_index
from ckptkit.spec import rule_for

from conftest import fixture_path, make_hf_model

DISTRIBUTED = ("gpt2do_tp2dp2", "legacy")
FP32 = (torch.float32, torch.float32)


def test_canonical_master_params_equal_the_merged_weights_bit_for_bit():
    with open_checkpoint(fixture_path(*DISTRIBUTED)) as weights, read_optimizer_state(weights) as state:
        names = [tensor.name for tensor in state.canonical()]
        assert len(names) == 28
        for name in names:
            assert torch.equal(state.tensor(name)["param"], weights.tensor(name)), name


def test_each_tp_rank_stored_its_rule_s_piece_of_the_canonical_state():
    """Cutting the canonical state with each tensor's rule gives back what each rank stored
    (fused QKV groups, row- and column-parallel blocks, padded vocabulary rows)."""
    with open_checkpoint(fixture_path(*DISTRIBUTED)) as weights, read_optimizer_state(weights) as state:
        for canonical in state.canonical():
            full = state.tensor(canonical.name)
            rule = rule_for(state.spec, canonical.rule, state.padded_vocab_size)
            pp_stage, chunk, position, _ = state._where[canonical.name]
            for tp_rank in range(2):
                stored = state._pieces(tp_rank, pp_stage, chunk, position)
                for key, values in full.items():
                    assert torch.equal(rule.split(values, 2)[tp_rank], stored[key]), (canonical.name, key, tp_rank)


def test_vocabulary_padding_rows_keep_their_state():
    # The tied head's logits for the 24 padding rows get gradients, so Megatron's Adam moved them.
    with read_optimizer_state(fixture_path(*DISTRIBUTED)) as state:
        embedding = state.tensor("embedding.word_embeddings.weight")
        assert state.spec.vocab_size == 1000 and state.padded_vocab_size == 1024
        assert all(values.shape == (1024, 64) for values in embedding.values())
        assert embedding["exp_avg_sq"][1000:].count_nonzero() > 0


def test_replicated_weights_have_the_same_state_on_every_tp_rank():
    with read_optimizer_state(fixture_path(*DISTRIBUTED)) as state:
        for canonical in state.canonical():
            if canonical.rule != "replicated":
                continue
            pp_stage, chunk, position, _ = state._where[canonical.name]
            first, second = (state._pieces(tp_rank, pp_stage, chunk, position) for tp_rank in range(2))
            assert all(torch.equal(first[key], second[key]) for key in first), canonical.name


def test_step_param_groups_and_lr_schedule_come_with_the_state():
    with read_optimizer_state(fixture_path(*DISTRIBUTED)) as state:
        info = state.info
    assert (info.kind, info.step, info.grad_scaler) == ("distributed", 10.0, None)  # fp32: no grad scaler
    assert [group["wd_mult"] for group in info.param_groups] == [1.0, 0.0]
    assert info.param_groups[0]["weight_decay"] == 0.01 and info.param_groups[0]["betas"] == (0.9, 0.999)
    assert all("params" not in group and "step" not in group for group in info.param_groups)
    assert info.opt_param_scheduler["num_steps"] == 80 and info.opt_param_scheduler["lr_decay_style"] == "cosine"
    assert info.source == {"format": "torch", "tp": 2, "pp": 1, "vpp": 1, "ep": 1, "dp": 2, "param_dtype": "float32"}


def test_non_distributed_groups_and_order_match_the_real_bf16_master_copies():
    """Megatron's bf16 optimizer keeps fp32 masters per group (decay, then none for biases and
    1-D tensors), each in named_parameters() order: the converted Llama files carry such
    masters (taken from the weights), which fixes the grouping and the order."""
    with open_checkpoint(fixture_path("llama_tp2pp2", "conv", "torch")) as weights:
        meta = weights.meta
        for pp_stage in range(2):
            for tp_rank in range(2):
                saved = weights.rank_state(tp_rank, pp_stage)
                groups = saved["optimizer"]["optimizer"]["param_groups"]
                masters = saved["optimizer"]["fp32_from_fp16_params"]
                members = [[], []]
                for parameter in chunk_parameters(weights.spec, ChunkPlace(2, tp_rank, 2, pp_stage),
                                                  meta.padded_vocab_size):
                    members[group_index(parameter, groups, "test")].append(parameter)
                for group in range(2):
                    assert [tuple(master.shape) for master in masters[group]] == \
                        [parameter.shape for parameter in members[group]]
                    for master, parameter in zip(masters[group], members[group]):
                        assert torch.equal(master, saved["model"][parameter.name].float()), parameter.name


def test_files_written_without_the_optimizer_are_refused_saying_so(tmp_path):
    with pytest.raises(BadInput, match="holds no state .a fresh optimizer"):
        read_optimizer_state(fixture_path("llama_tp2pp2", "conv", "torch"))
    with pytest.raises(BadInput, match="hf-safetensors checkpoint holds no optimizer state"):
        read_optimizer_state(make_hf_model(tmp_path / "hf"))


def test_a_missing_distrib_optim_file_is_named(tmp_path):
    copy = tmp_path / "checkpoint"
    shutil.copytree(fixture_path(*DISTRIBUTED), copy)
    (copy / "iter_0000010" / "mp_rank_01" / "distrib_optim.pt").unlink()
    with read_optimizer_state(copy) as state:
        with pytest.raises(BadInput, match=r"mp_rank_01/distrib_optim.pt: missing; the optimizer entry of "
                                           r"model_optim_rng.pt is the distributed optimizer's"):
            state.tensor("decoder.layers.0.mlp.linear_fc1.weight")


def test_docstring_examples_run(tmp_path, monkeypatch):
    (tmp_path / "checkpoints").mkdir()
    shutil.copytree(fixture_path(*DISTRIBUTED), tmp_path / "checkpoints" / "gpt2do")
    monkeypatch.chdir(tmp_path)
    for module_name in ("ckptkit.optimizer", "ckptkit.optimizer.state"):
        results = doctest.testmod(importlib.import_module(module_name), optionflags=doctest.ELLIPSIS)
        assert results.attempted > 0 and results.failed == 0, module_name


def test_reads_take_only_the_requested_elements_from_the_files():
    with read_optimizer_state(fixture_path(*DISTRIBUTED)) as state:
        pieces = state._pieces(1, 0, 0, state._where["decoder.final_layernorm.weight"][2])
        stored = state._buffer_file(1, 0)
        assert stored._file.state[0][FP32]["param"].device.type == "meta"  # nothing but the pickle is loaded
        assert all(piece.untyped_storage().nbytes() == 64 * 4 for piece in pieces.values())
