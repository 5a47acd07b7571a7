"""DeepSeek-V3's multi-token prediction (MTP) layers, in the Hub's layout (one more layer,
``model.layers.{num_hidden_layers}``, with copies of the embedding and head), survive HF ->
Megatron (torch_dist at TP2 PP2 EP2, per-rank files at TP2 PP2) -> HF bit for bit; what per-rank
files cannot hold is refused, and a config that declares MTP layers without their weights
converts without them, saying so."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptkit.convert import hf_to_megatron, megatron_to_hf, reshard
from ckptkit.errors import BadInput, Unsupported
from ckptkit.layouts import open_checkpoint

from conftest import assert_same_state, hf_state, make_hf_model

FOUR_LAYERS = {"num_hidden_layers": 4}


def make_hub_mtp_folder(tmp_path):
    """A DeepSeek-V3 folder with one MTP layer as the Hub has it: transformers saves the model,
    the MTP layer (random, shaped as the last layer plus enorm, hnorm, eh_proj, shared_head) is
    added beside it."""
    folder = make_hf_model(tmp_path / "hf", "deepseek_v3", num_nextn_predict_layers=1, **FOUR_LAYERS)
    state = load_file(folder / "model.safetensors")
    generator = torch.Generator().manual_seed(1)
    hidden = state["model.norm.weight"].shape[0]
    mtp = {}
    for name, tensor in state.items():
        if name.startswith("model.layers.3."):
            mtp[name.replace("model.layers.3.", "model.layers.4.")] = \
                torch.randn(tensor.shape, generator=generator).to(tensor.dtype) * 0.02
    mtp.update({
        "model.layers.4.enorm.weight": 1 + torch.randn(hidden, generator=generator) * 0.02,
        "model.layers.4.hnorm.weight": 1 + torch.randn(hidden, generator=generator) * 0.02,
        "model.layers.4.eh_proj.weight": torch.randn(hidden, 2 * hidden, generator=generator) * 0.02,
        "model.layers.4.shared_head.norm.weight": 1 + torch.randn(hidden, generator=generator) * 0.02,
        "model.layers.4.embed_tokens.weight": state["model.embed_tokens.weight"].clone(),
        "model.layers.4.shared_head.head.weight": state["lm_head.weight"].clone(),
    })
    save_file({**state, **mtp}, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_mtp_layers_survive_megatron_in_both_formats_bit_for_bit(tmp_path):
    folder = make_hub_mtp_folder(tmp_path)
    hf_to_megatron(folder, tmp_path / "dist", tp=2, pp=2, ep=2, format="torch_dist", make_vocab_size_divisible_by=8)
    with open_checkpoint(tmp_path / "dist") as reader:
        assert reader.spec.mtp_num_layers == 1 and reader.meta.args.mtp_num_layers == 1
    reshard(tmp_path / "dist", tmp_path / "torch", tp=2, pp=2, ep=1, format="torch")
    megatron_to_hf(tmp_path / "torch", tmp_path / "back")
    assert_same_state(hf_state(folder), hf_state(tmp_path / "back"))
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1


def test_mtp_layer_lands_on_the_last_pipeline_stage_with_megatrons_names(tmp_path):
    folder = make_hub_mtp_folder(tmp_path)
    hf_to_megatron(folder, tmp_path / "torch", tp=1, pp=2)
    last = torch.load(tmp_path / "torch" / "release" / "mp_rank_00_001" / "model_optim_rng.pt",
                      weights_only=False)["model"]
    first = torch.load(tmp_path / "torch" / "release" / "mp_rank_00_000" / "model_optim_rng.pt",
                       weights_only=False)["model"]
    assert not any(key.startswith("mtp.") for key in first)
    for key in ("mtp.layers.0.enorm.weight", "mtp.layers.0.eh_proj.weight", "mtp.layers.0.eh_proj._extra_state",
                "mtp.layers.0.mtp_model_layer.self_attention.linear_q_down_proj.weight",
                "mtp.layers.0.mtp_model_layer.mlp.experts.local_experts.7.linear_fc2.weight",
                "mtp.layers.0.mtp_model_layer.mlp.router.expert_bias", "mtp.layers.0.final_layernorm.weight"):
        assert key in last, key
    assert last["mtp.layers.0.mtp_model_layer.mlp.router.expert_bias"].dtype == torch.float32


def test_per_rank_files_of_mtp_experts_over_expert_parallel_ranks_are_refused(tmp_path):
    folder = make_hub_mtp_folder(tmp_path)
    with pytest.raises(Unsupported, match="multi-token prediction layers with expert parallelism"):
        hf_to_megatron(folder, tmp_path / "torch", tp=1, pp=1, ep=2)
    assert not (tmp_path / "torch").exists()


def test_mtp_embedding_copy_that_differs_from_the_models_is_refused(tmp_path):
    folder = make_hub_mtp_folder(tmp_path)
    state = load_file(folder / "model.safetensors")
    state["model.layers.4.embed_tokens.weight"] += 1
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BadInput, match="model.layers.4.embed_tokens.weight differs from model.embed_tokens.weight"):
        hf_to_megatron(folder, tmp_path / "torch", tp=1, pp=1)


def test_declared_mtp_layers_without_weights_convert_without_them_with_a_note(tmp_path):
    folder = make_hf_model(tmp_path / "hf", "deepseek_v3", num_nextn_predict_layers=1)
    result = hf_to_megatron(folder, tmp_path / "torch", tp=1, pp=1)
    assert any("declares 1 multi-token prediction layer(s) whose weights are not in the folder" in note
               for note in result.notes)
    with open_checkpoint(tmp_path / "torch") as reader:
        assert reader.spec.mtp_num_layers == 0
