"""Partition rules: how one full (unsharded) tensor is cut across tensor-parallel ranks.

Each rule is a pure function pair ``split(full, n) -> list[Tensor]`` and
``merge(shards) -> Tensor`` with ``merge(split(x, n)) == x`` bit for bit. No files,
no ranks, no globals. The registry ``RULES`` maps the rule names used in the
canonical tensor table (:mod:`ckptkit.spec`) to rule objects; rules that need model
hyper-parameters are built by :func:`rule_for`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import BadInput


def _chunks(tensor: torch.Tensor, n: int, dim: int, what: str) -> list[torch.Tensor]:
    if tensor.shape[dim] % n:
        raise BadInput(f"{what}: dimension {dim} of shape {tuple(tensor.shape)} "
                       f"is not divisible by {n} tensor-parallel ranks")
    return [piece.contiguous() for piece in torch.chunk(tensor, n, dim=dim)]


@dataclass(frozen=True)
class Replicated:
    """Every rank holds the whole tensor (norms, biases of row-parallel layers).

    ``split([a b c], 2) == [[a b c], [a b c]]``; ``merge`` returns the first copy
    (callers compare the copies: see :func:`max_abs_difference`).
    """

    name = "replicated"

    def split(self, full, n):
        return [full.clone() if n > 1 else full for _ in range(n)] if n > 1 else [full]

    def merge(self, shards):
        return shards[0]


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
class ColumnParallel:
    """Output features split across ranks: dim 0.

    rows ``[r0 r1 r2 r3]`` at TP=2 -> rank 0 ``[r0 r1]``, rank 1 ``[r2 r3]``.
    """

    name = "column"

    def split(self, full, n):
        return _chunks(full, n, 0, "column-parallel tensor")

    def merge(self, shards):
        return torch.cat(shards, dim=0)


@dataclass(frozen=True)
class RowParallel:
    """Input features split across ranks: dim 1 (the weight of ``linear_proj``/``linear_fc2``).

    columns ``[c0 c1 c2 c3]`` at TP=2 -> rank 0 ``[c0 c1]``, rank 1 ``[c2 c3]``.
    """

    name = "row"

    def split(self, full, n):
        return _chunks(full, n, 1, "row-parallel tensor")

    def merge(self, shards):
        return torch.cat(shards, dim=1)


@dataclass(frozen=True)
class VocabParallel:
    """Embedding rows split across ranks after padding the vocabulary.

    ``padded_rows`` is what the target layout needs (a multiple of
    ``make_vocab_size_divisible_by x TP``). Rows beyond the true vocabulary are padding:
    ``split`` keeps whatever padding rows the input has, adds zero rows or drops
    padding rows to reach ``padded_rows``; ``merge`` keeps the padding.
    Vocab 5, padded 6, TP=2: ``[t0 t1 t2 t3 t4]`` -> rank 0 ``[t0 t1 t2]``,
    rank 1 ``[t3 t4 0]``.
    """

    vocab_size: int
    padded_rows: int
    name = "vocab"

    def split(self, full, n):
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
        return _chunks(padded, n, 0, "vocab-parallel tensor")

    def merge(self, shards):
        return torch.cat(shards, dim=0)


@dataclass(frozen=True)
class FusedQKV:
    """Fused query/key/value rows, grouped per query group; ranks hold whole groups.

    Each group holds ``heads_per_group`` query heads, then one key and one value head,
    each ``head_dim`` rows. GQA with 2 groups of 2 query heads, TP=2:
    ``rows = [q0 q1 k0 v0 | q2 q3 k1 v1]``, split at ``|``. Multi-head attention is
    the case ``heads_per_group == 1``: ``[q0 k0 v0 | q1 k1 v1 | ...]``.
    """

    num_query_groups: int
    heads_per_group: int
    head_dim: int
    name = "qkv"

    @property
    def rows_per_group(self):
        return (self.heads_per_group + 2) * self.head_dim

    def split(self, full, n):
        expected = self.num_query_groups * self.rows_per_group
        if full.shape[0] != expected:
            raise BadInput(f"fused QKV tensor has {full.shape[0]} rows; expected {expected} "
                           f"({self.num_query_groups} groups x {self.rows_per_group})")
        if self.num_query_groups % n:
            raise BadInput(f"{self.num_query_groups} query groups cannot be split over "
                           f"{n} tensor-parallel ranks (each rank must hold whole groups)")
        return _chunks(full, n, 0, "fused QKV tensor")

    def merge(self, shards):
        return torch.cat(shards, dim=0)


@dataclass(frozen=True)
class GatedMLP:
    """SwiGLU ``linear_fc1``: the full tensor is ``[all gate; all up]``, each rank
    holds ``[its gate shard; its up shard]``.

    ffn 4, TP=2: full ``[g0 g1 g2 g3 u0 u1 u2 u3]`` -> rank 0 ``[g0 g1 u0 u1]``,
    rank 1 ``[g2 g3 u2 u3]``.
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


SIMPLE_RULES = {rule.name: rule for rule in (Replicated(), ColumnParallel(), RowParallel(), GatedMLP())}
