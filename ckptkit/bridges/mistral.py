"""Mistral (``MistralForCausalLM``): Llama without biases, with an optional sliding window.

``sliding_window`` W lets each query see W tokens, itself included; Megatron's
``window_size`` is ``(W - 1, 0)`` (see :mod:`ckptkit.megatron_args`).
"""
from __future__ import annotations

import torch

from ..spec import ModelSpec
from .base import Bridge, first_problem
from .llama import IGNORABLE, llama_like_config, llama_like_mappings, llama_like_problem, llama_like_spec


def _config_to_spec(config: dict) -> ModelSpec:
    return llama_like_spec(config, "mistral", sliding_window=config.get("sliding_window"))


def _mismatch(spec: ModelSpec) -> str | None:
    return llama_like_problem(spec) or first_problem(
        (not spec.add_bias_linear and not spec.add_qkv_bias, "linear biases"),
        (not spec.qk_layernorm, "q/k norms"),
    )


def _spec_to_config(spec: ModelSpec, dtype: torch.dtype) -> dict:
    MISTRAL.check(spec)
    config = llama_like_config(spec, dtype, MISTRAL.architecture, MISTRAL.model_type)
    config["sliding_window"] = spec.sliding_window
    return config


def _claims(spec: ModelSpec) -> bool:
    # Without a recorded architecture a windowed Llama-like model is a Mistral.
    return spec.sliding_window is not None and _mismatch(spec) is None


MISTRAL = Bridge("mistral", "MistralForCausalLM", "mistral", _config_to_spec, _spec_to_config,
                 llama_like_mappings, _mismatch, _claims, IGNORABLE)
