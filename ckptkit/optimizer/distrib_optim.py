"""``distrib_optim.pt``: the distributed optimizer's state in Megatron's per-rank files.

One file per model-parallel rank (``mp_rank_TT[_PPP]/distrib_optim.pt``), holding the
state of every DP rank, as ``save_parameter_state`` writes it::

    {"buckets_coalesced": True,
     0: {(param_dtype, grad_dtype): {"param": fp32 [N], "exp_avg": fp32 [N],
                                     "exp_avg_sq": fp32 [N], "numel_unpadded": N}},
     1: {...}}                                   one entry per model chunk (VPP)

``param`` holds the fp32 master copies, ``N`` is the buffer's compacted size and each
parameter sits at :meth:`BufferLayout.stored_offset` (see :mod:`.buffers`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BadInput, InternalError, Unsupported
from ..spec import ModelSpec
from .buffers import BufferLayout, BufferSettings, Slot, buffer_layout
from .files import MetaFile
from .presized_file import PresizedTorchFile
from .parameters import ChunkPlace, chunk_parameters

FILE_NAME = "distrib_optim.pt"
STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class RankLayout:
    """The buffers of one model-parallel rank: one per model chunk, in ``distrib_optim.pt`` order;
    in a mixture of experts, the experts' optimizer's buffers too (one per chunk)."""

    tp_rank: int
    pp_stage: int
    buffers: tuple[BufferLayout, ...]
    expert_buffers: tuple[BufferLayout, ...] = ()

    @property
    def parts(self) -> tuple[tuple[BufferLayout, ...], ...]:
        """The buffers of each chained optimizer: the others' first, then the experts'."""
        return (self.buffers, self.expert_buffers) if self.expert_buffers else (self.buffers,)

    def slot(self, chunk: int, parameter_name: str) -> tuple[int, BufferLayout, Slot]:
        """``(part, buffer, slot)`` of a parameter of model chunk ``chunk``."""
        for part, buffers in enumerate(self.parts):
            for slot in buffers[chunk].slots:
                if slot.parameter.name == parameter_name:
                    return part, buffers[chunk], slot
        raise InternalError(f"no parameter {parameter_name} in chunk {chunk} of rank {self.tp_rank}/{self.pp_stage}")


def rank_layout(spec: ModelSpec, *, tp: int, tp_rank: int, pp: int, pp_stage: int, vpp: int,
                padded_vocab_size: int, settings: BufferSettings, naming: str = "mcore-local", ep: int = 1,
                ep_rank: int = 0) -> RankLayout:
    """The flat buffers of rank (``tp_rank``, ``pp_stage``, ``ep_rank``), one per virtual chunk
    (and per chunk for the experts, over ``settings.expert_dp`` ranks)."""
    buffers, expert_buffers = [], []
    for chunk in range(vpp):
        place = ChunkPlace(tp, tp_rank, pp, pp_stage, vpp, chunk, ep, ep_rank)
        parameters = chunk_parameters(spec, place, padded_vocab_size, naming=naming)
        bucket_size = settings.chunk_bucket_size(pp_stage, chunk)
        buffers.append(buffer_layout([parameter for parameter in parameters if not parameter.expert],
                                     dp=settings.dp, bucket_size=bucket_size,
                                     pad_for_high_nccl_busbw=settings.pad_for_high_nccl_busbw))
        experts = [parameter for parameter in parameters if parameter.expert]
        if experts:
            expert_buffers.append(buffer_layout(experts, dp=settings.expert_dp or settings.dp, bucket_size=bucket_size,
                                                pad_for_high_nccl_busbw=settings.pad_for_high_nccl_busbw))
    if expert_buffers and len(expert_buffers) != vpp:
        # Megatron numbers the experts' buffers over the chunks that have experts; not checked
        raise Unsupported(f"optimizer state of a mixture of experts whose pipeline stage {pp_stage} has model chunks "
                          "without experts is not supported")
    if spec.num_experts and ep > 1 and not expert_buffers:
        raise Unsupported(f"optimizer state of a mixture of experts whose pipeline stage {pp_stage} holds no expert "
                          "is not supported")
    return RankLayout(tp_rank, pp_stage, tuple(buffers), tuple(expert_buffers))


class DistribOptimFile:
    """One rank's ``distrib_optim.pt``, checked against its expected layout; ranges of its
    flat tensors are read on demand (:class:`.files.MetaFile`), so nothing stays in memory."""

    def __init__(self, path: Path, layout: RankLayout, buffer_key, *, trust_remote_pickle: bool = False,
                 ep_rank: int = 0):
        self.path = Path(path)
        self._file = MetaFile(self.path, trust_remote_pickle=trust_remote_pickle)
        self._tensors = self._check(self._file.state, layout, buffer_key, ep_rank)

    def _check(self, state, layout: RankLayout, buffer_key, ep_rank: int = 0) -> dict:
        where = self.path
        parts = layout.parts
        if len(parts) > 1:  # chained optimizers: a list, the others' state first, then the experts'
            if not isinstance(state, list) or len(state) != len(parts):
                found = f"a list of {len(state)}" if isinstance(state, list) else f"a {type(state).__name__}"
                raise BadInput(f"{where}: expected a list of {len(parts)} states (the experts' optimizer apart), "
                               f"found {found}")
            states = state
        else:
            states = [state]
        tensors = {}
        for part, (part_state, buffers) in enumerate(zip(states, parts)):
            if part == 0 and len(parts) > 1 and ep_rank > 0 and part_state is None:
                continue  # the non-expert state is saved once, in EP rank 0's file (see DistribOptimWriter)
            label = f"{where}" if len(parts) == 1 else f"{where} ({'experts' if part else 'non-expert'} optimizer)"
            for (index, key), tensor in self._check_part(part_state, buffers, buffer_key, label).items():
                tensors[(part, index, key)] = tensor
        return tensors

    @staticmethod
    def _check_part(state, layout_buffers, buffer_key, where) -> dict:
        if not isinstance(state, dict):
            raise BadInput(f"{where}: expected a dict, found {type(state).__name__}")
        if not state.get("buckets_coalesced", False):
            raise Unsupported(f"{where}: distributed optimizer state in the format used before "
                              "Megatron-LM coalesced buckets (Feb 2024; no 'buckets_coalesced')")
        buffers = sorted(key for key in state if isinstance(key, int))
        if buffers != list(range(len(layout_buffers))):
            raise BadInput(f"{where}: holds buffers {buffers}; expected {list(range(len(layout_buffers)))} "
                           f"(one per model chunk)")
        tensors = {}
        for index, expected in enumerate(layout_buffers):
            by_dtype = state[index]
            if not isinstance(by_dtype, dict) or list(by_dtype) != [buffer_key]:
                found = list(by_dtype) if isinstance(by_dtype, dict) else type(by_dtype).__name__
                raise BadInput(f"{where}: buffer {index} is keyed {found}; expected [{buffer_key}] "
                               "(param dtype, grad dtype) from the args")
            entry = by_dtype[buffer_key]
            numel = entry.get("numel_unpadded") if isinstance(entry, dict) else None
            if numel != expected.numel_unpadded:
                raise BadInput(f"{where}: buffer {index} has numel_unpadded {numel}; Megatron's layout of "
                               f"this rank's parameters gives {expected.numel_unpadded}")
            for key in STATE_KEYS:
                tensor = entry.get(key)
                if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != (numel,) or \
                        tensor.dtype != torch.float32:
                    found = (tensor.dtype, tuple(tensor.shape)) if isinstance(tensor, torch.Tensor) else tensor
                    raise BadInput(f"{where}: buffer {index} {key} is {found}; expected float32 ({numel},)")
                tensors[(index, key)] = tensor
        return tensors

    def read(self, buffer: int, key: str, start: int, numel: int, part: int = 0) -> torch.Tensor:
        """Elements ``[start, start + numel)`` of flat tensor ``key`` of ``buffer`` (of chained
        optimizer ``part``), in a tensor of their own."""
        return self._file.read(self._tensors[(part, buffer, key)], start, numel)

    def close(self) -> None:
        self._file.close()


class DistribOptimWriter:
    """Writes one rank's ``distrib_optim.pt``: each flat tensor gets every parameter's values
    in buffer order (:meth:`add`), with the 64-element gaps filled in; the three flat tensors
    of a buffer fill independently, so one state tensor at a time need be in memory. With
    experts, the file holds a list: the non-expert optimizer's state, then the experts'. The
    non-expert state is gathered on the first rank of its DP group, which writes EP rank 0's
    file; the other EP ranks' files hold None in its place (as Megatron saves them)."""

    def __init__(self, path: Path, layout: RankLayout, buffer_key, ep_rank: int = 0):
        self.path, self.layout, self.buffer_key = Path(path), layout, buffer_key
        self.skipped_parts = {0} if len(layout.parts) > 1 and ep_rank > 0 else set()
        sizes = {self._record(part, index, key): (torch.float32, buffer.numel_unpadded)
                 for part, buffers in enumerate(layout.parts) if part not in self.skipped_parts
                 for index, buffer in enumerate(buffers) for key in STATE_KEYS}
        self._file = PresizedTorchFile(self.path, "distrib_optim", sizes)
        self._next = dict.fromkeys(sizes, 0)  # next slot of each flat tensor
        self._filled = dict.fromkeys(sizes, 0)  # elements written so far

    def _record(self, part: int, buffer: int, key: str) -> str:
        first = sum(len(buffers) for buffers in self.layout.parts[:part])
        return f"{(first + buffer) * len(STATE_KEYS) + STATE_KEYS.index(key)}"

    def add(self, buffer: int, values: dict[str, torch.Tensor], part: int = 0) -> None:
        """The next parameter of ``buffer`` (of chained optimizer ``part``, in buffer order) in
        the flat tensors ``values`` names."""
        if part in self.skipped_parts:
            return
        layout = self.layout.parts[part][buffer]
        for key, piece in values.items():
            record = self._record(part, buffer, key)
            slot = layout.slots[self._next[record]]
            if piece.numel() != slot.parameter.numel:
                raise InternalError(f"{self.path}: {slot.parameter.name} {key} has {piece.numel()} elements; "
                                    f"its slot holds {slot.parameter.numel}")
            start = layout.stored_offset(slot)
            self._file.append_zeros(record, start - self._filled[record])
            self._file.append(record, piece.to(torch.float32).reshape(-1))
            self._filled[record] = start + slot.parameter.numel
            self._next[record] += 1

    def finish(self) -> None:
        states = []
        for part, buffers in enumerate(self.layout.parts):
            if part in self.skipped_parts:
                states.append(None)
                continue
            state = {"buckets_coalesced": True}
            for index, buffer in enumerate(buffers):
                for key in STATE_KEYS:
                    record = self._record(part, index, key)
                    if self._next[record] != len(buffer.slots):
                        raise InternalError(f"{self.path}: buffer {index} {key} got {self._next[record]} of "
                                            f"{len(buffer.slots)} parameters")
                    # a bucket closed before a shared embedding ends in padding
                    self._file.append_zeros(record, buffer.numel_unpadded - self._filled[record])
                entry = {key: self._file.ref(self._record(part, index, key)) for key in STATE_KEYS}
                entry["numel_unpadded"] = buffer.numel_unpadded
                state[index] = {self.buffer_key: entry}
            states.append(state)
        self._file.finish(states if len(states) > 1 else states[0])

    def close(self) -> None:
        self._file.close()
