"""Qwen3 (``Qwen3ForCausalLM``): Qwen2 without biases, plus per-head RMSNorm of q and k
(Megatron ``--qk-layernorm``) and an explicit ``head_dim`` (Megatron ``--kv-channels``).

``attention_bias=True`` would put a bias on ``o_proj`` but none on the MLP, which
Megatron's single ``add_bias_linear`` cannot express: refused.
"""
from __future__ import annotations

import torch

from ..errors import Unsupported
from ..spec import ModelSpec
from .base import Bridge, first_problem
from .llama import IGNORABLE, llama_like_config, llama_like_mappings, llama_like_problem, llama_like_spec
from .qwen2 import qwen_window_fields, refuse_layer_windows


def _config_to_spec(config: dict) -> ModelSpec:
    refuse_layer_windows(config)
    if config.get("attention_bias"):
        raise Unsupported("attention_bias=True (biases on attention but not MLP) has no Megatron equivalent")
    return llama_like_spec(config, "qwen3", qk_layernorm=True)


def _mismatch(spec: ModelSpec) -> str | None:
    return llama_like_problem(spec) or first_problem(
        (spec.qk_layernorm, "no q/k norms"),
        (not spec.add_bias_linear and not spec.add_qkv_bias, "linear biases"),
        (spec.sliding_window is None, "a sliding window on every layer"),
    )


def _spec_to_config(spec: ModelSpec, dtype: torch.dtype) -> dict:
    QWEN3.check(spec)
    config = llama_like_config(spec, dtype, QWEN3.architecture, QWEN3.model_type)
    config.update(qwen_window_fields(), attention_bias=False)
    return config


def _claims(spec: ModelSpec) -> bool:
    return _mismatch(spec) is None


QWEN3 = Bridge("qwen3", "Qwen3ForCausalLM", "qwen3", _config_to_spec, _spec_to_config, llama_like_mappings,
               _mismatch, _claims, IGNORABLE)
