"""GPT-2 (``GPT2LMHeadModel``): learned positions, LayerNorm, GeLU, biases, tied head.

HF GPT-2 uses ``Conv1D`` layers whose weights are stored transposed
(``[in_features, out_features]``), and ``c_attn`` holds all of q, then all of k, then
all of v along its output columns.
"""
from __future__ import annotations

import torch

from ..errors import Unsupported
from ..spec import ModelSpec
from .base import Bridge, HfMapping, first_problem, same, same_back, transposed, transposed_back, vocab_rows

_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}


def config_to_spec(config: dict) -> ModelSpec:
    activation = config.get("activation_function", "gelu_new")
    if activation not in _ACTIVATIONS:
        raise Unsupported(f"config.json: GPT-2 activation {activation!r} has no Megatron equivalent")
    hidden, heads = config["n_embd"], config["n_head"]
    if not config.get("scale_attn_weights", True) or config.get("scale_attn_by_inverse_layer_idx") or \
            config.get("reorder_and_upcast_attn"):
        raise Unsupported("config.json: GPT-2 attention scaling variants have no Megatron equivalent")
    return ModelSpec(
        family="gpt2", num_layers=config["n_layer"], hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=heads, ffn_hidden_size=config.get("n_inner") or 4 * hidden,
        vocab_size=config["vocab_size"], max_position_embeddings=config["n_positions"],
        head_dim=hidden // heads, position_embedding="learned_absolute", normalization="LayerNorm",
        norm_epsilon=config.get("layer_norm_epsilon", 1e-5), activation=_ACTIVATIONS[activation],
        add_bias_linear=True, add_qkv_bias=True, tied_embeddings=config.get("tie_word_embeddings", True),
    )


def mismatch(spec: ModelSpec) -> str | None:
    return first_problem(
        (not spec.num_experts, "a mixture of experts"),
        (not spec.gated and spec.activation in ("gelu", "gelu_tanh"), f"activation {spec.activation}; expected GeLU"),
        (spec.normalization == "LayerNorm", f"{spec.normalization}; expected LayerNorm"),
        (spec.position_embedding == "learned_absolute", f"{spec.position_embedding} positions; expected learned"),
        (spec.head_dim * spec.num_attention_heads == spec.hidden_size, "head_dim x heads differs from hidden size"),
        (spec.num_query_groups == spec.num_attention_heads, "grouped-query attention"),
        (spec.tied_embeddings, "an untied output layer (GPT2LMHeadModel always ties it)"),
        (spec.add_bias_linear and spec.add_qkv_bias, "no linear biases"),
        (not spec.qk_layernorm and spec.sliding_window is None and spec.rope_scaling is None,
         "q/k norms, a sliding window or RoPE scaling"),
    )


def spec_to_config(spec: ModelSpec, dtype: torch.dtype) -> dict:
    GPT2.check(spec)
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "n_layer": spec.num_layers, "n_embd": spec.hidden_size, "n_head": spec.num_attention_heads,
        "n_inner": spec.ffn_hidden_size, "n_positions": spec.max_position_embeddings,
        "vocab_size": spec.vocab_size, "layer_norm_epsilon": spec.norm_epsilon,
        "activation_function": "gelu" if spec.activation == "gelu" else "gelu_new",
        "tie_word_embeddings": True, "scale_attn_weights": True,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _c_attn(fused, spec):
    """Canonical per-head rows -> Conv1D ``[hidden, q|k|v]`` (transposed).

    2 heads of dim 1, hidden 2: rows ``[q0 k0 v0 q1 k1 v1]`` (each a row of 2 inputs)
    -> a ``[2, 6]`` tensor whose column ``j`` is row ``[q0 q1 k0 k1 v0 v1][j]``.
    GPT-2 has no grouped-query attention: a group is a head with one q, k and v.
    Rows are regrouped first (copies of whole heads), then transposed: measured 3x
    faster than one 4-D strided copy, which reads the source with a large stride.
    """
    heads, head_dim, hidden = spec.num_attention_heads, spec.head_dim, fused.shape[1]
    by_part = fused.view(heads, 3, head_dim * hidden).transpose(0, 1).reshape(3 * heads * head_dim, hidden)
    return [by_part.t().contiguous()]


def _c_attn_back(tensors, spec):
    """Inverse of :func:`_c_attn`: transposed first, then whole heads regrouped."""
    heads, head_dim = spec.num_attention_heads, spec.head_dim
    rows = tensors[0].t().contiguous()
    hidden = rows.shape[1]
    return rows.view(3, heads, head_dim * hidden).transpose(0, 1).reshape(3 * heads * head_dim, hidden)


def _qkv_bias(fused, spec):
    """``[q0 k0 v0 q1 k1 v1]`` -> ``[q0 q1 k0 k1 v0 v1]`` (heads of ``head_dim`` entries)."""
    heads, head_dim = spec.num_attention_heads, spec.head_dim
    return [fused.view(heads, 3, head_dim).permute(1, 0, 2).reshape(3 * heads * head_dim)]


def _qkv_bias_back(tensors, spec):
    heads, head_dim = spec.num_attention_heads, spec.head_dim
    return tensors[0].view(3, heads, head_dim).permute(1, 0, 2).reshape(3 * heads * head_dim).contiguous()


def mappings(spec: ModelSpec) -> list[HfMapping]:
    layer = "decoder.layers.{layer}."
    hf = "transformer.h.{layer}."
    return [
        HfMapping("embedding.word_embeddings.weight", ("transformer.wte.weight",), vocab_rows, same_back),
        HfMapping("embedding.position_embeddings.weight", ("transformer.wpe.weight",), same, same_back),
        HfMapping(layer + "input_layernorm.weight", (hf + "ln_1.weight",), same, same_back),
        HfMapping(layer + "input_layernorm.bias", (hf + "ln_1.bias",), same, same_back),
        HfMapping(layer + "self_attention.linear_qkv.weight", (hf + "attn.c_attn.weight",), _c_attn, _c_attn_back),
        HfMapping(layer + "self_attention.linear_qkv.bias", (hf + "attn.c_attn.bias",), _qkv_bias, _qkv_bias_back),
        HfMapping(layer + "self_attention.linear_proj.weight", (hf + "attn.c_proj.weight",), transposed, transposed_back),
        HfMapping(layer + "self_attention.linear_proj.bias", (hf + "attn.c_proj.bias",), same, same_back),
        HfMapping(layer + "pre_mlp_layernorm.weight", (hf + "ln_2.weight",), same, same_back),
        HfMapping(layer + "pre_mlp_layernorm.bias", (hf + "ln_2.bias",), same, same_back),
        HfMapping(layer + "mlp.linear_fc1.weight", (hf + "mlp.c_fc.weight",), transposed, transposed_back),
        HfMapping(layer + "mlp.linear_fc1.bias", (hf + "mlp.c_fc.bias",), same, same_back),
        HfMapping(layer + "mlp.linear_fc2.weight", (hf + "mlp.c_proj.weight",), transposed, transposed_back),
        HfMapping(layer + "mlp.linear_fc2.bias", (hf + "mlp.c_proj.bias",), same, same_back),
        HfMapping("decoder.final_layernorm.weight", ("transformer.ln_f.weight",), same, same_back),
        HfMapping("decoder.final_layernorm.bias", ("transformer.ln_f.bias",), same, same_back),
    ]


def _claims(spec: ModelSpec) -> bool:
    return mismatch(spec) is None


GPT2 = Bridge("gpt2", "GPT2LMHeadModel", "gpt2", config_to_spec, spec_to_config, mappings, mismatch, _claims,
              ignorable=("lm_head.weight", ".attn.bias", ".attn.masked_bias"))
