"""What the entries of a Megatron ``torch_dist`` checkpoint are called.

Per-layer tensors share one key stacked over the global layers, spelled with Transformer
Engine's norm names (see the package docstring); non-tensor entries are pickled bytes
under ``KEY/shard_OFFSET_SHAPE``.

>>> extra_state_key("self_attention.linear_qkv", 3, 24)
'decoder.layers.self_attention.linear_qkv._extra_state/shard_3_24'
"""
from __future__ import annotations

import re

from ...spec import CanonicalTensor
from ..megatron_names import NAMINGS

LEGACY_COMMON_FILE = "common.pt"
COMMON_STATE_KEY = "common_state/shard_0_1"  # ShardedObject("common_state", shape (1,), offset (0,))

# Entries that are not model weights: never read for weights.
_NON_WEIGHT_PREFIXES = ("optimizer.", "rng_state", "rerun_state_machine_state", "common_state")
_EXTRA_STATE = re.compile(r"\._extra_state/shard_[\d_]+$")


_TE = NAMINGS["mcore-te"]
_LOCAL = NAMINGS["mcore-local"]
_LAYER_PREFIX = "decoder.layers."


def stored_key(canonical: CanonicalTensor) -> str:
    """The torch_dist key of a canonical tensor (per-layer tensors share one stacked key).

    ``decoder.layers.3.input_layernorm.weight`` -> ``decoder.layers.self_attention.
    linear_qkv.layer_norm_weight``; ``embedding.word_embeddings.weight`` is itself.
    """
    if canonical.layer is None:
        return _TE.global_names[canonical.name][0]
    suffix = canonical.name.split(".", 3)[3]
    return _LAYER_PREFIX + _TE.layer_names[suffix][0]


def _stored_spellings() -> dict[str, list[str]]:
    """Canonical name (per-layer tensors: their suffix) -> stored keys accepted on read.

    Megatron writes the Transformer Engine names; the local names are accepted too, for
    versions whose local layer spec did not map them yet.
    """
    spellings: dict[str, list[str]] = {}
    for naming in (_TE, _LOCAL):
        for suffix, names in naming.layer_names.items():
            spellings.setdefault(suffix, []).extend(_LAYER_PREFIX + name for name in names)
        for canonical, names in naming.global_names.items():
            spellings.setdefault(canonical, []).extend(names)
    return {target: list(dict.fromkeys(names)) for target, names in spellings.items()}


_STORED_SPELLINGS = _stored_spellings()
_KNOWN_KEYS = {key for keys in _STORED_SPELLINGS.values() for key in keys}


def extra_state_key(linear: str, layer: int, num_layers: int) -> str:
    """Megatron's key for one layer's ``_extra_state`` of a linear module (replicated over TP)."""
    return f"{_LAYER_PREFIX}{linear}._extra_state/shard_{layer}_{num_layers}"
