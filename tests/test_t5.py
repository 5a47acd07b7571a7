"""Megatron T5 (T5Model): inspected, resharded between TP sizes and formats bit for bit, never
exported to Hugging Face (refused with the reason), never pipelined (Megatron refuses too).

The real Megatron-LM fixture's tests compare with the logits Megatron computed; the synthetic
checkpoints here are written by ckptkit's own writers from random canonical tensors, so they
check only that a reshard keeps every tensor (self-consistency, not correctness)."""
from pathlib import Path

import pytest
import torch

from ckptkit.convert import megatron_to_hf, reshard
from ckptkit.errors import Unsupported
from ckptkit.layouts import open_checkpoint
from ckptkit.layouts.megatron_common import TargetLayout
from ckptkit.layouts.megatron_legacy.write import write as write_rank_files
from ckptkit.spec import ModelSpec, canonical_tensors

from conftest import RandomReader

T5_SPEC = ModelSpec(family="t5", model_kind="encoder_decoder", num_layers=2, encoder_num_layers=3, hidden_size=32,
                    num_attention_heads=4, num_query_groups=4, ffn_hidden_size=64, vocab_size=101,
                    max_position_embeddings=32, head_dim=8, output_layer_bias=True)


def make_t5(folder: Path, tp: int = 2) -> Path:
    write_rank_files(RandomReader(T5_SPEC), folder, TargetLayout(tp=tp, make_vocab_size_divisible_by=8))
    return folder


def all_tensors(path) -> dict:
    with open_checkpoint(path) as reader:
        return {tensor.name: reader.tensor(tensor.name)[: tensor.shape[0]] for tensor in reader.canonical()}


def test_t5_canonical_tensors_are_an_encoder_and_a_decoder_with_cross_attention():
    names = {tensor.name for tensor in canonical_tensors(T5_SPEC)}
    assert "encoder.layers.2.self_attention.linear_qkv.weight" in names
    assert "encoder.layers.0.cross_attention.linear_q.weight" not in names
    assert {"decoder.layers.1.pre_cross_attn_layernorm.weight", "decoder.layers.1.cross_attention.linear_kv.weight",
            "encoder.final_layernorm.bias", "decoder.final_layernorm.bias", "output_layer.bias"} <= names


def test_t5_is_read_as_an_encoder_decoder_model(tmp_path):
    with open_checkpoint(make_t5(tmp_path / "t5")) as reader:
        assert (reader.spec.model_kind, reader.spec.family) == ("encoder_decoder", "t5")
        assert (reader.spec.encoder_num_layers, reader.spec.num_layers) == (3, 2)


@pytest.mark.parametrize("path", [("torch", 1), ("torch_dist", 4), ("torch", 4)])
def test_t5_reshard_keeps_every_tensor_bit_for_bit(tmp_path, path):
    source = make_t5(tmp_path / "t5")
    out_format, tp = path
    reshard(source, tmp_path / "out", tp=tp, pp=1, format=out_format, make_vocab_size_divisible_by=8)
    reshard(tmp_path / "out", tmp_path / "back", tp=2, pp=1, format="torch", make_vocab_size_divisible_by=8)
    original, back = all_tensors(source), all_tensors(tmp_path / "back")
    assert sorted(original) == sorted(back)
    for name in original:
        assert torch.equal(original[name], back[name]), name


def test_t5_pipeline_parallelism_is_refused_as_megatron_refuses_it(tmp_path):
    with pytest.raises(Unsupported, match="refuses pipeline parallelism"):
        reshard(make_t5(tmp_path / "t5"), tmp_path / "out", tp=1, pp=2)


def test_t5_export_to_hugging_face_is_refused_with_the_reason(tmp_path):
    with pytest.raises(Unsupported, match="relative position buckets"):
        megatron_to_hf(make_t5(tmp_path / "t5"), tmp_path / "hf")


def test_t5_import_from_hugging_face_is_refused_with_the_reason(tmp_path):
    from ckptkit.convert import hf_to_megatron
    from transformers import T5Config, T5ForConditionalGeneration

    T5ForConditionalGeneration(T5Config(vocab_size=101, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                        num_heads=4)).save_pretrained(tmp_path / "hf")
    with pytest.raises(Unsupported, match="RMS-style T5LayerNorm without bias"):
        hf_to_megatron(tmp_path / "hf", tmp_path / "megatron", tp=1, pp=1)


# -- the real Megatron-LM T5 (tools/megatron_encoder_fixtures.sh): T5Model at TP2, saved as torch_dist
# (dist/) and converted to per-rank files by Megatron (torch/)

def test_real_megatron_t5_is_read_as_two_stacks_with_cross_attention():
    from conftest import fixture_path

    for checkpoint in ("dist", "torch"):
        with open_checkpoint(fixture_path("t5_tp2", checkpoint)) as reader:
            spec = reader.spec
            assert (spec.family, spec.model_kind, spec.encoder_num_layers, spec.num_layers) == \
                ("t5", "encoder_decoder", 2, 2)
            reader.tensor("decoder.layers.1.cross_attention.linear_kv.weight")


def test_real_megatron_t5_per_rank_files_written_by_ckptkit_are_megatron_s_own(tmp_path):
    """Megatron's T5 torch_dist -> per-rank TP1 -> per-rank TP2: key for key and bit for bit the
    files Megatron converted it to."""
    from conftest import assert_same_rank_model, fixture_path

    reshard(fixture_path("t5_tp2", "dist"), tmp_path / "tp1", tp=1, pp=1, format="torch")
    reshard(tmp_path / "tp1", tmp_path / "tp2", tp=2, pp=1, format="torch")
    theirs = sorted(fixture_path("t5_tp2", "torch").glob("iter_*/mp_rank_*/model_optim_rng.pt"))
    assert len(theirs) == 2
    for real in theirs:
        assert_same_rank_model(tmp_path / "tp2" / real.relative_to(fixture_path("t5_tp2", "torch")), real)


def test_real_megatron_t5_torch_dist_written_by_ckptkit_has_megatron_s_keys_shapes_and_chunks(tmp_path):
    from conftest import byte_keys, fixture_path, tensor_layout

    reshard(fixture_path("t5_tp2", "torch"), tmp_path / "tp4", tp=4, pp=1, format="torch")
    reshard(tmp_path / "tp4", tmp_path / "dist", tp=2, pp=1, format="torch_dist")
    ours = next((tmp_path / "dist").glob("iter_*"))
    theirs = next(fixture_path("t5_tp2", "dist").glob("iter_*"))
    assert tensor_layout(ours) == tensor_layout(theirs)
    extra_states = {key for key in byte_keys(theirs) if "_extra_state" in key}
    assert {key for key in byte_keys(ours) if "_extra_state" in key} == extra_states
    reshard(tmp_path / "dist", tmp_path / "back", tp=2, pp=1, format="torch")
    for real in sorted(fixture_path("t5_tp2", "torch").glob("iter_*/mp_rank_*/model_optim_rng.pt")):
        from conftest import assert_same_rank_model

        assert_same_rank_model(tmp_path / "back" / real.relative_to(fixture_path("t5_tp2", "torch")), real)


def test_untied_t5_keeps_both_names_of_its_output_layer_weight_through_reshards(tmp_path):
    from dataclasses import replace

    from conftest import tensor_layout

    untied = replace(T5_SPEC, tied_embeddings=False, output_layer_bias=False)
    write_rank_files(RandomReader(untied), tmp_path / "t5", TargetLayout(tp=2, make_vocab_size_divisible_by=8))
    reshard(tmp_path / "t5", tmp_path / "dist", tp=1, pp=1, format="torch_dist", make_vocab_size_divisible_by=8)
    keys = tensor_layout(next(p for p in (tmp_path / "dist").iterdir() if p.is_dir()))
    assert {"output_layer.weight", "lm_head.output_layer.weight"} <= set(keys)
    assert "output_layer.bias" not in keys
    reshard(tmp_path / "dist", tmp_path / "back", tp=2, pp=1, format="torch", make_vocab_size_divisible_by=8)
    original, back = all_tensors(tmp_path / "t5"), all_tensors(tmp_path / "back")
    assert all(torch.equal(original[name], back[name]) for name in original)


def test_real_t5_output_bias_that_differs_under_its_second_name_is_reported(copy_fixture):
    """T5Model saves its output layer twice; the second copy is compared with the first, and a
    difference is a note (an error with strict)."""
    from ckptkit.errors import BadInput
    from ckptkit.safe_load import safe_torch_load

    source = copy_fixture("t5_tp2", "torch")
    path = source / "iter_0000010/mp_rank_01/model_optim_rng.pt"
    state = safe_torch_load(path, mmap=False)
    state["model"]["lm_head.output_layer.bias"] = state["model"]["lm_head.output_layer.bias"] + 0.5
    torch.save(state, path)
    with open_checkpoint(source) as reader:
        notes = reader.validate()
    assert any("lm_head.output_layer.bias differs from output_layer.bias" in note for note in notes), notes
    with open_checkpoint(source, strict=True) as reader, pytest.raises(BadInput, match="lm_head.output_layer.bias"):
        reader.validate()
