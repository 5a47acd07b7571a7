"""Llama (``LlamaForCausalLM``, Llama 2 and 3.x), and the pieces its relatives reuse.

RoPE (rotate-half, as Megatron's non-interleaved rotary), RMSNorm, SwiGLU, grouped-query
attention. Llama 3.1-3.3 scale RoPE's frequencies (``rope_type: llama3``); Megatron's
``--use-rope-scaling`` does the same with ``--rope-scaling-factor`` (see
:mod:`ckptkit.megatron_args` for what it can express). ``attention_bias`` and
``mlp_bias`` go together: Megatron's ``add_bias_linear`` puts biases on both.

Mistral, Qwen2, Qwen3 and Phi-3 are this model with other switches; their bridges build
on :func:`llama_like_spec`, :func:`llama_like_config` and :func:`llama_like_mappings`.
"""
from __future__ import annotations

import torch

from ..errors import BadInput, Unsupported
from ..spec import ModelSpec
from .base import (Bridge, HfMapping, first_problem, halves, halves_back, qkv_fuse, qkv_parts, same, same_back,
                   vocab_rows)

LLAMA3_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
IGNORABLE = ("rotary_emb.inv_freq", "lm_head.weight")


def rope_theta(config: dict) -> float:
    parameters = config.get("rope_parameters") or {}
    return float(config.get("rope_theta") or parameters.get("rope_theta") or 10000.0)


def rope_scaling(config: dict) -> dict | None:
    """The RoPE scaling of a config in the spec's form: None, or a complete llama3 dict.

    transformers 4 writes ``rope_scaling``; 5 writes ``rope_parameters`` (with the theta
    inside). Older configs say ``type`` for ``rope_type``.
    """
    scaling = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    partial = scaling.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise Unsupported(f"partial_rotary_factor {partial}: only full rotary embeddings are supported")
    if kind == "default":
        return None
    if kind != "llama3":
        raise Unsupported(f"RoPE scaling {kind!r} has no Megatron equivalent (supported: llama3)")
    missing = [name for name in LLAMA3_FIELDS if scaling.get(name) is None]
    if missing:
        raise BadInput(f"llama3 RoPE scaling lacks {', '.join(missing)}")
    return {"rope_type": "llama3", "factor": float(scaling["factor"]),
            "low_freq_factor": float(scaling["low_freq_factor"]),
            "high_freq_factor": float(scaling["high_freq_factor"]),
            "original_max_position_embeddings": int(scaling["original_max_position_embeddings"])}


def llama_like_spec(config: dict, family: str, **fields) -> ModelSpec:
    """The spec every Llama-like config shares; ``fields`` set the family's switches."""
    if config.get("hidden_act", "silu") != "silu":
        raise Unsupported(f"activation {config.get('hidden_act')!r}; only SwiGLU (silu) is supported")
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    base = dict(
        family=family, num_layers=config["num_hidden_layers"], hidden_size=hidden,
        num_attention_heads=heads, num_query_groups=config.get("num_key_value_heads") or heads,
        ffn_hidden_size=config["intermediate_size"], vocab_size=config["vocab_size"],
        max_position_embeddings=config.get("max_position_embeddings", 2048),
        head_dim=config.get("head_dim") or hidden // heads, position_embedding="rope",
        normalization="RMSNorm", norm_epsilon=config.get("rms_norm_eps", 1e-6), activation="swiglu",
        add_bias_linear=False, add_qkv_bias=False,
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_theta=rope_theta(config), rope_scaling=rope_scaling(config),
    )
    base.update(fields)
    return ModelSpec(**base)


def llama_like_config(spec: ModelSpec, dtype: torch.dtype, architecture: str, model_type: str,
                      head_dim_field: bool = True) -> dict:
    """The config fields every Llama-like family writes. Families whose config has no
    ``head_dim`` (``head_dim_field=False``) get one only when it is not hidden / heads,
    which their attention then reads."""
    config = {
        "architectures": [architecture], "model_type": model_type,
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
    if not head_dim_field and spec.head_dim * spec.num_attention_heads == spec.hidden_size:
        del config["head_dim"]
    return config


def llama_like_problem(spec: ModelSpec, moe: bool = False, mla: bool = False) -> str | None:
    """Why a spec is not a Llama-like model at all (SwiGLU, RMSNorm, RoPE; dense unless ``moe``;
    multi-head or grouped-query attention unless ``mla``)."""
    return first_problem(
        (moe or not spec.num_experts, "a mixture of experts"),
        (mla or not spec.multi_latent_attention, "multi-latent attention"),
        (spec.gated, f"activation {spec.activation}; expected SwiGLU"),
        (spec.normalization == "RMSNorm", f"{spec.normalization}; expected RMSNorm"),
        (spec.position_embedding == "rope", f"{spec.position_embedding} positions; expected RoPE"),
    )


def llama_like_mappings(spec: ModelSpec) -> list[HfMapping]:
    """Canonical <-> ``model.layers.N.self_attn/mlp`` names, separate q/k/v and gate/up."""
    layer, hf = "decoder.layers.{layer}.", "model.layers.{layer}."
    attention = hf + "self_attn."
    return [
        HfMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), vocab_rows, same_back),
        HfMapping(layer + "input_layernorm.weight", (hf + "input_layernorm.weight",), same, same_back),
        HfMapping(layer + "self_attention.linear_qkv.weight",
                  (attention + "q_proj.weight", attention + "k_proj.weight", attention + "v_proj.weight"),
                  qkv_parts, qkv_fuse),
        HfMapping(layer + "self_attention.linear_qkv.bias",
                  (attention + "q_proj.bias", attention + "k_proj.bias", attention + "v_proj.bias"),
                  qkv_parts, qkv_fuse),
        HfMapping(layer + "self_attention.q_layernorm.weight", (attention + "q_norm.weight",), same, same_back),
        HfMapping(layer + "self_attention.k_layernorm.weight", (attention + "k_norm.weight",), same, same_back),
        HfMapping(layer + "self_attention.linear_proj.weight", (attention + "o_proj.weight",), same, same_back),
        HfMapping(layer + "self_attention.linear_proj.bias", (attention + "o_proj.bias",), same, same_back),
        HfMapping(layer + "pre_mlp_layernorm.weight", (hf + "post_attention_layernorm.weight",), same, same_back),
        HfMapping(layer + "mlp.linear_fc1.weight", (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"),
                  halves, halves_back),
        HfMapping(layer + "mlp.linear_fc1.bias", (hf + "mlp.gate_proj.bias", hf + "mlp.up_proj.bias"),
                  halves, halves_back),
        HfMapping(layer + "mlp.linear_fc2.weight", (hf + "mlp.down_proj.weight",), same, same_back),
        HfMapping(layer + "mlp.linear_fc2.bias", (hf + "mlp.down_proj.bias",), same, same_back),
        HfMapping("decoder.final_layernorm.weight", ("model.norm.weight",), same, same_back),
        HfMapping("output_layer.weight", ("lm_head.weight",), vocab_rows, same_back),
    ]


def _config_to_spec(config: dict) -> ModelSpec:
    attention_bias, mlp_bias = bool(config.get("attention_bias")), bool(config.get("mlp_bias"))
    if attention_bias != mlp_bias:
        raise Unsupported(f"attention_bias={attention_bias} with mlp_bias={mlp_bias}: Megatron's "
                          "add_bias_linear puts biases on attention and MLP together")
    return llama_like_spec(config, "llama", add_bias_linear=attention_bias, add_qkv_bias=attention_bias)


def _mismatch(spec: ModelSpec) -> str | None:
    return llama_like_problem(spec) or first_problem(
        (spec.add_qkv_bias == spec.add_bias_linear, "biases on q/k/v only (that is Qwen2)"),
        (not spec.qk_layernorm, "q/k norms (that is Qwen3)"),
        (spec.sliding_window is None, f"a sliding window of {spec.sliding_window} (that is Mistral)"),
    )


def _spec_to_config(spec: ModelSpec, dtype: torch.dtype) -> dict:
    LLAMA.check(spec)
    config = llama_like_config(spec, dtype, LLAMA.architecture, LLAMA.model_type)
    config.update(attention_bias=spec.add_bias_linear, mlp_bias=spec.add_bias_linear)
    return config


def _claims(spec: ModelSpec) -> bool:
    return _mismatch(spec) is None


LLAMA = Bridge("llama", "LlamaForCausalLM", "llama", _config_to_spec, _spec_to_config, llama_like_mappings,
               _mismatch, _claims, IGNORABLE)
