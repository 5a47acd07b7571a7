"""Every supported architecture survives HF -> Megatron torch_dist TP2 PP2 -> per-rank TP1 PP4
-> HF (mixtures of experts at EP2, then EP4): the same class, the same architecture fields of
config.json, bit-identical tensors and equal logits. Plus what each bridge refuses, in one line."""
import json

import pytest
import torch
from transformers import AutoConfig

from ckptkit.bridges import BRIDGES, bridge_for_config
from ckptkit.convert import hf_to_megatron, megatron_to_hf, reshard
from ckptkit.errors import Unsupported
from ckptkit.layouts import open_checkpoint

from conftest import assert_same_state, hf_logits, hf_state, make_hf_model

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}
FOUR_LAYERS = {"num_hidden_layers": 4}

# name -> (transformers model_type, config fields over the factory's defaults)
CASES = {
    "gpt2": ("gpt2", {"n_layer": 4}),
    "llama": ("llama", FOUR_LAYERS),
    "llama-with-biases": ("llama", {**FOUR_LAYERS, "attention_bias": True, "mlp_bias": True}),
    "llama-3.1": ("llama", {**FOUR_LAYERS, "rope_theta": 500000.0, "rope_scaling": LLAMA3_SCALING,
                            "max_position_embeddings": 131072}),
    "mistral": ("mistral", {**FOUR_LAYERS, "num_key_value_heads": 2, "sliding_window": None}),
    "mistral-sliding-window": ("mistral", {**FOUR_LAYERS, "num_key_value_heads": 2, "sliding_window": 3}),
    "qwen2": ("qwen2", FOUR_LAYERS),
    "qwen3": ("qwen3", FOUR_LAYERS),
    "qwen3-tied": ("qwen3", {**FOUR_LAYERS, "tie_word_embeddings": True}),
    "phi3": ("phi3", FOUR_LAYERS),
    "phi3-sliding-window": ("phi3", {**FOUR_LAYERS, "sliding_window": 3}),
}

# Fields of config.json that say nothing about the architecture: provenance and the
# dtype (the conversion may change it), token ids that belong to a tokenizer, and
# dropout rates (training settings; converted models are written with none).
NOT_ARCHITECTURE = {"transformers_version", "_name_or_path", "dtype", "torch_dtype",
                    "bos_token_id", "eos_token_id", "pad_token_id",
                    "attn_pdrop", "resid_pdrop", "embd_pdrop", "summary_first_dropout"}


def architecture_fields(folder) -> dict:
    config = AutoConfig.from_pretrained(folder).to_dict()
    return {name: value for name, value in config.items() if name not in NOT_ARCHITECTURE}


def round_trip(hf_dir, tmp_path):
    hf_to_megatron(hf_dir, tmp_path / "dist_tp2pp2", tp=2, pp=2, format="torch_dist",
                   make_vocab_size_divisible_by=8)
    reshard(tmp_path / "dist_tp2pp2", tmp_path / "torch_tp1pp4", tp=1, pp=4, format="torch")
    megatron_to_hf(tmp_path / "torch_tp1pp4", tmp_path / "back")
    return tmp_path / "back"


def assert_same_model(original, back):
    """The same class, architecture fields, bit-identical tensors and equal logits."""
    original_config = json.loads((original / "config.json").read_text())
    assert json.loads((back / "config.json").read_text())["architectures"] == original_config["architectures"]
    assert architecture_fields(back) == architecture_fields(original)
    assert_same_state(hf_state(original), hf_state(back))
    # 8 tokens: longer than the 3-token sliding windows, so a lost window changes the logits
    tokens = torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(hf_logits(original, tokens), hf_logits(back, tokens))


@pytest.mark.parametrize("case", sorted(CASES))
def test_family_round_trip_keeps_class_config_tensors_and_logits(case, tmp_path):
    model_type, fields = CASES[case]
    hf_dir = make_hf_model(tmp_path / "hf", model_type, **fields)
    assert_same_model(hf_dir, round_trip(hf_dir, tmp_path))


MOE_CASES = {
    "mixtral": ("mixtral", FOUR_LAYERS),
    "mixtral-sliding-window": ("mixtral", {**FOUR_LAYERS, "sliding_window": 3}),
    "qwen2-moe": ("qwen2_moe", FOUR_LAYERS),
    "qwen2-moe-every-second-layer": ("qwen2_moe", {**FOUR_LAYERS, "mlp_only_layers": [], "decoder_sparse_step": 2}),
    "qwen3-moe": ("qwen3_moe", FOUR_LAYERS),
    "qwen3-moe-without-renormalisation": ("qwen3_moe", {**FOUR_LAYERS, "norm_topk_prob": False}),
    # MLA with q_lora_rank, sigmoid routing with expert bias, 2 of 4 groups, scaling 2.5, layer 0 dense
    "deepseek-v3": ("deepseek_v3", FOUR_LAYERS),
    "deepseek-v3-yarn": ("deepseek_v3", {**FOUR_LAYERS, "max_position_embeddings": 16384, "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
        "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}}),
    "deepseek-v3-without-groups": ("deepseek_v3", {**FOUR_LAYERS, "n_group": 1, "topk_group": 1,
                                                   "first_k_dense_replace": 2}),
    "deepseek-v2": ("deepseek_v2", FOUR_LAYERS),
    "deepseek-v2-lite-without-q-lora": ("deepseek_v2", {**FOUR_LAYERS, "q_lora_rank": None}),
    "deepseek-v2-lite-yarn": ("deepseek_v2", {**FOUR_LAYERS, "q_lora_rank": None, "max_position_embeddings": 16384,
                                              "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                               "original_max_position_embeddings": 4096,
                                                               "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707,
                                                               "mscale_all_dim": 0.707}}),
}


def moe_round_trip(hf_dir, tmp_path):
    """HF -> torch_dist TP2 PP2 EP2 -> per-rank TP1 PP4 EP4 -> HF: experts change ranks twice."""
    hf_to_megatron(hf_dir, tmp_path / "dist_tp2pp2ep2", tp=2, pp=2, ep=2, format="torch_dist",
                   make_vocab_size_divisible_by=8)
    reshard(tmp_path / "dist_tp2pp2ep2", tmp_path / "torch_tp1pp4ep4", tp=1, pp=4, ep=4, format="torch")
    megatron_to_hf(tmp_path / "torch_tp1pp4ep4", tmp_path / "back")
    return tmp_path / "back"


@pytest.mark.parametrize("case", sorted(MOE_CASES))
def test_moe_family_round_trip_with_expert_parallelism_keeps_class_config_tensors_and_logits(case, tmp_path):
    model_type, fields = MOE_CASES[case]
    hf_dir = make_hf_model(tmp_path / "hf", model_type, **fields)
    assert_same_model(hf_dir, moe_round_trip(hf_dir, tmp_path))


def test_bf16_deepseek_round_trip_keeps_its_float32_expert_bias(tmp_path):
    hf_dir = make_hf_model(tmp_path / "hf", "deepseek_v3", dtype=torch.bfloat16, **FOUR_LAYERS)
    assert_same_model(hf_dir, moe_round_trip(hf_dir, tmp_path))
    assert hf_state(tmp_path / "back")["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32


def test_every_registered_bridge_has_a_round_trip_case():
    """Decoder families here; BERT's round trip in test_bert.py; Megatron-only entries (T5) have
    none, and test_t5.py checks their refusal."""
    from test_bert import BERT_CASES

    covered = {model_type for model_type, _ in [*CASES.values(), *MOE_CASES.values(), *BERT_CASES.values()]}
    megatron_only = {bridge.model_type for bridge in BRIDGES.values() if bridge.no_hf}
    assert covered | megatron_only == {bridge.model_type for bridge in BRIDGES.values()}


def test_megatron_checkpoint_records_the_architecture_megatron_args_cannot_tell(tmp_path):
    hf_dir = make_hf_model(tmp_path / "hf", "phi3")
    hf_to_megatron(hf_dir, tmp_path / "megatron", tp=1, pp=1)
    with open_checkpoint(tmp_path / "megatron") as reader:
        assert reader.spec.family == "phi3"
        assert reader.meta.args.hf_architecture == "Phi3ForCausalLM"


def test_architecture_option_exports_a_llama_shaped_megatron_model_as_phi3(tmp_path):
    hf_dir = make_hf_model(tmp_path / "hf", "llama")
    hf_to_megatron(hf_dir, tmp_path / "megatron", tp=1, pp=1)
    megatron_to_hf(tmp_path / "megatron", tmp_path / "phi3", architecture="Phi3ForCausalLM")
    assert json.loads((tmp_path / "phi3" / "config.json").read_text())["architectures"] == ["Phi3ForCausalLM"]
    tokens = torch.randint(0, 101, (1, 8), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(hf_logits(hf_dir, tokens), hf_logits(tmp_path / "phi3", tokens), atol=1e-5)


def test_architecture_option_is_refused_when_the_model_does_not_fit(tmp_path):
    hf_dir = make_hf_model(tmp_path / "hf", "qwen2")
    hf_to_megatron(hf_dir, tmp_path / "megatron", tp=1, pp=1)
    with pytest.raises(Unsupported, match="MistralForCausalLM cannot hold this model: linear biases"):
        megatron_to_hf(tmp_path / "megatron", tmp_path / "out", architecture="MistralForCausalLM")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scaling, message", [
    ({**LLAMA3_SCALING, "high_freq_factor": 2.0}, "fixes low_freq_factor=1.0, high_freq_factor=4.0"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}, "RoPE scaling 'yarn'"),
])
def test_rope_scaling_megatron_cannot_express_is_refused_before_writing(scaling, message, tmp_path):
    hf_dir = make_hf_model(tmp_path / "hf", "llama", rope_scaling=scaling, max_position_embeddings=131072)
    with pytest.raises(Unsupported, match=message):
        hf_to_megatron(hf_dir, tmp_path / "megatron", tp=1, pp=1)
    assert not (tmp_path / "megatron").exists()


@pytest.mark.parametrize("config, message", [
    ({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True}, "use_sliding_window=True"),
    ({"architectures": ["Qwen3ForCausalLM"], "attention_bias": True}, "attention_bias=True"),
    ({"architectures": ["LlamaForCausalLM"], "attention_bias": True, "mlp_bias": False}, "together"),
    ({"architectures": ["Phi3ForCausalLM"], "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0],
                                                            "long_factor": [1.0]}}, "'longrope'"),
])
def test_configs_without_a_megatron_equivalent_are_refused(config, message):
    base = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=48, vocab_size=101)
    with pytest.raises(Unsupported, match=message):
        bridge_for_config(config).config_to_spec({**base, **config})


def test_cli_architecture_option_names_the_class_written(tmp_path):
    from click.testing import CliRunner

    from ckptkit.cli import main

    hf_dir = make_hf_model(tmp_path / "hf", "llama")
    hf_to_megatron(hf_dir, tmp_path / "megatron", tp=1, pp=1)
    result = CliRunner().invoke(main, ["megatron-to-hf", str(tmp_path / "megatron"), str(tmp_path / "out"),
                                       "--architecture", "MistralForCausalLM", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["target_layout"]["architecture"] == "MistralForCausalLM"
    refused = CliRunner().invoke(main, ["megatron-to-hf", str(tmp_path / "megatron"), str(tmp_path / "gpt2"),
                                        "--architecture", "GPT2LMHeadModel"])
    assert refused.exit_code == 2 and "GPT2LMHeadModel cannot hold this model" in refused.output


def test_llama_3_2_scaling_factor_is_written_with_a_note_about_megatrons_builder(tmp_path):
    hf_dir = make_hf_model(tmp_path / "hf", "llama", rope_scaling={**LLAMA3_SCALING, "factor": 32.0},
                           max_position_embeddings=131072)
    result = hf_to_megatron(hf_dir, tmp_path / "megatron", tp=1, pp=1)
    assert any("builds the model with its default factor 8" in note for note in result.notes)
    with open_checkpoint(tmp_path / "megatron") as reader:
        assert reader.meta.args.rope_scaling_factor == 32.0 and reader.meta.args.use_rope_scaling


def test_a_model_no_architecture_holds_is_read_but_refused_for_hugging_face_export():
    from dataclasses import replace

    from ckptkit.bridges import bridge_of, family_of
    from ckptkit.train.config import MODEL_PRESETS

    gpt2_with_gqa = replace(MODEL_PRESETS["gpt2"], family="", num_query_groups=2)
    assert family_of(gpt2_with_gqa) == ""
    with pytest.raises(Unsupported, match="GPT2LMHeadModel: grouped-query attention"):
        bridge_of(gpt2_with_gqa)
