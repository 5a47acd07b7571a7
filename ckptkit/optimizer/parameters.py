"""The parameters of one Megatron model chunk, in the order Megatron's optimizer sees them.

Megatron builds its gradient buffers, the distributed optimizer's flat buffers and the
optimizer's parameter groups from ``model_chunk.named_parameters()``: the order in which
the modules registered their parameters. For Megatron-Core's GPT model with the local
layer spec that order is::

    embedding.word_embeddings.weight                       first stage, chunk 0
    embedding.position_embeddings.weight                   (learned absolute positions)
    decoder.layers.N.input_layernorm.{weight,bias}
    decoder.layers.N.self_attention.linear_proj.{weight,bias}
    decoder.layers.N.self_attention.linear_qkv.{weight,bias}
    decoder.layers.N.self_attention.{q,k}_layernorm.{weight,bias}
    decoder.layers.N.pre_mlp_layernorm.{weight,bias}
    decoder.layers.N.mlp.linear_fc1.{weight,bias}
    decoder.layers.N.mlp.linear_fc2.{weight,bias}
    decoder.final_layernorm.{weight,bias}                  last stage, last chunk
    output_layer.weight                                    untied head, or the tied copy

``linear_proj`` comes before ``linear_qkv`` because ``Attention.__init__`` registers it
before ``SelfAttention.__init__`` adds ``linear_qkv`` and the q/k norms
(megatron/core/transformer/attention.py); the state dicts of every real fixture list
them so. The canonical order of :func:`ckptkit.spec.canonical_tensors` differs (QKV
first): it is the order ckptkit writes weights in, not the order Megatron optimizes in.

Each parameter is one tensor-parallel piece of a canonical tensor: its rule (and the
padded vocabulary, for vocabulary tensors) says which region of the full tensor it
holds and what shape it has.
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

# Order of a transformer layer's parameters inside named_parameters() (local layer spec).
_LAYER_ORDER = (
    "input_layernorm.weight", "input_layernorm.bias",
    "self_attention.linear_proj.weight", "self_attention.linear_proj.bias",
    "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
    "self_attention.q_layernorm.weight", "self_attention.q_layernorm.bias",
    "self_attention.k_layernorm.weight", "self_attention.k_layernorm.bias",
    "pre_mlp_layernorm.weight", "pre_mlp_layernorm.bias",
    "mlp.linear_fc1.weight", "mlp.linear_fc1.bias",
    "mlp.linear_fc2.weight", "mlp.linear_fc2.bias",
)
_FIRST_STAGE_ORDER = (WORD_EMBEDDINGS, "embedding.position_embeddings.weight")
_LAST_STAGE_ORDER = ("decoder.final_layernorm.weight", "decoder.final_layernorm.bias", TIED_HEAD)

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
    if spec.num_experts:
        raise Unsupported("optimizer state of mixture-of-experts models (expert parameters live in "
                          "buffers of their own) is not supported yet")
    check_parallel_sizes(spec, place.tp, place.pp, place.vpp)
    if not (0 <= place.tp_rank < place.tp and 0 <= place.pp_stage < place.pp and 0 <= place.chunk < place.vpp):
        raise BadInput(f"no model chunk {place} in TP={place.tp} PP={place.pp} VPP={place.vpp}")
    file_names = NAMINGS[naming]
    layers = stage_layers(spec, place.pp, place.vpp)[(place.pp_stage, place.chunk)]
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
    for layer in layers:
        prefix = f"decoder.layers.{layer}."
        for suffix in _LAYER_ORDER:
            if prefix + suffix in tensors:
                parameters.append(piece(prefix + suffix, file_names.file_name(suffix, layer - layers.start)))
    if place.is_last:
        for canonical in _LAST_STAGE_ORDER:
            if canonical == TIED_HEAD and tied_split:
                parameters.append(piece(WORD_EMBEDDINGS, file_names.tied_head[0], shared_embedding=True,
                                        tied_copy=True))
            elif canonical in tensors:
                parameters.append(piece(canonical, file_names.file_name(canonical, None)))
    listed = {parameter.canonical for parameter in parameters}
    expected = [name for name, tensor in tensors.items() if _holds(place, tensor, layers)]
    missing = [name for name in expected if name not in listed]
    if missing:  # a canonical tensor this table does not place: refuse rather than misplace its state
        raise Unsupported(f"optimizer state: no place in Megatron's parameter order for {missing[0]}")
    return parameters


def _holds(place: ChunkPlace, tensor, layers: range) -> bool:
    if tensor.layer is not None:
        return tensor.layer in layers
    return place.is_first if tensor.name.startswith("embedding.") else place.is_last
