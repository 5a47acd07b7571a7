"""A GPT in one file: what Megatron-LM's ``GPTModel`` computes with its local layers.

Module and parameter names are Megatron-Core's, so ``model.named_parameters()`` lists
exactly the keys Megatron writes under ``model`` in a per-rank checkpoint
(``embedding.word_embeddings.weight``, ``decoder.layers.0.self_attention.linear_qkv.weight``,
..., ``output_layer.weight``). The model is plain: one process, full tensors.
Parallelism is applied from outside by :mod:`ckptkit.train.parallel`, which swaps
linear layers for tensor-parallel ones and cuts the layer list into pipeline stages;
nothing here changes for it, because every shape is read from the weights
(a tensor-parallel rank's ``linear_qkv`` simply has fewer query groups).

Two styles come from one :class:`~ckptkit.spec.ModelSpec`:

* GPT-2: learned absolute positions, LayerNorm, GeLU (exact erf for ``"gelu"``, tanh
  form for ``"gelu_tanh"``), biases, tied embeddings;
* Llama: rotary positions (rotate-half), RMSNorm, SwiGLU, no biases, grouped-query
  attention, optionally an untied output layer.

and, on top of either, what Llama 3.1, Mistral and Qwen3 add: RoPE's "llama3"
frequency rescaling (``spec.rope_scaling``), a sliding attention window
(``spec.sliding_window``), per-head norms of queries and keys before RoPE
(``spec.qk_layernorm``, Megatron's ``q_layernorm``/``k_layernorm``) and a head size
other than ``hidden / heads`` (``spec.head_dim``, Megatron's ``--kv-channels``).

Blocks are pre-norm: ``x + attention(norm(x))`` then ``x + mlp(norm(x))``. Logits
cover the padded vocabulary (Megatron pads the embedding rows to a multiple of
``make_vocab_size_divisible_by x TP``). No dropout: Megatron's defaults would add it
in training, which would make runs of different layouts differ.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..spec import ModelSpec


class Norm(nn.Module):
    """LayerNorm (weight and bias) or RMSNorm (weight only) over the last ``size`` values, in float32.

    ``size`` is the hidden size, or the head size for the query and key norms.
    """

    def __init__(self, spec: ModelSpec, fused: bool = False, size: int | None = None):
        super().__init__()
        size = size or spec.hidden_size
        self.rms = spec.normalization == "RMSNorm"
        self.eps = spec.norm_epsilon
        self.fused = fused
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = None if self.rms else nn.Parameter(torch.zeros(size))

    def forward(self, x):
        if self.rms:
            return kernels.rms_norm(x, self.weight, self.eps, fused=self.fused)
        return kernels.layer_norm(x, self.weight, self.bias, self.eps, fused=self.fused)


class Linear(nn.Linear):
    """``nn.Linear`` that can leave its bias out, for a fused bias + activation after it."""

    def forward(self, x, add_bias: bool = True):
        return F.linear(x, self.weight, self.bias if add_bias else None)


class Embedding(nn.Module):
    """Token embeddings plus, for GPT-2 style models, learned position embeddings."""

    def __init__(self, spec: ModelSpec, padded_vocab_size: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(padded_vocab_size, spec.hidden_size)
        self.position_embeddings = None
        if spec.position_embedding == "learned_absolute":
            self.position_embeddings = nn.Embedding(spec.max_position_embeddings, spec.hidden_size)

    def forward(self, tokens):
        x = self.word_embeddings(tokens)
        if self.position_embeddings is not None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            x = x + self.position_embeddings(positions)
        return x


def attention_mask(seq_length: int, sliding_window: int | None, device=None) -> torch.Tensor | None:
    """Boolean ``[seq, seq]`` mask (True: attend) for a sliding window, or None for plain causal.

    Query ``i`` sees keys ``i - W < j <= i``: ``W`` tokens, itself included, as Hugging
    Face's ``sliding_window`` (``masking_utils.sliding_window_overlay``). A window at
    least as long as the sequence is the causal mask, left to SDPA's ``is_causal``.
    """
    if sliding_window is None or sliding_window >= seq_length:
        return None
    positions = torch.arange(seq_length, device=device)
    distance = positions[:, None] - positions[None, :]  # query - key
    return (distance >= 0) & (distance < sliding_window)


class SelfAttention(nn.Module):
    """Causal attention over a fused QKV projection, grouped per query group.

    ``linear_qkv`` rows are ``[q heads of group 0, k_0, v_0, q heads of group 1, ...]``
    (each ``head_dim`` rows), so a rank holding whole groups is just a shorter weight.
    Query head ``g x heads_per_group + j`` attends with key/value head ``g``.
    With ``qk_layernorm``, ``q_layernorm`` and ``k_layernorm`` (weights ``[head_dim]``,
    the same on every tensor-parallel rank) normalise each query and key head before
    RoPE, as Megatron's ``SelfAttention.get_query_key_value_tensors`` does.
    """

    def __init__(self, spec: ModelSpec, fused: bool = False):
        super().__init__()
        self.heads_per_group = spec.heads_per_group
        self.head_dim = spec.head_dim
        self.rope_theta = spec.rope_theta if spec.position_embedding == "rope" else None
        # Checked here so that an unknown rope_type fails when the model is built, not at its first step.
        self.rope_scaling = spec.rope_scaling if kernels.rope_scaling_parameters(spec.rope_scaling) else None
        self.sliding_window = spec.sliding_window
        self.fused = fused
        query_width = spec.num_attention_heads * spec.head_dim
        qkv_rows = (spec.num_attention_heads + 2 * spec.num_query_groups) * spec.head_dim
        # Registered in Megatron's order (linear_proj, linear_qkv, q_layernorm, k_layernorm),
        # so state dicts list keys as its files do.
        self.linear_proj = Linear(query_width, spec.hidden_size, bias=spec.add_bias_linear)
        self.linear_qkv = Linear(spec.hidden_size, qkv_rows, bias=spec.add_qkv_bias)
        self.q_layernorm = Norm(spec, fused, size=spec.head_dim) if spec.qk_layernorm else None
        self.k_layernorm = Norm(spec, fused, size=spec.head_dim) if spec.qk_layernorm else None

    def forward(self, x):
        qkv = self.linear_qkv(x)
        batch, seq = qkv.shape[:2]  # the full sequence even when x is a sequence-parallel slice
        per_group = self.heads_per_group + 2
        groups = qkv.shape[-1] // (per_group * self.head_dim)
        qkv = qkv.view(batch, seq, groups, per_group, self.head_dim)
        query = qkv[:, :, :, : self.heads_per_group].reshape(batch, seq, groups * self.heads_per_group,
                                                              self.head_dim)
        key, value = qkv[:, :, :, -2], qkv[:, :, :, -1]
        if self.q_layernorm is not None:
            query, key = self.q_layernorm(query), self.k_layernorm(key)
        if self.rope_theta is not None:
            cos, sin = kernels.rope_tables(seq, self.head_dim, self.rope_theta, device=x.device,
                                           scaling=self.rope_scaling)
            query = kernels.apply_rope(query, cos, sin, fused=self.fused)
            key = kernels.apply_rope(key, cos, sin, fused=self.fused)
        mask = attention_mask(seq, self.sliding_window, device=x.device)
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                             attn_mask=mask, is_causal=mask is None,
                                             scale=1.0 / math.sqrt(self.head_dim),
                                             enable_gqa=self.heads_per_group > 1)
        return self.linear_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    """``fc2(act(fc1(x)))``; SwiGLU's ``fc1`` rows are ``[gate; up]`` and it computes ``silu(gate) * up``."""

    def __init__(self, spec: ModelSpec, fused: bool = False):
        super().__init__()
        self.gated = spec.gated
        self.approximate = "tanh" if spec.activation == "gelu_tanh" else "none"
        self.fused = fused
        fc1_rows = 2 * spec.ffn_hidden_size if self.gated else spec.ffn_hidden_size
        self.linear_fc1 = Linear(spec.hidden_size, fc1_rows, bias=spec.add_bias_linear)
        self.linear_fc2 = Linear(spec.ffn_hidden_size, spec.hidden_size, bias=spec.add_bias_linear)

    def forward(self, x):
        if self.gated:
            gate, up = self.linear_fc1(x).chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        else:
            hidden = self.linear_fc1(x, add_bias=False)
            hidden = kernels.bias_gelu(hidden, self.linear_fc1.bias, self.approximate, fused=self.fused)
        return self.linear_fc2(hidden)


class TransformerLayer(nn.Module):
    def __init__(self, spec: ModelSpec, fused: bool = False):
        super().__init__()
        self.input_layernorm = Norm(spec, fused)
        self.self_attention = SelfAttention(spec, fused)
        self.pre_mlp_layernorm = Norm(spec, fused)
        self.mlp = MLP(spec, fused)

    def forward(self, x):
        x = x + self.self_attention(self.input_layernorm(x))
        return x + self.mlp(self.pre_mlp_layernorm(x))


class TransformerBlock(nn.Module):
    def __init__(self, spec: ModelSpec, fused: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(spec, fused) for _ in range(spec.num_layers))
        self.final_layernorm = Norm(spec, fused)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x if self.final_layernorm is None else self.final_layernorm(x)


class GPT(nn.Module):
    """Tokens ``[batch, seq]`` -> logits ``[batch, seq, padded_vocab]``.

    A pipeline stage is the same module with parts removed (see
    :func:`ckptkit.train.parallel.pipeline.keep_stage`): without ``embedding`` it takes
    hidden states ``[batch, seq, hidden]``, without ``output_layer`` it returns them.
    With tied embeddings ``output_layer.weight`` *is* the embedding parameter (named
    once, under ``embedding``), as in nanoGPT.
    """

    def __init__(self, spec: ModelSpec, padded_vocab_size: int | None = None, fused_kernels: bool = False):
        super().__init__()
        self.spec = spec
        self.padded_vocab_size = padded_vocab_size or spec.vocab_size
        self.embedding = Embedding(spec, self.padded_vocab_size)
        self.decoder = TransformerBlock(spec, fused_kernels)
        self.output_layer = Linear(spec.hidden_size, self.padded_vocab_size, bias=False)
        if spec.tied_embeddings:
            tie_embeddings(self)

    def forward(self, inputs):
        x = self.embedding(inputs) if self.embedding is not None else inputs
        x = self.decoder(x)
        return self.output_layer(x) if self.output_layer is not None else x


def tie_embeddings(model: GPT) -> None:
    """Make the output layer use the embedding matrix (only when both live in this stage)."""
    if model.embedding is not None and model.output_layer is not None:
        model.output_layer.weight = model.embedding.word_embeddings.weight
