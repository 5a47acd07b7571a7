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
decoder.layers.{L}.mlp.router.weight               replic.  MoE layers: [experts, hidden]
decoder.layers.{L}.mlp.router.expert_bias          replic.  expert bias: [experts], float32
decoder.layers.{L}.mlp.experts.local_experts.{E}.  gated/   MoE layers instead of linear_fc1/2;
    linear_fc1.weight / linear_fc2.weight          row      E global, cut over ETP
decoder.layers.{L}.mlp.shared_experts.linear_fc1/2 gated/   shared expert, cut over TP;
    .weight, .gate_weight                          row/rep. gate_weight [1, hidden]
decoder.final_layernorm.weight/bias                replic.
mtp.layers.{D}.enorm/hnorm/final_layernorm.weight  replic.  multi-token prediction depth D
mtp.layers.{D}.eh_proj.weight                      column   [hidden, 2 x hidden]
mtp.layers.{D}.transformer_layer.*                 (layer)  as decoder.layers.{last}.*
output_layer.weight                                vocab    untied embeddings only
=================================================  =======  ==========================

The model kind (:data:`MODEL_KINDS`) says which layer stacks there are: GPTModel's
``decoder``, BertModel's ``encoder``, T5Model's ``encoder`` then ``decoder``; each stack's
layers are ``{stack}.layers.{L}.*`` (as above) and its final norm ``{stack}.final_layernorm``.
A T5 decoder layer adds cross-attention, and BERT and T5 add heads:

=================================================  =======  ==========================
embedding.tokentype_embeddings.weight              replic.  num_tokentypes rows (BERT)
decoder.layers.{L}.pre_cross_attn_layernorm.*      replic.  encoder_decoder decoder only
decoder.layers.{L}.cross_attention.linear_q.*      column   [heads x head_dim, hidden]
decoder.layers.{L}.cross_attention.linear_kv.*     column   rows [k0 v0 k1 v1 ...] per group
decoder.layers.{L}.cross_attention.linear_proj.w   row      .bias replicated
lm_head.dense.weight/bias                          replic.  BERT's transform (a plain Linear)
lm_head.layer_norm.weight/bias                     replic.  BERT's transform norm
output_layer.bias                                  vocab    BERT; T5 with tied embeddings
pooler.dense.weight/bias                           replic.  BERT's binary head only
binary_head.weight/bias                            replic.  [2, hidden]: BERT's next-sentence head
=================================================  =======  ==========================

Vocabulary tensors may carry padding rows past ``vocab_size`` (what Megatron saved);
they are dropped for Hugging Face and re-made for another tensor-parallel size.

A multi-latent attention (MLA) layer has, instead of ``linear_qkv`` and the per-head q/k
norms, these ``decoder.layers.{L}.self_attention.`` tensors (``.weight`` each; ``pos`` is
qk_pos_emb_head_dim, ``qk`` qk_head_dim, ``v`` v_head_dim):

=====================  =======  ==============================================
linear_q_down_proj     column   q_lora_rank only: [q_lora, hidden]
q_layernorm            replic.  q_lora_rank only: [q_lora]
linear_q_up_proj       column   q_lora_rank only: [heads x (qk + pos), q_lora]
linear_q_proj          column   no q_lora_rank: [heads x (qk + pos), hidden]
linear_kv_down_proj    column   [kv_lora + pos, hidden]
kv_layernorm           replic.  [kv_lora]
linear_kv_up_proj      column   [heads x (qk + v), kv_lora]
=====================  =======  ==============================================

MLA's projections are all column parallel in Megatron-Core's local layer spec
(megatron/core/models/gpt/gpt_layer_specs.py, ``get_gpt_layer_local_submodules``): the
down projections too, their rows cut over TP and gathered before the norms
(megatron/core/transformer/multi_latent_attention.py, ``_qkv_down_projection``). Rows of
the up projections are grouped per head (``[qk_head_dim nope rows, qk_pos_emb_head_dim
rope rows]`` per query head, ``[qk_head_dim k rows, v_head_dim v rows]`` per head of
``linear_kv_up_proj``), so a TP rank holds whole heads; ``linear_kv_down_proj`` rows are
``[kv_lora_rank latent rows, qk_pos_emb_head_dim shared rope-key rows]``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch

from . import rules
from .errors import BadInput, Unsupported

LAYER = "{stack}.layers.{layer}."


@dataclass(frozen=True)
class ModelKind:
    """What a Megatron model is built of: its layer stacks, in build order, and whether
    Megatron can cut it into pipeline stages."""

    name: str
    stacks: tuple[str, ...]
    layer_count_fields: tuple[str, ...]  # the ModelSpec field counting each stack's layers
    cross_attention_stack: str | None = None  # the stack whose layers attend to the encoder
    no_pipeline: str | None = None  # why Megatron cannot pipeline it, or None
    # whether torch_dist keeps the output layer's (empty) _extra_state: GPTModel pops it
    # (megatron/core/models/gpt/gpt_model.py, sharded_state_dict); BertModel and T5Model keep it
    output_extra_state_in_dist: bool = True

    def count_field(self, stack: str) -> str:
        """The ModelSpec field (and Megatron arg) that counts ``stack``'s layers."""
        return self.layer_count_fields[self.stacks.index(stack)]

    @property
    def pipelined_stack(self) -> str:
        """The stack pipeline stages cut (the one stack of a model Megatron can pipeline)."""
        return self.stacks[-1]


MODEL_KINDS = {kind.name: kind for kind in (
    ModelKind("decoder", ("decoder",), ("num_layers",), output_extra_state_in_dist=False),  # GPTModel
    ModelKind("encoder", ("encoder",), ("num_layers",)),  # BertModel
    # examples/t5/pretrain_t5.py (d98e8a6), model_provider: "Pipeline parallelism is not
    # supported for T5." (the --pipeline-model-parallel-split-rank machinery it describes is gone)
    ModelKind("encoder_decoder", ("encoder", "decoder"), ("encoder_num_layers", "num_layers"),
              cross_attention_stack="decoder",
              no_pipeline="Megatron-LM's T5 (examples/t5/pretrain_t5.py) refuses pipeline parallelism"),
)}


@dataclass(frozen=True)
class ModelSpec:
    """Architecture hyper-parameters shared by every layout of one model."""

    family: str  # a key of ckptkit.bridges.BRIDGES: "gpt2", "llama", ..., "bert", "t5"; "" when none claims it
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
    # "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, or with multi-latent
    # attention {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
    # "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}, or None
    rope_scaling: dict | None = field(default=None, hash=False)
    sliding_window: int | None = None  # tokens a query sees, itself included (HF's sliding_window)
    qk_layernorm: bool = False  # per-head norm of queries and keys before RoPE (Qwen3)
    # Mixture of experts (num_experts 0: dense). Router: top-k of the logits, then a softmax
    # over the chosen k; with moe_router_pre_softmax, a softmax over all experts first and
    # no renormalisation of the chosen k.
    num_experts: int = 0
    moe_ffn_hidden_size: int = 0
    moe_router_topk: int = 0
    moe_layers: tuple[int, ...] | None = None  # 1 = MoE layer, 0 = dense; None: every layer
    moe_shared_expert_size: int = 0  # ffn of the shared expert (0: none)
    moe_shared_expert_gate: bool = False  # sigmoid(gate_weight . x) scales the shared expert
    moe_router_pre_softmax: bool = False
    # DeepSeek routing: "sigmoid" scores (renormalised over the chosen k when k > 1), an
    # expert bias added for the choice only, the top-k chosen among the best
    # moe_router_group_topk of moe_router_num_groups groups (0: no groups), and the chosen
    # weights scaled by moe_router_topk_scaling_factor.
    moe_router_score_function: str = "softmax"
    moe_router_expert_bias: bool = False
    moe_router_num_groups: int = 0
    moe_router_group_topk: int = 0
    moe_router_topk_scaling_factor: float = 1.0
    # Multi-latent attention (DeepSeek-V2/V3): queries through a q_lora_rank bottleneck (0:
    # one linear_q_proj), keys and values through a kv_lora_rank one; each head's query and
    # key are qk_head_dim plain dims plus qk_pos_emb_head_dim rotary dims (the rotary key
    # shared by every head), its value v_head_dim (= head_dim). Both bottlenecks are
    # RMS-normalised. The rotary dims are rotated in interleaved pairs.
    multi_latent_attention: bool = False
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_head_dim: int = 0
    qk_pos_emb_head_dim: int = 0
    # Multi-token prediction layers (DeepSeek-V3's; Megatron's --mtp-num-layers), on the last
    # pipeline stage, each shaped as the last decoder layer
    mtp_num_layers: int = 0
    # Which Megatron model the tensors belong to (a key of MODEL_KINDS): GPTModel's decoder,
    # BertModel's encoder or T5Model's encoder and decoder. num_layers counts the layers of
    # the last stack (BERT's encoder, T5's decoder), encoder_num_layers a T5 encoder's.
    model_kind: str = "decoder"
    encoder_num_layers: int = 0
    num_tokentypes: int = 0  # token-type embedding rows (BERT: 2 with the binary head)
    lm_head_transform: bool = False  # BERT: dense, GeLU (erf), LayerNorm before the vocabulary projection
    binary_head: bool = False  # BERT: pooler (dense + tanh of the first token) and 2-way binary head
    output_layer_bias: bool = False  # a vocabulary-parallel bias on the logits (BERT; T5 when tied)
    # --apply-residual-connection-post-layernorm: pre-Core layers add the normed input to the
    # residual (megatron/legacy/model/transformer.py); Megatron-Core's layers ignore the flag
    residual_post_layernorm: bool = False

    def __post_init__(self):
        if self.model_kind not in MODEL_KINDS:
            raise BadInput(f"unknown model kind {self.model_kind!r} (known: {', '.join(MODEL_KINDS)})")
        if self.num_attention_heads % self.num_query_groups:
            raise BadInput(f"{self.num_attention_heads} attention heads are not divisible "
                           f"into {self.num_query_groups} query groups")

    @property
    def query_head_dim(self) -> int:
        """Rows per query head of MLA's query projection: plain dims, then rotary dims."""
        return self.qk_head_dim + self.qk_pos_emb_head_dim

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def gated(self) -> bool:
        return self.activation == "swiglu"

    @property
    def has_norm_bias(self) -> bool:
        return self.normalization == "LayerNorm"

    def deepseek_features(self) -> list[str]:
        """What of DeepSeek's architecture this model has: multi-latent attention, its routing
        (sigmoid scores, expert bias, group-limited top-k, scaled weights) and multi-token
        prediction layers. Code that computes plain attention and softmax routing refuses these."""
        return [what for present, what in (
            (self.multi_latent_attention, "multi-latent attention"),
            (self.moe_router_score_function != "softmax", f"{self.moe_router_score_function} router scores"),
            (self.moe_router_expert_bias, "a router expert bias"),
            (bool(self.moe_router_num_groups), "group-limited routing"),
            (self.moe_router_topk_scaling_factor != 1.0, "scaled routing weights"),
            (bool(self.mtp_num_layers), "multi-token prediction layers"),
        ) if present]

    @property
    def kind(self) -> ModelKind:
        return MODEL_KINDS[self.model_kind]

    def stack_layers(self, stack: str) -> int:
        """How many layers ``stack`` has: a T5 encoder's are encoder_num_layers."""
        return getattr(self, self.kind.count_field(stack))

    def is_moe_layer(self, layer: int) -> bool:
        if not self.num_experts:
            return False
        return self.moe_layers is None or bool(self.moe_layers[layer])

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CanonicalTensor:
    """One full tensor of the canonical namespace."""

    name: str
    shape: tuple[int, ...]
    rule: str  # "replicated", "column", "row", "vocab", "qkv", "gated"
    layer: int | None = None  # global layer index, None for embeddings/final norm/head
    # global expert index of an expert's tensor: held whole by one expert-parallel rank
    # (expert // (num_experts / EP)) and cut over the expert tensor-parallel ranks
    expert: int | None = None
    # a dtype the tensor keeps whatever the model's: Megatron keeps the router's expert bias
    # in float32 (megatron/core/transformer/moe/router.py, _maintain_float32_expert_bias)
    dtype: torch.dtype | None = None
    stack: str = "decoder"  # the layer stack of a layer's tensor (see MODEL_KINDS)


def layer_suffix(name: str) -> str:
    """A layer tensor's name inside its layer.

    >>> layer_suffix("encoder.layers.3.mlp.linear_fc1.weight")
    'mlp.linear_fc1.weight'
    """
    return name.split(".", 3)[3]


def stored_dtype(tensor: CanonicalTensor, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype ``tensor`` is written in for a model of ``model_dtype``."""
    return tensor.dtype or model_dtype


def kept_dtypes(spec: "ModelSpec") -> dict[str, torch.dtype]:
    """The canonical tensors that keep their own dtype whatever the model's: name -> dtype."""
    return {tensor.name: tensor.dtype for tensor in canonical_tensors(spec) if tensor.dtype is not None}


def _attention_entries(spec: ModelSpec) -> list[tuple]:
    """(suffix, shape, rule, present) of a layer's query/key/value projections and norms."""
    hidden = spec.hidden_size
    if spec.multi_latent_attention:
        heads, q_lora, kv_lora = spec.num_attention_heads, spec.q_lora_rank, spec.kv_lora_rank
        query_rows = heads * spec.query_head_dim
        return [
            ("self_attention.linear_q_down_proj.weight", (q_lora, hidden), "column", bool(q_lora)),
            ("self_attention.q_layernorm.weight", (q_lora,), "replicated", bool(q_lora)),
            ("self_attention.linear_q_up_proj.weight", (query_rows, q_lora), "column", bool(q_lora)),
            ("self_attention.linear_q_proj.weight", (query_rows, hidden), "column", not q_lora),
            ("self_attention.linear_kv_down_proj.weight", (kv_lora + spec.qk_pos_emb_head_dim, hidden), "column",
             True),
            ("self_attention.kv_layernorm.weight", (kv_lora,), "replicated", True),
            ("self_attention.linear_kv_up_proj.weight", (heads * (spec.qk_head_dim + spec.head_dim), kv_lora),
             "column", True),
        ]
    qkv_rows = (spec.num_attention_heads + 2 * spec.num_query_groups) * spec.head_dim
    return [
        ("self_attention.linear_qkv.weight", (qkv_rows, hidden), "qkv", True),
        ("self_attention.linear_qkv.bias", (qkv_rows,), "qkv", spec.add_qkv_bias),
        ("self_attention.q_layernorm.weight", (spec.head_dim,), "replicated", spec.qk_layernorm),
        ("self_attention.q_layernorm.bias", (spec.head_dim,), "replicated", spec.qk_layernorm and spec.has_norm_bias),
        ("self_attention.k_layernorm.weight", (spec.head_dim,), "replicated", spec.qk_layernorm),
        ("self_attention.k_layernorm.bias", (spec.head_dim,), "replicated", spec.qk_layernorm and spec.has_norm_bias),
    ]


def _cross_attention_entries(spec: ModelSpec, stack: str) -> list[tuple]:
    """A T5 decoder layer's attention to the encoder output (megatron/core/transformer/
    attention.py, CrossAttention): queries from the layer, keys and values from the encoder,
    ``linear_kv`` rows per query group ``[k0 v0 k1 v1 ...]`` (its forward views them as
    ``[groups, 2 x head_dim]``), so a column split keeps whole groups."""
    if stack != spec.kind.cross_attention_stack:
        return []
    hidden, width = spec.hidden_size, spec.num_attention_heads * spec.head_dim
    kv_rows = 2 * spec.num_query_groups * spec.head_dim
    return [
        ("pre_cross_attn_layernorm.weight", (hidden,), "replicated", True),
        ("pre_cross_attn_layernorm.bias", (hidden,), "replicated", spec.has_norm_bias),
        ("cross_attention.linear_q.weight", (width, hidden), "column", True),
        ("cross_attention.linear_q.bias", (width,), "column", spec.add_bias_linear),
        ("cross_attention.linear_kv.weight", (kv_rows, hidden), "column", True),
        ("cross_attention.linear_kv.bias", (kv_rows,), "column", spec.add_bias_linear),
        ("cross_attention.linear_proj.weight", (hidden, width), "row", True),
        ("cross_attention.linear_proj.bias", (hidden,), "replicated", spec.add_bias_linear),
    ]


def _layer_tensors(spec: ModelSpec, layer: int, stack: str = "decoder") -> list[CanonicalTensor]:
    hidden, ffn = spec.hidden_size, spec.ffn_hidden_size
    entries = [
        ("input_layernorm.weight", (hidden,), "replicated", True),
        ("input_layernorm.bias", (hidden,), "replicated", spec.has_norm_bias),
        *_attention_entries(spec),
        ("self_attention.linear_proj.weight", (hidden, spec.num_attention_heads * spec.head_dim), "row", True),
        ("self_attention.linear_proj.bias", (hidden,), "replicated", spec.add_bias_linear),
        *_cross_attention_entries(spec, stack),
        ("pre_mlp_layernorm.weight", (hidden,), "replicated", True),
        ("pre_mlp_layernorm.bias", (hidden,), "replicated", spec.has_norm_bias),
    ]
    prefix = LAYER.format(stack=stack, layer=layer)
    tensors = [CanonicalTensor(prefix + suffix, shape, rule, layer, stack=stack)
               for suffix, shape, rule, present in entries if present]
    mlp = _moe_tensors(spec, layer) if spec.is_moe_layer(layer) else \
        _mlp_tensors(spec, "mlp.", ffn, layer, stack=stack)
    return tensors + mlp


def _mlp_tensors(spec: ModelSpec, module: str, ffn: int, layer: int, expert: int | None = None,
                 biases: bool | None = None, stack: str = "decoder") -> list[CanonicalTensor]:
    """``linear_fc1``/``linear_fc2`` of one MLP (dense, shared expert or one expert)."""
    hidden = spec.hidden_size
    biases = spec.add_bias_linear if biases is None else biases
    fc1_rows = 2 * ffn if spec.gated else ffn
    fc1_rule = "gated" if spec.gated else "column"
    entries = [
        ("linear_fc1.weight", (fc1_rows, hidden), fc1_rule, True),
        ("linear_fc1.bias", (fc1_rows,), fc1_rule, biases),
        ("linear_fc2.weight", (hidden, ffn), "row", True),
        ("linear_fc2.bias", (hidden,), "replicated", biases),
    ]
    prefix = LAYER.format(stack=stack, layer=layer) + module
    return [CanonicalTensor(prefix + suffix, shape, rule, layer, expert, stack=stack)
            for suffix, shape, rule, present in entries if present]


def _moe_tensors(spec: ModelSpec, layer: int) -> list[CanonicalTensor]:
    """Router, then every expert (global index), then the shared expert and its gate."""
    prefix = LAYER.format(stack="decoder", layer=layer)
    tensors = [CanonicalTensor(prefix + "mlp.router.weight", (spec.num_experts, spec.hidden_size), "replicated",
                               layer)]
    if spec.moe_router_expert_bias:
        tensors.append(CanonicalTensor(prefix + "mlp.router.expert_bias", (spec.num_experts,), "replicated", layer,
                                       dtype=torch.float32))
    for expert in range(spec.num_experts):
        tensors += _mlp_tensors(spec, f"mlp.experts.local_experts.{expert}.", spec.moe_ffn_hidden_size, layer,
                                expert, biases=False)
    if spec.moe_shared_expert_size:
        tensors += _mlp_tensors(spec, "mlp.shared_experts.", spec.moe_shared_expert_size, layer, biases=False)
        if spec.moe_shared_expert_gate:
            tensors.append(CanonicalTensor(prefix + "mlp.shared_experts.gate_weight", (1, spec.hidden_size),
                                           "replicated", layer))
    return tensors


MTP = "mtp.layers.{depth}."
MTP_LAYER = "transformer_layer."  # the MTP layer's transformer layer, as Megatron's torch_dist keys say


def _mtp_tensors(spec: ModelSpec, depth: int) -> list[CanonicalTensor]:
    """One multi-token prediction layer: its norms of the next token's embedding (enorm) and
    of the previous depth's hidden state (hnorm), the projection of both concatenated
    ([embedding, hidden] columns), a transformer layer built as the last decoder layer (its
    experts too), and its final norm. The embedding and output head are the model's own."""
    hidden, prefix = spec.hidden_size, MTP.format(depth=depth)
    last = LAYER.format(stack="decoder", layer=spec.num_layers - 1)
    layer = [replace(tensor, name=prefix + MTP_LAYER + tensor.name[len(last):], layer=None)
             for tensor in _layer_tensors(spec, spec.num_layers - 1)]
    return [CanonicalTensor(prefix + "enorm.weight", (hidden,), "replicated"),
            CanonicalTensor(prefix + "hnorm.weight", (hidden,), "replicated"),
            CanonicalTensor(prefix + "eh_proj.weight", (hidden, 2 * hidden), "column"),
            *layer,
            CanonicalTensor(prefix + "final_layernorm.weight", (hidden,), "replicated")]


def mtp_part(name: str) -> tuple[int, str] | None:
    """``(depth, rest)`` of a multi-token prediction layer's canonical name, else None.

    >>> mtp_part("mtp.layers.0.transformer_layer.mlp.router.weight")
    (0, 'transformer_layer.mlp.router.weight')
    """
    if not name.startswith("mtp.layers."):
        return None
    depth, rest = name[len("mtp.layers."):].split(".", 1)
    return int(depth), rest


def canonical_tensors(spec: ModelSpec) -> list[CanonicalTensor]:
    """Every canonical tensor of the model, in the order Megatron builds them."""
    hidden = spec.hidden_size
    tensors = [CanonicalTensor("embedding.word_embeddings.weight", (spec.vocab_size, hidden), "vocab")]
    if spec.position_embedding == "learned_absolute":
        tensors.append(CanonicalTensor("embedding.position_embeddings.weight",
                                       (spec.max_position_embeddings, hidden), "replicated"))
    if spec.num_tokentypes:
        tensors.append(CanonicalTensor("embedding.tokentype_embeddings.weight", (spec.num_tokentypes, hidden),
                                       "replicated"))
    for stack in spec.kind.stacks:
        for layer in range(spec.stack_layers(stack)):
            tensors += _layer_tensors(spec, layer, stack)
        tensors.append(CanonicalTensor(f"{stack}.final_layernorm.weight", (hidden,), "replicated"))
        if spec.has_norm_bias:
            tensors.append(CanonicalTensor(f"{stack}.final_layernorm.bias", (hidden,), "replicated"))
    for depth in range(spec.mtp_num_layers):
        tensors += _mtp_tensors(spec, depth)
    return tensors + _head_tensors(spec)


def _head_tensors(spec: ModelSpec) -> list[CanonicalTensor]:
    """The output layer and BERT's heads, in BertModel's order (lm_head, output_layer,
    binary_head, pooler: megatron/core/models/bert/bert_model.py). Megatron's lm_head and
    pooler dense layers and binary head are plain ``torch.nn.Linear`` layers
    (megatron/core/transformer/utils.py, ``get_linear_layer``): whole on every TP rank."""
    hidden, vocab = spec.hidden_size, spec.vocab_size
    entries = [
        ("lm_head.dense.weight", (hidden, hidden), "replicated", spec.lm_head_transform),
        ("lm_head.dense.bias", (hidden,), "replicated", spec.lm_head_transform),
        ("lm_head.layer_norm.weight", (hidden,), "replicated", spec.lm_head_transform),
        ("lm_head.layer_norm.bias", (hidden,), "replicated", spec.lm_head_transform),
        ("output_layer.weight", (vocab, hidden), "vocab", not spec.tied_embeddings),
        ("output_layer.bias", (vocab,), "vocab", spec.output_layer_bias),
        ("binary_head.weight", (2, hidden), "replicated", spec.binary_head),
        ("binary_head.bias", (2,), "replicated", spec.binary_head),
        ("pooler.dense.weight", (hidden, hidden), "replicated", spec.binary_head),
        ("pooler.dense.bias", (hidden,), "replicated", spec.binary_head),
    ]
    return [CanonicalTensor(name, shape, rule) for name, shape, rule, present in entries if present]


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


def check_parallel_sizes(spec: ModelSpec, tp: int, pp: int, vpp: int = 1, ep: int = 1,
                         etp: int | None = None) -> None:
    """Refuse target sizes that do not divide the model (one clear line each).

    ``ep`` experts-parallel ranks each hold ``num_experts / ep`` whole experts; each expert
    is cut over ``etp`` expert tensor-parallel ranks (None: TP, Megatron's default), the
    shared expert over TP like a dense MLP.

    >>> check_parallel_sizes(ModelSpec("mixtral", 2, 32, 4, 2, 24, 101, 32, 8, num_experts=4,
    ...                                moe_ffn_hidden_size=24), tp=1, pp=1, ep=3)
    Traceback (most recent call last):
    ckptkit.errors.BadInput: EP=3 does not divide 4 experts
    """
    if tp < 1 or pp < 1 or vpp < 1:
        raise BadInput(f"parallel sizes must be positive (got TP={tp}, PP={pp}, VPP={vpp})")
    if spec.kind.no_pipeline and pp * vpp > 1:
        raise Unsupported(f"PP={pp} x VPP={vpp}: {spec.kind.no_pipeline}; write PP=1")
    problems = [
        (spec.num_attention_heads % tp, f"{spec.num_attention_heads} attention heads"),
        (spec.num_query_groups % tp, f"{spec.num_query_groups} query groups"),
        (spec.ffn_hidden_size % tp, f"ffn size {spec.ffn_hidden_size}"),
    ]
    if spec.moe_shared_expert_size:
        problems.append((spec.moe_shared_expert_size % tp, f"shared expert ffn size {spec.moe_shared_expert_size}"))
    if spec.multi_latent_attention:
        # the down projections are column parallel in Megatron's local spec (see the module docstring)
        kv_down_rows = spec.kv_lora_rank + spec.qk_pos_emb_head_dim
        problems += [(spec.q_lora_rank % tp, f"q_lora_rank {spec.q_lora_rank}"),
                     (kv_down_rows % tp, f"kv_lora_rank + qk_pos_emb_head_dim = {kv_down_rows}")]
    for remainder, what in problems:
        if remainder:
            raise BadInput(f"TP={tp} does not divide {what}")
    if spec.num_layers % (pp * vpp):
        raise BadInput(f"PP={pp} x VPP={vpp} does not divide {spec.num_layers} layers")
    check_expert_parallel_sizes(spec, ep, tp if etp is None else etp)


def check_expert_parallel_sizes(spec: ModelSpec, ep: int, etp: int) -> None:
    """Refuse expert-parallel sizes that do not divide the experts (one line each)."""
    if ep < 1 or etp < 1:
        raise BadInput(f"expert parallel sizes must be positive (got EP={ep}, ETP={etp})")
    if not spec.num_experts:
        if ep > 1:
            raise BadInput(f"EP={ep}: expert parallelism needs a mixture-of-experts model; this one is dense")
        return
    if spec.num_experts % ep:
        raise BadInput(f"EP={ep} does not divide {spec.num_experts} experts")
    if spec.moe_ffn_hidden_size % etp:
        raise BadInput(f"ETP={etp} does not divide expert ffn size {spec.moe_ffn_hidden_size}")
