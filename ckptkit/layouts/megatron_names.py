"""Parameter namings found in Megatron-LM per-rank files, as data.

Each naming maps a canonical suffix (Megatron-Core local spec, see
:mod:`ckptkit.spec`) to the spellings used in files. The first spelling is the one we
write; the others are accepted on read. Layer indices in files are local to the
pipeline stage (and virtual chunk).

=============  =======================================================================
naming         what writes it
=============  =======================================================================
mcore-local    Megatron-Core GPTModel, ``--transformer-impl local`` (the real fixtures)
mcore-te       Megatron-Core with Transformer Engine: norms fused into the next linear
legacy         pre-Core ``--use-legacy-models``: ``language_model.encoder.layers.N...``
=============  =======================================================================
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import Unsupported

# canonical suffix inside decoder.layers.N. -> spellings (first is written)
_MCORE_LOCAL_LAYER = {
    "input_layernorm.weight": ["input_layernorm.weight"],
    "input_layernorm.bias": ["input_layernorm.bias"],
    "self_attention.linear_qkv.weight": ["self_attention.linear_qkv.weight"],
    "self_attention.linear_qkv.bias": ["self_attention.linear_qkv.bias"],
    "self_attention.linear_proj.weight": ["self_attention.linear_proj.weight"],
    "self_attention.linear_proj.bias": ["self_attention.linear_proj.bias"],
    # --qk-layernorm: per-head norms, the same names with or without Transformer Engine
    "self_attention.q_layernorm.weight": ["self_attention.q_layernorm.weight"],
    "self_attention.q_layernorm.bias": ["self_attention.q_layernorm.bias"],
    "self_attention.k_layernorm.weight": ["self_attention.k_layernorm.weight"],
    "self_attention.k_layernorm.bias": ["self_attention.k_layernorm.bias"],
    "pre_mlp_layernorm.weight": ["pre_mlp_layernorm.weight"],
    "pre_mlp_layernorm.bias": ["pre_mlp_layernorm.bias"],
    "mlp.linear_fc1.weight": ["mlp.linear_fc1.weight"],
    "mlp.linear_fc1.bias": ["mlp.linear_fc1.bias"],
    "mlp.linear_fc2.weight": ["mlp.linear_fc2.weight"],
    "mlp.linear_fc2.bias": ["mlp.linear_fc2.bias"],
}

# Transformer Engine fuses each norm into the linear that follows it.
_MCORE_TE_LAYER = {
    **_MCORE_LOCAL_LAYER,
    "input_layernorm.weight": ["self_attention.linear_qkv.layer_norm_weight"],
    "input_layernorm.bias": ["self_attention.linear_qkv.layer_norm_bias"],
    "pre_mlp_layernorm.weight": ["mlp.linear_fc1.layer_norm_weight"],
    "pre_mlp_layernorm.bias": ["mlp.linear_fc1.layer_norm_bias"],
}

# 2024 Megatron-LM says input_norm/post_attention_norm/final_norm; older versions say
# *_layernorm, and older still `attention` for `self_attention`.
_LEGACY_LAYER = {
    "input_layernorm.weight": ["input_norm.weight", "input_layernorm.weight"],
    "input_layernorm.bias": ["input_norm.bias", "input_layernorm.bias"],
    "self_attention.linear_qkv.weight": ["self_attention.query_key_value.weight", "attention.query_key_value.weight"],
    "self_attention.linear_qkv.bias": ["self_attention.query_key_value.bias", "attention.query_key_value.bias"],
    "self_attention.linear_proj.weight": ["self_attention.dense.weight", "attention.dense.weight"],
    "self_attention.linear_proj.bias": ["self_attention.dense.bias", "attention.dense.bias"],
    "pre_mlp_layernorm.weight": ["post_attention_norm.weight", "post_attention_layernorm.weight"],
    "pre_mlp_layernorm.bias": ["post_attention_norm.bias", "post_attention_layernorm.bias"],
    "mlp.linear_fc1.weight": ["mlp.dense_h_to_4h.weight"],
    "mlp.linear_fc1.bias": ["mlp.dense_h_to_4h.bias"],
    "mlp.linear_fc2.weight": ["mlp.dense_4h_to_h.weight"],
    "mlp.linear_fc2.bias": ["mlp.dense_4h_to_h.bias"],
}

_MCORE_GLOBAL = {
    "embedding.word_embeddings.weight": ["embedding.word_embeddings.weight"],
    "embedding.position_embeddings.weight": ["embedding.position_embeddings.weight"],
    "decoder.final_layernorm.weight": ["decoder.final_layernorm.weight"],
    "decoder.final_layernorm.bias": ["decoder.final_layernorm.bias"],
    "output_layer.weight": ["output_layer.weight"],
}

_LEGACY_GLOBAL = {
    "embedding.word_embeddings.weight": ["language_model.embedding.word_embeddings.weight"],
    "embedding.position_embeddings.weight": ["language_model.embedding.position_embeddings.weight"],
    "decoder.final_layernorm.weight": ["language_model.encoder.final_norm.weight",
                                       "language_model.encoder.final_layernorm.weight",
                                       "language_model.transformer.final_layernorm.weight"],
    "decoder.final_layernorm.bias": ["language_model.encoder.final_norm.bias",
                                     "language_model.encoder.final_layernorm.bias",
                                     "language_model.transformer.final_layernorm.bias"],
    # Untied heads live under language_model; the tied head copy on the last stage
    # is word_embeddings_for_head (see TIED_HEAD below).
    "output_layer.weight": ["language_model.output_layer.weight"],
}

# Linear layers that carry an `_extra_state` entry (None with the local implementation).
_MCORE_LINEARS = ["self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"]
_LEGACY_LINEARS = ["self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]


@dataclass(frozen=True)
class Naming:
    """One naming style: how canonical names are spelled inside a per-rank file."""

    name: str
    layer_prefixes: tuple[str, ...]  # first is written
    layer_names: dict = field(hash=False)
    global_names: dict = field(hash=False)
    tied_head: tuple[str, ...]  # spelling of the tied output head copy on the last stage
    extra_state_linears: tuple[str, ...] = ()
    head_extra_state: str | None = None

    def file_name(self, canonical_suffix: str, local_layer: int | None) -> str:
        """The spelling we write for a canonical name (suffix inside the layer if per-layer)."""
        names = self.global_names if local_layer is None else self.layer_names
        if canonical_suffix not in names:
            raise Unsupported(f"the {self.name} naming has no name for {canonical_suffix} "
                              "(pre-Core models lack it): write mcore-local or mcore-te")
        if local_layer is None:
            return names[canonical_suffix][0]
        return f"{self.layer_prefixes[0]}{local_layer}.{names[canonical_suffix][0]}"

    def extra_state_names(self, local_layer: int) -> list[str]:
        return [f"{self.layer_prefixes[0]}{local_layer}.{linear}._extra_state"
                for linear in self.extra_state_linears]

    def parse(self, file_key: str):
        """``(canonical_suffix, local_layer)`` for a file key, or None if not ours.

        ``decoder.layers.3.self_attention.linear_qkv.weight`` ->
        ``("self_attention.linear_qkv.weight", 3)``; globals give ``(name, None)``;
        the tied head copy gives ``("output_layer.weight", None)``.
        """
        lookup = _reverse_lookup(self)
        if file_key in lookup["global"]:
            return lookup["global"][file_key], None
        if file_key in self.tied_head:
            return "output_layer.weight", None
        for prefix in self.layer_prefixes:
            if file_key.startswith(prefix):
                match = _LAYER_KEY.match(file_key[len(prefix):])
                if match and match.group(2) in lookup["layer"]:
                    return lookup["layer"][match.group(2)], int(match.group(1))
        return None


_LAYER_KEY = re.compile(r"^(\d+)\.(.+)$")
_REVERSE_CACHE: dict[str, dict] = {}


def _reverse_lookup(naming: Naming) -> dict:
    if naming.name not in _REVERSE_CACHE:
        _REVERSE_CACHE[naming.name] = {
            "global": {spelling: canonical for canonical, spellings in naming.global_names.items()
                       for spelling in spellings},
            "layer": {spelling: canonical for canonical, spellings in naming.layer_names.items()
                      for spelling in spellings},
        }
    return _REVERSE_CACHE[naming.name]


NAMINGS = {
    naming.name: naming
    for naming in (
        Naming("mcore-local", ("decoder.layers.",), _MCORE_LOCAL_LAYER, _MCORE_GLOBAL, ("output_layer.weight",),
               tuple(_MCORE_LINEARS), "output_layer._extra_state"),
        Naming("mcore-te", ("decoder.layers.",), _MCORE_TE_LAYER, _MCORE_GLOBAL, ("output_layer.weight",),
               tuple(_MCORE_LINEARS), "output_layer._extra_state"),
        Naming("legacy", ("language_model.encoder.layers.", "language_model.transformer.layers."),
               _LEGACY_LAYER, _LEGACY_GLOBAL, ("word_embeddings_for_head.weight",), tuple(_LEGACY_LINEARS)),
    )
}


def detect_naming(file_keys) -> Naming | None:
    """The naming whose spellings match the most keys of one file (TE beats local on ties
    only when a fused ``layer_norm_weight`` is present)."""
    keys = [key for key in file_keys if not key.endswith("._extra_state")]
    best, best_count = None, 0
    for naming in NAMINGS.values():
        count = sum(naming.parse(key) is not None for key in keys)
        if count > best_count:
            best, best_count = naming, count
    return best
