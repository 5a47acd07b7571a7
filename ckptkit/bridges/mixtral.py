"""Mixtral (``MixtralForCausalLM``): Mistral whose every MLP is a mixture of experts.

HF ``block_sparse_moe.gate`` is the router; expert e's ``w1`` (gate), ``w3`` (up) and
``w2`` (down) are Megatron's expert ``linear_fc1`` = ``[w1; w3]`` and ``linear_fc2``.
Routing is top-k of the router logits, then a softmax over the chosen k: Megatron's
default (no ``--moe-router-pre-softmax``).
"""
from __future__ import annotations

import torch

from ..spec import ModelSpec
from .base import Bridge, first_problem
from .llama import IGNORABLE, llama_like_config, llama_like_mappings, llama_like_problem, llama_like_spec
from .moe import expert_mappings, moe_problem

_MOE = "model.layers.{layer}.block_sparse_moe."


def _config_to_spec(config: dict) -> ModelSpec:
    return llama_like_spec(
        config, "mixtral", sliding_window=config.get("sliding_window"),
        num_experts=config["num_local_experts"], moe_ffn_hidden_size=config["intermediate_size"],
        moe_router_topk=config["num_experts_per_tok"])


def _mismatch(spec: ModelSpec) -> str | None:
    return llama_like_problem(spec, moe=True) or moe_problem(spec, shared_expert=False) or first_problem(
        (spec.moe_layers is None, "dense layers among the MoE layers"),
        (not spec.moe_router_pre_softmax, "a softmax over all experts before the top-k"),
        (not spec.add_bias_linear and not spec.add_qkv_bias, "linear biases"),
        (not spec.qk_layernorm, "q/k norms"),
    )


def _spec_to_config(spec: ModelSpec, dtype: torch.dtype) -> dict:
    MIXTRAL.check(spec)
    config = llama_like_config(spec, dtype, MIXTRAL.architecture, MIXTRAL.model_type)
    # every layer is MoE (dense layers are refused), so Megatron's --ffn-hidden-size sizes no
    # weight (it defaults to 4 x hidden): the experts' size is intermediate_size
    config.update(intermediate_size=spec.moe_ffn_hidden_size)
    config.update(sliding_window=spec.sliding_window, num_local_experts=spec.num_experts,
                  num_experts_per_tok=spec.moe_router_topk, router_jitter_noise=0.0)
    return config


def _mappings(spec: ModelSpec):
    return llama_like_mappings(spec) + expert_mappings(
        _MOE + "gate.weight", _MOE + "experts.{expert}.", "w1.weight", "w3.weight", "w2.weight")


def _claims(spec: ModelSpec) -> bool:
    return _mismatch(spec) is None


MIXTRAL = Bridge("mixtral", "MixtralForCausalLM", "mixtral", _config_to_spec, _spec_to_config, _mappings,
                 _mismatch, _claims, IGNORABLE)
