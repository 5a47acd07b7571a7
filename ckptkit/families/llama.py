"""Llama-style families: ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``.

RoPE (rotate-half, as Megatron's non-interleaved rotary), RMSNorm, SwiGLU, grouped-query
attention. They differ only in biases (Qwen2: q/k/v biases only) and config fields,
so each family is the same mapping table with different switches.
"""
from __future__ import annotations

import torch

from ..errors import Unsupported
from ..spec import ModelSpec
from .base import HfFamily, HfMapping, halves, halves_back, qkv_fuse, qkv_parts, same, same_back, vocab_rows


def _rope_theta(config: dict) -> float:
    parameters = config.get("rope_parameters") or {}
    return float(config.get("rope_theta") or parameters.get("rope_theta") or 10000.0)


def _rope_scaling(config: dict):
    scaling = config.get("rope_scaling")
    if scaling is None:
        parameters = dict(config.get("rope_parameters") or {})
        parameters.pop("rope_theta", None)
        if parameters.get("rope_type", "default") != "default":
            scaling = parameters
    return scaling


def _make_config_to_spec(family: str):
    def config_to_spec(config: dict) -> ModelSpec:
        if config.get("hidden_act", "silu") != "silu":
            raise Unsupported(f"config.json: activation {config.get('hidden_act')!r}; only SwiGLU (silu) is supported")
        heads = config["num_attention_heads"]
        hidden = config["hidden_size"]
        qkv_bias = family == "qwen2" or bool(config.get("attention_bias", False))
        if family == "llama" and config.get("mlp_bias"):
            raise Unsupported("config.json: mlp_bias=True has no Megatron equivalent here")
        return ModelSpec(
            family=family, num_layers=config["num_hidden_layers"], hidden_size=hidden,
            num_attention_heads=heads, num_query_groups=config.get("num_key_value_heads") or heads,
            ffn_hidden_size=config["intermediate_size"], vocab_size=config["vocab_size"],
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            head_dim=config.get("head_dim") or hidden // heads, position_embedding="rope",
            normalization="RMSNorm", norm_epsilon=config.get("rms_norm_eps", 1e-6), activation="swiglu",
            add_bias_linear=family == "llama" and bool(config.get("attention_bias", False)),
            add_qkv_bias=qkv_bias, tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            rope_theta=_rope_theta(config), rope_scaling=_rope_scaling(config),
            sliding_window=config.get("sliding_window") if config.get("use_sliding_window", family == "mistral") else None,
        )
    return config_to_spec


def _make_spec_to_config(family: str, architecture: str):
    def spec_to_config(spec: ModelSpec, dtype: torch.dtype) -> dict:
        if not spec.gated or spec.normalization != "RMSNorm" or spec.position_embedding != "rope":
            raise Unsupported(f"{architecture} needs SwiGLU, RMSNorm and RoPE")
        if family == "qwen2" and (spec.add_bias_linear or not spec.add_qkv_bias):
            raise Unsupported("Qwen2 has biases on q/k/v only")
        if family != "qwen2" and spec.add_qkv_bias != spec.add_bias_linear:
            raise Unsupported(f"{architecture} puts biases on all attention projections or none")
        config = {
            "architectures": [architecture], "model_type": family,
            "hidden_size": spec.hidden_size, "intermediate_size": spec.ffn_hidden_size,
            "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.num_attention_heads,
            "num_key_value_heads": spec.num_query_groups, "head_dim": spec.head_dim,
            "max_position_embeddings": spec.max_position_embeddings, "rms_norm_eps": spec.norm_epsilon,
            "rope_theta": spec.rope_theta, "tie_word_embeddings": spec.tied_embeddings,
            "vocab_size": spec.vocab_size, "hidden_act": "silu", "attention_dropout": 0.0,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }
        if spec.rope_scaling:
            config["rope_scaling"] = dict(spec.rope_scaling)
        if family == "llama":
            config.update(attention_bias=spec.add_bias_linear, mlp_bias=False)
        if family == "mistral":
            config["sliding_window"] = spec.sliding_window
        if family == "qwen2":
            config.update(use_sliding_window=False, sliding_window=None)
        return config
    return spec_to_config


def mappings(spec: ModelSpec) -> list[HfMapping]:
    layer = "decoder.layers.{layer}."
    hf = "model.layers.{layer}."
    table = [
        HfMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), vocab_rows, same_back),
        HfMapping(layer + "input_layernorm.weight", (hf + "input_layernorm.weight",), same, same_back),
        HfMapping(layer + "self_attention.linear_qkv.weight",
                  (hf + "self_attn.q_proj.weight", hf + "self_attn.k_proj.weight", hf + "self_attn.v_proj.weight"),
                  qkv_parts, qkv_fuse),
        HfMapping(layer + "self_attention.linear_qkv.bias",
                  (hf + "self_attn.q_proj.bias", hf + "self_attn.k_proj.bias", hf + "self_attn.v_proj.bias"),
                  qkv_parts, qkv_fuse),
        HfMapping(layer + "self_attention.linear_proj.weight", (hf + "self_attn.o_proj.weight",), same, same_back),
        HfMapping(layer + "self_attention.linear_proj.bias", (hf + "self_attn.o_proj.bias",), same, same_back),
        HfMapping(layer + "pre_mlp_layernorm.weight", (hf + "post_attention_layernorm.weight",), same, same_back),
        HfMapping(layer + "mlp.linear_fc1.weight", (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"),
                  halves, halves_back),
        HfMapping(layer + "mlp.linear_fc2.weight", (hf + "mlp.down_proj.weight",), same, same_back),
        HfMapping("decoder.final_layernorm.weight", ("model.norm.weight",), same, same_back),
        HfMapping("output_layer.weight", ("lm_head.weight",), vocab_rows, same_back),
    ]
    return table


_IGNORABLE = ("rotary_emb.inv_freq", "lm_head.weight")
LLAMA = HfFamily("llama", "LlamaForCausalLM", "llama", _make_config_to_spec("llama"),
                 _make_spec_to_config("llama", "LlamaForCausalLM"), mappings, _IGNORABLE)
MISTRAL = HfFamily("mistral", "MistralForCausalLM", "mistral", _make_config_to_spec("mistral"),
                   _make_spec_to_config("mistral", "MistralForCausalLM"), mappings, _IGNORABLE)
QWEN2 = HfFamily("qwen2", "Qwen2ForCausalLM", "qwen2", _make_config_to_spec("qwen2"),
                 _make_spec_to_config("qwen2", "Qwen2ForCausalLM"), mappings, _IGNORABLE)
