"""Real Megatron-LM DeepSeek-style checkpoints (tools/make_megatron_deepseek_fixture.sh:
Megatron-LM d98e8a6, local spec, float32, 10 iterations) converted to Hugging Face reproduce the
logits Megatron computed for them, the multi-token prediction (MTP) head's included, and are
rewritten with Megatron's own keys, shapes and chunks.

- ``deepseek_v3_tp1ep2/dist``: torch_dist from TP1 EP2. MLA with q_lora_rank, YaRN (factor 4,
  mscale 1/1), sigmoid routing with a trained expert bias, top-4 of 8 experts from 2 of 4 groups,
  scaling 2.5, a shared expert, layer 0 dense, one MTP layer.
- ``deepseek_v2_ep2_torch/torch``: DeepSeek-V2 style (softmax over all experts, top-2 unrenormalised,
  scaling 1.5), per-rank files at EP2 (2.1 MB, kept out of the repository for its size: made by the
  same script, it reproduced Megatron's logits to 7.2e-7; its tests skip without it).

transformers computes no MTP head: ``mtp_logits`` (tools/megatron_deepseek_mtp.py) is Megatron's
(megatron/core/transformer/multi_token_prediction.py) written with transformers' modules and the
Hub's names.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

from ckptkit.convert import megatron_to_hf, reshard
from ckptkit.layouts import open_checkpoint, torch_dist
from ckptkit.layouts.megatron_common import TargetLayout

from conftest import assert_same_rank_model, byte_keys, fixture_path, hf_logits, reference_logits, tensor_layout

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from megatron_deepseek_mtp import mtp_logits  # noqa: E402

# float32 on both sides; what is left is the order of float32 sums (GPU kernels against CPU ones)
FLOAT32_LOGITS_ATOL = 1e-5
REAL = {"deepseek_v3_tp1ep2": "dist"}
REAL_MTP = ["deepseek_v3_tp1ep2"]


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_megatron_deepseek_reproduces_megatron_logits(name, tmp_path):
    megatron_to_hf(fixture_path(name, REAL[name]), tmp_path / "hf")
    reference = reference_logits(name)
    vocab = reference["vocab"]
    error = (hf_logits(tmp_path / "hf", reference["tokens"])[..., :vocab] - reference["logits"][..., :vocab]).abs()
    assert error.max().item() < FLOAT32_LOGITS_ATOL


@pytest.mark.parametrize("name", REAL_MTP)
def test_real_megatron_deepseek_mtp_layer_reproduces_megatrons_mtp_logits(name, tmp_path):
    megatron_to_hf(fixture_path(name, REAL[name]), tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    reference = reference_logits(name)
    vocab = reference["vocab"]
    ours = mtp_logits(tmp_path / "hf", reference["tokens"])[..., :vocab]
    error = (ours - reference["mtp_logits"][0][..., :vocab]).abs()
    assert error.max().item() < FLOAT32_LOGITS_ATOL


def test_real_deepseek_rewritten_as_torch_dist_has_megatrons_keys_shapes_chunks_and_extra_state(tmp_path):
    source = fixture_path("deepseek_v3_tp1ep2", "dist")
    with open_checkpoint(source) as reader:
        assert reader.spec.family == "deepseek_v3" and reader.spec.mtp_num_layers == 1
        torch_dist.write(reader, tmp_path, TargetLayout(tp=1, pp=1, ep=2, iteration=10, args_base=reader.meta.args))
        real, ours = source / "iter_0000010", tmp_path / "iter_0000010"
        assert tensor_layout(ours) == tensor_layout(real)
        assert byte_keys(ours) == {key for key in byte_keys(real) if not key.startswith("rerun_state_machine_state/")}
        with open_checkpoint(tmp_path) as back:
            for canonical in reader.canonical():
                assert torch.equal(back.tensor(canonical.name), reader.tensor(canonical.name)), canonical.name


@pytest.mark.parametrize("name, tp", [("deepseek_v2_ep2_torch", 1)])
def test_real_per_rank_deepseek_rewritten_has_megatrons_keys_shapes_and_values(name, tp, tmp_path):
    source = fixture_path(name, "torch")
    reshard(source, tmp_path / "out", tp=tp, pp=1)
    real, ours = source / "iter_0000010", tmp_path / "out" / "iter_0000010"
    folders = sorted(path.name for path in real.iterdir())
    assert sorted(path.name for path in ours.iterdir()) == folders
    for folder in folders:
        assert_same_rank_model(ours / folder / "model_optim_rng.pt", real / folder / "model_optim_rng.pt")


def test_the_trainer_refuses_a_deepseek_model_before_training(tmp_path):
    """ckptkit's own trainer computes plain attention and softmax routing: a DeepSeek checkpoint
    is refused in one line before any step, and nothing is saved."""
    from click.testing import CliRunner

    from ckptkit.convert import hf_to_megatron
    from ckptkit.train.command import train

    from conftest import make_hf_model

    hf_to_megatron(make_hf_model(tmp_path / "hf", "deepseek_v3"), tmp_path / "megatron", tp=1, pp=1)
    result = CliRunner().invoke(train, ["--load", str(tmp_path / "megatron"), "--steps", "1", "--seq-length", "16",
                                        "--save", str(tmp_path / "run"), "--device", "cpu"])
    assert result.exit_code != 0
    assert "the trainer does not compute multi-latent attention, sigmoid router scores, a router expert bias, " \
           "group-limited routing, scaled routing weights (a deepseek_v3 model)" in result.output
    assert not (tmp_path / "run").exists()


# deepseek-ai/DeepSeek-V3's config.json (its architecture fields).
DEEPSEEK_V3_HUB_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8,
    "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                            "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False,
    "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "v_head_dim": 128, "vocab_size": 129280,
}


def test_deepseek_v3_hub_config_gives_megatrons_deepseek_v3_arguments():
    from ckptkit.bridges import bridge_for_config
    from ckptkit.megatron_args import megatron_args

    spec = bridge_for_config(DEEPSEEK_V3_HUB_CONFIG).config_to_spec(DEEPSEEK_V3_HUB_CONFIG)
    args = megatron_args(spec, tp=1, pp=1, dtype=torch.bfloat16, padded_vocab=129280, make_vocab_size_divisible_by=128)
    expected = dict(
        num_layers=61, hidden_size=7168, num_attention_heads=128, multi_latent_attention=True, q_lora_rank=1536,
        kv_lora_rank=512, qk_head_dim=128, qk_pos_emb_head_dim=64, v_head_dim=128, kv_channels=128, qk_layernorm=True,
        rope_type="yarn", rotary_scaling_factor=40.0, mscale=1.0, mscale_all_dim=1.0, group_query_attention=False,
        num_experts=256, moe_ffn_hidden_size=2048, moe_router_topk=8, moe_shared_expert_intermediate_size=2048,
        moe_layer_freq=[0, 0, 0] + [1] * 58, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_num_groups=8, moe_router_group_topk=4, moe_router_topk_scaling_factor=2.5, mtp_num_layers=1,
        ffn_hidden_size=18432, untie_embeddings_and_output_weights=True, norm_epsilon=1e-6)
    assert {name: getattr(args, name) for name in expected} == expected
    assert spec.rope_scaling["original_max_position_embeddings"] == 4096  # Megatron's MLA YaRN's fixed length


@pytest.mark.parametrize("layout", [dict(tp=2, pp=2, ep=1, format="torch"), dict(tp=2, pp=2, ep=2, format="torch_dist"),
                                    dict(tp=1, pp=1, ep=4, format="torch_dist")])
def test_real_deepseek_reshards_keeping_every_tensor(layout, tmp_path):
    """MLA's column-parallel down projections, the expert bias and the MTP layer (last stage) move
    between layouts unchanged."""
    from ckptkit.verification import verify

    source = fixture_path("deepseek_v3_tp1ep2", "dist")
    reshard(source, tmp_path / "out", **layout)
    assert verify(source, tmp_path / "out").equivalent
    with open_checkpoint(tmp_path / "out") as reader:
        assert reader.spec.mtp_num_layers == 1
        assert reader.tensor("decoder.layers.1.mlp.router.expert_bias").dtype == torch.float32
