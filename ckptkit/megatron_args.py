"""Megatron-LM training args (``argparse.Namespace``) <-> :class:`~ckptkit.spec.ModelSpec`.

Megatron stores its full argument namespace in every checkpoint. Readers take the
architecture from it; writers produce the fields Megatron needs to load a checkpoint
with ``--use-checkpoint-args`` (and to rebuild the same model without it).
"""
from __future__ import annotations

import argparse

import torch

from .errors import BadInput, Unsupported
from .spec import ModelSpec

_DTYPE_FLAGS = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def _get(args, *names, default=None):
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            return value
    return default


def activation_from_args(args) -> str:
    """Which activation Megatron computed. The fused bias-GeLU kernel and ``openai_gelu``
    compute the tanh approximation (megatron/core/fusions/fused_bias_gelu.py); plain
    ``F.gelu`` is exact (erf)."""
    if _get(args, "swiglu", default=False):
        return "swiglu"
    if _get(args, "squared_relu", default=False):
        raise Unsupported("squared-ReLU activation is not supported")
    tanh_fused = _get(args, "bias_gelu_fusion", "bias_activation_fusion", default=False) and \
        _get(args, "add_bias_linear", default=True)
    if _get(args, "openai_gelu", default=False) or tanh_fused:
        return "gelu_tanh"
    return "gelu"


def family_from_args(args) -> str:
    swiglu = bool(_get(args, "swiglu", default=False))
    rope = _get(args, "position_embedding_type", default="learned_absolute") == "rope" or \
        bool(_get(args, "use_rotary_position_embeddings", default=False))
    rms = _get(args, "normalization", default="LayerNorm") == "RMSNorm"
    if swiglu and rope and rms:
        qkv_bias_only = _get(args, "add_qkv_bias", default=False) and not _get(args, "add_bias_linear", default=True)
        return "qwen2" if qkv_bias_only else "llama"
    if not swiglu and not rope and not rms:
        return "gpt2"
    raise Unsupported(f"architecture with swiglu={swiglu}, rope={rope}, RMSNorm={rms} matches "
                      "no supported family (gpt2: GeLU+LayerNorm+learned positions; "
                      "llama/qwen2: SwiGLU+RMSNorm+RoPE)")


def spec_from_args(args, *, vocab_size: int | None = None, source: str = "checkpoint") -> ModelSpec:
    """Read the architecture from Megatron's args.

    ``vocab_size`` overrides ``args.vocab_size`` (absent in some checkpoints, where
    only ``padded_vocab_size`` is known and padding cannot be told from real rows).
    """
    required = ["num_layers", "hidden_size", "num_attention_heads"]
    missing = [name for name in required if getattr(args, name, None) is None]
    if missing:
        raise BadInput(f"{source}: args lack {', '.join(missing)}")
    heads = args.num_attention_heads
    groups = _get(args, "num_query_groups") if _get(args, "group_query_attention", default=False) else heads
    hidden = args.hidden_size
    ffn = _get(args, "ffn_hidden_size", default=4 * hidden)
    bias_linear = bool(_get(args, "add_bias_linear", default=True))
    family = family_from_args(args)
    vocab = vocab_size or _get(args, "vocab_size") or _get(args, "padded_vocab_size")
    if vocab is None:
        raise BadInput(f"{source}: args give neither vocab_size nor padded_vocab_size (use --vocab-size)")
    rope_scaling = None
    if _get(args, "use_rope_scaling", default=False):
        rope_scaling = {"rope_type": "llama3", "factor": float(_get(args, "rope_scaling_factor", default=8.0))}
    return ModelSpec(
        family=family,
        num_layers=args.num_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=groups or heads,
        ffn_hidden_size=ffn,
        vocab_size=int(vocab),
        max_position_embeddings=_get(args, "max_position_embeddings", "seq_length", default=2048),
        head_dim=_get(args, "kv_channels", default=hidden // heads),
        position_embedding="rope" if family != "gpt2" else "learned_absolute",
        normalization=_get(args, "normalization", default="LayerNorm"),
        norm_epsilon=float(_get(args, "norm_epsilon", "layernorm_epsilon", default=1e-5)),
        activation=activation_from_args(args),
        add_bias_linear=bias_linear,
        add_qkv_bias=bias_linear or bool(_get(args, "add_qkv_bias", default=False)),
        tied_embeddings=not _get(args, "untie_embeddings_and_output_weights", default=False),
        rope_theta=float(_get(args, "rotary_base", default=10000)),
        rope_scaling=rope_scaling,
        sliding_window=_get(args, "window_size", default=None) and None,
    )


def megatron_args(spec: ModelSpec, *, tp: int, pp: int, dtype: torch.dtype, padded_vocab: int,
                  make_vocab_size_divisible_by: int, iteration: int = 0, vpp: int = 1,
                  transformer_impl: str = "local", extra_fields: dict | None = None,
                  base: argparse.Namespace | None = None) -> argparse.Namespace:
    """The args Megatron-LM needs to rebuild and load this model at TP/PP(/VPP).

    ``base`` (the source checkpoint's args when resharding) keeps every other field
    (optimizer, schedule, data settings); the layout and architecture fields are set
    from the arguments.
    """
    args = argparse.Namespace(**vars(base)) if base is not None else argparse.Namespace()
    gelu_tanh = spec.activation == "gelu_tanh"
    fields = dict(
        num_layers=spec.num_layers, encoder_num_layers=spec.num_layers,
        hidden_size=spec.hidden_size, ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads, kv_channels=spec.head_dim,
        group_query_attention=spec.num_query_groups != spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        max_position_embeddings=spec.max_position_embeddings,
        position_embedding_type=spec.position_embedding,
        use_rotary_position_embeddings=spec.position_embedding == "rope",
        add_position_embedding=spec.position_embedding == "learned_absolute",
        rotary_base=int(spec.rope_theta) if float(spec.rope_theta).is_integer() else spec.rope_theta,
        rotary_percent=1.0, rotary_interleaved=False,
        use_rope_scaling=spec.rope_scaling is not None,
        normalization=spec.normalization, norm_epsilon=spec.norm_epsilon, layernorm_epsilon=spec.norm_epsilon,
        swiglu=spec.gated, openai_gelu=gelu_tanh, bias_gelu_fusion=False, bias_swiglu_fusion=False,
        squared_relu=False,
        add_bias_linear=spec.add_bias_linear, add_qkv_bias=spec.add_qkv_bias,
        untie_embeddings_and_output_weights=not spec.tied_embeddings,
        vocab_size=spec.vocab_size, padded_vocab_size=padded_vocab,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        transformer_pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        num_layers_per_virtual_pipeline_stage=spec.num_layers // (pp * vpp) if vpp > 1 else None,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        transformer_impl=transformer_impl, iteration=iteration,
        ckpt_format="torch",
    )
    if spec.rope_scaling:
        fields["rope_scaling_factor"] = spec.rope_scaling.get("factor", 8.0)
    for name, value in fields.items():
        setattr(args, name, value)
    if base is None:
        args.data_parallel_size = 1
        args.world_size = tp * pp
        args.seq_length = spec.max_position_embeddings
    else:
        data_parallel = max(1, getattr(base, "data_parallel_size", 1) or 1)
        args.data_parallel_size = data_parallel
        args.world_size = tp * pp * data_parallel
    for name, value in (extra_fields or {}).items():
        setattr(args, name, value)
    return args
