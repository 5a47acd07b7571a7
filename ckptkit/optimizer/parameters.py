"""The parameters of one Megatron model chunk, in the order Megatron's optimizer sees them.

Megatron builds its gradient buffers, the distributed optimizer's flat buffers and the
optimizer's parameter groups from ``model_chunk.named_parameters()``: the order in which
the modules registered their parameters. For Megatron-Core's GPTModel, BertModel and
T5Model with the local layer spec that order is (``STACK`` is ``decoder`` for GPT,
``encoder`` for BERT, ``encoder`` then ``decoder`` for T5)::

    embedding.word_embeddings.weight                       first stage, chunk 0
    embedding.position_embeddings.weight                   (learned absolute positions)
    embedding.tokentype_embeddings.weight                  (BERT)
    STACK.layers.N.input_layernorm.{weight,bias}           each stack's layers of the chunk
    STACK.layers.N.self_attention.linear_proj.{weight,bias}
    STACK.layers.N.self_attention.linear_qkv.{weight,bias}
    STACK.layers.N.self_attention.{q,k}_layernorm.{weight,bias}
    STACK.layers.N.pre_cross_attn_layernorm.{weight,bias}  a T5 decoder layer:
    STACK.layers.N.cross_attention.linear_proj.{weight,bias}
    STACK.layers.N.cross_attention.linear_q.{weight,bias}
    STACK.layers.N.cross_attention.linear_kv.{weight,bias}
    STACK.layers.N.pre_mlp_layernorm.{weight,bias}
    STACK.layers.N.mlp.linear_fc1.{weight,bias}            a dense layer; a MoE layer instead:
    STACK.layers.N.mlp.linear_fc2.{weight,bias}
    STACK.layers.N.mlp.router.weight
    STACK.layers.N.mlp.experts.local_experts.E.linear_fc{1,2}.{weight,bias}   each local expert
    STACK.layers.N.mlp.shared_experts.gate_weight          (a module's own parameters come first)
    STACK.layers.N.mlp.shared_experts.linear_fc{1,2}.weight
    STACK.final_layernorm.{weight,bias}                    after the stack's last layer
    lm_head.dense.{weight,bias}                            last stage, last chunk: BERT's transform
    lm_head.layer_norm.{weight,bias}
    output_layer.weight                                    untied head, or the tied copy (PP > 1)
    output_layer.bias                                      BERT; T5 (lm_head.output_layer.bias)
    binary_head.{weight,bias}                              BERT's binary head
    pooler.dense.{weight,bias}

``linear_proj`` comes before ``linear_qkv`` (and before a cross-attention's ``linear_q``)
because ``Attention.__init__`` registers it before ``SelfAttention.__init__`` and
``CrossAttention.__init__`` add theirs (megatron/core/transformer/attention.py); the state
dicts of every real fixture list them so. The canonical order of
:func:`ckptkit.spec.canonical_tensors` differs (QKV first): it is the order ckptkit writes
weights in, not the order Megatron optimizes in. BertModel registers ``lm_head``,
``output_layer``, ``binary_head``, ``pooler`` in that order, and its tied ``output_layer``
holds no weight on a stage that also holds the embeddings (``skip_weight_param_allocation``,
megatron/core/models/bert/bert_model.py). T5Model registers its output layer and its position
embeddings twice (``self.output_layer = self.lm_head.output_layer``, ``self.position_embeddings
= self.embedding.position_embeddings``); ``named_parameters()`` yields each parameter once,
under its first name: ``lm_head.output_layer.bias``, ``embedding.position_embeddings.weight``.
All of this was read off ``named_parameters()`` of the models Megatron-LM d98e8a6 builds
(one stage, the first and the last of a pipeline) and is checked on real checkpoints of each model.

Each parameter is one tensor-parallel piece of a canonical tensor: its rule (and the
padded vocabulary, for vocabulary tensors) says which region of the full tensor it
holds and what shape it has.

In a mixture of experts with expert parallelism (EP > 1) Megatron chains two optimizers
(``ChainedOptimizer``): one over every other parameter and one over the experts of the
rank's expert-parallel rank (``is_expert_parallel``), each with its own buffers and groups;
their parameters say ``expert``. At EP 1 the experts' weights reduce over the whole DP group
like the rest (``allreduce`` stays True: megatron/core/tensor_parallel/layers.py) and sit in
the one optimizer, in their places in the order below. An expert is named with its index
local to the EP rank (``local_experts.1`` of EP rank 1 of 2 with 4 experts is global
expert 3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import BadInput, Unsupported
from ..layouts.megatron_legacy import stage_layers
from ..layouts.megatron_names import NAMINGS
from ..spec import ModelSpec, canonical_tensors, check_parallel_sizes, rule_for

WORD_EMBEDDINGS = "embedding.word_embeddings.weight"
TIED_HEAD = "output_layer.weight"

_EXPERTS = "mlp.experts.local_experts"  # where the layer's local experts come, each in _EXPERT_ORDER
# Order of a transformer layer's parameters inside named_parameters() (local layer spec); a
# layer lacking one (no q/k norms, no cross-attention, dense or MoE) skips it.
_LAYER_ORDER = (
    "input_layernorm.weight", "input_layernorm.bias",
    "self_attention.linear_proj.weight", "self_attention.linear_proj.bias",
    "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
    "self_attention.q_layernorm.weight", "self_attention.q_layernorm.bias",
    "self_attention.k_layernorm.weight", "self_attention.k_layernorm.bias",
    "pre_cross_attn_layernorm.weight", "pre_cross_attn_layernorm.bias",
    "cross_attention.linear_proj.weight", "cross_attention.linear_proj.bias",
    "cross_attention.linear_q.weight", "cross_attention.linear_q.bias",
    "cross_attention.linear_kv.weight", "cross_attention.linear_kv.bias",
    "pre_mlp_layernorm.weight", "pre_mlp_layernorm.bias",
    "mlp.linear_fc1.weight", "mlp.linear_fc1.bias",
    "mlp.linear_fc2.weight", "mlp.linear_fc2.bias",
    "mlp.router.weight",
    _EXPERTS,
    "mlp.shared_experts.gate_weight",
    "mlp.shared_experts.linear_fc1.weight", "mlp.shared_experts.linear_fc2.weight",
)
# One local expert's parameters, in order (SequentialMLP's MLP per expert)
_EXPERT_ORDER = ("linear_fc1.weight", "linear_fc1.bias", "linear_fc2.weight", "linear_fc2.bias")
_FIRST_STAGE_ORDER = (WORD_EMBEDDINGS, "embedding.position_embeddings.weight",
                      "embedding.tokentype_embeddings.weight")
_FINAL_NORM_ORDER = ("final_layernorm.weight", "final_layernorm.bias")  # after each stack's last layer
_LAST_STAGE_ORDER = (
    "lm_head.dense.weight", "lm_head.dense.bias", "lm_head.layer_norm.weight", "lm_head.layer_norm.bias",
    TIED_HEAD, "output_layer.bias",
    "binary_head.weight", "binary_head.bias", "pooler.dense.weight", "pooler.dense.bias",
)
# Modules named_parameters() meets first under another name than the canonical one: model kind
# -> (canonical prefix, Megatron's name). T5Model's lm_head registers the output layer before
# T5Model's own alias of it.
_FIRST_NAMES = {"encoder_decoder": (("output_layer.", "lm_head.output_layer."),)}

SUPPORTED_NAMINGS = ("mcore-local",)


@dataclass(frozen=True)
class ChunkPlace:
    """One model chunk of one model-parallel rank: TP rank, pipeline stage, virtual chunk."""

    tp: int
    tp_rank: int
    pp: int = 1
    pp_stage: int = 0
    vpp: int = 1
    chunk: int = 0
    ep: int = 1
    ep_rank: int = 0

    @property
    def is_first(self) -> bool:
        return self.pp_stage == 0 and self.chunk == 0

    @property
    def is_last(self) -> bool:
        return self.pp_stage == self.pp - 1 and self.chunk == self.vpp - 1


@dataclass(frozen=True)
class ModelParameter:
    """One parameter of a model chunk: a TP piece of canonical tensor ``canonical``.

    ``name`` is Megatron's, with the layer index local to the chunk. ``shape`` is the
    piece this rank holds (``rule.shard_shape`` of the full tensor). The tied output
    head on the last stage (PP x VPP > 1) is a copy of the word embeddings: its
    ``canonical`` is the embeddings' and ``tied_copy`` is set; Megatron marks both with
    ``shared_embedding``, which gives each a bucket of its own.
    """

    name: str
    canonical: str
    rule: str
    shape: tuple[int, ...]
    shared_embedding: bool = False
    tied_copy: bool = False
    expert: bool = False  # an expert's: in the experts' optimizer of a mixture of experts

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def weight_decay(self) -> bool:
        """Megatron's default parameter groups: no weight decay for biases and 1-D tensors
        (``get_standard_config_overrides`` in megatron/core/optimizer/__init__.py)."""
        return not (len(self.shape) == 1 or self.name.endswith(".bias"))


def chunk_parameters(spec: ModelSpec, place: ChunkPlace, padded_vocab_size: int, *,
                     naming: str = "mcore-local") -> list[ModelParameter]:
    """The parameters of one model chunk in Megatron's ``named_parameters()`` order.

    GPT-2 style, 1 layer, TP=2, PP=1, rank 1: ``embedding.word_embeddings.weight``
    (rows 512-1023 of 1024), ``embedding.position_embeddings.weight`` (whole),
    ``decoder.layers.0.input_layernorm.weight``, ..., ``decoder.final_layernorm.bias``.
    """
    if naming not in SUPPORTED_NAMINGS:
        raise Unsupported(f"optimizer state for the {naming} naming: the order in which its modules "
                          f"register parameters is not confirmed on real files (supported: "
                          f"{', '.join(SUPPORTED_NAMINGS)})")
    check_parallel_sizes(spec, place.tp, place.pp, place.vpp, place.ep)
    if not (0 <= place.tp_rank < place.tp and 0 <= place.pp_stage < place.pp and 0 <= place.chunk < place.vpp
            and 0 <= place.ep_rank < place.ep):
        raise BadInput(f"no model chunk {place} in TP={place.tp} PP={place.pp} VPP={place.vpp} EP={place.ep}")
    file_names = NAMINGS[naming]
    layers_of = {stack: stage_layers(spec, place.pp, place.vpp, stack)[(place.pp_stage, place.chunk)]
                 for stack in spec.kind.stacks}
    tensors = {tensor.name: tensor for tensor in canonical_tensors(spec)}
    tied_split = spec.tied_embeddings and place.pp * place.vpp > 1

    def piece(canonical: str, name: str, **flags) -> ModelParameter:
        tensor = tensors[canonical]
        rule = rule_for(spec, tensor.rule, padded_vocab_size)
        return ModelParameter(name, canonical, tensor.rule, rule.shard_shape(tensor.shape, place.tp), **flags)

    parameters = []
    if place.is_first:
        for canonical in _FIRST_STAGE_ORDER:
            if canonical in tensors:
                shared = tied_split and canonical == WORD_EMBEDDINGS
                parameters.append(piece(canonical, file_names.file_name(canonical, None), shared_embedding=shared))
    local_experts = spec.num_experts // place.ep if spec.num_experts else 0
    first_expert = place.ep_rank * local_experts
    for stack, layers in layers_of.items():
        for layer in layers:
            parameters += _layer_parameters(spec, stack, layer, layers, tensors, piece, file_names, place,
                                            first_expert, local_experts)
        if spec.stack_layers(stack) - 1 in layers:
            for suffix in _FINAL_NORM_ORDER:
                canonical = f"{stack}.{suffix}"
                if canonical in tensors:
                    parameters.append(piece(canonical, file_names.file_name(canonical, None)))
    if place.is_last:
        for canonical in _LAST_STAGE_ORDER:
            if canonical == TIED_HEAD and tied_split:
                parameters.append(piece(WORD_EMBEDDINGS, file_names.tied_head[0], shared_embedding=True,
                                        tied_copy=True))
            elif canonical in tensors:
                parameters.append(piece(canonical, _first_name(spec, file_names.file_name(canonical, None))))
    listed = {parameter.canonical for parameter in parameters}
    expected = [name for name, tensor in tensors.items() if _holds(place, tensor, layers_of, first_expert,
                                                                    local_experts)]
    missing = [name for name in expected if name not in listed]
    if missing:  # a canonical tensor this table does not place: refuse rather than misplace its state
        raise Unsupported(f"optimizer state: no place in Megatron's parameter order for {missing[0]}")
    return parameters


def _layer_parameters(spec: ModelSpec, stack: str, layer: int, layers: range, tensors: dict, piece, file_names,
                      place: ChunkPlace, first_expert: int, local_experts: int) -> list[ModelParameter]:
    """One layer's parameters in _LAYER_ORDER (its experts those of the chunk's EP rank)."""
    prefix = f"{stack}.layers.{layer}."
    moe_layer = bool(spec.num_experts) and spec.is_moe_layer(layer)
    parameters = []
    for suffix in _LAYER_ORDER:
        if suffix == _EXPERTS:
            for expert in range(first_expert, first_expert + local_experts):
                for part in _EXPERT_ORDER:
                    expert_suffix = f"{_EXPERTS}.{expert}.{part}"
                    if prefix + expert_suffix in tensors:
                        parameters.append(piece(prefix + expert_suffix, file_names.file_name(
                            expert_suffix, layer - layers.start, moe_layer=True, expert_offset=first_expert,
                            stack=stack), expert=place.ep > 1))
        elif prefix + suffix in tensors:
            parameters.append(piece(prefix + suffix, file_names.file_name(suffix, layer - layers.start,
                                                                          moe_layer=moe_layer, stack=stack)))
    return parameters


def _first_name(spec: ModelSpec, name: str) -> str:
    """``name`` as named_parameters() spells it (see _FIRST_NAMES): a T5Model's
    ``output_layer.bias`` is ``lm_head.output_layer.bias``."""
    for canonical_prefix, first in _FIRST_NAMES.get(spec.model_kind, ()):
        if name.startswith(canonical_prefix):
            return first + name[len(canonical_prefix):]
    return name


def _holds(place: ChunkPlace, tensor, layers_of: dict[str, range], first_expert: int, local_experts: int) -> bool:
    if tensor.expert is not None:
        return tensor.layer in layers_of[tensor.stack] and first_expert <= tensor.expert < first_expert + local_experts
    if tensor.layer is not None:
        return tensor.layer in layers_of[tensor.stack]
    return place.is_first if tensor.name.startswith("embedding.") else place.is_last
