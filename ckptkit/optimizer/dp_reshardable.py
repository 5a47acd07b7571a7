"""Where Megatron's ``dp_reshardable`` torch_dist sharding puts each bucket of the distributed
optimizer (``DistributedOptimizer.sharded_param_state_dp_reshardable``).

Each buffer bucket is one global 1-D tensor per state key, named by the model-parallel
domain ``G`` that holds it, the buffer's model chunk ``i`` (``gbuf_idx``) and the bucket
``b``::

    optimizer.distributed.dp_group_idx_G.gbuf_idx_i.dtype_(PARAM, GRAD).bucket_idx_b.{param,exp_avg,exp_avg_sq}

of the bucket's ``numel_unpadded`` elements, each parameter at its place in the bucket
(:mod:`.buffers`), chunked per parameter and per DP shard. Bytes entries
``optimizer.distributed.dp_group_idx_G.{optimizer,per_bucket_numel,per_bucket_numel_unpadded}``
hold the param groups (with the step) and the bucket sizes.

A mixture of experts at EP > 1 chains two optimizers: every key then starts with
``chained_0.`` (the non-expert parameters, one domain per TP x PP rank) or ``chained_1.``
(the experts, one domain per TP x EP x PP rank). TP1 PP1 EP2, two experts per EP rank::

    chained_0.optimizer.distributed.dp_group_idx_0.gbuf_idx_0...   embeddings, attention, router, ...
    chained_1.optimizer.distributed.dp_group_idx_0.gbuf_idx_0...   experts 0-1 (EP rank 0)
    chained_1.optimizer.distributed.dp_group_idx_1.gbuf_idx_0...   experts 2-3 (EP rank 1)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .buffers import Bucket, BufferLayout, BufferSettings, Slot
from .distrib_optim import rank_layout

DP_PREFIX = "optimizer.distributed.dp_group_idx_{group}"
CHAINED_PREFIX = "chained_{part}."
PER_DOMAIN_OBJECTS = ("optimizer", "per_bucket_numel", "per_bucket_numel_unpadded")


def model_parallel_domain(tp: int, tp_rank: int, pp_stage: int) -> int:
    """``G`` of rank (``tp_rank``, ``pp_stage``): its rank in Megatron's model-parallel group
    (``get_pg_rank(mp_group)`` in megatron/core/optimizer/__init__.py). The group's ranks are
    ordered TP fastest, then PP (``RankGenerator`` with the default order tp-cp-ep-dp-pp);
    checked on a real TP2 PP2 checkpoint.

    TP=2 PP=2: ``(tp_rank, pp_stage)`` (0, 0) -> 0, (1, 0) -> 1, (0, 1) -> 2, (1, 1) -> 3.
    """
    return tp_rank + tp * pp_stage


def expert_domain(tp: int, tp_rank: int, ep: int, ep_rank: int, pp_stage: int) -> int:
    """``G`` of the experts' optimizer on rank (``tp_rank``, ``ep_rank``, ``pp_stage``): its
    rank in the expert tensor x expert x pipeline group (``expt_tp_pp_with_egtp_remat_group``),
    expert TP fastest, then EP, then PP (the expert order tp-ep-dp-pp); the EP order is
    checked on a real EP2 checkpoint, the others follow Megatron's rank generator.

    TP=1 EP=2 PP=1: EP rank 0 -> 0, EP rank 1 -> 1.
    """
    return tp_rank + tp * (ep_rank + ep * pp_stage)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype)


@dataclass(frozen=True)
class Domain:
    """One ``dp_group_idx`` of one chained optimizer (``part`` 0: the non-expert parameters,
    1: the experts) and the buffers of its ranks, one per model chunk."""

    part: int
    group: int
    tp_rank: int
    pp_stage: int
    ep_rank: int
    buffers: tuple[BufferLayout, ...]
    chained: bool = False

    @property
    def prefix(self) -> str:
        chained = CHAINED_PREFIX.format(part=self.part) if self.chained else ""
        return chained + DP_PREFIX.format(group=self.group)

    def object_key(self, name: str) -> str:
        """A bytes entry of the domain (``optimizer``, ``per_bucket_numel``, ...), as stored."""
        return f"{self.prefix}.{name}/shard_0_1"

    def bucket_key(self, chunk: int, buffer_key, bucket: int) -> str:
        """A bucket's stored key, without ``.{state key}``."""
        param_dtype, grad_dtype = buffer_key
        return (f"{self.prefix}.gbuf_idx_{chunk}.dtype_({_dtype_name(param_dtype)}, {_dtype_name(grad_dtype)})"
                f".bucket_idx_{bucket}")

    def slot(self, chunk: int, parameter_name: str) -> tuple[Bucket, Slot]:
        buffer = self.buffers[chunk]
        slot = next(slot for slot in buffer.slots if slot.parameter.name == parameter_name)
        return buffer.buckets[slot.bucket], slot


def domains(spec, *, tp: int, pp: int, vpp: int, ep: int, padded_vocab_size: int, settings: BufferSettings,
            naming: str) -> list[Domain]:
    """Every domain of a layout, the non-expert ones first, each in ``G`` order."""
    chained = bool(spec.num_experts) and ep > 1  # at EP 1 the experts are in the one optimizer
    found = []
    for pp_stage in range(pp):
        for tp_rank in range(tp):
            for ep_rank in range(ep):
                layout = rank_layout(spec, tp=tp, tp_rank=tp_rank, pp=pp, pp_stage=pp_stage, vpp=vpp,
                                     padded_vocab_size=padded_vocab_size, settings=settings, naming=naming, ep=ep,
                                     ep_rank=ep_rank)
                if ep_rank == 0:  # the non-expert parameters are the same on every EP rank
                    found.append(Domain(0, model_parallel_domain(tp, tp_rank, pp_stage), tp_rank, pp_stage, 0,
                                        layout.parts[0], chained))
                if chained:
                    found.append(Domain(1, expert_domain(tp, tp_rank, ep, ep_rank, pp_stage), tp_rank, pp_stage,
                                        ep_rank, layout.parts[1], chained))
    return sorted(found, key=lambda domain: (domain.part, domain.group))


def bucket_chunks(buffer: BufferLayout, bucket: Bucket, dp: int) -> list[tuple[int, int, Slot | None]]:
    """The chunks Megatron stores of one bucket tensor, as (start, end, slot or None for a
    gap) in the bucket: cut at every parameter's ends and every DP shard's start, up to the
    bucket's unpadded end.

    Parameters ``b`` [0, 3) and ``w`` [64, 70), DP 2 (shards of 64): (0, 3, b), (3, 64, gap),
    (64, 70, w).
    """
    slots = [slot for slot in buffer.slots if slot.bucket == bucket.index]
    local = bucket.numel // dp
    cuts = {0, bucket.numel_unpadded}
    cuts |= {rank * local for rank in range(dp) if rank * local < bucket.numel_unpadded}
    for slot in slots:
        cuts |= {slot.start - bucket.start, slot.end - bucket.start}
    cuts = sorted(cut for cut in cuts if cut <= bucket.numel_unpadded)
    chunks = []
    for low, high in zip(cuts, cuts[1:]):
        owner = next((slot for slot in slots if slot.start - bucket.start <= low < slot.end - bucket.start), None)
        chunks.append((low, high, owner))
    return chunks
