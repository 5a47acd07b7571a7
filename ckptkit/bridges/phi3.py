"""Phi-3 (``Phi3ForCausalLM``): Llama whose Hugging Face layers fuse q, k and v into
``qkv_proj`` and gate and up into ``gate_up_proj``; no biases; optional sliding window.

``qkv_proj`` rows are ``[all q; all k; all v]`` (Megatron groups them per query group);
``gate_up_proj`` rows are ``[all gate; all up]``, which is the canonical ``linear_fc1``
as it is. Phi-3's ``longrope`` scaling and partial rotary embeddings are refused.
A Megatron checkpoint does not say it is Phi-3 unless ckptkit wrote it from one
(``--architecture Phi3ForCausalLM`` on export says so).
"""
from __future__ import annotations

import torch

from ..spec import ModelSpec
from .base import Bridge, HfMapping, first_problem, qkv_fuse, qkv_parts, same, same_back
from .llama import IGNORABLE, llama_like_config, llama_like_mappings, llama_like_problem, llama_like_spec


def _qkv_proj(fused: torch.Tensor, spec: ModelSpec):
    """Grouped rows ``[q0 q1 k0 v0 q2 q3 k1 v1]`` -> ``[q0 q1 q2 q3 k0 k1 v0 v1]``."""
    return [torch.cat(qkv_parts(fused, spec), dim=0)]


def _qkv_proj_back(tensors, spec: ModelSpec) -> torch.Tensor:
    query_rows = spec.num_attention_heads * spec.head_dim
    key_rows = spec.num_query_groups * spec.head_dim
    query, key, value = torch.split(tensors[0], [query_rows, key_rows, key_rows], dim=0)
    return qkv_fuse([query, key, value], spec)


_FUSED = {
    "decoder.layers.{layer}.self_attention.linear_qkv.weight":
        HfMapping("decoder.layers.{layer}.self_attention.linear_qkv.weight",
                  ("model.layers.{layer}.self_attn.qkv_proj.weight",), _qkv_proj, _qkv_proj_back),
    "decoder.layers.{layer}.mlp.linear_fc1.weight":
        HfMapping("decoder.layers.{layer}.mlp.linear_fc1.weight",
                  ("model.layers.{layer}.mlp.gate_up_proj.weight",), same, same_back),
}


def _mappings(spec: ModelSpec) -> list[HfMapping]:
    return [_FUSED.get(mapping.canonical, mapping) for mapping in llama_like_mappings(spec)]


def _config_to_spec(config: dict) -> ModelSpec:
    return llama_like_spec(config, "phi3", sliding_window=config.get("sliding_window"))


def _mismatch(spec: ModelSpec) -> str | None:
    return llama_like_problem(spec) or first_problem(
        (not spec.add_bias_linear and not spec.add_qkv_bias, "linear biases"),
        (not spec.qk_layernorm, "q/k norms"),
        (spec.head_dim * spec.num_attention_heads == spec.hidden_size,
         f"head_dim {spec.head_dim} x {spec.num_attention_heads} heads differs from hidden size {spec.hidden_size}"),
        (spec.rope_scaling is None, "llama3 RoPE scaling"),
    )


def _spec_to_config(spec: ModelSpec, dtype: torch.dtype) -> dict:
    PHI3.check(spec)
    config = llama_like_config(spec, dtype, PHI3.architecture, PHI3.model_type, head_dim_field=False)
    config.update(sliding_window=spec.sliding_window, resid_pdrop=0.0, embd_pdrop=0.0,
                  original_max_position_embeddings=spec.max_position_embeddings)
    return config


PHI3 = Bridge("phi3", "Phi3ForCausalLM", "phi3", _config_to_spec, _spec_to_config, _mappings, _mismatch,
              ignorable=IGNORABLE)
