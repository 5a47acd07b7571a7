"""The canonical model: hyper-parameters and the tensor namespace every conversion passes through.

Canonical names are Megatron-Core's (local layer spec) with *global* layer indices,
and canonical tensors are the full, unsharded tensors in Megatron's own row order:

=================================================  =======  ==========================
name                                               rule     note
=================================================  =======  ==========================
embedding.word_embeddings.weight                   vocab    >= vocab_size rows
embedding.position_embeddings.weight               replic.  learned positions only
decoder.layers.{L}.input_layernorm.weight/bias     replic.
decoder.layers.{L}.self_attention.linear_qkv.*     qkv      rows grouped per query group
decoder.layers.{L}.self_attention.q_layernorm.*    replic.  qk_layernorm only: [head_dim]
decoder.layers.{L}.self_attention.k_layernorm.*    replic.  qk_layernorm only: [head_dim]
decoder.layers.{L}.self_attention.linear_proj.w    row      .bias replicated
decoder.layers.{L}.pre_mlp_layernorm.weight/bias   replic.
decoder.layers.{L}.mlp.linear_fc1.weight/bias      column   gated: [all gate; all up]
decoder.layers.{L}.mlp.linear_fc2.weight           row      .bias replicated
decoder.final_layernorm.weight/bias                replic.
output_layer.weight                                vocab    untied embeddings only
=================================================  =======  ==========================

Vocabulary tensors may carry padding rows past ``vocab_size`` (what Megatron saved);
they are dropped for Hugging Face and re-made for another tensor-parallel size.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from . import rules
from .errors import BadInput

LAYER = "decoder.layers.{layer}."


@dataclass(frozen=True)
class ModelSpec:
    """Architecture hyper-parameters shared by every layout of one model."""

    family: str  # a key of ckptkit.bridges.BRIDGES: "gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3"
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    head_dim: int
    position_embedding: str = "learned_absolute"  # or "rope"
    normalization: str = "LayerNorm"  # or "RMSNorm"
    norm_epsilon: float = 1e-5
    activation: str = "gelu"  # "gelu" (erf), "gelu_tanh" or "swiglu"
    add_bias_linear: bool = True
    add_qkv_bias: bool = True
    tied_embeddings: bool = True
    rope_theta: float = 10000.0
    # Hugging Face form: {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    # "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, or None
    rope_scaling: dict | None = field(default=None, hash=False)
    sliding_window: int | None = None  # tokens a query sees, itself included (HF's sliding_window)
    qk_layernorm: bool = False  # per-head norm of queries and keys before RoPE (Qwen3)

    def __post_init__(self):
        if self.num_attention_heads % self.num_query_groups:
            raise BadInput(f"{self.num_attention_heads} attention heads are not divisible "
                           f"into {self.num_query_groups} query groups")

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def gated(self) -> bool:
        return self.activation == "swiglu"

    @property
    def has_norm_bias(self) -> bool:
        return self.normalization == "LayerNorm"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CanonicalTensor:
    """One full tensor of the canonical namespace."""

    name: str
    shape: tuple[int, ...]
    rule: str  # "replicated", "column", "row", "vocab", "qkv", "gated"
    layer: int | None = None  # global layer index, None for embeddings/final norm/head


def _layer_tensors(spec: ModelSpec, layer: int) -> list[CanonicalTensor]:
    hidden, ffn = spec.hidden_size, spec.ffn_hidden_size
    qkv_rows = (spec.num_attention_heads + 2 * spec.num_query_groups) * spec.head_dim
    fc1_rows = 2 * ffn if spec.gated else ffn
    entries = [
        ("input_layernorm.weight", (hidden,), "replicated", True),
        ("input_layernorm.bias", (hidden,), "replicated", spec.has_norm_bias),
        ("self_attention.linear_qkv.weight", (qkv_rows, hidden), "qkv", True),
        ("self_attention.linear_qkv.bias", (qkv_rows,), "qkv", spec.add_qkv_bias),
        ("self_attention.q_layernorm.weight", (spec.head_dim,), "replicated", spec.qk_layernorm),
        ("self_attention.q_layernorm.bias", (spec.head_dim,), "replicated", spec.qk_layernorm and spec.has_norm_bias),
        ("self_attention.k_layernorm.weight", (spec.head_dim,), "replicated", spec.qk_layernorm),
        ("self_attention.k_layernorm.bias", (spec.head_dim,), "replicated", spec.qk_layernorm and spec.has_norm_bias),
        ("self_attention.linear_proj.weight", (hidden, spec.num_attention_heads * spec.head_dim), "row", True),
        ("self_attention.linear_proj.bias", (hidden,), "replicated", spec.add_bias_linear),
        ("pre_mlp_layernorm.weight", (hidden,), "replicated", True),
        ("pre_mlp_layernorm.bias", (hidden,), "replicated", spec.has_norm_bias),
        ("mlp.linear_fc1.weight", (fc1_rows, hidden), "gated" if spec.gated else "column", True),
        ("mlp.linear_fc1.bias", (fc1_rows,), "gated" if spec.gated else "column", spec.add_bias_linear),
        ("mlp.linear_fc2.weight", (hidden, ffn), "row", True),
        ("mlp.linear_fc2.bias", (hidden,), "replicated", spec.add_bias_linear),
    ]
    prefix = LAYER.format(layer=layer)
    return [CanonicalTensor(prefix + suffix, shape, rule, layer)
            for suffix, shape, rule, present in entries if present]


def canonical_tensors(spec: ModelSpec) -> list[CanonicalTensor]:
    """Every canonical tensor of the model, in the order Megatron builds them."""
    hidden = spec.hidden_size
    tensors = [CanonicalTensor("embedding.word_embeddings.weight", (spec.vocab_size, hidden), "vocab")]
    if spec.position_embedding == "learned_absolute":
        tensors.append(CanonicalTensor("embedding.position_embeddings.weight",
                                       (spec.max_position_embeddings, hidden), "replicated"))
    for layer in range(spec.num_layers):
        tensors += _layer_tensors(spec, layer)
    tensors.append(CanonicalTensor("decoder.final_layernorm.weight", (hidden,), "replicated"))
    if spec.has_norm_bias:
        tensors.append(CanonicalTensor("decoder.final_layernorm.bias", (hidden,), "replicated"))
    if not spec.tied_embeddings:
        tensors.append(CanonicalTensor("output_layer.weight", (spec.vocab_size, hidden), "vocab"))
    return tensors


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's padding: ``ceil(vocab / (divisible_by x TP)) x (divisible_by x TP)``.

    >>> padded_vocab_size(1000, 128, 2)
    1024
    """
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def rule_for(spec: ModelSpec, rule_name: str, padded_rows: int | None = None):
    """The partition rule object for a rule name of the canonical table."""
    if rule_name == "qkv":
        return rules.FusedQKV(spec.num_query_groups, spec.heads_per_group, spec.head_dim)
    if rule_name == "vocab":
        return rules.VocabParallel(spec.vocab_size, padded_rows or spec.vocab_size)
    return rules.SIMPLE_RULES[rule_name]


def check_parallel_sizes(spec: ModelSpec, tp: int, pp: int, vpp: int = 1) -> None:
    """Refuse target sizes that do not divide the model (one clear line each)."""
    if tp < 1 or pp < 1 or vpp < 1:
        raise BadInput(f"parallel sizes must be positive (got TP={tp}, PP={pp}, VPP={vpp})")
    problems = [
        (spec.num_attention_heads % tp, f"{spec.num_attention_heads} attention heads"),
        (spec.num_query_groups % tp, f"{spec.num_query_groups} query groups"),
        (spec.ffn_hidden_size % tp, f"ffn size {spec.ffn_hidden_size}"),
    ]
    for remainder, what in problems:
        if remainder:
            raise BadInput(f"TP={tp} does not divide {what}")
    if spec.num_layers % (pp * vpp):
        raise BadInput(f"PP={pp} x VPP={vpp} does not divide {spec.num_layers} layers")
