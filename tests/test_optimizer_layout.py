"""Megatron's distributed-optimizer buffer layout, computed from metadata, matches the
files real Megatron-LM wrote: parameter order, offsets, padding and bucket boundaries."""
import doctest
import importlib
from pathlib import Path

import pytest
import torch

from ckptkit.errors import BadInput
from ckptkit.layouts import open_checkpoint
from ckptkit.optimizer.buffers import BufferSettings, buffer_layout
from ckptkit.optimizer.distrib_optim import DistribOptimFile, rank_layout
from ckptkit.optimizer.parameters import ModelParameter, chunk_parameters

from conftest import fixture_path, megatron_chunks

DISTRIBUTED = ("gpt2do_tp2dp2", "legacy")
MEGATRON_WRITTEN = [("gpt2do_tp2dp2", "legacy"), ("gpt2_tp2pp2", "conv", "torch"),
                    ("llama_tp2pp2", "conv", "torch"), ("vpp_tp2pp2v2", "conv", "torch"),
                    ("qwen3_tp2", "conv", "torch")]


def parameter(name, *shape, shared=False):
    return ModelParameter(name, name, "column", tuple(shape), shared_embedding=shared)


def test_parameters_are_laid_out_in_reverse_order_each_start_padded_to_64():
    layout = buffer_layout([parameter("a", 10), parameter("b", 3, 5), parameter("c", 64)], dp=1)
    assert [(slot.parameter.name, slot.start, slot.end) for slot in layout.slots] == \
        [("c", 0, 64), ("b", 64, 79), ("a", 128, 138)]
    assert layout.numel_unpadded == 138
    assert layout.numel == 256  # the bucket end is padded to lcm(DP, 128)


def test_bucket_end_is_padded_to_a_multiple_of_lcm_dp_128():
    for dp, padded in [(1, 128), (2, 128), (3, 384), (256, 256)]:
        layout = buffer_layout([parameter("a", 5)], dp=dp)
        assert (layout.buckets[0].end, layout.buckets[0].numel_unpadded) == (padded, 5)
    assert buffer_layout([parameter("a", 5)], dp=2, pad_for_high_nccl_busbw=True).numel == 65536


def test_bucket_closes_once_it_holds_bucket_size_elements_and_the_next_starts_at_its_padded_end():
    layout = buffer_layout([parameter("a", 100), parameter("b", 100), parameter("c", 100)], dp=2, bucket_size=150)
    assert [(slot.parameter.name, slot.start, slot.bucket) for slot in layout.slots] == \
        [("c", 0, 0), ("b", 128, 0), ("a", 256, 1)]
    assert [(bucket.start, bucket.end, bucket.numel_unpadded, bucket.stored_start) for bucket in layout.buckets] == \
        [(0, 256, 228, 0), (256, 384, 100, 228)]
    assert layout.stored_offset(layout.slots[2]) == 228  # buckets are stored back to back, unpadded


def test_shared_embedding_gets_a_bucket_of_its_own_first_stage_and_last_stage():
    # first stage: the embeddings come first in the model, so last in the buffer
    first = buffer_layout([parameter("embedding", 10, 4, shared=True), parameter("norm", 4)], dp=2)
    assert [(slot.parameter.name, slot.start, slot.bucket) for slot in first.slots] == \
        [("norm", 0, 0), ("embedding", 128, 1)]
    # the bucket closed before it ends at the shared embedding's padded start (64), not at 4
    assert [(bucket.start, bucket.end, bucket.numel_unpadded) for bucket in first.buckets] == \
        [(0, 128, 64), (128, 256, 40)]
    # last stage: the tied head comes last in the model, so first in the buffer
    last = buffer_layout([parameter("norm", 4), parameter("head", 10, 4, shared=True)], dp=2)
    assert [(slot.parameter.name, slot.start, slot.bucket) for slot in last.slots] == \
        [("head", 0, 0), ("norm", 128, 1)]


def test_dp_shards_split_every_bucket_equally_and_cover_each_parameter_once():
    layout = buffer_layout([parameter("a", 300), parameter("b", 7, 9), parameter("c", 1000)], dp=4, bucket_size=500)
    covered = {slot.parameter.name: [] for slot in layout.slots}
    for dp_rank in range(4):
        for piece in layout.dp_shard(dp_rank):
            low, high = layout.dp_range(layout.buckets[piece.slot.bucket], dp_rank)
            assert low <= piece.buffer_start < piece.buffer_end <= high
            covered[piece.slot.parameter.name].append((piece.param_start, piece.param_end))
    for slot in layout.slots:
        ranges = sorted(covered[slot.parameter.name])
        assert ranges[0][0] == 0 and ranges[-1][1] == slot.parameter.numel
        assert all(previous[1] == following[0] for previous, following in zip(ranges, ranges[1:]))


@pytest.mark.parametrize("parts", MEGATRON_WRITTEN, ids=[parts[0] for parts in MEGATRON_WRITTEN])
def test_parameter_order_and_shapes_are_those_of_every_real_megatron_rank_file(parts):
    with open_checkpoint(fixture_path(*parts)) as reader:
        for place, model in megatron_chunks(reader):
            stored = [(key, tuple(value.shape)) for key, value in model.items() if isinstance(value, torch.Tensor)]
            ours = [(p.name, p.shape) for p in chunk_parameters(reader.spec, place, reader.meta.padded_vocab_size)]
            assert ours == stored, place


def _open_distributed(reader, tp_rank, pp_stage=0):
    meta = reader.meta
    settings = BufferSettings.from_args(meta.args)
    layout = rank_layout(reader.spec, tp=meta.tp, tp_rank=tp_rank, pp=meta.pp, pp_stage=pp_stage, vpp=meta.vpp,
                         padded_vocab_size=meta.padded_vocab_size, settings=settings)
    folder = Path(meta.files[0]).parent.parent / ("mp_rank_%02d" % tp_rank)
    return layout, DistribOptimFile(folder / "distrib_optim.pt", layout, settings.buffer_key)


def test_real_distributed_optimizer_fp32_master_params_equal_the_stored_weights_bit_for_bit():
    with open_checkpoint(fixture_path(*DISTRIBUTED)) as reader:
        assert (reader.meta.tp, reader.meta.pp, reader.meta.args.data_parallel_size) == (2, 1, 2)
        checked = 0
        for tp_rank in range(2):
            layout, stored = _open_distributed(reader, tp_rank)
            model = reader.rank_state(tp_rank, 0)["model"]
            buffer = layout.buffers[0]
            assert len(buffer.slots) == sum(isinstance(value, torch.Tensor) for value in model.values())
            for slot in buffer.slots:
                master = stored.read(0, "param", buffer.stored_offset(slot), slot.parameter.numel)
                assert torch.equal(master.view(slot.parameter.shape), model[slot.parameter.name]), slot.parameter.name
                checked += 1
            stored.close()
        assert checked == 56


def test_real_buffer_holds_zeros_in_the_64_element_gaps_and_adam_moments_elsewhere():
    with open_checkpoint(fixture_path(*DISTRIBUTED)) as reader:
        layout, stored = _open_distributed(reader, 0)
        buffer = layout.buffers[0]
        # the fused QKV bias (96 elements) is the only size here that is not a multiple of 64
        gaps = [(slot.parameter.name, buffer.slots[i + 1].start - slot.end) for i, slot in enumerate(buffer.slots[:-1])
                if buffer.slots[i + 1].start != slot.end]
        assert gaps == [("decoder.layers.1.self_attention.linear_qkv.bias", 32),
                        ("decoder.layers.0.self_attention.linear_qkv.bias", 32)]
        assert buffer.numel_unpadded == 87360 + 64
        for key in ("param", "exp_avg", "exp_avg_sq"):
            everything = stored.read(0, key, 0, buffer.numel_unpadded)
            in_gaps = torch.ones(buffer.numel_unpadded, dtype=torch.bool)
            for slot in buffer.slots:
                in_gaps[buffer.stored_offset(slot): buffer.stored_offset(slot) + slot.parameter.numel] = False
            assert in_gaps.sum() == 64 and not everything[in_gaps].any()
        moments = stored.read(0, "exp_avg_sq", 0, buffer.numel_unpadded)
        assert (moments >= 0).all() and moments.count_nonzero() > 0.9 * 87360
        stored.close()


def test_a_distrib_optim_file_that_does_not_fit_the_layout_is_refused_naming_file_and_sizes():
    with open_checkpoint(fixture_path(*DISTRIBUTED)) as reader:
        meta = reader.meta
        settings = BufferSettings.from_args(meta.args)
        wrong = rank_layout(reader.spec, tp=meta.tp, tp_rank=0, pp=meta.pp, pp_stage=0, vpp=meta.vpp,
                            padded_vocab_size=2048, settings=settings)  # a vocabulary padded for another run
        path = Path(meta.files[0]).parent / "distrib_optim.pt"
        with pytest.raises(BadInput, match=r"mp_rank_00/distrib_optim.pt: buffer 0 has numel_unpadded 87424; "
                                           r"Megatron's layout of this rank's parameters gives 120192"):
            DistribOptimFile(path, wrong, settings.buffer_key)
        with pytest.raises(BadInput, match=r"keyed \[\(torch.float32, torch.float32\)\]; expected "
                                           r"\[\(torch.bfloat16, torch.float32\)\]"):
            DistribOptimFile(path, wrong, (torch.bfloat16, torch.float32))


def test_settings_come_from_megatron_args():
    with open_checkpoint(fixture_path(*DISTRIBUTED)) as reader:
        settings = BufferSettings.from_args(reader.meta.args)
    assert (settings.dp, settings.bucket_size, settings.buffer_key) == (2, None, (torch.float32, torch.float32))
    from argparse import Namespace
    bf16 = BufferSettings.from_args(Namespace(bf16=True, data_parallel_size=8, context_parallel_size=2,
                                              overlap_grad_reduce=True, num_distributed_optimizer_instances=2))
    assert (bf16.dp, bf16.bucket_size, bf16.buffer_key) == (8, 40_000_000, (torch.bfloat16, torch.float32))
    assert bf16.chunk_bucket_size(pp_stage=1, chunk=0) is None and bf16.chunk_bucket_size(0, 1) is None


@pytest.mark.parametrize("module_name", ["ckptkit.optimizer.buffers"])
def test_docstring_examples_run(module_name):
    results = doctest.testmod(importlib.import_module(module_name), optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0 and results.failed == 0
