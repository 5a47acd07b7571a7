"""Checkpoints written by real Megatron-LM convert to Hugging Face and reproduce its logits."""
import json

import pytest
import torch

from ckptkit.convert import reshard
from ckptkit.layouts import open_checkpoint
from ckptkit.safe_load import pickled_globals, safe_torch_load
from ckptkit.verification import verify

from conftest import converted_logits_error, fixture_path

FLOAT32_LOGITS_ATOL = 1e-5  # a hand merge reaches 1.4e-6; the tanh GeLU would be 6e-4 off

CASES = [
    ("gpt2_tp2pp2", ("gpt2_tp2pp2", "conv", "torch")),
    ("legacy_gpt2_tp2pp2", ("legacy_gpt2_tp2pp2", "c22")),
    ("vpp_tp2pp2v2", ("vpp_tp2pp2v2", "conv", "torch")),
]


@pytest.mark.parametrize("name,parts", CASES, ids=[case[0] for case in CASES])
def test_real_megatron_gpt2_reproduces_megatron_logits(name, parts, tmp_path):
    error = converted_logits_error(fixture_path(*parts), name, tmp_path)
    assert error.max().item() < FLOAT32_LOGITS_ATOL


def test_real_megatron_llama_bf16_reproduces_megatron_logits_at_bf16_rounding(tmp_path):
    error = converted_logits_error(fixture_path("llama_tp2pp2", "conv", "torch"), "llama_tp2pp2", tmp_path)
    # Megatron computed in bf16; rounding alone gives ~0.02-0.03 max, ~0.004 mean. A wrong
    # layout lands near the logits' own size (~1).
    assert error.max().item() < 0.06
    assert error.mean().item() < 0.008


def test_per_rank_files_load_without_megatron_and_stand_in_its_enums():
    path = fixture_path("gpt2_tp2pp2", "conv", "torch") / "iter_0000010" / "mp_rank_00_000" / "model_optim_rng.pt"
    names = pickled_globals(path)
    assert "megatron.core.transformer.enums.AttnBackend" in names
    state = safe_torch_load(path)
    assert state["args"].tensor_model_parallel_size == 2
    assert state["args"].attention_backend.qualified_name == "megatron.core.transformer.enums.AttnBackend"


def test_layer_indices_in_stage_files_are_local_and_become_global():
    with open_checkpoint(fixture_path("gpt2_tp2pp2", "conv", "torch")) as reader:
        location = reader.index["decoder.layers.4.mlp.linear_fc1.weight"]
        assert (location.pp_stage, location.file_key) == (1, "decoder.layers.1.mlp.linear_fc1.weight")


def test_tied_output_head_copy_on_last_stage_equals_embeddings():
    with open_checkpoint(fixture_path("gpt2_tp2pp2", "conv", "torch")) as reader:
        assert reader.tied_head_location.pp_stage == 1
        assert reader.validate() == []


def test_weights_come_from_model_never_from_the_fresh_optimizer_entry():
    with open_checkpoint(fixture_path("gpt2_tp2pp2", "conv", "torch")) as reader:
        state = reader.rank_state(0, 0)
        assert "optimizer" in state
        merged = reader.tensor("embedding.word_embeddings.weight")
        shard = state["model"]["embedding.word_embeddings.weight"]
        assert torch.equal(merged[: shard.shape[0]], shard)


def test_virtual_pipeline_chunks_map_to_contiguous_global_layers():
    with open_checkpoint(fixture_path("vpp_tp2pp2v2", "conv", "torch")) as reader:
        assert reader.meta.vpp == 2
        # stage 1, chunk 1 = virtual stage 3 = global layers 6-7
        location = reader.index["decoder.layers.6.self_attention.linear_qkv.weight"]
        assert (location.pp_stage, location.chunk) == (1, 1)


def test_reshard_of_real_checkpoint_is_bit_identical_and_keeps_iteration(tmp_path):
    source = fixture_path("gpt2_tp2pp2", "conv", "torch")
    result = reshard(source, tmp_path / "tp1pp3", tp=1, pp=3)
    assert any("dropped optimizer" in note for note in result.notes)
    assert (tmp_path / "tp1pp3" / "latest_checkpointed_iteration.txt").read_text() == "10"
    state = safe_torch_load(tmp_path / "tp1pp3" / "iter_0000010" / "mp_rank_00_002" / "model_optim_rng.pt")
    assert state["iteration"] == 10 and "optimizer" not in state and "rng_state" not in state
    assert state["args"].tensor_model_parallel_size == 1 and state["args"].pipeline_model_parallel_size == 3
    assert state["args"].lr == safe_torch_load(source / "iter_0000010" / "mp_rank_00_000" / "model_optim_rng.pt")["args"].lr
    assert verify(source, tmp_path / "tp1pp3").equivalent


def test_pre_core_names_are_written_back_as_megatron_2024_nests_them(tmp_path):
    source = fixture_path("legacy_gpt2_tp2pp2", "c22")
    reshard(source, tmp_path / "out", tp=2, pp=2)
    ours = safe_torch_load(tmp_path / "out" / "iter_0000010" / "mp_rank_01_001" / "model_optim_rng.pt")["model"]
    theirs = safe_torch_load(source / "iter_0000010" / "mp_rank_01_001" / "model_optim_rng.pt")["model"]

    def layout(tree):
        return {key: layout(value) if isinstance(value, dict) else
                (tuple(value.shape) if isinstance(value, torch.Tensor) else value) for key, value in tree.items()}

    assert layout(ours) == layout(theirs)
    assert torch.equal(ours["word_embeddings_for_head"]["weight"], theirs["word_embeddings_for_head"]["weight"])


def test_resharded_files_refer_to_no_ckptkit_code_so_megatron_can_unpickle_them(tmp_path):
    reshard(fixture_path("gpt2_tp2pp2", "conv", "torch"), tmp_path / "out", tp=1, pp=1)
    names = pickled_globals(tmp_path / "out" / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt")
    assert names and not [name for name in names if "ckptkit" in name]


# Real Megatron-LM, float32, TP2: Qwen3-style (--qk-layernorm, --kv-channels 32 with hidden
# 128 / 8 heads, GQA 2 groups, RoPE base 1e6) and Llama-3.1-style (--use-rope-scaling, base
# 5e5). Dropping the rope scaling moves the Llama-3.1 logits by 3.2e-3 (positions < 32 only),
# so the tolerance stays well under that. The Llama-3.1 one is kept as torch_dist only (its
# per-rank conversion holds the same tensors under the same names as the Qwen3 one's).
NEWER_FAMILIES = [
    ("qwen3_tp2", "Qwen3ForCausalLM", ("dist",)),
    ("qwen3_tp2", "Qwen3ForCausalLM", ("conv", "torch")),
    ("llama31_tp2", "LlamaForCausalLM", ("dist",)),
]


@pytest.mark.parametrize("fixture, architecture, layout", NEWER_FAMILIES,
                         ids=["qwen3-torch_dist", "qwen3-per-rank", "llama31-torch_dist"])
def test_real_megatron_newer_families_reproduce_megatron_logits(fixture, architecture, layout, tmp_path):
    error = converted_logits_error(fixture_path(fixture, *layout), fixture, tmp_path)
    assert error.max().item() < FLOAT32_LOGITS_ATOL
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [architecture]


def test_real_qwen3_carries_qk_norms_and_its_own_head_dim(tmp_path):
    with open_checkpoint(fixture_path("qwen3_tp2", "dist")) as reader:
        spec = reader.spec
        assert (spec.family, spec.qk_layernorm, spec.head_dim, spec.hidden_size) == ("qwen3", True, 32, 128)
        assert tuple(reader.tensor("decoder.layers.3.self_attention.k_layernorm.weight").shape) == (32,)


def test_real_llama31_rope_scaling_becomes_hugging_face_llama3_scaling():
    with open_checkpoint(fixture_path("llama31_tp2", "dist")) as reader:
        assert reader.spec.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
