"""Qwen2 (``Qwen2ForCausalLM``): Llama with biases on q, k and v only.

Qwen2's per-layer sliding window (``use_sliding_window`` from ``max_window_layers`` on)
has no Megatron equivalent and is refused.
"""
from __future__ import annotations

import torch

from ..errors import Unsupported
from ..spec import ModelSpec
from .base import Bridge, first_problem
from .llama import IGNORABLE, llama_like_config, llama_like_mappings, llama_like_problem, llama_like_spec


def refuse_layer_windows(config: dict) -> None:
    if config.get("use_sliding_window"):
        raise Unsupported("use_sliding_window=True (a window on some layers only) has no Megatron equivalent")


def _config_to_spec(config: dict) -> ModelSpec:
    refuse_layer_windows(config)
    return llama_like_spec(config, "qwen2", add_qkv_bias=True)


def _mismatch(spec: ModelSpec) -> str | None:
    return llama_like_problem(spec) or first_problem(
        (spec.add_qkv_bias and not spec.add_bias_linear, "Qwen2 has biases on q/k/v and nowhere else"),
        (not spec.qk_layernorm, "q/k norms (that is Qwen3)"),
        (spec.sliding_window is None, "a sliding window on every layer"),
    )


def qwen_window_fields() -> dict:
    return {"use_sliding_window": False, "sliding_window": None}


def _spec_to_config(spec: ModelSpec, dtype: torch.dtype) -> dict:
    QWEN2.check(spec)
    config = llama_like_config(spec, dtype, QWEN2.architecture, QWEN2.model_type, head_dim_field=False)
    config.update(qwen_window_fields())
    return config


def _claims(spec: ModelSpec) -> bool:
    return _mismatch(spec) is None


QWEN2 = Bridge("qwen2", "Qwen2ForCausalLM", "qwen2", _config_to_spec, _spec_to_config, llama_like_mappings,
               _mismatch, _claims, IGNORABLE)
