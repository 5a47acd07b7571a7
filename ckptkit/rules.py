"""Partition rules: how one full (unsharded) tensor is cut across tensor-parallel ranks.

Each rule is a pure function pair ``split(full, n) -> list[Tensor]`` and
``merge(shards) -> Tensor`` with ``merge(split(x, n)) == x`` bit for bit, plus its
geometry: the region of the full tensor each rank holds (:meth:`PartitionRule.boxes`)
and the shape each rank stores (:meth:`PartitionRule.shard_shape`), which layouts ask
for instead of re-encoding the rule. No files, no ranks, no globals. Rules that need
model hyper-parameters are built by :func:`ckptkit.spec.rule_for`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import BadInput

# A box of the full tensor: (offsets, sizes), one entry per dimension.
Box = tuple[tuple[int, ...], tuple[int, ...]]


def _chunks(tensor: torch.Tensor, n: int, dim: int, what: str) -> list[torch.Tensor]:
    if tensor.shape[dim] % n:
        raise BadInput(f"{what}: dimension {dim} of shape {tuple(tensor.shape)} "
                       f"is not divisible by {n} tensor-parallel ranks")
    return [piece.contiguous() for piece in torch.chunk(tensor, n, dim=dim)]


def _block(shape: tuple[int, ...], dim: int, blocks: int, index: int, what: str) -> Box:
    """Block ``index`` of ``blocks`` equal blocks of ``shape`` along ``dim``."""
    if shape[dim] % blocks:
        raise BadInput(f"{what}: dimension {dim} of shape {tuple(shape)} "
                       f"is not divisible into {blocks} equal blocks")
    step = shape[dim] // blocks
    offsets = [0] * len(shape)
    sizes = list(shape)
    offsets[dim], sizes[dim] = index * step, step
    return tuple(offsets), tuple(sizes)


def box_slices(box: Box) -> tuple[slice, ...]:
    """Index of a box: ``full[box_slices(box)]`` is its region, a view.

    >>> box_slices(((2, 0), (2, 4)))
    (slice(2, 4, None), slice(0, 4, None))
    """
    offsets, sizes = box
    return tuple(slice(offset, offset + size) for offset, size in zip(offsets, sizes))


class PartitionRule:
    """What every rule has besides ``split``/``merge``: its geometry, in the coordinates of
    the full tensor.

    A rank's stored piece is its boxes' regions of the full tensor, concatenated along
    dim 0 (one box for most rules, two for :class:`GatedMLP`). The full tensor is the
    canonical one, except that :class:`VocabParallel` pads it to ``padded_rows`` first
    (:meth:`full_shape`, :meth:`fit`).
    """

    name = ""

    def full_shape(self, shape) -> tuple[int, ...]:
        """The shape of the full tensor ``split`` cuts, for a canonical tensor of ``shape``."""
        return tuple(shape)

    def fit(self, full: torch.Tensor) -> torch.Tensor:
        """``full`` as the tensor ``split`` cuts (shape :meth:`full_shape`)."""
        return full

    def boxes(self, shape, n: int, rank: int) -> list[Box]:
        """The regions of the full tensor TP rank ``rank`` of ``n`` holds, in stored order."""
        raise NotImplementedError

    def shard_shape(self, shape, n: int) -> tuple[int, ...]:
        """The shape each of ``n`` ranks stores for a canonical tensor of ``shape``."""
        boxes = self.boxes(shape, n, 0)
        if not boxes[0][1]:
            return ()
        return (sum(sizes[0] for _, sizes in boxes), *boxes[0][1][1:])

    def shard(self, full: torch.Tensor, n: int, rank: int) -> torch.Tensor:
        """Rank ``rank``'s piece of ``full``, equal to ``split(full, n)[rank]``: a view of
        ``fit(full)`` when the rank holds one box (no copy for a replicated tensor)."""
        full = self.fit(full)
        parts = [full[box_slices(box)] for box in self.boxes(full.shape, n, rank)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def from_checkpoint_version(self, shard: torch.Tensor, checkpoint_version: float) -> torch.Tensor:
        """One rank's stored piece with its rows in the current order. Megatron stored every
        tensor's rows in today's order in every ``checkpoint_version`` but fused QKV's."""
        return shard


@dataclass(frozen=True)
class Replicated(PartitionRule):
    """Every rank holds the whole tensor (norms, biases of row-parallel layers).

    ``split([a b c], 2) == [[a b c], [a b c]]``; ``merge`` returns the first copy
    (callers compare the copies: see :func:`max_abs_difference`). Each rank's box is the
    whole tensor: ``boxes((3,), 2, 1) == [((0,), (3,))]``.
    """

    name = "replicated"

    def split(self, full, n):
        return [full.clone() if n > 1 else full for _ in range(n)] if n > 1 else [full]

    def merge(self, shards):
        return shards[0]

    def boxes(self, shape, n, rank):
        return [((0,) * len(shape), tuple(shape))]


def max_abs_difference(reference: torch.Tensor, copy: torch.Tensor) -> float:
    """Largest ``|copy - reference|`` of two tensors that should be equal: 0.0 when they
    are, ``inf`` when their shapes differ.

    Computed in the wider of the tensors' own dtype and float32, never float64: a float16
    difference can overflow (``60000 - (-60000)``), and a float32 copy of a chunk is the
    most it adds. Callers compare large tensors a chunk of rows at a time.

    >>> max_abs_difference(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5]))
    0.5
    """
    if copy.shape != reference.shape:
        return float("inf")
    if copy.numel() == 0 or (copy.dtype == reference.dtype and torch.equal(copy, reference)):
        return 0.0
    dtype = torch.promote_types(torch.promote_types(reference.dtype, copy.dtype), torch.float32)
    difference = copy.to(dtype, copy=True).sub_(reference).abs_()
    return difference.max().item()


@dataclass(frozen=True)
class ColumnParallel(PartitionRule):
    """Output features split across ranks: dim 0.

    rows ``[r0 r1 r2 r3]`` at TP=2 -> rank 0 ``[r0 r1]``, rank 1 ``[r2 r3]``;
    rank 1's box of a (4, 3) tensor is ``((2, 0), (2, 3))``.
    """

    name = "column"

    def split(self, full, n):
        return _chunks(full, n, 0, "column-parallel tensor")

    def merge(self, shards):
        return torch.cat(shards, dim=0)

    def boxes(self, shape, n, rank):
        return [_block(tuple(shape), 0, n, rank, "column-parallel tensor")]


@dataclass(frozen=True)
class RowParallel(PartitionRule):
    """Input features split across ranks: dim 1 (the weight of ``linear_proj``/``linear_fc2``).

    columns ``[c0 c1 c2 c3]`` at TP=2 -> rank 0 ``[c0 c1]``, rank 1 ``[c2 c3]``;
    rank 1's box of a (3, 4) tensor is ``((0, 2), (3, 2))``.
    """

    name = "row"

    def split(self, full, n):
        return _chunks(full, n, 1, "row-parallel tensor")

    def merge(self, shards):
        return torch.cat(shards, dim=1)

    def boxes(self, shape, n, rank):
        return [_block(tuple(shape), 1, n, rank, "row-parallel tensor")]


@dataclass(frozen=True)
class VocabParallel(PartitionRule):
    """Embedding rows split across ranks after padding the vocabulary.

    ``padded_rows`` is what the target layout needs (a multiple of
    ``make_vocab_size_divisible_by x TP``). Rows beyond the true vocabulary are padding:
    ``split`` keeps whatever padding rows the input has, adds zero rows or drops
    padding rows to reach ``padded_rows``; ``merge`` keeps the padding.
    Vocab 5, padded 6, TP=2: ``[t0 t1 t2 t3 t4]`` -> rank 0 ``[t0 t1 t2]``,
    rank 1 ``[t3 t4 0]``; boxes are in the padded tensor: rank 1's is ``((3, 0), (3, hidden))``.
    """

    vocab_size: int
    padded_rows: int
    name = "vocab"

    def full_shape(self, shape):
        return (self.padded_rows, *shape[1:])

    def fit(self, full):
        if full.shape[0] < self.vocab_size:
            raise BadInput(f"vocab-parallel tensor has {full.shape[0]} rows; "
                           f"expected at least the vocabulary size {self.vocab_size}")
        if self.padded_rows < self.vocab_size:
            raise BadInput(f"padded vocabulary {self.padded_rows} is smaller than "
                           f"the vocabulary {self.vocab_size}")
        padded = full[: self.padded_rows]
        missing = self.padded_rows - padded.shape[0]
        if missing:
            padding = torch.zeros((missing, *full.shape[1:]), dtype=full.dtype)
            padded = torch.cat([padded, padding], dim=0)
        return padded

    def split(self, full, n):
        return _chunks(self.fit(full), n, 0, "vocab-parallel tensor")

    def merge(self, shards):
        return torch.cat(shards, dim=0)

    def boxes(self, shape, n, rank):
        return [_block(self.full_shape(shape), 0, n, rank, "vocab-parallel tensor")]


@dataclass(frozen=True)
class FusedQKV(PartitionRule):
    """Fused query/key/value rows, grouped per query group; ranks hold whole groups.

    Each group holds ``heads_per_group`` query heads, then one key and one value head,
    each ``head_dim`` rows. GQA with 2 groups of 2 query heads, TP=2:
    ``rows = [q0 q1 k0 v0 | q2 q3 k1 v1]``, split at ``|``. Multi-head attention is
    the case ``heads_per_group == 1``: ``[q0 k0 v0 | q1 k1 v1 | ...]``. Each rank's box
    is its block of whole groups: rank 1's above is rows 4-7.
    """

    num_query_groups: int
    heads_per_group: int
    head_dim: int
    name = "qkv"

    @property
    def rows_per_group(self):
        return (self.heads_per_group + 2) * self.head_dim

    def _check(self, rows: int, n: int) -> None:
        expected = self.num_query_groups * self.rows_per_group
        if rows != expected:
            raise BadInput(f"fused QKV tensor has {rows} rows; expected {expected} "
                           f"({self.num_query_groups} groups x {self.rows_per_group})")
        if self.num_query_groups % n:
            raise BadInput(f"{self.num_query_groups} query groups cannot be split over "
                           f"{n} tensor-parallel ranks (each rank must hold whole groups)")

    def split(self, full, n):
        self._check(full.shape[0], n)
        return _chunks(full, n, 0, "fused QKV tensor")

    def merge(self, shards):
        return torch.cat(shards, dim=0)

    def boxes(self, shape, n, rank):
        self._check(shape[0], n)
        return [_block(tuple(shape), 0, n, rank, "fused QKV tensor")]

    def from_checkpoint_version(self, shard, checkpoint_version):
        """Reorder a rank's rows stored by an old ``checkpoint_version`` (see :func:`qkv_to_current`)."""
        if checkpoint_version >= 2.0:
            return shard
        return qkv_to_current(shard, checkpoint_version, shard.shape[0] // (3 * self.head_dim), self.head_dim)


def qkv_to_current(shard: torch.Tensor, version: float, heads: int, head_dim: int) -> torch.Tensor:
    """Reorder one rank's QKV shard from an old checkpoint_version to the per-head layout.

    Version 0 stores ``[3, heads, head_dim]`` (all q, all k, all v), version 1.0
    ``[heads, head_dim, 3]``; 2.0 and later ``[heads, 3, head_dim]`` (per head
    ``q_h k_h v_h``), which is canonical. (Multi-head attention only: GQA postdates 2.0.)
    """
    if version >= 2.0:
        return shard
    tail = shard.shape[1:]
    if version == 0:
        reordered = shard.view(3, heads, head_dim, *tail).transpose(0, 1)
    else:
        reordered = shard.view(heads, head_dim, 3, *tail).transpose(1, 2)
    return reordered.reshape(shard.shape).contiguous()


@dataclass(frozen=True)
class GatedMLP(PartitionRule):
    """SwiGLU ``linear_fc1``: the full tensor is ``[all gate; all up]``, each rank
    holds ``[its gate shard; its up shard]``.

    ffn 4, TP=2: full ``[g0 g1 g2 g3 u0 u1 u2 u3]`` -> rank 0 ``[g0 g1 u0 u1]``,
    rank 1 ``[g2 g3 u2 u3]``: two boxes per rank, rank 1's rows 2-3 and 6-7.
    """

    name = "gated"

    def split(self, full, n):
        gate, up = _chunks(full, 2, 0, "gated MLP tensor")
        gate_shards = _chunks(gate, n, 0, "gated MLP gate half")
        up_shards = _chunks(up, n, 0, "gated MLP up half")
        return [torch.cat([g, u], dim=0) for g, u in zip(gate_shards, up_shards)]

    def merge(self, shards):
        halves = [_chunks(shard, 2, 0, "gated MLP shard") for shard in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)

    def boxes(self, shape, n, rank):
        shape = tuple(shape)
        if shape[0] % 2:
            raise BadInput(f"gated MLP tensor: dimension 0 of shape {shape} is not divisible by 2")
        return [_block(shape, 0, 2 * n, rank, "gated MLP tensor"),
                _block(shape, 0, 2 * n, n + rank, "gated MLP tensor")]


SIMPLE_RULES = {rule.name: rule for rule in (Replicated(), ColumnParallel(), RowParallel(), GatedMLP())}
