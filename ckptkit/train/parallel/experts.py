"""Expert parallelism: give each rank a block of the experts and exchange tokens between them.

With ``E`` experts over ``EP`` expert-parallel ranks, EP rank ``r`` holds global experts
``r x E/EP .. (r+1) x E/EP - 1`` as ``local_experts.0 .. E/EP - 1`` (Megatron's names in
that rank's file). Each expert is also cut over the TP ranks as a dense MLP is
(expert tensor parallelism = TP, Megatron's default): ``linear_fc1`` holds
``[gate slice; up slice]``, ``linear_fc2`` a slice of its input columns.

A MoE layer then runs, on every rank (Megatron's all-gather token dispatcher):

1. the router on this rank's tokens (its sequence slice under sequence parallelism);
2. tokens, probabilities and chosen experts enter the tensor-parallel region as a
   column-parallel input does: copied (gradients all-reduced), or all-gathered along
   the sequence under sequence parallelism;
3. they are all-gathered over the expert-parallel group along the batch, so this rank
   sees every token of the group;
4. the local experts add ``prob x expert_shard(token)`` for the tokens routed to them;
5. the sums are reduce-scattered back over the expert-parallel group (each rank gets
   its own tokens, summed over every rank's experts), then leave the tensor-parallel
   region as a row-parallel output does (all-reduced, or reduce-scattered along the
   sequence), in float32.

Each expert's gradient so covers every token of its expert-parallel group; summing it
over the expert-data-parallel group (:class:`ckptkit.train.optim.DistributedAdam`)
covers the global batch. The router and the shared expert are replicated / cut over TP
like the rest of the layer.
"""
from __future__ import annotations

import torch

from ..model import GPT, Experts, MoELayer
from .comm import (copy_to_tensor_parallel, gather_from_expert_parallel, gather_from_sequence_parallel,
                   reduce_from_tensor_parallel, reduce_scatter_to_expert_parallel,
                   reduce_scatter_to_sequence_parallel)
from .groups import group_rank, group_size


class ParallelExperts(Experts):
    """This rank's block of experts, each cut over TP, with the token exchange around them."""

    def __init__(self, spec, fused, tp_group, ep_group, sequence_parallel: bool = False, device=None):
        tp, ep = group_size(tp_group), group_size(ep_group)
        if spec.num_experts % ep:
            raise ValueError(f"EP={ep} does not divide {spec.num_experts} experts")
        if spec.moe_ffn_hidden_size % tp:
            raise ValueError(f"TP={tp} does not divide the expert ffn size {spec.moe_ffn_hidden_size}")
        local = spec.num_experts // ep
        with torch.device(device or "cpu"):
            super().__init__(spec, fused, num_local_experts=local, first_expert=group_rank(ep_group) * local,
                             ffn_hidden_size=spec.moe_ffn_hidden_size // tp)
        self.tp_group, self.ep_group, self.sequence_parallel = tp_group, ep_group, sequence_parallel

    def _enter_tensor_parallel(self, x):
        if self.sequence_parallel:
            return gather_from_sequence_parallel(x, self.tp_group)
        return copy_to_tensor_parallel(x, self.tp_group)

    def forward(self, x, probs, experts):
        gathered = [gather_from_expert_parallel(self._enter_tensor_parallel(tensor), self.ep_group)
                    for tensor in (x, probs, experts)]
        out = reduce_scatter_to_expert_parallel(self.compute(*gathered), self.ep_group)
        if self.sequence_parallel:
            out = reduce_scatter_to_sequence_parallel(out, self.tp_group)
        else:
            out = reduce_from_tensor_parallel(out, self.tp_group)
        return out.to(x.dtype)


def apply_expert_parallel(model: GPT, tp_group, ep_group, sequence_parallel: bool = False) -> GPT:
    """Replace every MoE layer's experts with this rank's block, cut over ``tp_group``
    (in place, any device incl. ``meta``). A no-op at TP1 EP1."""
    if group_size(tp_group) == 1 and group_size(ep_group) == 1:
        return model
    for layer in model.decoder.layers:
        if isinstance(layer.mlp, MoELayer):
            first = layer.mlp.experts.local_experts[0]
            layer.mlp.experts = ParallelExperts(model.spec, first.fused, tp_group, ep_group, sequence_parallel,
                                                device=first.linear_fc1.weight.device)
    return model
