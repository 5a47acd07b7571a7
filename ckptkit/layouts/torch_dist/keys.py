"""What the entries of a Megatron ``torch_dist`` checkpoint are called.

Per-layer tensors share one key stacked over the global layers, spelled with Transformer
Engine's norm names (see the package docstring); non-tensor entries are pickled bytes
under ``KEY/shard_OFFSET_SHAPE``.

When the layers differ in structure (dense and MoE layers mixed: ``moe_layer_freq`` a
list or an int above 1), Megatron keys each layer on its own with its *global* index and
no layer axis (megatron/core/transformer/transformer_block.py, ``sharded_state_dict``:
``non_homogeneous_layers``). All experts of a layer share one key with an expert axis
after the layer axis (megatron/core/transformer/moe/experts.py, ``SequentialMLP.
sharded_state_dict``): ``decoder.layers.mlp.experts.experts.linear_fc1.weight`` is
``[layers, experts, rows, hidden]``, or ``decoder.layers.1.mlp.experts.experts.
linear_fc1.weight`` ``[experts, rows, hidden]``.

>>> extra_state_key("self_attention.linear_qkv", 3, 24)
'decoder.layers.self_attention.linear_qkv._extra_state/shard_3_24'
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ...spec import MTP, MTP_LAYER, CanonicalTensor, ModelSpec, mtp_part
from ..megatron_names import EXPERT, NAMINGS, attention_linears, expert_of, key_copies, with_cross_attention

LEGACY_COMMON_FILE = "common.pt"
COMMON_STATE_KEY = "common_state/shard_0_1"  # ShardedObject("common_state", shape (1,), offset (0,))

# Entries that are not model weights: never read for weights.
_NON_WEIGHT_PREFIXES = ("optimizer.", "rng_state", "rerun_state_machine_state", "common_state")
# Optimizer entries: "optimizer." alone, or "chained_N.optimizer." when Megatron chains one
# optimizer per parameter kind (the experts' apart from the rest in a mixture of experts).
_OPTIMIZER_KEY = re.compile(r"^(chained_\d+\.)?optimizer\.")


def is_optimizer_key(key: str) -> bool:
    """Whether a stored key is optimizer state.

    >>> is_optimizer_key("chained_1.optimizer.distributed.dp_group_idx_0.optimizer/shard_0_1")
    True
    """
    return _OPTIMIZER_KEY.match(key) is not None


# ShardedObject keys: KEY/shard_OFFSETS_SHAPE, dotted over several axes (an expert's: 0.3_2.4)
_EXTRA_STATE = re.compile(r"\._extra_state/shard_[\d.]+_[\d.]+$")
_PER_LAYER_KEY = re.compile(r"^(decoder|encoder)\.layers\.\d+\.")

_TE = NAMINGS["mcore-te"]
_LOCAL = NAMINGS["mcore-local"]
_LAYER_PREFIX = "decoder.layers."  # GPT's stack; BERT's and T5's encoder is "encoder.layers."


def _stack_prefix(stack: str) -> str:
    return f"{stack}.layers."


_STORED_EXPERTS = "mlp.experts.experts."  # SequentialMLP's experts under one key, EXPERT in the live model


def keys_per_layer(spec: ModelSpec) -> bool:
    """Whether Megatron keys this model's layers one by one (no layer axis): when dense and
    MoE layers mix, i.e. when the ``moe_layer_freq`` ckptkit writes is a list."""
    return bool(spec.num_experts) and spec.moe_layers is not None


@dataclass(frozen=True)
class StoredPlace:
    """Where one canonical tensor is in a torch_dist checkpoint: a key, and the indices on
    the key's leading axes (layer, expert) that select it, with those axes' sizes.

    >>> place = StoredPlace("decoder.layers.mlp.experts.experts.linear_fc2.weight", (1, 3), (2, 4))
    >>> place.global_shape((96, 64)), place.box((0, 32), (96, 32))
    ((2, 4, 96, 64), ((1, 3, 0, 32), (1, 1, 96, 32)))
    """

    key: str
    index: tuple[int, ...] = ()
    axes: tuple[int, ...] = ()

    def global_shape(self, shape) -> tuple[int, ...]:
        """The stored key's global shape, for a canonical tensor of ``shape``."""
        return (*self.axes, *shape)

    def box(self, offsets, sizes) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """A box of the canonical tensor as a box of the stored key."""
        return (*self.index, *offsets), (*(1 for _ in self.index), *sizes)


def _layer_spellings(suffix: str, moe_layer: bool, naming: str | None, mla: bool = False) -> list[str]:
    """Stored spellings of a per-layer suffix: the one Megatron writes for ``naming`` first,
    then (``naming`` None, for reading) every one accepted. A multi-latent attention model
    keeps the local names (its local spec maps no keys to Transformer Engine's)."""
    if suffix.startswith(EXPERT):
        return [_STORED_EXPERTS + suffix[len(EXPERT):]]
    if naming is not None and mla:
        return [NAMINGS[naming].layer_spelling(suffix, moe_layer=moe_layer)]
    if naming is not None:
        table = _TE.moe_layer_names if naming == "mcore-te" and moe_layer and suffix in _TE.moe_layer_names \
            else _TE.layer_names
        return table[suffix][:1]
    return _STORED_SPELLINGS[suffix]


def _place(spec: ModelSpec, canonical: CanonicalTensor, spelling: str, per_layer: bool) -> StoredPlace:
    if canonical.layer is None:
        return StoredPlace(spelling)
    layer_index, layer_axis = ((), ()) if per_layer else ((canonical.layer,), (spec.stack_layers(canonical.stack),))
    stack_prefix = _stack_prefix(canonical.stack)
    prefix = f"{stack_prefix}{canonical.layer}." if per_layer else stack_prefix
    if canonical.expert is None:
        return StoredPlace(prefix + spelling, layer_index, layer_axis)
    return StoredPlace(prefix + spelling, (*layer_index, canonical.expert), (*layer_axis, spec.num_experts))


def _layer_suffix(canonical: CanonicalTensor) -> str:
    return expert_of(canonical.name.split(".", 3)[3])[0]


def stored_place(spec: ModelSpec, canonical: CanonicalTensor, naming: str = "mcore-local") -> StoredPlace:
    """Where Megatron saves ``canonical`` for a model built with ``naming``'s implementation.

    ``decoder.layers.3.input_layernorm.weight`` -> ``decoder.layers.self_attention.
    linear_qkv.layer_norm_weight`` at layer 3; ``embedding.word_embeddings.weight`` is
    itself; expert 5 of layer 1 is index (1, 5) of ``decoder.layers.mlp.experts.experts.
    linear_fc1.weight``.
    """
    if mtp_part(canonical.name) is not None:
        return _mtp_places(spec, canonical, naming)[0]
    if canonical.layer is None:
        return StoredPlace(_TE.global_names[canonical.name][0])
    suffix = _layer_suffix(canonical)
    spelling = _layer_spellings(suffix, spec.is_moe_layer(canonical.layer), naming, spec.multi_latent_attention)[0]
    return _place(spec, canonical, spelling, keys_per_layer(spec))


def stored_places(spec: ModelSpec, canonical: CanonicalTensor) -> list[StoredPlace]:
    """Every place a checkpoint may hold ``canonical`` in, for reading: each accepted
    spelling, keyed per layer and stacked over layers (Megatron's choice depends on its
    version and flags, so the stored keys decide)."""
    if mtp_part(canonical.name) is not None:
        return _mtp_places(spec, canonical, None)
    if canonical.layer is None:
        return [StoredPlace(name) for name in _STORED_SPELLINGS[canonical.name]]
    spellings = _layer_spellings(_layer_suffix(canonical), spec.is_moe_layer(canonical.layer), None)
    return [_place(spec, canonical, spelling, per_layer) for per_layer in (True, False) for spelling in spellings]


def _mtp_places(spec: ModelSpec, canonical: CanonicalTensor, naming: str | None) -> list[StoredPlace]:
    """Where a multi-token prediction tensor is: its own key (``mtp.layers.D.enorm.weight``), or
    for its transformer layer ``mtp.layers.D.transformer_layer.`` and the layer's spelling, with
    an expert axis for an expert (megatron/core/transformer/multi_token_prediction.py,
    ``MultiTokenPredictionLayer.sharded_state_dict``: no layer axis). ``naming`` None: every
    place accepted on read."""
    depth, rest = mtp_part(canonical.name)
    if not rest.startswith(MTP_LAYER):
        return [StoredPlace(canonical.name)]
    last = spec.num_layers - 1
    suffix = expert_of(rest[len(MTP_LAYER):])[0]
    spellings = _layer_spellings(suffix, spec.is_moe_layer(last), naming, spec.multi_latent_attention)
    prefix = f"{MTP.format(depth=depth)}{MTP_LAYER}"
    if canonical.expert is None:
        return [StoredPlace(prefix + spelling) for spelling in spellings]
    return [StoredPlace(prefix + spelling, (canonical.expert,), (spec.num_experts,)) for spelling in spellings]


def stored_key(canonical: CanonicalTensor, spec: ModelSpec | None = None) -> str:
    """The torch_dist key of a canonical tensor of a model whose layers share keys (see
    :func:`stored_place` for any model).

    >>> from ckptkit.spec import CanonicalTensor
    >>> stored_key(CanonicalTensor("decoder.layers.3.input_layernorm.weight", (8,), "replicated", 3))
    'decoder.layers.self_attention.linear_qkv.layer_norm_weight'
    """
    if canonical.layer is None:
        return _TE.global_names[canonical.name][0]
    if spec is not None:
        return stored_place(spec, canonical).key
    return _stack_prefix(canonical.stack) + _layer_spellings(_layer_suffix(canonical), False, "mcore-local")[0]


def _stored_spellings() -> dict[str, list[str]]:
    """Canonical name (per-layer tensors: their suffix, experts' with ``{expert}``) -> stored
    spellings accepted on read (without the layer prefix for per-layer tensors).

    Megatron writes the Transformer Engine names; the local names are accepted too, for
    versions whose local layer spec did not map them yet. Experts are one key for all.
    """
    spellings: dict[str, list[str]] = {}
    for naming in (_TE, _LOCAL):
        for table in (naming.layer_names, naming.moe_layer_names):
            for suffix, names in table.items():
                if suffix.startswith(EXPERT):
                    names = [_STORED_EXPERTS + suffix[len(EXPERT):]]
                spellings.setdefault(suffix, []).extend(names)
        for canonical, names in naming.global_names.items():
            spellings.setdefault(canonical, []).extend(names)
    return {target: list(dict.fromkeys(names)) for target, names in spellings.items()}


_STORED_SPELLINGS = _stored_spellings()
_KNOWN_KEYS = {_stack_prefix(stack) + key if suffix not in _LOCAL.global_names else key
               for suffix, keys in _STORED_SPELLINGS.items() for key in keys for stack in ("decoder", "encoder")}
_MOE_KEYS = {_LAYER_PREFIX + key for suffix, keys in _STORED_SPELLINGS.items() for key in keys
             if suffix.startswith(("mlp.router.", "mlp.experts.", "mlp.shared_experts."))}


def is_known_key(key: str, moe: bool) -> bool:
    """A weight key ckptkit knows, stacked or per layer, whether or not this model has it;
    the experts' keys count only for a mixture of experts (in a dense model they are as
    unknown as any other: nothing would read them)."""
    known = _PER_LAYER_KEY.sub(r"\1.layers.", key)
    return known in _KNOWN_KEYS and (moe or known not in _MOE_KEYS)


def _object_key(key: str, offsets: tuple[int, ...], shape: tuple[int, ...]) -> str:
    """A ShardedObject's key (megatron/core/dist_checkpointing/mapping.py, ``unique_key``)."""
    return f"{key}/shard_{'.'.join(map(str, offsets))}_{'.'.join(map(str, shape))}"


def extra_state_key(linear: str, layer: int, num_layers: int, stack: str = "decoder") -> str:
    """Megatron's key for one layer's ``_extra_state`` of a linear module (replicated over TP)."""
    return _object_key(f"{_stack_prefix(stack)}{linear}._extra_state", (layer,), (num_layers,))


def extra_state_keys(spec: ModelSpec) -> list[str]:
    """Every ``_extra_state`` ShardedObject Megatron saves for ``spec``, layer by layer: each
    linear's (a dense layer's four; a MoE layer's attention, each expert's, the shared
    expert's), over the layer axis or, keyed per layer, with shape (1,) (an expert's over
    the expert axis: ``shard_L.E_layers.experts`` or ``shard_E_experts``)."""
    per_layer = keys_per_layer(spec)
    attention = attention_linears(spec)
    keys = []
    stack_layers = [(stack, layer) for stack in spec.kind.stacks for layer in range(spec.stack_layers(stack))]
    for stack, layer in stack_layers:
        moe = spec.is_moe_layer(layer)
        linears = list(_TE.extra_state_linears) if not moe else list(_TE.moe_extra_state_linears) + \
            (list(_TE.shared_expert_extra_state_linears) if spec.moe_shared_expert_size else [])
        if attention is not None:
            linears = list(attention) + [linear for linear in linears if not linear.startswith("self_attention.")]
        if stack == spec.kind.cross_attention_stack:
            linears = with_cross_attention(linears)
        stack_prefix = _stack_prefix(stack)
        prefix = f"{stack_prefix}{layer}." if per_layer else stack_prefix
        index, axes = ((), ()) if per_layer else ((layer,), (spec.stack_layers(stack),))
        for linear in linears:
            if not linear.startswith(EXPERT):
                keys.append(_object_key(f"{prefix}{linear}._extra_state", index or (0,), axes or (1,)))
                continue
            stored = f"{prefix}{_STORED_EXPERTS}{linear[len(EXPERT):]}._extra_state"
            keys += [_object_key(stored, (*index, expert), (*axes, spec.num_experts))
                     for expert in range(spec.num_experts)]
    if spec.kind.output_extra_state_in_dist:
        keys += [_object_key(key, (0,), (1,)) for key in ("output_layer._extra_state",
                                                          *key_copies(spec.model_kind, "output_layer._extra_state"))]
    return keys + _mtp_extra_state_keys(spec, attention)


def _mtp_extra_state_keys(spec: ModelSpec, attention) -> list[str]:
    """The multi-token prediction layers' ``_extra_state`` objects: ``eh_proj``'s and their
    transformer layer's linears, keyed without a layer axis (shard_0_1; an expert's over the
    expert axis)."""
    keys = []
    moe = spec.is_moe_layer(spec.num_layers - 1)
    linears = list(_TE.extra_state_linears) if not moe else list(_TE.moe_extra_state_linears) + \
        (list(_TE.shared_expert_extra_state_linears) if spec.moe_shared_expert_size else [])
    if attention is not None:
        linears = list(attention) + [linear for linear in linears if not linear.startswith("self_attention.")]
    for depth in range(spec.mtp_num_layers):
        prefix = MTP.format(depth=depth)
        keys.append(_object_key(f"{prefix}eh_proj._extra_state", (0,), (1,)))
        for linear in linears:
            if not linear.startswith(EXPERT):
                keys.append(_object_key(f"{prefix}{MTP_LAYER}{linear}._extra_state", (0,), (1,)))
                continue
            stored = f"{prefix}{MTP_LAYER}{_STORED_EXPERTS}{linear[len(EXPERT):]}._extra_state"
            keys += [_object_key(stored, (expert,), (spec.num_experts,)) for expert in range(spec.num_experts)]
    return keys
