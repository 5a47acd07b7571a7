"""Megatron-LM training args (``argparse.Namespace``) <-> :class:`~ckptkit.spec.ModelSpec`.

Megatron stores its full argument namespace in every checkpoint. Readers take the
architecture from it; writers produce the fields Megatron needs to load a checkpoint
with ``--use-checkpoint-args`` (and to rebuild the same model without it).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import replace

import torch

from .bridges import BRIDGES, family_of
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


def _position_embedding(args) -> str:
    kind = _get(args, "position_embedding_type", default="learned_absolute")
    if kind == "rope" or _get(args, "use_rotary_position_embeddings", default=False):
        return "rope"
    if kind == "learned_absolute":
        return kind
    raise Unsupported(f"position embedding {kind!r} is not supported (learned_absolute or rope)")


def _check_rotary(args) -> None:
    percent = float(_get(args, "rotary_percent", default=1.0))
    if percent != 1.0:
        raise Unsupported(f"rotary_percent {percent}: only full rotary embeddings are supported")
    if _get(args, "rotary_interleaved", default=False):
        raise Unsupported("interleaved rotary embeddings (--rotary-interleaved) are not supported")


def rope_scaling_from_args(args) -> dict | None:
    """Megatron's ``--use-rope-scaling`` is Llama 3.1's scaling with three of its four
    numbers fixed (megatron/core/models/common/embeddings/rotary_pos_embedding.py,
    ``_apply_scaling``: low 1, high 4, original length 8192); only the factor is an arg."""
    if not _get(args, "use_rope_scaling", default=False):
        return None
    return {"rope_type": "llama3", "factor": float(_get(args, "rope_scaling_factor", default=8.0)),
            **MEGATRON_LLAMA3_FIXED}


MEGATRON_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


# Megatron's MLA YaRN: only the factor and the two mscales are args (--rotary-scaling-factor,
# --mscale, --mscale-all-dim); the rest are MLATransformerConfig defaults no arg reaches
# (megatron/core/transformer/transformer_config.py; megatron/training/argument_utils.py fills
# the config from args of the same name, and there are none).
MEGATRON_MLA_YARN_FIXED = {"original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0}


def mla_fields_from_args(args) -> dict:
    """The spec's multi-latent attention fields (empty without ``--multi-latent-attention``).

    The value head is the spec's ``head_dim`` (Megatron's output projection reads
    ``v_head_dim`` per head). MLA's rotary type defaults to YaRN in Megatron
    (MLATransformerConfig.rope_type); YaRN with factor 1 is plain RoPE.
    """
    if not _get(args, "multi_latent_attention", default=False):
        return {}
    if not _get(args, "qk_layernorm", default=False):
        raise Unsupported("multi-latent attention without its q/kv norms (no --qk-layernorm) is not supported: "
                          "DeepSeek models normalise both bottlenecks")
    factor = float(_get(args, "rotary_scaling_factor", default=1.0))
    rope_type = _get(args, "rope_type", default="yarn")
    mscale, mscale_all_dim = float(_get(args, "mscale", default=1.0)), float(_get(args, "mscale_all_dim", default=0.0))
    scaling = None
    if rope_type == "yarn" and factor != 1.0:
        scaling = {"rope_type": "yarn", "factor": factor, **MEGATRON_MLA_YARN_FIXED, "mscale": mscale,
                   "mscale_all_dim": mscale_all_dim}
    elif rope_type == "rope" and factor != 1.0 and mscale_all_dim:
        # MLA scales its softmax by YaRN's mscale whatever the rotary type (multi_latent_attention.py)
        raise Unsupported(f"rope_type rope with rotary_scaling_factor {factor} and mscale_all_dim {mscale_all_dim}: "
                          "Megatron scales the attention by YaRN's mscale without YaRN's frequencies")
    elif rope_type not in ("yarn", "rope"):
        raise Unsupported(f"MLA rope_type {rope_type!r} is not supported (rope or yarn)")
    q_lora = _get(args, "q_lora_rank")
    return dict(
        multi_latent_attention=True, q_lora_rank=int(q_lora or 0), kv_lora_rank=int(args.kv_lora_rank),
        qk_head_dim=int(args.qk_head_dim), qk_pos_emb_head_dim=int(args.qk_pos_emb_head_dim),
        head_dim=int(args.v_head_dim), num_query_groups=args.num_attention_heads, qk_layernorm=False,
        rope_scaling=scaling,
    )


def mla_args(spec: ModelSpec) -> dict:
    """The Megatron args of the spec's attention's MLA fields (off for other attention)."""
    if not spec.multi_latent_attention:
        return dict(multi_latent_attention=False)
    scaling = spec.rope_scaling or {}
    return dict(
        multi_latent_attention=True, q_lora_rank=spec.q_lora_rank or None, kv_lora_rank=spec.kv_lora_rank,
        qk_head_dim=spec.qk_head_dim, qk_pos_emb_head_dim=spec.qk_pos_emb_head_dim, v_head_dim=spec.head_dim,
        # Megatron's local core attention views its output as kv_channels per head
        kv_channels=spec.head_dim, qk_layernorm=True, use_rope_scaling=False,
        rope_type="yarn" if scaling else "rope", rotary_scaling_factor=scaling.get("factor", 1.0),
        mscale=scaling.get("mscale", 1.0), mscale_all_dim=scaling.get("mscale_all_dim", 0.0),
    )


def check_expressible(spec: ModelSpec) -> None:
    """Refuse, before anything is written, a model Megatron's args cannot describe."""
    scaling = spec.rope_scaling
    if scaling is None:
        return
    if spec.multi_latent_attention:
        fixed = {name: scaling.get(name) for name in MEGATRON_MLA_YARN_FIXED}
        if scaling.get("rope_type") != "yarn" or fixed != MEGATRON_MLA_YARN_FIXED:
            raise Unsupported(f"RoPE scaling {scaling}: Megatron's multi-latent attention YaRN fixes "
                              + ", ".join(f"{name}={value}" for name, value in MEGATRON_MLA_YARN_FIXED.items())
                              + " (only the factor and the mscales are arguments)")
        return
    fixed = {name: scaling.get(name) for name in MEGATRON_LLAMA3_FIXED}
    if scaling.get("rope_type") != "llama3" or fixed != MEGATRON_LLAMA3_FIXED:
        raise Unsupported(f"RoPE scaling {scaling}: Megatron's --use-rope-scaling fixes "
                          + ", ".join(f"{name}={value}" for name, value in MEGATRON_LLAMA3_FIXED.items())
                          + " (only the factor is an argument)")


def megatron_caveats(spec: ModelSpec) -> list[str]:
    """What Megatron-LM may compute differently from the args ckptkit writes for ``spec``."""
    caveats = []
    if spec.rope_scaling and spec.rope_scaling["rope_type"] == "llama3" and spec.rope_scaling["factor"] != 8.0:
        # gpt_builders.py passes use_rope_scaling but not the factor to GPTModel (default 8),
        # at least up to Megatron-LM d98e8a6 (2026-08).
        caveats.append(f"rope_scaling_factor {spec.rope_scaling['factor']} is in the args, but Megatron-LM's "
                       "pretrain_gpt.py builds the model with its default factor 8: check your Megatron version")
    return caveats


def sliding_window_from_args(args) -> int | None:
    """Megatron's ``window_size`` ``(left, right)`` lets query i see keys i-left..i+right
    (megatron/core/transformer/utils.py, ``get_sliding_window_causal_mask``); Hugging Face's
    ``sliding_window`` W counts the query itself: W = left + 1, right 0. -1 is unbounded."""
    window = _get(args, "window_size")
    if window is None:
        return None
    if _get(args, "window_attn_skip_freq") is not None:
        raise Unsupported("a sliding window on some layers only (--window-attn-skip-freq) is not supported")
    left, right = (int(value) for value in window)
    if left < 0:
        return None
    if right != 0:
        raise Unsupported(f"window_size {tuple(window)}: only causal windows (right side 0) are supported")
    return left + 1


def moe_layers_from_args(args, num_layers: int) -> tuple[int, ...] | None:
    """``--moe-layer-freq``: an int N makes every N-th layer (0, N, 2N, ...) MoE, a list
    names each layer (megatron/training/arguments.py, ``moe_freq_type``)."""
    frequency = _get(args, "moe_layer_freq", default=1)
    if isinstance(frequency, str):  # some versions keep the command-line text: "[0,1,1]" or "1"
        frequency = [int(part) for part in frequency.strip("[]").split(",")] if "[" in frequency \
            else int(frequency)
    pattern = tuple(int(value) for value in frequency) if isinstance(frequency, (list, tuple)) else \
        tuple(int(layer % int(frequency) == 0) for layer in range(num_layers))
    if len(pattern) != num_layers:
        raise BadInput(f"moe_layer_freq {list(pattern)} names {len(pattern)} layers; the model has {num_layers}")
    return None if all(pattern) else pattern


def moe_fields_from_args(args, num_layers: int) -> dict:
    """The spec's mixture-of-experts fields (empty for a dense model)."""
    experts = _get(args, "num_experts")
    if not experts:
        return {}
    score = _get(args, "moe_router_score_function", default="softmax")
    if score not in ("softmax", "sigmoid"):
        raise Unsupported(f"MoE router score function {score!r} (softmax or sigmoid are supported)")
    if _get(args, "moe_router_topk_limited_devices") is not None:
        raise Unsupported("device-limited routing (moe_router_topk_limited_devices) is not supported")
    return dict(
        moe_router_score_function=score,
        moe_router_expert_bias=bool(_get(args, "moe_router_enable_expert_bias", default=False)),
        moe_router_num_groups=int(_get(args, "moe_router_num_groups", default=0) or 0),
        moe_router_group_topk=int(_get(args, "moe_router_group_topk", default=0) or 0),
        moe_router_topk_scaling_factor=float(_get(args, "moe_router_topk_scaling_factor", default=1.0) or 1.0),
        num_experts=int(experts),
        moe_ffn_hidden_size=int(_get(args, "moe_ffn_hidden_size", "ffn_hidden_size")),
        moe_router_topk=int(_get(args, "moe_router_topk", default=2)),
        moe_layers=moe_layers_from_args(args, args.num_layers),
        moe_shared_expert_size=int(_get(args, "moe_shared_expert_intermediate_size", default=0)),
        moe_shared_expert_gate=bool(_get(args, "moe_shared_expert_gate", default=False)),
        # the sigmoid path ignores it (moe_utils.py, topk_routing_with_score_function)
        moe_router_pre_softmax=score == "softmax" and bool(_get(args, "moe_router_pre_softmax", default=False)),
    )


def moe_args(spec: ModelSpec) -> dict:
    """The Megatron args of the spec's mixture of experts (all None/off for a dense model)."""
    if not spec.num_experts:
        return dict(num_experts=None, moe_layer_freq=1, moe_shared_expert_intermediate_size=None)
    return dict(
        num_experts=spec.num_experts, moe_ffn_hidden_size=spec.moe_ffn_hidden_size,
        moe_router_topk=spec.moe_router_topk,
        moe_layer_freq=list(spec.moe_layers) if spec.moe_layers is not None else 1,
        moe_shared_expert_intermediate_size=spec.moe_shared_expert_size or None,
        moe_shared_expert_gate=spec.moe_shared_expert_gate, moe_router_pre_softmax=spec.moe_router_pre_softmax,
        moe_router_score_function=spec.moe_router_score_function, moe_grouped_gemm=False,
        moe_router_enable_expert_bias=spec.moe_router_expert_bias,
        moe_router_num_groups=spec.moe_router_num_groups or None,
        moe_router_group_topk=spec.moe_router_group_topk or None,
        moe_router_topk_scaling_factor=(spec.moe_router_topk_scaling_factor
                                        if spec.moe_router_topk_scaling_factor != 1.0 else None),
    )


def model_kind_fields(args, model_kind: str) -> dict:
    """The spec's fields of a BERT or T5 model, as Megatron builds them from args.

    BertModel (examples/bert/pretrain_bert.py, megatron/core/models/bert/bert_model.py, and the
    pre-Core megatron/legacy/model/bert_model.py alike): two token types and the pooler and
    binary head with ``bert_binary_head`` (none without), the lm_head transform always, a bias
    on the output layer always. T5Model (megatron/core/models/T5/t5_model.py, T5LMHead): the
    encoder has ``encoder_num_layers`` layers, and the output layer a bias exactly when the
    embeddings are tied.
    """
    if model_kind == "encoder":
        binary_head = bool(_get(args, "bert_binary_head", default=True))
        return dict(num_tokentypes=2 if binary_head else 0, binary_head=binary_head, lm_head_transform=True,
                    output_layer_bias=True)
    if model_kind == "encoder_decoder":
        return dict(encoder_num_layers=int(_get(args, "encoder_num_layers", "num_layers")),
                    output_layer_bias=not _get(args, "untie_embeddings_and_output_weights", default=False))
    return {}


def spec_from_args(args, *, vocab_size: int | None = None, source: str = "checkpoint",
                   architecture: str | None = None, model_kind: str = "decoder") -> ModelSpec:
    """Read the architecture from Megatron's args.

    Megatron's args do not say which model they built (GPT, BERT and T5 share one parser):
    ``model_kind`` (a key of :data:`ckptkit.spec.MODEL_KINDS`) comes from the checkpoint's keys.

    ``vocab_size`` overrides ``args.vocab_size`` (absent in some checkpoints, where
    only ``padded_vocab_size`` is known and padding cannot be told from real rows).
    The family is the one the args record (``ARCHITECTURE_FIELD``, written by ckptkit),
    ``architecture`` when given, else the first bridge that claims the model.
    """
    required = ["num_layers", "hidden_size", "num_attention_heads"]
    missing = [name for name in required if getattr(args, name, None) is None]
    if missing:
        raise BadInput(f"{source}: args lack {', '.join(missing)}")
    heads = args.num_attention_heads
    groups = _get(args, "num_query_groups") if _get(args, "group_query_attention", default=False) else heads
    hidden = args.hidden_size
    bias_linear = bool(_get(args, "add_bias_linear", default=True))
    vocab = vocab_size or _get(args, "vocab_size") or _get(args, "padded_vocab_size")
    if vocab is None:
        raise BadInput(f"{source}: args give neither vocab_size nor padded_vocab_size (use --vocab-size)")
    try:
        position_embedding = _position_embedding(args)
        if position_embedding == "rope":
            _check_rotary(args)
        fields = dict(
            family="",
            num_layers=args.num_layers,
            hidden_size=hidden,
            num_attention_heads=heads,
            num_query_groups=groups or heads,
            ffn_hidden_size=_get(args, "ffn_hidden_size", default=4 * hidden),
            vocab_size=int(vocab),
            max_position_embeddings=_get(args, "max_position_embeddings", "seq_length", default=2048),
            head_dim=_get(args, "kv_channels", default=hidden // heads),
            position_embedding=position_embedding,
            normalization=_get(args, "normalization", default="LayerNorm"),
            norm_epsilon=float(_get(args, "norm_epsilon", "layernorm_epsilon", default=1e-5)),
            activation=activation_from_args(args),
            add_bias_linear=bias_linear,
            add_qkv_bias=bias_linear or bool(_get(args, "add_qkv_bias", default=False)),
            tied_embeddings=not _get(args, "untie_embeddings_and_output_weights", default=False),
            rope_theta=float(_get(args, "rotary_base", default=10000)),
            rope_scaling=rope_scaling_from_args(args) if position_embedding == "rope" else None,
            sliding_window=sliding_window_from_args(args),
            qk_layernorm=bool(_get(args, "qk_layernorm", default=False)),
            mtp_num_layers=int(_get(args, "mtp_num_layers", default=0) or 0),
            **moe_fields_from_args(args, args.num_layers),
            model_kind=model_kind,
            residual_post_layernorm=bool(_get(args, "apply_residual_connection_post_layernorm", default=False)),
            **model_kind_fields(args, model_kind),
        )
        fields.update(mla_fields_from_args(args))  # MLA's head sizes, norms and rotary scaling
        spec = ModelSpec(**fields)
    except Unsupported as error:
        raise Unsupported(f"{source}: {error}") from None
    recorded = architecture or _get(args, ARCHITECTURE_FIELD)
    return replace(spec, family=family_of(spec, recorded, source))


# The Hugging Face class a ckptkit-written checkpoint came from: Megatron's args cannot
# tell Phi-3 from Llama, or a Mistral without a window from Llama. Megatron ignores it.
ARCHITECTURE_FIELD = "hf_architecture"


def megatron_args(spec: ModelSpec, *, tp: int, pp: int, dtype: torch.dtype, padded_vocab: int,
                  make_vocab_size_divisible_by: int, iteration: int = 0, vpp: int = 1,
                  ep: int = 1, etp: int | None = None,
                  transformer_impl: str = "local", extra_fields: dict | None = None,
                  base: argparse.Namespace | None = None) -> argparse.Namespace:
    """The args Megatron-LM needs to rebuild and load this model at TP/PP(/VPP)(/EP/ETP).

    ``base`` (the source checkpoint's args when resharding) keeps every other field
    (optimizer, schedule, data settings); the layout and architecture fields are set
    from the arguments. ``etp`` None is TP, as Megatron sets it when unset.
    """
    args = argparse.Namespace(**vars(base)) if base is not None else argparse.Namespace()
    gelu_tanh = spec.activation == "gelu_tanh"
    fields = dict(
        num_layers=spec.num_layers, encoder_num_layers=spec.encoder_num_layers or spec.num_layers,
        hidden_size=spec.hidden_size, ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads, kv_channels=spec.head_dim,
        group_query_attention=spec.num_query_groups != spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        max_position_embeddings=spec.max_position_embeddings,
        position_embedding_type=spec.position_embedding,
        use_rotary_position_embeddings=spec.position_embedding == "rope",
        # Megatron's parser default, True even for RoPE models (only --no-position-embedding
        # turns it off), and its resume check compares it with the run's own value.
        add_position_embedding=getattr(base, "add_position_embedding", True) if base is not None else True,
        rotary_base=int(spec.rope_theta) if float(spec.rope_theta).is_integer() else spec.rope_theta,
        rotary_percent=1.0, rotary_interleaved=False,
        use_rope_scaling=spec.rope_scaling is not None,
        qk_layernorm=spec.qk_layernorm, mtp_num_layers=spec.mtp_num_layers or None,
        window_size=(spec.sliding_window - 1, 0) if spec.sliding_window else None,
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
        expert_model_parallel_size=ep, expert_tensor_parallel_size=tp if etp is None else etp,
        num_layers_per_virtual_pipeline_stage=spec.num_layers // (pp * vpp) if vpp > 1 else None,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        transformer_impl=transformer_impl, iteration=iteration,
        ckpt_format="torch",
    )
    fields["apply_residual_connection_post_layernorm"] = spec.residual_post_layernorm
    if spec.model_kind == "encoder":
        fields["bert_binary_head"] = spec.binary_head
    fields.update(moe_args(spec))
    fields.update(mla_args(spec))
    bridge = BRIDGES.get(spec.family)
    fields[ARCHITECTURE_FIELD] = bridge.architecture if bridge and not bridge.no_hf and bridge.problem(spec) is None \
        else None
    check_expressible(spec)
    if spec.rope_scaling and spec.rope_scaling["rope_type"] == "llama3":
        fields["rope_scaling_factor"] = spec.rope_scaling["factor"]
    for name, value in fields.items():
        setattr(args, name, value)
    # Megatron carves the expert-parallel ranks out of the data-parallel ones
    # (TP x DP = ETP x EP x expert-DP), so a run with EP ranks has a DP size EP divides.
    data_parallel = 1 if base is None else max(1, getattr(base, "data_parallel_size", 1) or 1)
    experts_width = ep * (tp if etp is None else etp)
    data_parallel = math.lcm(data_parallel, experts_width // math.gcd(experts_width, tp))
    args.data_parallel_size = data_parallel
    args.world_size = tp * pp * data_parallel
    if base is None:
        args.seq_length = spec.max_position_embeddings
    for name, value in (extra_fields or {}).items():
        setattr(args, name, value)
    return args
