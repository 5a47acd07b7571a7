"""The trainer's model computes Qwen3, Llama 3.1 and Mistral as transformers does.

Each architecture test draws a tiny transformers model (float32, eager attention,
every weight perturbed so that norms are not ones), maps its weights by hand onto
Megatron's canonical tensors, loads them into the in-repo model and compares logits.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from ckptkit import kernels
from ckptkit.errors import Unsupported
from ckptkit.spec import ModelSpec
from ckptkit.train import TrainConfig
from ckptkit.train.model import GPT, attention_mask
from ckptkit.train.optim import AdamConfig
from ckptkit.train.parallel import Layout
from ckptkit.train.trainer import run_training
from ckptkit.train.weights import load_weights

LOGITS_ATOL = 1e-5
VOCAB = 101
SEQ = 24

SMALL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
             vocab_size=VOCAB, max_position_embeddings=256, head_dim=8, position_embedding="rope",
             normalization="RMSNorm", norm_epsilon=1e-6, activation="swiglu", add_bias_linear=False,
             add_qkv_bias=False, tied_embeddings=False)
HF_SMALL = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-6,
                tie_word_embeddings=False, attention_bias=False, bos_token_id=None, eos_token_id=None,
                pad_token_id=None)

# head_dim 16 with hidden 32 and 4 heads: queries are 64 wide, twice the hidden size (Megatron's --kv-channels).
QWEN3 = ModelSpec(family="qwen3", **{**SMALL, "head_dim": 16}, rope_theta=1_000_000.0, qk_layernorm=True)
# original_max_position_embeddings 64 puts head_dim 16's wavelengths (6.3 .. 353 tokens at theta 1e4)
# in all three bands: < 16 kept, 16 .. 64 interpolated, > 64 divided by the factor.
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}
LLAMA31 = ModelSpec(family="llama", **{**SMALL, "head_dim": 16}, rope_scaling=LLAMA3_SCALING)
MISTRAL = ModelSpec(family="mistral", **{**SMALL, "num_query_groups": 1}, sliding_window=5)


def tokens(seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(7))


def hf_model(architecture: str, **config):
    """A random float32 transformers model with eager attention and no weight left at its init value."""
    import transformers

    config_class = getattr(transformers, f"{architecture}Config")
    model_class = getattr(transformers, f"{architecture}ForCausalLM")
    torch.manual_seed(0)
    model = model_class._from_config(config_class(**{**HF_SMALL, **config}), attn_implementation="eager")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * (0.2 if parameter.dim() == 1 else 0.02))
    return model.float().eval()


def megatron_tensors(hf_state: dict, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Canonical (Megatron) tensors from a Llama-style transformers state dict, written out by hand.

    ``linear_qkv`` rows are grouped per query group: ``[q heads of group g; k_g; v_g]`` for each g.
    ``linear_fc1`` is ``[gate; up]``.
    """
    hidden, head_dim, groups = spec.hidden_size, spec.head_dim, spec.num_query_groups
    tensors = {"embedding.word_embeddings.weight": hf_state["model.embed_tokens.weight"],
               "decoder.final_layernorm.weight": hf_state["model.norm.weight"],
               "output_layer.weight": hf_state["lm_head.weight"]}
    for layer in range(spec.num_layers):
        hf, ours = f"model.layers.{layer}.", f"decoder.layers.{layer}."
        query = hf_state[hf + "self_attn.q_proj.weight"].view(groups, spec.heads_per_group * head_dim, hidden)
        key = hf_state[hf + "self_attn.k_proj.weight"].view(groups, head_dim, hidden)
        value = hf_state[hf + "self_attn.v_proj.weight"].view(groups, head_dim, hidden)
        tensors[ours + "self_attention.linear_qkv.weight"] = torch.cat([query, key, value], dim=1).reshape(-1, hidden)
        tensors[ours + "self_attention.linear_proj.weight"] = hf_state[hf + "self_attn.o_proj.weight"]
        tensors[ours + "input_layernorm.weight"] = hf_state[hf + "input_layernorm.weight"]
        tensors[ours + "pre_mlp_layernorm.weight"] = hf_state[hf + "post_attention_layernorm.weight"]
        tensors[ours + "mlp.linear_fc1.weight"] = torch.cat([hf_state[hf + "mlp.gate_proj.weight"],
                                                             hf_state[hf + "mlp.up_proj.weight"]])
        tensors[ours + "mlp.linear_fc2.weight"] = hf_state[hf + "mlp.down_proj.weight"]
        if spec.qk_layernorm:
            tensors[ours + "self_attention.q_layernorm.weight"] = hf_state[hf + "self_attn.q_norm.weight"]
            tensors[ours + "self_attention.k_layernorm.weight"] = hf_state[hf + "self_attn.k_norm.weight"]
    return tensors


def our_model(spec: ModelSpec, tensors: dict[str, torch.Tensor], fused: bool = False, device="cpu") -> GPT:
    model = GPT(spec, fused_kernels=fused).to(device)
    load_weights(model, lambda name: tensors[name], Layout(), tp_rank=0, pp_stage=0)
    return model.eval()


def logits_of_both(spec: ModelSpec, architecture: str, seq: int = SEQ, **hf_config):
    hf = hf_model(architecture, **hf_config)
    ours = our_model(spec, megatron_tensors(hf.state_dict(), spec))
    with torch.no_grad():
        return ours(tokens(seq)), hf(tokens(seq)).logits


# ---------------------------------------------------------------------------- Qwen3: q/k norms, head_dim

def test_qwen3_qk_layernorm_and_head_dim_give_transformers_logits():
    ours, theirs = logits_of_both(QWEN3, "Qwen3", head_dim=16,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                                  use_sliding_window=False)
    assert (ours - theirs).abs().max().item() < LOGITS_ATOL


def test_query_and_key_norms_are_named_as_megatron_names_them_after_linear_qkv():
    names = [name for name, _ in GPT(QWEN3).named_parameters() if name.startswith("decoder.layers.0.self_attention")]
    assert names == ["decoder.layers.0.self_attention.linear_proj.weight",
                     "decoder.layers.0.self_attention.linear_qkv.weight",
                     "decoder.layers.0.self_attention.q_layernorm.weight",
                     "decoder.layers.0.self_attention.k_layernorm.weight"]


def test_query_and_key_norms_have_one_weight_per_head_channel_and_a_bias_under_layernorm():
    parameters = dict(GPT(dataclasses.replace(QWEN3, normalization="LayerNorm")).named_parameters())
    for norm in ("q_layernorm", "k_layernorm"):
        assert parameters[f"decoder.layers.1.self_attention.{norm}.weight"].shape == (16,)
        assert parameters[f"decoder.layers.1.self_attention.{norm}.bias"].shape == (16,)


def test_head_dim_other_than_hidden_over_heads_sets_the_qkv_and_projection_widths():
    attention = GPT(QWEN3).decoder.layers[0].self_attention
    # 4 query heads + 2 key + 2 value heads of 16 channels; the projection takes 4 x 16 = 64 back to 32.
    assert attention.linear_qkv.weight.shape == ((4 + 2 * 2) * 16, 32)
    assert attention.linear_proj.weight.shape == (32, 64)


def test_models_without_qk_layernorm_have_no_query_or_key_norm():
    names = [name for name, _ in GPT(LLAMA31).named_parameters()]
    assert not any("q_layernorm" in name or "k_layernorm" in name for name in names)


# ---------------------------------------------------------------------------- Llama 3.1: RoPE scaling

def test_llama3_scaled_frequencies_match_transformers_in_all_three_bands():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(**HF_SMALL, head_dim=16, rope_parameters={**LLAMA3_SCALING, "rope_theta": 10000.0})
    expected, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = kernels.rope_inverse_frequencies(16, 10000.0)
    scaled = kernels.rope_inverse_frequencies(16, 10000.0, LLAMA3_SCALING)
    assert torch.equal(scaled, expected) and attention_factor == 1.0
    wavelength = 2 * torch.pi / plain
    kept, divided = wavelength < 64 / 4, wavelength > 64 / 1
    between = ~kept & ~divided
    assert kept.any() and divided.any() and between.any()
    assert torch.equal(scaled[kept], plain[kept])
    assert torch.equal(scaled[divided], plain[divided] / 8.0)
    assert ((scaled[between] < plain[between]) & (scaled[between] > plain[between] / 8.0)).all()


def test_llama31_rope_scaling_gives_transformers_logits():
    ours, theirs = logits_of_both(LLAMA31, "Llama", head_dim=16,
                                  rope_parameters={**LLAMA3_SCALING, "rope_theta": 10000.0})
    assert (ours - theirs).abs().max().item() < LOGITS_ATOL


def test_rope_scaling_changes_the_logits():
    hf = hf_model("Llama", head_dim=16, rope_parameters={**LLAMA3_SCALING, "rope_theta": 10000.0})
    tensors = megatron_tensors(hf.state_dict(), LLAMA31)
    unscaled = dataclasses.replace(LLAMA31, rope_scaling=None)
    with torch.no_grad():
        difference = (our_model(LLAMA31, tensors)(tokens()) - our_model(unscaled, tensors)(tokens())).abs().max()
    assert difference.item() > 1e-3


def test_missing_llama3_parameters_take_megatrons_defaults():
    # A Megatron checkpoint's args record only --rope-scaling-factor.
    assert kernels.rope_scaling_parameters({"rope_type": "llama3", "factor": 32.0}) == {
        "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_rope_type_default_is_plain_rope():
    assert kernels.rope_scaling_parameters({"rope_type": "default"}) is None
    assert torch.equal(kernels.rope_inverse_frequencies(16, 1e4, {"rope_type": "default"}),
                       kernels.rope_inverse_frequencies(16, 1e4))


@pytest.mark.parametrize("scaling", [{"rope_type": "yarn", "factor": 4.0}, {"type": "linear", "factor": 2.0}])
def test_other_rope_scaling_types_are_refused_naming_the_type(scaling):
    spec = dataclasses.replace(LLAMA31, rope_scaling=scaling)
    rope_type = scaling.get("rope_type", scaling.get("type"))
    with pytest.raises(Unsupported, match=rope_type):
        GPT(spec)
    with pytest.raises(Unsupported, match=rope_type):
        TrainConfig(model=spec).check(spec)


# ---------------------------------------------------------------------------- Mistral: sliding window

def test_sliding_window_mask_lets_query_i_see_keys_i_minus_w_plus_1_to_i():
    expected = torch.tensor([[1, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0],
                             [0, 1, 1, 0, 0],
                             [0, 0, 1, 1, 0],
                             [0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(attention_mask(5, 2), expected)
    assert attention_mask(5, 5) is None and attention_mask(5, None) is None  # plain causal


def test_mistral_sliding_window_gives_transformers_logits():
    ours, theirs = logits_of_both(MISTRAL, "Mistral", num_key_value_heads=1, head_dim=8, sliding_window=5)
    assert (ours - theirs).abs().max().item() < LOGITS_ATOL


def test_sliding_window_shorter_than_the_sequence_changes_the_logits():
    hf = hf_model("Mistral", num_key_value_heads=1, head_dim=8, sliding_window=5)
    tensors = megatron_tensors(hf.state_dict(), MISTRAL)
    full = dataclasses.replace(MISTRAL, sliding_window=None)
    with torch.no_grad():
        windowed, causal = our_model(MISTRAL, tensors)(tokens()), our_model(full, tensors)(tokens())
    assert torch.equal(windowed[:, :5], causal[:, :5])  # the first 5 queries see everything before them anyway
    assert (windowed[:, 5:] - causal[:, 5:]).abs().max().item() > 1e-3


# ---------------------------------------------------------------------------- training with every feature

ALL_FEATURES = dataclasses.replace(QWEN3, rope_theta=10000.0, rope_scaling=LLAMA3_SCALING, sliding_window=6)


def test_trainer_trains_a_model_with_every_feature():
    config = TrainConfig(model=ALL_FEATURES, steps=4, micro_batch_size=2, global_batch_size=4, seq_length=16,
                         make_vocab_size_divisible_by=64, optimizer=AdamConfig(lr=3e-3))
    config.check(ALL_FEATURES)
    losses = run_training(config, torch.device("cpu")).losses
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


@pytest.mark.skipif(not kernels.fused_available(), reason="needs a CUDA GPU and Triton")
def test_fused_kernels_compute_every_feature_as_the_eager_model():
    hf = hf_model("Qwen3", head_dim=16)
    tensors = {name: tensor.cuda() for name, tensor in megatron_tensors(hf.state_dict(), ALL_FEATURES).items()}
    with torch.no_grad():
        fused = our_model(ALL_FEATURES, tensors, fused=True, device="cuda")(tokens().cuda())
        eager = our_model(ALL_FEATURES, tensors, fused=False, device="cuda")(tokens().cuda())
    assert (fused - eager).abs().max().item() < 1e-4


# ---------------------------------------------------------------------------- compiled layers

@pytest.mark.parametrize("scope", ["layers", "model"])
def test_compiled_layers_or_model_train_as_the_eager_model(scope):
    config = TrainConfig(model=ALL_FEATURES, steps=2, micro_batch_size=2, global_batch_size=2, seq_length=16,
                         make_vocab_size_divisible_by=64, optimizer=AdamConfig(lr=3e-3), device="cpu")
    eager = run_training(config, "cpu")
    compiled = run_training(dataclasses.replace(config, compile=True, compile_scope=scope), "cpu")
    assert compiled.losses == pytest.approx(eager.losses, abs=1e-5)
    assert [r.grad_norm for r in compiled.records] == pytest.approx([r.grad_norm for r in eager.records], rel=1e-4)


@pytest.mark.parametrize("sizes", [dict(tp=2), dict(dp=2, ep=2)])
def test_compiling_layers_that_hold_collectives_is_refused(sizes):
    config = TrainConfig(model=ALL_FEATURES, compile=True, **sizes)
    with pytest.raises(Unsupported, match="compiling the layers needs TP=1 and EP=1"):
        config.check_layout()
