"""Tensor parallelism: swap a plain model's linears for sharded ones (Megatron's scheme).

* :class:`ColumnParallelLinear` holds a slice of the output rows (``linear_qkv``: whole
  query groups, ``linear_fc1``: ``[gate slice; up slice]`` when gated, ``output_layer``:
  a slice of the padded vocabulary). Its input is replicated, or with sequence
  parallelism all-gathered along the sequence first.
* :class:`RowParallelLinear` holds a slice of the input columns (``linear_proj``,
  ``linear_fc2``); partial outputs are all-reduced (or reduce-scattered along the
  sequence), then the replicated bias is added.
* :class:`VocabParallelEmbedding` holds a slice of the embedding rows; tokens outside
  it embed to zero and the slices are summed across ranks.

Norms stay plain modules with the whole (replicated) weight on every rank: the
layer norms, and with ``qk_layernorm`` the per-head ``q_layernorm``/``k_layernorm``,
which each rank applies to its own heads (their gradients are summed over the group
by :class:`ckptkit.train.optim.DistributedAdam`). So do a MoE layer's router and
shared-expert gate; its shared expert is cut as a dense MLP, its experts by
:mod:`.experts`.

Which rows each rank holds is decided by the partition rules when the weights are
loaded (:mod:`ckptkit.train.weights`); these modules only know their local shapes.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import GPT, MoELayer, tie_embeddings
from .comm import (copy_to_tensor_parallel, gather_from_sequence_parallel, reduce_from_tensor_parallel,
                   reduce_scatter_to_sequence_parallel, scatter_to_sequence_parallel)
from .groups import group_rank, group_size


def _local(size: int, tp: int, what: str) -> int:
    if size % tp:
        raise ValueError(f"{what} of size {size} is not divisible by TP={tp}")
    return size // tp


class ColumnParallelLinear(nn.Module):
    """``y_r = x @ W_r^T + b_r`` with ``W_r`` this rank's rows; ``y`` stays sharded."""

    def __init__(self, in_features, out_features, bias, group, sequence_parallel=False, device=None):
        super().__init__()
        tp = group_size(group)
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = nn.Parameter(torch.empty(_local(out_features, tp, "output rows"), in_features, device=device))
        self.bias = nn.Parameter(torch.empty(self.weight.shape[0], device=device)) if bias else None

    def forward(self, x, add_bias: bool = True):
        if self.sequence_parallel:
            x = gather_from_sequence_parallel(x, self.group)
        else:
            x = copy_to_tensor_parallel(x, self.group)
        return F.linear(x, self.weight, self.bias if add_bias else None)


class RowParallelLinear(nn.Module):
    """``y = sum_r x_r @ W_r^T + b`` with ``x_r`` and ``W_r`` this rank's input columns."""

    def __init__(self, in_features, out_features, bias, group, sequence_parallel=False, device=None):
        super().__init__()
        tp = group_size(group)
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = nn.Parameter(torch.empty(out_features, _local(in_features, tp, "input columns"), device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None

    def forward(self, x, add_bias: bool = True):
        partial = F.linear(x, self.weight)
        if self.sequence_parallel:
            out = reduce_scatter_to_sequence_parallel(partial, self.group)
        else:
            out = reduce_from_tensor_parallel(partial, self.group)
        return out + self.bias if (add_bias and self.bias is not None) else out


class VocabParallelEmbedding(nn.Module):
    """Rows ``vocab_start .. vocab_start + rows`` of the (padded) embedding matrix."""

    def __init__(self, num_embeddings, embedding_dim, group, device=None):
        super().__init__()
        rows = _local(num_embeddings, group_size(group), "padded vocabulary")
        self.group = group
        self.vocab_start = group_rank(group) * rows
        self.weight = nn.Parameter(torch.empty(rows, embedding_dim, device=device))

    def forward(self, tokens):
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_parallel(out, self.group)


def _column(linear, group, sequence_parallel):
    return ColumnParallelLinear(linear.in_features, linear.out_features, linear.bias is not None, group,
                                sequence_parallel, device=linear.weight.device)


def _row(linear, group, sequence_parallel):
    return RowParallelLinear(linear.in_features, linear.out_features, linear.bias is not None, group,
                             sequence_parallel, device=linear.weight.device)


def apply_tensor_parallel(model: GPT, tp_group, sequence_parallel: bool = False) -> GPT:
    """Shard ``model`` (one pipeline stage of it, on any device incl. ``meta``) over ``tp_group``.

    With ``sequence_parallel`` the activations between the layers are cut along the
    sequence: the embedding output is scattered, column-parallel layers all-gather
    their input and row-parallel layers reduce-scatter their output. The replicated
    parameters inside the layers (norms, row-parallel biases) then see only a slice of
    the sequence: their gradients must be summed over the group
    (:func:`ckptkit.train.optim.GradientBuffer` does that).
    """
    if group_size(tp_group) == 1:
        return model
    for layer in model.decoder.layers:
        attention = layer.self_attention
        attention.linear_qkv = _column(attention.linear_qkv, tp_group, sequence_parallel)
        attention.linear_proj = _row(attention.linear_proj, tp_group, sequence_parallel)
        # A MoE layer's experts are cut by apply_expert_parallel; its shared expert is a dense MLP.
        mlp = layer.mlp.shared_experts if isinstance(layer.mlp, MoELayer) else layer.mlp
        if mlp is not None:
            mlp.linear_fc1 = _column(mlp.linear_fc1, tp_group, sequence_parallel)
            mlp.linear_fc2 = _row(mlp.linear_fc2, tp_group, sequence_parallel)
    if model.embedding is not None:
        plain = model.embedding.word_embeddings
        model.embedding.word_embeddings = VocabParallelEmbedding(plain.num_embeddings, plain.embedding_dim,
                                                                 tp_group, device=plain.weight.device)
        if sequence_parallel:
            model.embedding.register_forward_hook(
                lambda module, args, output: scatter_to_sequence_parallel(output, tp_group))
    if model.output_layer is not None:
        model.output_layer = _column(model.output_layer, tp_group, sequence_parallel)
    if model.spec.tied_embeddings:
        tie_embeddings(model)
    return model
