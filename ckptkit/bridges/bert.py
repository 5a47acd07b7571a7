"""BERT (``MegatronBertForPreTraining``): Megatron's BertModel, pre-LayerNorm like Megatron's.

Both are the same network: word, position and token-type embeddings summed (no embedding
norm), pre-LN layers (``attention.ln`` then self-attention, ``ln`` then the MLP), a final
``bert.encoder.ln``; the MLM head is dense, GeLU, LayerNorm, then the tied embeddings and a
bias; the pooler is dense + tanh of the first token and ``cls.seq_relationship`` is
Megatron's 2-way ``binary_head``. Megatron fuses q, k and v per head (rows
``[q0 k0 v0 q1 k1 v1 ...]``); Hugging Face keeps three linears.

transformers saves the tied ``cls.predictions.decoder`` weight and bias as
``bert.embeddings.word_embeddings.weight`` and ``cls.predictions.bias`` only
(``_tied_weights_keys``), which is what ckptkit writes. Untied, transformers keeps an unused
``cls.predictions.bias`` beside the decoder's own bias (see :func:`_output_bias`).
"""
from __future__ import annotations

import torch

from ..errors import Unsupported
from ..spec import ModelSpec
from .base import Bridge, HfMapping, first_problem, qkv_fuse, qkv_parts, same, same_back, vocab_rows

ARCHITECTURE = "MegatronBertForPreTraining"
# Megatron builds two token types exactly when it builds the binary head (pretrain_bert.py,
# model_provider: num_tokentypes = 2 if args.bert_binary_head else 0).
TOKEN_TYPES = 2


def config_to_spec(config: dict) -> ModelSpec:
    activation = config.get("hidden_act", "gelu")
    if activation != "gelu":
        # MegatronBertForPreTraining applies hidden_act in the layers and the MLM head alike;
        # Megatron's head always uses erf GeLU (bert_lm_head.py: torch.nn.functional.gelu).
        raise Unsupported(f"config.json: BERT hidden_act {activation!r}: Megatron's MLM head computes erf GeLU "
                          "whatever its layers do, so only 'gelu' converts exactly")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise Unsupported(f"config.json: BERT position_embedding_type {config['position_embedding_type']!r}; "
                          "Megatron's BERT learns absolute positions")
    token_types = config.get("type_vocab_size", TOKEN_TYPES)
    if token_types != TOKEN_TYPES:
        raise Unsupported(f"config.json: type_vocab_size {token_types}: Megatron's BertModel with its binary head "
                          f"has exactly {TOKEN_TYPES} token types")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    return ModelSpec(
        family="bert", model_kind="encoder", num_layers=config["num_hidden_layers"], hidden_size=hidden,
        num_attention_heads=heads, num_query_groups=heads, ffn_hidden_size=config["intermediate_size"],
        vocab_size=config["vocab_size"], max_position_embeddings=config["max_position_embeddings"],
        head_dim=hidden // heads, position_embedding="learned_absolute", normalization="LayerNorm",
        norm_epsilon=config.get("layer_norm_eps", 1e-12), activation="gelu", add_bias_linear=True,
        add_qkv_bias=True, tied_embeddings=config.get("tie_word_embeddings", True), num_tokentypes=token_types,
        lm_head_transform=True, binary_head=True, output_layer_bias=True,
    )


def mismatch(spec: ModelSpec) -> str | None:
    return first_problem(
        (spec.binary_head and spec.num_tokentypes == TOKEN_TYPES,
         "no binary head (MegatronBertForPreTraining has the pooler and cls.seq_relationship)"),
        (spec.lm_head_transform and spec.output_layer_bias, "no MLM head transform or output bias"),
        (spec.activation == "gelu", f"activation {spec.activation}; the MLM head's erf GeLU needs hidden_act 'gelu'"),
        (spec.normalization == "LayerNorm", f"{spec.normalization}; expected LayerNorm"),
        (spec.position_embedding == "learned_absolute", f"{spec.position_embedding} positions; expected learned"),
        (spec.num_query_groups == spec.num_attention_heads, "grouped-query attention"),
        (spec.head_dim * spec.num_attention_heads == spec.hidden_size, "head_dim x heads differs from hidden size"),
        (spec.add_bias_linear and spec.add_qkv_bias, "no linear biases"),
        (not spec.num_experts and not spec.qk_layernorm, "experts or q/k norms"),
    )


def spec_to_config(spec: ModelSpec, dtype: torch.dtype) -> dict:
    BERT.check(spec)
    return {
        "architectures": [ARCHITECTURE], "model_type": "megatron-bert",
        "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size, "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_attention_heads, "intermediate_size": spec.ffn_hidden_size,
        "hidden_act": "gelu", "max_position_embeddings": spec.max_position_embeddings,
        "type_vocab_size": spec.num_tokentypes, "layer_norm_eps": spec.norm_epsilon,
        "tie_word_embeddings": spec.tied_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _both(tensor, spec):
    bias = vocab_rows(tensor, spec)[0]
    return [bias, bias.clone()]


def _output_bias(spec: ModelSpec) -> HfMapping:
    """Megatron's output bias. Tied, transformers ties ``cls.predictions.decoder.bias`` to
    ``cls.predictions.bias`` too and saves the latter. Untied, the two are separate parameters and
    the forward adds only the decoder's: it is the one read, and both are written equal."""
    if spec.tied_embeddings:
        return HfMapping("output_layer.bias", ("cls.predictions.bias",), vocab_rows, same_back)
    return HfMapping("output_layer.bias", ("cls.predictions.decoder.bias", "cls.predictions.bias"), _both,
                     same_back)


def mappings(spec: ModelSpec) -> list[HfMapping]:
    layer = "encoder.layers.{layer}."
    hf = "bert.encoder.layer.{layer}."
    qkv = tuple(hf + f"attention.self.{part}" for part in ("query", "key", "value"))
    plain = [  # canonical, HF: the same tensor
        (layer + "input_layernorm", hf + "attention.ln"),
        (layer + "self_attention.linear_proj", hf + "attention.output.dense"),
        (layer + "pre_mlp_layernorm", hf + "ln"),
        (layer + "mlp.linear_fc1", hf + "intermediate.dense"),
        (layer + "mlp.linear_fc2", hf + "output.dense"),
        ("encoder.final_layernorm", "bert.encoder.ln"),
        ("lm_head.dense", "cls.predictions.transform.dense"),
        ("lm_head.layer_norm", "cls.predictions.transform.LayerNorm"),
        ("pooler.dense", "bert.pooler.dense"),
        ("binary_head", "cls.seq_relationship"),
    ]
    return [
        HfMapping("embedding.word_embeddings.weight", ("bert.embeddings.word_embeddings.weight",), vocab_rows,
                  same_back),
        HfMapping("embedding.position_embeddings.weight", ("bert.embeddings.position_embeddings.weight",), same,
                  same_back),
        HfMapping("embedding.tokentype_embeddings.weight", ("bert.embeddings.token_type_embeddings.weight",), same,
                  same_back),
        HfMapping(layer + "self_attention.linear_qkv.weight", tuple(name + ".weight" for name in qkv), qkv_parts,
                  qkv_fuse),
        HfMapping(layer + "self_attention.linear_qkv.bias", tuple(name + ".bias" for name in qkv), qkv_parts,
                  qkv_fuse),
        *[HfMapping(f"{canonical}.{kind}", (f"{hf_name}.{kind}",), same, same_back)
          for canonical, hf_name in plain for kind in ("weight", "bias")],
        _output_bias(spec),
        HfMapping("output_layer.weight", ("cls.predictions.decoder.weight",), vocab_rows, same_back),
    ]


BERT = Bridge("bert", ARCHITECTURE, "megatron-bert", config_to_spec, spec_to_config, mappings, mismatch,
              lambda spec: True,
              # the tied head's names, and the position-id buffer transformers 4 saved
              ignorable=("cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "embeddings.position_ids"),
              model_kind="encoder")
