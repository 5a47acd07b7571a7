"""Parallelisms applied to a plain :class:`~ckptkit.train.model.GPT` from outside.

>>> with torch.device("meta"):
...     model = GPT(spec, padded_vocab_size=1024)
>>> parallelize(model, groups, sequence_parallel=True, recompute=False)

cuts the model to this rank's pipeline stage (:mod:`.pipeline`), swaps its linears
for tensor-parallel ones (:mod:`.tensor`), gives each rank its block of every MoE
layer's experts (:mod:`.experts`) and optionally wraps each layer in activation
recomputation. Data parallelism lives in the optimizer
(:class:`ckptkit.train.optim.DistributedAdam`).
"""
from __future__ import annotations

import functools

from torch.utils.checkpoint import checkpoint

from ..model import GPT
from .experts import apply_expert_parallel
from .groups import Layout, ParallelGroups, build_groups
from .pipeline import keep_stage, stage_layers
from .tensor import apply_tensor_parallel

__all__ = ["Layout", "ParallelGroups", "build_groups", "parallelize", "apply_activation_recompute",
           "keep_stage", "stage_layers", "apply_tensor_parallel", "apply_expert_parallel"]


def apply_activation_recompute(model: GPT) -> GPT:
    """Recompute each layer's activations in the backward pass instead of storing them
    (Megatron's ``--recompute-granularity full --recompute-method uniform``, one layer per chunk).
    Parameter names do not change: the layer's ``forward`` is wrapped, not the layer."""
    for layer in model.decoder.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    return model


def parallelize(model: GPT, groups: ParallelGroups, *, sequence_parallel: bool = False,
                recompute: bool = False) -> GPT:
    """Apply pipeline, tensor (and sequence), expert parallelism and recompute to ``model``, in place."""
    keep_stage(model, groups.pp_stage, groups.layout.pp)
    apply_tensor_parallel(model, groups.tp_group, sequence_parallel)
    apply_expert_parallel(model, groups.tp_group, groups.ep_group, sequence_parallel)
    if recompute:
        apply_activation_recompute(model)
    return model
