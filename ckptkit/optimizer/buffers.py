"""Megatron's distributed-optimizer buffer layout, computed from metadata alone.

With ``--use-distributed-optimizer`` every model chunk's parameters live in one flat
buffer per (param dtype, grad dtype) pair, cut into buckets; each bucket is cut into
DP equal shards and DP rank ``r`` keeps the fp32 master copy and Adam moments of shard
``r``. ``DistributedOptimizer._compute_per_buffer_param_layout``
(megatron/core/optimizer/distrib_optimizer.py, helpers in
megatron/core/optimizer/param_layout.py) places them:

* parameters in *reverse* ``named_parameters()`` order (the order gradients arrive);
* each parameter starts at a multiple of 64 elements (``pad_param_start``);
* a bucket closes once it holds ``bucket_size`` elements (``bucket_size`` is None, one
  bucket, unless ``--overlap-grad-reduce``; always None on stages after the first and
  for chunks after the first); a ``shared_embedding`` parameter (tied embeddings with
  PP > 1) gets a bucket of its own;
* each bucket's end is padded to a multiple of ``lcm(DP, 128)`` (``pad_bucket_end``;
  ``lcm(DP, 128, 65536)`` with ``--ddp-pad-buckets-for-high-nccl-busbw``), so it cuts
  into DP equal shards; the next bucket starts there.

The per-rank file ``distrib_optim.pt`` stores each buffer *compacted*: bucket after
bucket, each cut at its unpadded end (``numel_unpadded``), the 64-element gaps between
parameters kept (zeros). ``get_parameter_state_dp_zero`` writes it so.

Tiny example: a chunk with parameters ``w`` (2 x 3) then ``b`` (3), DP=2::

    buffer order   b, w                     (reverse)
    b              [0, 3)                   bucket 0
    w              [64, 70)                 start padded from 3 to 64
    bucket 0       [0, 128), 70 unpadded    end padded to lcm(2, 128) = 128
    file           [b0 b1 b2 0 x 61 w0 .. w5]      70 elements
    DP rank 0      buffer [0, 64):   all of b
    DP rank 1      buffer [64, 128): all of w

>>> from ckptkit.optimizer.parameters import ModelParameter
>>> layout = buffer_layout([ModelParameter("w", "w", "column", (2, 3)),
...                         ModelParameter("b", "b", "column", (3,))], dp=2)
>>> [(slot.parameter.name, slot.start, slot.end) for slot in layout.slots]
[('b', 0, 3), ('w', 64, 70)]
>>> layout.buckets[0]
Bucket(index=0, start=0, end=128, numel_unpadded=70, stored_start=0)
>>> [(piece.slot.parameter.name, piece.buffer_start, piece.buffer_end) for piece in layout.dp_shard(1)]
[('w', 64, 70)]
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..errors import BadInput
from .parameters import ModelParameter

PARAM_START_ALIGNMENT = 64  # elements (param_layout.pad_param_start)
BUCKET_END_MULTIPLE = 128  # with DP: lcm(DP, 128) (param_layout.bucket_end_divisor)
HIGH_NCCL_BUSBW_MULTIPLE = 2 ** 16


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class Slot:
    """Where one parameter lives in the flat buffer: ``[start, end)``, in bucket ``bucket``."""

    parameter: ModelParameter
    start: int
    bucket: int

    @property
    def end(self) -> int:
        return self.start + self.parameter.numel


@dataclass(frozen=True)
class Bucket:
    """``[start, end)`` of the padded buffer; ``numel_unpadded`` elements up to its last
    parameter's end; ``stored_start``: where it begins in ``distrib_optim.pt``."""

    index: int
    start: int
    end: int
    numel_unpadded: int
    stored_start: int

    @property
    def numel(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ShardPiece:
    """The part of one parameter a DP rank owns: elements ``[param_start, param_end)`` of
    the flattened parameter, at ``[buffer_start, buffer_end)`` of the buffer."""

    slot: Slot
    param_start: int
    param_end: int

    @property
    def buffer_start(self) -> int:
        return self.slot.start + self.param_start

    @property
    def buffer_end(self) -> int:
        return self.slot.start + self.param_end


@dataclass(frozen=True)
class BufferLayout:
    """One flat buffer of one model chunk: its parameters in buffer order and its buckets."""

    slots: tuple[Slot, ...]
    buckets: tuple[Bucket, ...]
    dp: int

    @property
    def numel(self) -> int:
        """Elements of the padded buffer (a multiple of DP)."""
        return self.buckets[-1].end if self.buckets else 0

    @property
    def numel_unpadded(self) -> int:
        """Elements of the compacted buffer ``distrib_optim.pt`` stores (its ``numel_unpadded``)."""
        return sum(bucket.numel_unpadded for bucket in self.buckets)

    def stored_offset(self, slot: Slot) -> int:
        """Where ``slot``'s parameter starts in ``distrib_optim.pt``'s flat tensors."""
        bucket = self.buckets[slot.bucket]
        return bucket.stored_start + slot.start - bucket.start

    def dp_range(self, bucket: Bucket, dp_rank: int) -> tuple[int, int]:
        """The part of ``bucket`` DP rank ``dp_rank`` owns (``_build_model_gbuf_range``)."""
        size = bucket.numel // self.dp
        return bucket.start + dp_rank * size, bucket.start + (dp_rank + 1) * size

    def dp_shard(self, dp_rank: int) -> list[ShardPiece]:
        """What DP rank ``dp_rank`` updates: per bucket, the parameters (or parts of them) in
        its range, in buffer order (``_build_model_gbuf_param_range_map``)."""
        if not 0 <= dp_rank < self.dp:
            raise BadInput(f"DP rank {dp_rank} of {self.dp}")
        pieces = []
        for bucket in self.buckets:
            low, high = self.dp_range(bucket, dp_rank)
            for slot in self.slots:
                if slot.bucket == bucket.index and slot.start < high and slot.end > low:
                    pieces.append(ShardPiece(slot, max(low, slot.start) - slot.start, min(high, slot.end) - slot.start))
        return pieces


def buffer_layout(parameters: list[ModelParameter], *, dp: int, bucket_size: int | None = None,
                  pad_for_high_nccl_busbw: bool = False) -> BufferLayout:
    """Megatron's layout of one buffer of ``parameters`` (given in ``named_parameters()``
    order) for a distributed optimizer over ``dp`` ranks: a transcription of
    ``DistributedOptimizer._compute_per_buffer_param_layout``."""
    if dp < 1:
        raise BadInput(f"data-parallel size must be positive (got {dp})")
    multiple = math.lcm(dp, BUCKET_END_MULTIPLE, HIGH_NCCL_BUSBW_MULTIPLE if pad_for_high_nccl_busbw else 1)
    slots: list[Slot] = []
    buckets: list[Bucket] = []
    bucket_start = 0
    param_start = 0
    param_end = 0
    open_bucket: list[Slot] = []

    def close(end: int) -> int:
        stored_start = sum(bucket.numel_unpadded for bucket in buckets)
        padded_end = _round_up(end, multiple)
        buckets.append(Bucket(len(buckets), bucket_start, padded_end, end - bucket_start, stored_start))
        open_bucket.clear()
        return padded_end

    for parameter in reversed(parameters):
        param_start = _round_up(param_start, PARAM_START_ALIGNMENT)
        if parameter.shared_embedding and open_bucket:
            bucket_start = param_start = close(param_start)
        slot = Slot(parameter, param_start, len(buckets))
        slots.append(slot)
        open_bucket.append(slot)
        param_end = slot.end
        full = bucket_size is not None and param_end - bucket_start >= bucket_size
        if full or parameter.shared_embedding:
            bucket_start = param_start = close(param_end)
        else:
            param_start = param_end
    if open_bucket:
        close(param_end)
    return BufferLayout(tuple(slots), tuple(buckets), dp)


@dataclass(frozen=True)
class BufferSettings:
    """What Megatron's buffer layout depends on besides the model: from its args.

    ``dp`` is the group the optimizer shards over: data x context parallel ranks, divided
    by ``num_distributed_optimizer_instances``. ``bucket_size`` is the size the first
    stage's first chunk uses (None: one bucket per buffer).
    """

    dp: int = 1
    bucket_size: int | None = None
    pad_for_high_nccl_busbw: bool = False
    param_dtype: torch.dtype = torch.float32
    grad_dtype: torch.dtype = torch.float32
    # the experts' optimizer shards over the expert-data-parallel group: the ranks holding the
    # same experts (DP x TP / (EP x ETP) of them); None: no experts
    expert_dp: int | None = None

    def with_experts(self, *, tp: int, ep: int, etp: int | None = None) -> "BufferSettings":
        """These settings for a mixture of experts at TP ``tp``, EP ``ep``, expert TP ``etp``.

        >>> BufferSettings(dp=4).with_experts(tp=2, ep=2).expert_dp  # 8 ranks, 2 x 2 per expert group
        2
        """
        etp = etp or tp
        if (self.dp * tp) % (ep * etp):
            raise BadInput(f"DP={self.dp} x TP={tp} ranks do not divide into EP={ep} x expert TP={etp}")
        return dataclasses.replace(self, expert_dp=self.dp * tp // (ep * etp))

    def chunk_bucket_size(self, pp_stage: int, chunk: int) -> int | None:
        """Bucketing is off on later stages and later chunks (``get_model`` in
        megatron/training/training.py)."""
        return self.bucket_size if pp_stage == 0 and chunk == 0 else None

    @property
    def buffer_key(self) -> tuple[torch.dtype, torch.dtype]:
        """The key of a buffer in ``distrib_optim.pt``: ``(param dtype, grad dtype)``."""
        return self.param_dtype, self.grad_dtype

    @classmethod
    def from_args(cls, args, *, dp: int | None = None, num_parameters: int | None = None,
                  param_dtype: torch.dtype | None = None) -> "BufferSettings":
        """Settings of a run from its Megatron args (``dp`` overrides the args' DP size).

        ``num_parameters`` (this rank's, all chunks) is needed only with ``--ddp-num-buckets``.
        """
        def get(name, default=None):
            value = getattr(args, name, None)
            return default if value is None else value

        context = int(get("context_parallel_size", 1))
        instances = int(get("num_distributed_optimizer_instances", 1))
        data_parallel = dp if dp is not None else int(get("data_parallel_size", 1))
        if (data_parallel * context) % instances:
            raise BadInput(f"DP={data_parallel} x CP={context} does not divide into "
                           f"{instances} distributed optimizer instances")
        if param_dtype is None:
            param_dtype = torch.bfloat16 if get("bf16", False) else torch.float16 if get("fp16", False) \
                else torch.float32
        # Saved args hold the value after Megatron's validation, which turns fp32 accumulation on
        # with --bf16 unless --grad-reduce-in-bf16 (megatron/training/arguments.py).
        grad_fp32 = get("accumulate_allreduce_grads_in_fp32")
        if grad_fp32 is None:
            grad_fp32 = param_dtype == torch.bfloat16 and not get("grad_reduce_in_bf16", False)
        bucket_size = None
        if get("overlap_grad_reduce", False) and not get("overlap_param_gather_with_optimizer_step", False):
            sharding_group = data_parallel * context
            if get("ddp_num_buckets") is not None:
                if num_parameters is None:
                    raise BadInput("--ddp-num-buckets needs the parameter count of the rank")
                bucket_size = num_parameters // int(args.ddp_num_buckets)
            else:
                bucket_size = int(get("ddp_bucket_size", max(40_000_000, 1_000_000 * sharding_group)))
        settings = cls(dp=data_parallel * context // instances, bucket_size=bucket_size,
                       pad_for_high_nccl_busbw=bool(get("ddp_pad_buckets_for_high_nccl_busbw", False)),
                       param_dtype=param_dtype, grad_dtype=torch.float32 if grad_fp32 else param_dtype)
        if get("num_experts") and dp is None:  # the args' own layout (another DP: see with_experts)
            settings = settings.with_experts(tp=int(get("tensor_model_parallel_size", 1)),
                                             ep=int(get("expert_model_parallel_size", 1)),
                                             etp=get("expert_tensor_parallel_size"))
        return settings
