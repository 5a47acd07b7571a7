"""Collectives that autograd can differentiate: Megatron's tensor-parallel "mappings".

Each forward collective has the adjoint collective as its backward
(``megatron/core/tensor_parallel/mappings.py``):

==============================  =======================  =========================
function                        forward                  backward
==============================  =======================  =========================
copy_to_tensor_parallel         identity                 all-reduce
reduce_from_tensor_parallel     all-reduce               identity
scatter_to_sequence_parallel    keep my sequence slice   all-gather the sequence
gather_from_sequence_parallel   all-gather the sequence  reduce-scatter
reduce_scatter_to_sequence      reduce-scatter           all-gather the sequence
gather_from_expert_parallel     all-gather the batch     reduce-scatter
reduce_scatter_to_expert_par.   reduce-scatter           all-gather the batch
==============================  =======================  =========================

Activations are ``[batch, seq, hidden]``; sequence parallelism cuts ``seq`` (dim 1).
The expert-parallel pair exchanges the micro-batches of the ranks of an expert-parallel
group along ``batch`` (dim 0): every rank sees every token of the group, and gets back
the sum of every rank's contribution for its own tokens (Megatron's all-gather token
dispatcher, ``token_dispatcher.py``).
With ``group=None`` (one rank) every function returns its input.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

SEQUENCE_DIM = 1
BATCH_DIM = 0


def _all_reduce(x, group):
    x = x.clone()
    dist.all_reduce(x, group=group)
    return x


def _split(x, group):
    return x.chunk(dist.get_world_size(group), dim=SEQUENCE_DIM)[dist.get_rank(group)].contiguous()


def _all_gather(x, group, dim=SEQUENCE_DIM):
    x = x.contiguous()
    pieces = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, x, group=group)
    return torch.cat(pieces, dim=dim)


def _reduce_scatter(x, group, dim=SEQUENCE_DIM):
    pieces = [piece.contiguous() for piece in x.chunk(dist.get_world_size(group), dim=dim)]
    out = torch.empty_like(pieces[0])
    dist.reduce_scatter(out, pieces, group=group)
    return out


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group), None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim=SEQUENCE_DIM):
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group, ctx.dim), None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim=SEQUENCE_DIM):
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, ctx.dim), None, None


def copy_to_tensor_parallel(x, group):
    return x if group is None else _Copy.apply(x, group)


def reduce_from_tensor_parallel(x, group):
    return x if group is None else _Reduce.apply(x, group)


def scatter_to_sequence_parallel(x, group):
    return x if group is None else _Scatter.apply(x, group)


def gather_from_sequence_parallel(x, group):
    return x if group is None else _Gather.apply(x, group)


def reduce_scatter_to_sequence_parallel(x, group):
    return x if group is None else _ReduceScatter.apply(x, group)


def gather_from_expert_parallel(x, group):
    return x if group is None else _Gather.apply(x, group, BATCH_DIM)


def reduce_scatter_to_expert_parallel(x, group):
    return x if group is None else _ReduceScatter.apply(x, group, BATCH_DIM)
