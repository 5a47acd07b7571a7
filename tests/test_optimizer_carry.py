"""A conversion carries optimizer state through one writer: the per-rank weight writer
wrapped in WithOptimizerState plans, writes, finishes and checks as the engine drives it."""
import pytest
import torch

from ckptkit.errors import BadInput, Unsupported
from ckptkit.layouts import open_checkpoint
from ckptkit.layouts.megatron_common import TargetLayout
from ckptkit.layouts.megatron_legacy import RankFilesWriter
from ckptkit.layouts.torch_dist_writer import TorchDistWriter
from ckptkit.optimizer import OptimizerTarget, read_optimizer_state
from ckptkit.optimizer.carry import WithOptimizerState, optimizer_state_absence

from conftest import fixture_path, make_hf_model

DISTRIBUTED = ("gpt2do_tp2dp2", "legacy")


def convert_like_the_engine(source, out, writer):
    """What the conversion engine does with a writer, in one process: plan, write, finish, check."""
    with open_checkpoint(source) as reader:
        plan = writer.plan(reader)
        out.mkdir()
        files = writer.write(reader, plan, out)
        files += writer.finish(reader, plan, out)
        writer.check(plan, out, out)
        return plan, files


def test_resharding_writer_carries_the_state_to_the_new_layout(tmp_path):
    target = TargetLayout(tp=1, pp=2, iteration=10, dtype=torch.float32)
    writer = WithOptimizerState(RankFilesWriter(target, keep_source_args=True),
                                OptimizerTarget.from_layout(target, dp=2, distributed=True))
    plan, files = convert_like_the_engine(fixture_path(*DISTRIBUTED), tmp_path / "out", writer)
    optimizer_files = ["iter_0000010/mp_rank_00_000/distrib_optim.pt", "iter_0000010/mp_rank_00_001/distrib_optim.pt"]
    assert plan.finish_files == ["latest_checkpointed_iteration.txt", *optimizer_files]
    assert plan.target["optimizer"] == {"distributed": True, "dp": 2}
    assert files == [planned.path for planned in plan.files] + plan.finish_files
    with read_optimizer_state(fixture_path(*DISTRIBUTED)) as before, read_optimizer_state(tmp_path / "out") as after:
        assert after.info.step == before.info.step and after.info.param_groups == before.info.param_groups
        for canonical in before.canonical():
            old, new = before.tensor(canonical.name), after.tensor(canonical.name)
            assert all(torch.equal(new[key], old[key]) for key in old), canonical.name


def test_checkpoints_say_whether_they_have_state_to_carry(tmp_path):
    with open_checkpoint(fixture_path(*DISTRIBUTED)) as reader:
        assert optimizer_state_absence(reader) is None
    with open_checkpoint(fixture_path("llama_tp2pp2", "conv", "torch")) as reader:
        assert "holds no state (a fresh optimizer" in optimizer_state_absence(reader)
    with open_checkpoint(make_hf_model(tmp_path / "hf")) as reader:
        assert "holds no optimizer state" in optimizer_state_absence(reader)


def test_torch_dist_output_with_optimizer_state_is_refused_before_anything_is_written(tmp_path):
    target = TargetLayout(tp=1, iteration=10, dtype=torch.float32)
    writer = WithOptimizerState(TorchDistWriter(target, keep_source_args=True), OptimizerTarget.from_layout(target))
    with open_checkpoint(fixture_path(*DISTRIBUTED)) as reader:
        with pytest.raises(Unsupported, match="optimizer state in torch_dist checkpoints is not written yet"):
            writer.plan(reader)


def test_a_conversion_carries_the_state_where_it_can_and_says_why_not_elsewhere(tmp_path):
    from ckptkit.optimizer.carry import with_optimizer_state

    target = TargetLayout(tp=1, iteration=10, dtype=torch.float32)
    weights = RankFilesWriter(target, keep_source_args=True)
    with open_checkpoint(fixture_path(*DISTRIBUTED)) as reader:
        writer, notes = with_optimizer_state(weights, target, reader)
        assert notes == [] and (writer.target.dp, writer.target.distributed) == (2, True)  # the source's
        writer, _ = with_optimizer_state(weights, target, reader, dp=8, distributed=False)
        assert (writer.target.dp, writer.target.distributed) == (8, False)
        dist = TorchDistWriter(target, keep_source_args=True)
        writer, notes = with_optimizer_state(dist, target, reader)  # dp_reshardable
        assert notes == [] and writer.weights is dist and writer.dp == 2
        tp2 = TargetLayout(tp=2, iteration=10, dtype=torch.float32)
        dist = TorchDistWriter(tp2, keep_source_args=True)
        writer, notes = with_optimizer_state(dist, tp2, reader)  # at any TP/PP too
        assert notes == [] and writer.weights is dist
        writer, notes = with_optimizer_state(dist, tp2, reader, sharding="fully_reshardable")
        assert notes == [] and writer.sharding == "fully_reshardable"
        writer, notes = with_optimizer_state(TorchDistWriter(target, keep_source_args=True), target, reader,
                                             distributed=False)  # the plain optimizer, fp32
        assert notes == [] and writer.sharding == "plain"
        fp16 = TargetLayout(tp=1, iteration=10, dtype=torch.float16)
        assert with_optimizer_state(TorchDistWriter(fp16, keep_source_args=True), fp16, reader,
                                    distributed=False)[1] == [
            "optimizer state dropped: torch_dist output carries the plain optimizer's state of fp32 and bf16 models "
            "only (this one is float16; write --format torch, or --distributed-optimizer)"]
        with pytest.raises(BadInput, match="--optimizer-sharding is a torch_dist sharding type"):
            with_optimizer_state(weights, target, reader, sharding="fully_reshardable")
        release = TargetLayout(tp=1, release=True)
        assert with_optimizer_state(weights, release, reader)[1] == [
            "optimizer state dropped: Megatron loads none from a release checkpoint"]
    with open_checkpoint(fixture_path("llama_tp2pp2", "conv", "torch")) as reader:
        writer, notes = with_optimizer_state(weights, target, reader)
        assert writer is weights and notes[0].startswith("no optimizer state carried: ")
