"""Qwen2-MoE (``Qwen2MoeForCausalLM``): Qwen2 whose MLPs are experts plus a shared expert
scaled by ``sigmoid(shared_expert_gate . x)`` (Megatron ``--moe-shared-expert-gate``).

Layers in ``mlp_only_layers`` (or off the ``decoder_sparse_step``) stay dense MLPs of
``intermediate_size``; experts have ``moe_intermediate_size``. Without ``norm_topk_prob``
the router takes a softmax over all experts, then the top k as they are
(``--moe-router-pre-softmax``).
"""
from __future__ import annotations

import torch

from ..spec import ModelSpec
from .base import Bridge, first_problem
from .llama import IGNORABLE, llama_like_config, llama_like_mappings, llama_like_problem, llama_like_spec
from .moe import expert_mappings, moe_problem, refuse_zero, routing_fields, shared_expert_mappings, \
    sparse_layer_fields, sparse_layers
from .qwen2 import refuse_layer_windows

_MLP = "model.layers.{layer}.mlp."


def _config_to_spec(config: dict) -> ModelSpec:
    refuse_layer_windows(config)
    refuse_zero(config, "shared_expert_intermediate_size")
    return llama_like_spec(
        config, "qwen2_moe", add_qkv_bias=bool(config.get("qkv_bias", True)),
        num_experts=config["num_experts"], moe_ffn_hidden_size=config["moe_intermediate_size"],
        moe_layers=sparse_layers(config, config["num_hidden_layers"]),
        moe_shared_expert_size=config["shared_expert_intermediate_size"], moe_shared_expert_gate=True,
        **routing_fields(config))


def _mismatch(spec: ModelSpec) -> str | None:
    return llama_like_problem(spec, moe=True) or moe_problem(spec, shared_expert=True) or first_problem(
        (not spec.add_bias_linear, "biases beyond q/k/v"),
        (not spec.qk_layernorm, "q/k norms"),
        (spec.sliding_window is None, "a sliding window"),
    )


def _spec_to_config(spec: ModelSpec, dtype: torch.dtype) -> dict:
    QWEN2_MOE.check(spec)
    config = llama_like_config(spec, dtype, QWEN2_MOE.architecture, QWEN2_MOE.model_type, head_dim_field=False)
    config.update(sparse_layer_fields(spec), qkv_bias=spec.add_qkv_bias, num_experts=spec.num_experts,
                  num_experts_per_tok=spec.moe_router_topk, moe_intermediate_size=spec.moe_ffn_hidden_size,
                  shared_expert_intermediate_size=spec.moe_shared_expert_size,
                  norm_topk_prob=not spec.moe_router_pre_softmax, use_sliding_window=False, sliding_window=None)
    return config


def _mappings(spec: ModelSpec):
    return llama_like_mappings(spec) + expert_mappings(
        _MLP + "gate.weight", _MLP + "experts.{expert}.", "gate_proj.weight", "up_proj.weight",
        "down_proj.weight") + shared_expert_mappings(_MLP + "shared_expert.", _MLP + "shared_expert_gate.weight")


def _claims(spec: ModelSpec) -> bool:
    return _mismatch(spec) is None


QWEN2_MOE = Bridge("qwen2_moe", "Qwen2MoeForCausalLM", "qwen2_moe", _config_to_spec, _spec_to_config, _mappings,
                   _mismatch, _claims, IGNORABLE)
