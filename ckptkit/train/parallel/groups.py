"""Which rank does what: the TP x DP x PP grid and its process groups.

Ranks are numbered as Megatron numbers them (order ``tp-dp-pp``: tensor-parallel
rank fastest, pipeline stage slowest)::

    rank = tp_rank + TP x (dp_rank + DP x pp_stage)

TP=2, DP=1, PP=2 -> ranks 0,1 are stage 0 (TP ranks 0,1), ranks 2,3 stage 1.

Expert parallelism (EP) groups data-parallel ranks, as Megatron does when the expert
tensor-parallel size is the TP size (its default): EP divides DP, and with the expert
grid ``tp-ep-dp-pp`` DP rank ``d`` is expert-parallel rank ``d % EP`` and
expert-data-parallel rank ``d // EP``. TP=1, DP=4, EP=2 -> expert-parallel groups
{0,1} and {2,3} (together they hold every expert once), expert-data-parallel groups
{0,2} and {1,3} (replicas of the same experts).

A group of one rank is ``None``: every collective on it is skipped, so a TP1 PP1 DP1
run needs no ``torch.distributed`` at all.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class Layout:
    """Parallel sizes of a run."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1  # expert-parallel ranks, out of the DP ranks

    def __post_init__(self):
        if self.ep < 1 or self.dp % self.ep:
            raise ValueError(f"EP={self.ep} must divide DP={self.dp} (expert-parallel ranks are data-parallel ranks)")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def rank(self, tp_rank: int, dp_rank: int, pp_stage: int) -> int:
        return tp_rank + self.tp * (dp_rank + self.dp * pp_stage)

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """``(tp_rank, dp_rank, pp_stage)`` of a global rank."""
        return rank % self.tp, (rank // self.tp) % self.dp, rank // (self.tp * self.dp)

    def __str__(self):
        return f"TP{self.tp} PP{self.pp} DP{self.dp}" + (f" EP{self.ep}" if self.ep > 1 else "")


@dataclass
class ParallelGroups:
    """This rank's place in the grid and the process groups it belongs to."""

    layout: Layout
    rank: int = 0
    tp_group: object = None  # same stage and DP rank: shards of one layer
    dp_group: object = None  # same TP rank and stage: replicas
    embedding_group: object = None  # first and last stage, same TP and DP rank: tied embeddings
    ep_group: object = None  # same TP rank, stage and expert-DP rank: every expert once
    expert_dp_group: object = None  # same TP rank, stage and EP rank: replicas of the same experts
    world_group: object = None  # everyone (None when alone)

    @property
    def tp_rank(self) -> int:
        return self.layout.coordinates(self.rank)[0]

    @property
    def dp_rank(self) -> int:
        return self.layout.coordinates(self.rank)[1]

    @property
    def pp_stage(self) -> int:
        return self.layout.coordinates(self.rank)[2]

    @property
    def ep_rank(self) -> int:
        return self.dp_rank % self.layout.ep

    @property
    def expert_dp_rank(self) -> int:
        return self.dp_rank // self.layout.ep

    @property
    def is_first_stage(self) -> bool:
        return self.pp_stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_stage == self.layout.pp - 1

    def stage_rank(self, pp_stage: int) -> int:
        """Global rank of this rank's peer (same TP and DP rank) in another stage."""
        return self.layout.rank(self.tp_rank, self.dp_rank, pp_stage)


def build_groups(layout: Layout) -> ParallelGroups:
    """Create every process group of the grid (collective: all ranks call it alike).

    Without an initialised ``torch.distributed`` the layout must be a single rank.
    """
    if not dist.is_initialized():
        if layout.world_size != 1:
            raise RuntimeError(f"{layout} needs {layout.world_size} processes but torch.distributed "
                               "is not initialised")
        return ParallelGroups(layout)
    if dist.get_world_size() != layout.world_size:
        raise RuntimeError(f"{layout} needs {layout.world_size} processes; the world has {dist.get_world_size()}")
    rank = dist.get_rank()
    groups = ParallelGroups(layout, rank)

    def make(members, attribute):
        # new_group is collective over the whole world: every rank creates every group.
        group = dist.new_group(members) if len(members) > 1 else None
        if rank in members:
            setattr(groups, attribute, group)

    T, D, P = layout.tp, layout.dp, layout.pp
    for d in range(D):
        for p in range(P):
            make([layout.rank(t, d, p) for t in range(T)], "tp_group")
    for t in range(T):
        for p in range(P):
            make([layout.rank(t, d, p) for d in range(D)], "dp_group")
    E = layout.ep
    if E > 1:
        for t in range(T):
            for p in range(P):
                for block in range(D // E):
                    make([layout.rank(t, block * E + e, p) for e in range(E)], "ep_group")
                for e in range(E):
                    make([layout.rank(t, block * E + e, p) for block in range(D // E)], "expert_dp_group")
    else:
        groups.expert_dp_group = groups.dp_group
    if P > 1:
        for d in range(D):
            for t in range(T):
                make([layout.rank(t, d, 0), layout.rank(t, d, P - 1)], "embedding_group")
    groups.world_group = dist.group.WORLD if layout.world_size > 1 else None
    # A first collective with every rank in it: NCCL sets its communicator up here rather
    # than inside the pipeline's first point-to-point exchange, where ranks arrive apart.
    dist.barrier()
    return groups


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)
