"""Qwen3-MoE (``Qwen3MoeForCausalLM``): Qwen3 (q/k norms, explicit head_dim, no biases)
whose MLPs are experts, without a shared expert. Dense layers and routing as Qwen2-MoE
(:mod:`ckptkit.bridges.qwen2_moe`); the released models renormalise the top k
(``norm_topk_prob``), which is Megatron's default routing.
"""
from __future__ import annotations

import torch

from ..errors import Unsupported
from ..spec import ModelSpec
from .base import Bridge, first_problem
from .llama import IGNORABLE, llama_like_config, llama_like_mappings, llama_like_problem, llama_like_spec
from .moe import expert_mappings, moe_problem, routing_fields, sparse_layer_fields, sparse_layers
from .qwen2 import refuse_layer_windows

_MLP = "model.layers.{layer}.mlp."


def _config_to_spec(config: dict) -> ModelSpec:
    refuse_layer_windows(config)
    if config.get("attention_bias"):
        raise Unsupported("attention_bias=True (biases on attention but not MLP) has no Megatron equivalent")
    experts = config.get("num_experts") or config.get("num_local_experts")
    return llama_like_spec(
        config, "qwen3_moe", qk_layernorm=True, num_experts=experts,
        moe_ffn_hidden_size=config["moe_intermediate_size"],
        moe_layers=sparse_layers(config, config["num_hidden_layers"]), **routing_fields(config))


def _mismatch(spec: ModelSpec) -> str | None:
    return llama_like_problem(spec, moe=True) or moe_problem(spec, shared_expert=False) or first_problem(
        (spec.qk_layernorm, "no q/k norms"),
        (not spec.add_bias_linear and not spec.add_qkv_bias, "linear biases"),
        (spec.sliding_window is None, "a sliding window"),
    )


def _spec_to_config(spec: ModelSpec, dtype: torch.dtype) -> dict:
    QWEN3_MOE.check(spec)
    config = llama_like_config(spec, dtype, QWEN3_MOE.architecture, QWEN3_MOE.model_type)
    config.update(sparse_layer_fields(spec), num_experts=spec.num_experts, num_experts_per_tok=spec.moe_router_topk,
                  moe_intermediate_size=spec.moe_ffn_hidden_size, norm_topk_prob=not spec.moe_router_pre_softmax,
                  attention_bias=False, use_sliding_window=False, sliding_window=None)
    return config


def _mappings(spec: ModelSpec):
    return llama_like_mappings(spec) + expert_mappings(
        _MLP + "gate.weight", _MLP + "experts.{expert}.", "gate_proj.weight", "up_proj.weight", "down_proj.weight")


def _claims(spec: ModelSpec) -> bool:
    return _mismatch(spec) is None


QWEN3_MOE = Bridge("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3_moe", _config_to_spec, _spec_to_config, _mappings,
                   _mismatch, _claims, IGNORABLE)
