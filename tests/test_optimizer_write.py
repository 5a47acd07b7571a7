"""Optimizer state written as Megatron lays it out, for any TP/PP/VPP/DP, distributed or
not: the real TP2 DP2 fixture's state survives a trip through other layouts bit for bit."""
import doctest
import importlib
import shutil
import warnings
import zlib

import pytest
import torch

from ckptkit.convert import reshard
from ckptkit.errors import BadInput
from ckptkit.layouts.megatron_common import TargetLayout
from ckptkit.optimizer import OptimizerTarget, output_files, read_optimizer_state, write_optimizer_state
from ckptkit.optimizer.state import OptimizerInfo, OptimizerState
from ckptkit.safe_load import safe_torch_load
from ckptkit.spec import rule_for

from conftest import fixture_path

DISTRIBUTED = ("gpt2do_tp2dp2", "legacy")
FP32 = (torch.float32, torch.float32)


def resharded_with_optimizer(source, destination, target: OptimizerTarget, *, dtype=None):
    """``source``'s weights and optimizer state at ``target``'s layout."""
    reshard(source, destination, tp=target.tp, pp=target.pp, vpp=target.vpp, dtype=dtype,
            make_vocab_size_divisible_by=target.make_vocab_size_divisible_by, optimizer=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with read_optimizer_state(source) as state:
            return write_optimizer_state(state, destination, target)


def rank_files(root, name, tp=2):
    return [safe_torch_load(root / "iter_0000010" / f"mp_rank_{tp_rank:02d}" / name) for tp_rank in range(tp)]


TRIPS = {
    "tp1-dp1": OptimizerTarget(tp=1, dp=1, iteration=10),
    "tp1-dp2": OptimizerTarget(tp=1, dp=2, iteration=10),
    "tp2-dp1": OptimizerTarget(tp=2, dp=1, iteration=10),
    "tp1-pp2-dp4": OptimizerTarget(tp=1, pp=2, dp=4, iteration=10),
    "tp1-pp2-non-distributed": OptimizerTarget(tp=1, pp=2, distributed=False, iteration=10),
    "tp2-bf16-non-distributed": OptimizerTarget(tp=2, distributed=False, param_dtype=torch.bfloat16, iteration=10),
    "tp1-bf16-dp3": OptimizerTarget(tp=1, dp=3, param_dtype=torch.bfloat16, iteration=10),
}


@pytest.mark.parametrize("trip", TRIPS, ids=list(TRIPS))
def test_real_state_goes_to_another_layout_and_back_bit_for_bit(trip, tmp_path):
    source = fixture_path(*DISTRIBUTED)
    target = TRIPS[trip]
    dtype = "bf16" if target.param_dtype == torch.bfloat16 else None
    resharded_with_optimizer(source, tmp_path / "there", target, dtype=dtype)
    back = resharded_with_optimizer(tmp_path / "there", tmp_path / "back", OptimizerTarget(tp=2, dp=2, iteration=10),
                                    dtype="fp32" if dtype else None)
    assert back == [f"iter_0000010/mp_rank_{tp_rank:02d}/{name}" for tp_rank in range(2)
                    for name in ("distrib_optim.pt", "model_optim_rng.pt")]
    for original, returned in zip(rank_files(source, "distrib_optim.pt"), rank_files(tmp_path / "back", "distrib_optim.pt")):
        assert sorted(returned, key=str) == sorted(original, key=str)
        for key in ("param", "exp_avg", "exp_avg_sq"):
            assert torch.equal(returned[0][FP32][key], original[0][FP32][key]), key
        assert returned[0][FP32]["numel_unpadded"] == original[0][FP32]["numel_unpadded"] == 87424
    for original, returned in zip(rank_files(source, "model_optim_rng.pt"), rank_files(tmp_path / "back", "model_optim_rng.pt")):
        assert returned["optimizer"] == original["optimizer"]
        assert returned["opt_param_scheduler"] == original["opt_param_scheduler"]
        assert returned["num_floating_point_operations_so_far"] == original["num_floating_point_operations_so_far"]


def test_non_distributed_state_is_pytorch_adam_s_state_dict_numbered_over_megatron_s_groups(tmp_path):
    resharded_with_optimizer(fixture_path(*DISTRIBUTED), tmp_path / "out",
                             OptimizerTarget(tp=1, distributed=False, param_dtype=torch.bfloat16, iteration=10),
                             dtype="bf16")
    saved = safe_torch_load(tmp_path / "out" / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt")
    entry = saved["optimizer"]
    decay, no_decay = entry["optimizer"]["param_groups"]
    assert (decay["wd_mult"], no_decay["wd_mult"]) == (1.0, 0.0)
    # matrices decay; biases and norms do not (2 layers x 4 matrices, 2 embeddings)
    assert decay["params"] == list(range(10)) and no_decay["params"] == list(range(10, 28))
    adam = entry["optimizer"]["state"]
    assert sorted(adam) == list(range(28)) and all(value["step"].item() == 10.0 for value in adam.values())
    masters = entry["fp32_from_fp16_params"]
    assert [len(group) for group in masters] == [10, 18] and all(m.dtype == torch.float32 for g in masters for m in g)
    # the first decay parameter is the word embeddings: the fp32 master rounds to the stored bf16 weight
    assert torch.equal(masters[0][0].to(torch.bfloat16), saved["model"]["embedding.word_embeddings.weight"])
    assert saved["args"].use_distributed_optimizer is False
    assert not (tmp_path / "out" / "iter_0000010" / "mp_rank_00" / "distrib_optim.pt").exists()


def test_added_vocabulary_padding_rows_get_zero_state_and_kept_rows_keep_theirs(tmp_path):
    target = OptimizerTarget(tp=1, dp=2, iteration=10, make_vocab_size_divisible_by=384)  # 1152 rows
    resharded_with_optimizer(fixture_path(*DISTRIBUTED), tmp_path / "out", target)
    with read_optimizer_state(fixture_path(*DISTRIBUTED)) as before, read_optimizer_state(tmp_path / "out") as after:
        assert after.padded_vocab_size == 1152
        old, new = before.tensor("embedding.word_embeddings.weight"), after.tensor("embedding.word_embeddings.weight")
        for key in old:
            assert torch.equal(new[key][:1024], old[key])
            assert not new[key][1024:].any()
        with open_weights(tmp_path / "out") as weights:  # the master copies are the weights, padding included
            assert torch.equal(weights.tensor("embedding.word_embeddings.weight"), new["param"])


def open_weights(path):
    from ckptkit.layouts import open_checkpoint
    return open_checkpoint(path)


class SyntheticState(OptimizerState):
    """Distinct made-up values for every canonical tensor (from a hash of its name)."""

    def __init__(self, spec, padded_vocab_size):
        self.spec, self.padded_vocab_size = spec, padded_vocab_size
        self.info = OptimizerInfo(kind="distributed", step=7.0, param_groups=[{"wd_mult": 1.0}, {"wd_mult": 0.0}],
                                  source={"tp": 0})

    def tensor(self, name, keys=("param", "exp_avg", "exp_avg_sq")):
        canonical = next(tensor for tensor in self.canonical() if tensor.name == name)
        shape = rule_for(self.spec, canonical.rule, self.padded_vocab_size).full_shape(canonical.shape)
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        values = {key: torch.randn(shape, generator=generator) for key in ("param", "exp_avg", "exp_avg_sq")}
        return {key: values[key] for key in keys}


def test_virtual_pipeline_chunks_and_the_tied_head_copy_are_written_where_megatron_keeps_them(tmp_path):
    """8 layers at TP2 PP2 VPP2 with tied embeddings: one buffer per chunk; the word
    embeddings (first stage, chunk 0) and their copy for the head (last stage, last chunk)
    each in a bucket of their own, with the same state."""
    source = fixture_path("vpp_tp2pp2v2", "conv", "torch")
    reshard(source, tmp_path / "out", tp=2, pp=2, vpp=2)
    with open_weights(tmp_path / "out") as weights:
        state = SyntheticState(weights.spec, weights.meta.padded_vocab_size)
    write_optimizer_state(state, tmp_path / "out", OptimizerTarget(tp=2, pp=2, vpp=2, dp=2, iteration=10))
    with read_optimizer_state(tmp_path / "out") as written:
        for canonical in written.canonical():
            expected, found = state.tensor(canonical.name), written.tensor(canonical.name)
            assert all(torch.equal(found[key], expected[key]) for key in expected), canonical.name
        first = written._layouts[(0, 0, 0)].buffers  # (TP rank, PP stage, EP rank)
        last = written._layouts[(1, 1, 0)].buffers
    assert len(first) == len(last) == 2
    assert [len(buffer.buckets) for buffer in first] == [2, 1] and [len(buffer.buckets) for buffer in last] == [1, 2]
    assert first[0].slots[-1].parameter.name == "embedding.word_embeddings.weight"
    assert last[1].slots[0].parameter.name == "output_layer.weight" and last[1].slots[0].parameter.tied_copy
    stored = safe_torch_load(tmp_path / "out" / "iter_0000010" / "mp_rank_01_001" / "distrib_optim.pt")
    head = last[1].slots[0]
    embedding = state.tensor("embedding.word_embeddings.weight")["exp_avg"]
    head_piece = stored[1][FP32]["exp_avg"][last[1].stored_offset(head):][:head.parameter.numel]
    assert torch.equal(head_piece.view(head.parameter.shape), embedding[512:])


def test_rng_state_is_carried_to_the_same_layout_only(tmp_path):
    source = fixture_path(*DISTRIBUTED)
    resharded_with_optimizer(source, tmp_path / "dp4", OptimizerTarget(tp=2, dp=4, iteration=10))
    original = rank_files(source, "model_optim_rng.pt")[1]["rng_state"]
    carried = rank_files(tmp_path / "dp4", "model_optim_rng.pt")[1]["rng_state"]
    assert torch.equal(carried[0]["torch_rng_state"], original[0]["torch_rng_state"])
    assert carried[0]["rng_tracker_states"].keys() == original[0]["rng_tracker_states"].keys()
    reshard(source, tmp_path / "tp1", tp=1, pp=1)
    with read_optimizer_state(source) as state, pytest.warns(UserWarning, match="rng_state is not carried"):
        write_optimizer_state(state, tmp_path / "tp1", OptimizerTarget(tp=1, iteration=10))
    assert "rng_state" not in rank_files(tmp_path / "tp1", "model_optim_rng.pt", tp=1)[0]


def test_args_say_which_optimizer_and_data_parallel_size_the_state_is_for(tmp_path):
    resharded_with_optimizer(fixture_path(*DISTRIBUTED), tmp_path / "out", OptimizerTarget(tp=1, dp=8, iteration=10))
    args = rank_files(tmp_path / "out", "model_optim_rng.pt", tp=1)[0]["args"]
    assert (args.use_distributed_optimizer, args.data_parallel_size, args.tensor_model_parallel_size) == (True, 8, 1)


def megatron_resume_mismatches(checkpoint_args, run_args) -> list[str]:
    """What Megatron's check_checkpoint_args (megatron/training/checkpointing.py) finds
    different between a checkpoint's args and those of the run that loads it (no vocab
    file, torch format)."""
    compared = {name: getattr(checkpoint_args, name) for name in
                ("num_layers", "hidden_size", "num_attention_heads", "tensor_model_parallel_size",
                 "pipeline_model_parallel_size")}
    compared["add_position_embedding"] = getattr(checkpoint_args, "add_position_embedding", True)
    return [name for name, value in compared.items() if value != getattr(run_args, name)]


def test_a_resharded_rope_model_resumes_with_the_command_line_of_the_run_that_wrote_it(tmp_path):
    """Megatron resuming compares the checkpoint's add_position_embedding (default True)
    with the run's, True for a RoPE model unless the deprecated --no-position-embedding is
    given. The weight writer's args say False for RoPE, and every Megatron resume of a
    resharded Llama stopped at "add_position_embedding value from checkpoint (False) is not
    equal to the input argument value (True)". The optimizer writer gives the source run's value."""
    from argparse import Namespace
    source = fixture_path("llama_tp2pp2", "conv", "torch")  # RoPE, written by Megatron
    with open_weights(source) as weights:
        run_args = weights.meta.args
    assert run_args.position_embedding_type == "rope" and run_args.add_position_embedding is True
    reshard(source, tmp_path / "tp1", tp=1, pp=1)
    with open_weights(tmp_path / "tp1") as weights:  # made-up state of a TP1 DP2 run: Megatron's default
        state = SyntheticState(weights.spec, weights.meta.padded_vocab_size)
    write_optimizer_state(state, tmp_path / "tp1", OptimizerTarget(tp=1, dp=2, param_dtype=torch.bfloat16,
                                                                   iteration=10))
    for name, tp, pp, distributed in (("tp2", 2, 1, True), ("pp2", 1, 2, True), ("nodist", 1, 1, False)):
        target = OptimizerTarget(tp=tp, pp=pp, dp=1, distributed=distributed, param_dtype=torch.bfloat16,
                                 iteration=10)
        resharded_with_optimizer(tmp_path / "tp1", tmp_path / name, target)
        for relative in output_files(target):
            if relative.endswith("model_optim_rng.pt"):
                args = safe_torch_load(tmp_path / name / relative)["args"]
                resuming = Namespace(**{**vars(run_args), "tensor_model_parallel_size": tp,
                                        "pipeline_model_parallel_size": pp})
                assert megatron_resume_mismatches(args, resuming) == [], relative
    # a source run that gave --no-position-embedding: its resume gives it again
    state.info.resume_args = {"add_position_embedding": False}
    reshard(source, tmp_path / "off", tp=1, pp=1)
    write_optimizer_state(state, tmp_path / "off", OptimizerTarget(tp=1, param_dtype=torch.bfloat16, iteration=10))
    assert rank_files(tmp_path / "off", "model_optim_rng.pt", tp=1)[0]["args"].add_position_embedding is False


def test_a_release_target_is_refused_since_megatron_loads_no_optimizer_from_it():
    with pytest.raises(BadInput, match="Megatron loads no optimizer state from a release checkpoint"):
        OptimizerTarget.from_layout(TargetLayout(tp=1, release=True), dp=2)
    target = OptimizerTarget.from_layout(TargetLayout(tp=2, pp=2, iteration=30, dtype=torch.bfloat16), dp=4)
    assert (target.tp, target.pp, target.dp, target.iteration, target.settings.buffer_key) == \
        (2, 2, 4, 30, (torch.bfloat16, torch.float32))


def test_bucket_settings_follow_the_args_of_the_run_that_resumes():
    from argparse import Namespace
    layout = TargetLayout(tp=2, iteration=10, dtype=torch.bfloat16)
    args = Namespace(bf16=True, overlap_grad_reduce=True, ddp_bucket_size=None, data_parallel_size=2)
    assert OptimizerTarget.from_layout(layout, dp=64, args=args).bucket_size == 64_000_000  # max(4e7, 1e6 x DP)
    assert OptimizerTarget.from_layout(layout, dp=4, args=Namespace(overlap_grad_reduce=False)).bucket_size is None


def test_the_weights_must_be_written_first(tmp_path):
    with read_optimizer_state(fixture_path(*DISTRIBUTED)) as state:
        with pytest.raises(BadInput, match=r"mp_rank_00/model_optim_rng.pt: missing; the weights are written first"):
            write_optimizer_state(state, tmp_path, OptimizerTarget(tp=1, iteration=10))


def test_docstring_examples_run(tmp_path, monkeypatch):
    (tmp_path / "checkpoints").mkdir()
    shutil.copytree(fixture_path(*DISTRIBUTED), tmp_path / "checkpoints" / "gpt2do")
    monkeypatch.chdir(tmp_path)
    results = doctest.testmod(importlib.import_module("ckptkit.optimizer.write"), optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0 and results.failed == 0


@pytest.mark.parametrize("zip64_limit", [None, 100], ids=["zip32", "zip64"])
def test_presized_file_fills_records_out_of_order_and_torch_loads_it(tmp_path, monkeypatch, zip64_limit):
    from ckptkit.optimizer import presized_file
    from ckptkit.optimizer.files import MetaFile

    if zip64_limit:  # records and offsets past the limit use ZIP64 fields, as files over 4 GiB do
        monkeypatch.setattr(presized_file, "ZIP64_LIMIT", zip64_limit)
    first, second = torch.randn(1000), torch.randn(37)
    path = tmp_path / "distrib_optim.pt"
    with presized_file.PresizedTorchFile(path, "distrib_optim", {"0": (torch.float32, 1000),
                                                                 "1": (torch.float32, 37)}) as out:
        out.append("1", second[:10])
        out.append("0", first[:500])
        out.append("1", second[10:])
        out.append("0", first[500:])
        out.finish({"buckets_coalesced": True, 0: {FP32: {"param": out.ref("0"), "exp_avg": out.ref("1")}}})
    for mmap in (False, True):
        loaded = torch.load(path, weights_only=True, mmap=mmap)[0][FP32]
        assert torch.equal(loaded["param"], first) and torch.equal(loaded["exp_avg"], second)
    meta = MetaFile(path)  # tensors located by their own headers, as ckptkit reads
    assert torch.equal(meta.read(meta.state[0][FP32]["exp_avg"], 30, 7), second[30:])
    assert meta.state[0][FP32]["param"].untyped_storage()._checkpoint_offset % 64 == 0
    meta.close()
