"""Parameter namings found in Megatron-LM per-rank files, as data.

Each naming maps a canonical suffix (Megatron-Core local spec, see
:mod:`ckptkit.spec`) to the spellings used in files. The first spelling is the one we
write; the others are accepted on read. Layer indices in files are local to the
pipeline stage (and virtual chunk), and expert indices local to the expert-parallel
rank: canonical names carry the global expert ``e``, a rank file of EP rank ``r`` holding
``E / EP`` experts spells it ``e - r x E / EP`` (``{expert}`` in the tables below).

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
from ..spec import MTP, MTP_LAYER, mtp_part

# A multi-token prediction layer's own tensors; its transformer layer is the module
# ``mtp_model_layer`` in per-rank files (torch_dist keys say ``transformer_layer``, canonical too).
MTP_OWN = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "final_layernorm.weight")
PER_RANK_MTP_LAYER = "mtp_model_layer."

# The canonical (and per-rank file) prefix of one expert's MLP, with its expert placeholder.
EXPERT = "mlp.experts.local_experts.{expert}."
_CANONICAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")


def expert_of(canonical_suffix: str) -> tuple[str, int | None]:
    """``(template, expert)`` of a canonical suffix inside a layer; ``(suffix, None)`` if it is
    not an expert's.

    >>> expert_of("mlp.experts.local_experts.5.linear_fc2.weight")
    ('mlp.experts.local_experts.{expert}.linear_fc2.weight', 5)
    """
    match = _CANONICAL_EXPERT.match(canonical_suffix)
    if match is None:
        return canonical_suffix, None
    return EXPERT + match.group(2), int(match.group(1))

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
    # Mixture-of-experts layers (megatron/core/transformer/moe/): the router, each local
    # expert of SequentialMLP (grouped GEMM, TEGroupedMLP, spells them weight0..weightN-1:
    # accepted on read), the shared expert and its gate.
    "mlp.router.weight": ["mlp.router.weight"],
    "mlp.router.expert_bias": ["mlp.router.expert_bias"],
    EXPERT + "linear_fc1.weight": [EXPERT + "linear_fc1.weight", "mlp.experts.linear_fc1.weight{expert}"],
    EXPERT + "linear_fc2.weight": [EXPERT + "linear_fc2.weight", "mlp.experts.linear_fc2.weight{expert}"],
    "mlp.shared_experts.linear_fc1.weight": ["mlp.shared_experts.linear_fc1.weight"],
    "mlp.shared_experts.linear_fc2.weight": ["mlp.shared_experts.linear_fc2.weight"],
    "mlp.shared_experts.gate_weight": ["mlp.shared_experts.gate_weight"],
    # A T5 decoder layer's cross-attention (megatron/core/models/T5/t5_spec.py): its own norm
    # and three linears, the same names with or without Transformer Engine
    **{suffix: [suffix] for suffix in (
        "pre_cross_attn_layernorm.weight", "pre_cross_attn_layernorm.bias",
        "cross_attention.linear_q.weight", "cross_attention.linear_q.bias",
        "cross_attention.linear_kv.weight", "cross_attention.linear_kv.bias",
        "cross_attention.linear_proj.weight", "cross_attention.linear_proj.bias")},
}

# Multi-latent attention in the local spec (megatron/core/models/gpt/gpt_layer_specs.py,
# get_gpt_layer_local_submodules with multi_latent_attention): every projection a module of
# its own and the q/kv norms too. Its torch_dist keys are these same names: the local MLA
# spec maps no keys to Transformer Engine's (no sharded_state_dict_keys_map).
_MCORE_LOCAL_MLA_LAYER = {
    suffix: [suffix] for suffix in (
        "self_attention.linear_q_down_proj.weight", "self_attention.q_layernorm.weight",
        "self_attention.linear_q_up_proj.weight", "self_attention.linear_q_proj.weight",
        "self_attention.linear_kv_down_proj.weight", "self_attention.kv_layernorm.weight",
        "self_attention.linear_kv_up_proj.weight")
}

# The linears of an MLA layer's attention with an ``_extra_state`` entry, in the order Megatron's
# state dict has them (linear_proj is built first, by the Attention base class).
MLA_LINEARS = ("self_attention.linear_proj", "self_attention.linear_q_down_proj",
               "self_attention.linear_q_up_proj", "self_attention.linear_kv_down_proj",
               "self_attention.linear_kv_up_proj")
MLA_LINEARS_WITHOUT_Q_LORA = ("self_attention.linear_proj", "self_attention.linear_q_proj",
                              "self_attention.linear_kv_down_proj", "self_attention.linear_kv_up_proj")


def with_cross_attention(linears: list[str]) -> list[str]:
    """A layer's linears with a T5 decoder layer's cross-attention after its self-attention,
    where Megatron's TransformerLayer builds it."""
    after = sum(linear.startswith("self_attention.") for linear in linears)
    return [*linears[:after], *CROSS_ATTENTION_LINEARS, *linears[after:]]


def attention_linears(spec) -> tuple[str, ...] | None:
    """The attention linears with an ``_extra_state`` in a layer of ``spec``'s model when they
    are not the naming's own (MLA's), else None."""
    if not spec.multi_latent_attention:
        return None
    return MLA_LINEARS if spec.q_lora_rank else MLA_LINEARS_WITHOUT_Q_LORA

# Transformer Engine fuses each norm into the linear that follows it. A MoE layer has no
# linear_fc1 to fuse into: its pre-MLP norm is a module of its own (gpt_layer_specs.py,
# ``pre_mlp_layernorm=backend.layer_norm(...) if num_experts``), spelled as below.
# MLA has no Transformer Engine names here: TE fuses its q/kv norms into the up projections
# and keeps the down projections whole on every TP rank (TELinear, parallel_mode "duplicated"),
# another partition than the local spec's.
_MCORE_TE_LAYER = {
    **_MCORE_LOCAL_LAYER,
    "input_layernorm.weight": ["self_attention.linear_qkv.layer_norm_weight"],
    "input_layernorm.bias": ["self_attention.linear_qkv.layer_norm_bias"],
    "pre_mlp_layernorm.weight": ["mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"],
    "pre_mlp_layernorm.bias": ["mlp.linear_fc1.layer_norm_bias", "pre_mlp_layernorm.bias"],
}
_MCORE_TE_MOE_LAYER = {
    "pre_mlp_layernorm.weight": ["pre_mlp_layernorm.weight"],
    "pre_mlp_layernorm.bias": ["pre_mlp_layernorm.bias"],
}
_MCORE_LOCAL_LAYER.update(_MCORE_LOCAL_MLA_LAYER)

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

# Megatron-Core spells every global tensor as its canonical name (BertModel's heads too:
# megatron/core/models/bert/bert_model.py)
_MCORE_GLOBAL = {name: [name] for name in (
    "embedding.word_embeddings.weight", "embedding.position_embeddings.weight",
    "embedding.tokentype_embeddings.weight",
    "encoder.final_layernorm.weight", "encoder.final_layernorm.bias",
    "decoder.final_layernorm.weight", "decoder.final_layernorm.bias",
    "lm_head.dense.weight", "lm_head.dense.bias", "lm_head.layer_norm.weight", "lm_head.layer_norm.bias",
    "output_layer.weight", "output_layer.bias",
    "binary_head.weight", "binary_head.bias", "pooler.dense.weight", "pooler.dense.bias",
)}

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
    # Pre-Core BERT (megatron/legacy/model/bert_model.py, language_model.py at fd5cfec0ba):
    # BertLMHead keeps the vocabulary-parallel output bias as lm_head.bias and its norm as
    # lm_head.norm (lm_head.layernorm before 2024: its load_state_dict renames layernorm -> norm);
    # the pooler lives in the language model.
    "embedding.tokentype_embeddings.weight": ["language_model.embedding.tokentype_embeddings.weight"],
    "lm_head.dense.weight": ["lm_head.dense.weight"],
    "lm_head.dense.bias": ["lm_head.dense.bias"],
    "lm_head.layer_norm.weight": ["lm_head.norm.weight", "lm_head.layernorm.weight"],
    "lm_head.layer_norm.bias": ["lm_head.norm.bias", "lm_head.layernorm.bias"],
    "output_layer.bias": ["lm_head.bias"],
    "binary_head.weight": ["binary_head.weight"],
    "binary_head.bias": ["binary_head.bias"],
    "pooler.dense.weight": ["language_model.pooler.dense.weight"],
    "pooler.dense.bias": ["language_model.pooler.dense.bias"],
}

# Linear layers that carry an `_extra_state` entry (None with the local implementation):
# a dense layer's, a MoE layer's (each local expert's, no router: it is a plain
# parameter), and a shared expert's.
_MCORE_LINEARS = ["self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"]
_MCORE_MOE_LINEARS = ["self_attention.linear_qkv", "self_attention.linear_proj",
                      EXPERT + "linear_fc1", EXPERT + "linear_fc2"]
_MCORE_SHARED_EXPERT_LINEARS = ["mlp.shared_experts.linear_fc1", "mlp.shared_experts.linear_fc2"]
# A T5 decoder layer's linears, cross-attention's between self-attention's and the MLP's
CROSS_ATTENTION_LINEARS = ["cross_attention.linear_q", "cross_attention.linear_kv",
                                  "cross_attention.linear_proj"]
_LEGACY_LINEARS = ["self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]


@dataclass(frozen=True)
class Naming:
    """One naming style: how canonical names are spelled inside a per-rank file."""

    name: str
    layer_prefixes: tuple[str, ...]  # first is written: the decoder's (one_stack: the model's one stack)
    layer_names: dict = field(hash=False)
    global_names: dict = field(hash=False)
    tied_head: tuple[str, ...]  # spelling of the tied output head copy on the last stage
    extra_state_linears: tuple[str, ...] = ()
    head_extra_state: str | None = None
    moe_layer_names: dict = field(default_factory=dict, hash=False)  # a MoE layer's spellings, where they differ
    moe_extra_state_linears: tuple[str, ...] = ()
    shared_expert_extra_state_linears: tuple[str, ...] = ()
    # what to write instead, named when a canonical tensor has no spelling here
    instead: str = "write mcore-local or mcore-te"
    # Pre-Core models have one layer stack, spelled language_model.encoder.layers whether it is
    # GPT's decoder or BERT's encoder: the layer prefixes and the final norm's spellings stand for
    # the model's one stack, and the tables name it "decoder".
    one_stack: bool = False

    def stack_prefix(self, stack: str) -> str:
        """The prefix of layer keys of ``stack`` in a file.

        >>> NAMINGS["mcore-local"].stack_prefix("encoder"), NAMINGS["legacy"].stack_prefix("encoder")
        ('encoder.layers.', 'language_model.encoder.layers.')
        """
        return self.layer_prefixes[0] if self.one_stack else f"{stack}.layers."

    def _stack_of(self, prefix: str, main_stack: str) -> str:
        return main_stack if self.one_stack else prefix.split(".")[0]

    def _table_name(self, canonical: str) -> str:
        """A global canonical name as this naming's table has it (a one-stack naming's final norm
        is "decoder.final_layernorm" for any stack)."""
        stack, _, rest = canonical.partition(".")
        if self.one_stack and rest.startswith("final_layernorm."):
            return f"decoder.{rest}"
        return canonical

    def file_name(self, canonical_suffix: str, local_layer: int | None, *, moe_layer: bool = False,
                  expert_offset: int = 0, stack: str = "decoder") -> str:
        """The spelling we write for a canonical name (suffix inside the layer if per-layer).

        An expert's global index becomes local: ``expert_offset`` is the first global
        expert of the file's expert-parallel rank.

        >>> NAMINGS["mcore-local"].file_name("mlp.experts.local_experts.5.linear_fc1.weight", 0, expert_offset=4)
        'decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight'
        """
        if local_layer is None and mtp_part(canonical_suffix) is not None:
            return self._mtp_name(canonical_suffix)
        if local_layer is None:
            table_name = self._table_name(canonical_suffix)
            if table_name not in self.global_names:
                raise Unsupported(f"the {self.name} naming has no name for {canonical_suffix}: {self.instead}")
            return self.global_names[table_name][0]
        template, expert = expert_of(canonical_suffix)
        spelled = self.layer_spelling(template, moe_layer=moe_layer)
        if expert is not None:
            spelled = spelled.format(expert=expert - expert_offset)
        return f"{self.stack_prefix(stack)}{local_layer}.{spelled}"

    def _mtp_name(self, canonical: str) -> str:
        """A multi-token prediction tensor's key: its transformer layer is the module
        ``mtp_model_layer`` (megatron/core/transformer/multi_token_prediction.py), spelled as a
        decoder layer inside; experts keep their global index (one EP rank holds them all:
        :meth:`mtp_extra_state_names` refuses more)."""
        if self.name != "mcore-local":
            raise Unsupported(f"the {self.name} naming has no name for {canonical}: multi-token prediction "
                              "layers are written for Megatron's local spec only: write mcore-local")
        depth, rest = mtp_part(canonical)
        if not rest.startswith(MTP_LAYER):
            return canonical
        template, expert = expert_of(rest[len(MTP_LAYER):])
        spelled = self.layer_spelling(template)
        if expert is not None:
            spelled = spelled.format(expert=expert)
        return f"{MTP.format(depth=depth)}{PER_RANK_MTP_LAYER}{spelled}"

    def mtp_extra_state_names(self, spec, local_experts: int) -> list[str]:
        """The ``_extra_state`` keys of the multi-token prediction layers (on the last stage):
        ``eh_proj``'s and its transformer layer's linears. Their experts are written under global
        indices, so every expert must be on one EP rank."""
        if not spec.mtp_num_layers:
            return []
        last = spec.num_layers - 1
        moe = spec.is_moe_layer(last)
        if moe and local_experts != spec.num_experts:
            raise Unsupported("per-rank files of multi-token prediction layers with expert parallelism (EP>1) are "
                              "not supported: write torch_dist (--format torch_dist) or EP=1")
        inner = self.extra_state_names(0, moe_layer=moe, local_experts=local_experts,
                                       shared_expert=bool(spec.moe_shared_expert_size),
                                       attention=attention_linears(spec))
        names = []
        for depth in range(spec.mtp_num_layers):
            prefix = MTP.format(depth=depth)
            names.append(f"{prefix}eh_proj._extra_state")
            names += [f"{prefix}{PER_RANK_MTP_LAYER}{name[len(self.layer_prefixes[0]) + 2:]}" for name in inner]
        return names

    def layer_spelling(self, suffix: str, *, moe_layer: bool = False) -> str:
        """The spelling we write inside a layer for a canonical per-layer suffix (an expert's
        with its ``{expert}`` placeholder).

        >>> NAMINGS["mcore-te"].layer_spelling("input_layernorm.weight")
        'self_attention.linear_qkv.layer_norm_weight'
        """
        names = self.moe_layer_names if moe_layer and suffix in self.moe_layer_names else self.layer_names
        if suffix not in names:
            raise Unsupported(f"the {self.name} naming has no name for {suffix}: {self.instead}")
        return names[suffix][0]

    def extra_state_names(self, local_layer: int, *, moe_layer: bool = False, local_experts: int = 0,
                          shared_expert: bool = False, attention: tuple[str, ...] | None = None,
                          stack: str = "decoder", cross_attention: bool = False) -> list[str]:
        """The ``_extra_state`` keys of one layer of ``stack``: its linears', and in a MoE layer
        each of its ``local_experts`` experts' and the shared expert's. ``attention`` names the
        attention's linears when they are not this naming's fused QKV and projection (MLA's:
        :func:`attention_linears`); ``cross_attention`` adds a T5 decoder layer's."""
        if not moe_layer:
            linears = list(self.extra_state_linears)
        else:
            linears = [linear.format(expert=expert) for linear in self.moe_extra_state_linears
                       for expert in (range(local_experts) if "{expert}" in linear else [None])]
            linears += list(self.shared_expert_extra_state_linears) if shared_expert else []
        if attention is not None:
            linears = list(attention) + [linear for linear in linears if not linear.startswith("self_attention.")]
        if cross_attention:
            linears = with_cross_attention(linears)
        return [f"{self.stack_prefix(stack)}{local_layer}.{linear}._extra_state" for linear in linears]

    def parse(self, file_key: str, main_stack: str = "decoder"):
        """``(canonical_suffix, local_layer, local_expert, stack)`` for a file key, or None if not
        ours. ``main_stack`` is the model's one stack, for a one-stack naming.

        ``decoder.layers.3.self_attention.linear_qkv.weight`` ->
        ``("self_attention.linear_qkv.weight", 3, None, "decoder")``; globals give
        ``(name, None, None, None)``; the tied head copy gives ``("output_layer.weight", None,
        None, None)``; an expert's tensor gives the template and the expert's index in the file:
        ``decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight`` ->
        ``("mlp.experts.local_experts.{expert}.linear_fc1.weight", 1, 0, "decoder")``.
        """
        lookup = _reverse_lookup(self)
        if file_key.startswith("mtp.layers."):
            return self._parse_mtp(file_key, lookup)
        if file_key in lookup["global"]:
            name = lookup["global"][file_key]
            if self.one_stack and name.startswith("decoder.final_layernorm."):
                name = f"{main_stack}.{name.split('.', 1)[1]}"
            return name, None, None, None
        if file_key in self.tied_head:
            return "output_layer.weight", None, None, None
        for prefix in self.layer_prefixes:
            if file_key.startswith(prefix):
                match = _LAYER_KEY.match(file_key[len(prefix):])
                if not match:
                    continue
                layer, rest = int(match.group(1)), match.group(2)
                stack = self._stack_of(prefix, main_stack)
                if rest in lookup["layer"]:
                    return lookup["layer"][rest], layer, None, stack
                for pattern, template in lookup["experts"]:
                    expert = pattern.match(rest)
                    if expert:
                        return template, layer, int(expert.group(1)), stack
        return None


    def _parse_mtp(self, file_key: str, lookup: dict):
        """A multi-token prediction key as its canonical name (layer None; experts are global)."""
        depth, rest = mtp_part(file_key)
        prefix = MTP.format(depth=depth)
        if rest in MTP_OWN:
            return file_key, None, None, None
        for spelled_layer in (PER_RANK_MTP_LAYER, MTP_LAYER):
            if not rest.startswith(spelled_layer):
                continue
            inner = rest[len(spelled_layer):]
            if inner in lookup["layer"]:
                return f"{prefix}{MTP_LAYER}{lookup['layer'][inner]}", None, None, None
            for pattern, template in lookup["experts"]:
                expert = pattern.match(inner)
                if expert:
                    return f"{prefix}{MTP_LAYER}{template.format(expert=int(expert.group(1)))}", None, None, None
        return None


_LAYER_KEY = re.compile(r"^(\d+)\.(.+)$")
_REVERSE_CACHE: dict[str, dict] = {}


def _reverse_lookup(naming: Naming) -> dict:
    if naming.name not in _REVERSE_CACHE:
        layer_tables = (naming.layer_names, naming.moe_layer_names)
        _REVERSE_CACHE[naming.name] = {
            "global": {spelling: canonical for canonical, spellings in naming.global_names.items()
                       for spelling in spellings},
            "layer": {spelling: canonical for table in layer_tables for canonical, spellings in table.items()
                      for spelling in spellings if "{expert}" not in spelling},
            "experts": [(re.compile("^" + re.escape(spelling).replace(re.escape("{expert}"), r"(\d+)") + "$"),
                         canonical)
                        for table in layer_tables for canonical, spellings in table.items()
                        for spelling in spellings if "{expert}" in spelling],
        }
    return _REVERSE_CACHE[naming.name]


NAMINGS = {
    naming.name: naming
    for naming in (
        Naming("mcore-local", ("decoder.layers.", "encoder.layers."), _MCORE_LOCAL_LAYER, _MCORE_GLOBAL,
               ("output_layer.weight",),
               tuple(_MCORE_LINEARS), "output_layer._extra_state", {}, tuple(_MCORE_MOE_LINEARS),
               tuple(_MCORE_SHARED_EXPERT_LINEARS)),
        Naming("mcore-te", ("decoder.layers.", "encoder.layers."), _MCORE_TE_LAYER, _MCORE_GLOBAL,
               ("output_layer.weight",),
               tuple(_MCORE_LINEARS), "output_layer._extra_state", _MCORE_TE_MOE_LAYER, tuple(_MCORE_MOE_LINEARS),
               tuple(_MCORE_SHARED_EXPERT_LINEARS),
               instead="multi-latent attention is written for Megatron's local spec only: write mcore-local"),
        Naming("legacy", ("language_model.encoder.layers.", "language_model.transformer.layers."),
               _LEGACY_LAYER, _LEGACY_GLOBAL, ("word_embeddings_for_head.weight",), tuple(_LEGACY_LINEARS),
               instead="pre-Core models lack it: write mcore-local or mcore-te", one_stack=True),
    )
}


# Modules a Megatron model registers under two names, whose state dict entries therefore
# appear twice (torch's state_dict and Megatron's sharded_state_dict both walk every child):
# T5Model's output layer is also its lm_head's, and its position embeddings a member of their
# own (megatron/core/models/T5/t5_model.py: ``self.output_layer = self.lm_head.output_layer``,
# ``self.position_embeddings = self.embedding.position_embeddings``). Seen in Megatron-LM's T5
# per-rank files and torch_dist alike. model kind -> (name, second name)
_MODULE_COPIES = {"encoder_decoder": (("output_layer.", "lm_head.output_layer."),
                                      ("embedding.position_embeddings.", "position_embeddings."))}


def copied_key(model_kind: str, key: str) -> str | None:
    """The key whose copy ``key`` is (its module's first name), or None.

    >>> copied_key("encoder_decoder", "lm_head.output_layer.bias")
    'output_layer.bias'
    """
    for name, second in _MODULE_COPIES.get(model_kind, ()):
        if key.startswith(second):
            return name + key[len(second):]
    return None


def key_copies(model_kind: str, key: str) -> list[str]:
    """The second names under which Megatron saves ``key`` again (see :func:`copied_key`)."""
    return [second + key[len(name):] for name, second in _MODULE_COPIES.get(model_kind, ()) if key.startswith(name)]


# Keys only an encoder (BERT) has: Megatron-Core's encoder stack, and pre-Core BERT's heads (its
# layers are language_model.encoder.layers, as a pre-Core GPT's are)
_ENCODER_KEYS = ("encoder.layers.", "encoder.final_layernorm.", "embedding.tokentype_embeddings.",
                 "language_model.embedding.tokentype_embeddings.", "lm_head.", "binary_head.",
                 "language_model.pooler.")


def model_kind_of(keys) -> str:
    """Which Megatron model stored these keys (a key of :data:`ckptkit.spec.MODEL_KINDS`):
    T5Model has an encoder and a decoder stack, BertModel its encoder or BERT's heads, GPTModel
    neither. Megatron's args cannot tell: pretrain_gpt.py, pretrain_bert.py and pretrain_t5.py
    share one argument parser. Per-rank files: the first and the last stage's keys.

    >>> model_kind_of(["encoder.layers.0.input_layernorm.weight", "decoder.layers.0.input_layernorm.weight"])
    'encoder_decoder'
    >>> model_kind_of(["language_model.encoder.layers.0.input_norm.weight", "lm_head.bias"])
    'encoder'
    """
    keys = list(keys)
    stacks = {stack for stack in ("encoder", "decoder") if any(key.startswith(f"{stack}.layers.") for key in keys)}
    if stacks == {"encoder", "decoder"}:
        return "encoder_decoder"
    if any(key.startswith(_ENCODER_KEYS) for key in keys):
        return "encoder"
    return "decoder"


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
