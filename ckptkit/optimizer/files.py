"""Reading parts of large ``torch.save`` files without holding them in memory.

The pickle is loaded on the meta device: every tensor comes back with its shape, dtype
and its storage's byte offset in the file, and :meth:`MetaFile.read` fills a fresh
tensor with ``pread`` from there (:mod:`ckptkit.torch_offsets`, which also says where
torch takes those offsets from). Where torch gives no offsets (< 2.5) the file is
memory-mapped instead.

>>> file = MetaFile("mp_rank_00/distrib_optim.pt")
>>> flat = file.state[0][(torch.float32, torch.float32)]["param"]
>>> file.read(flat, start=64, numel=32).shape
torch.Size([32])
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import BadInput
from ..safe_load import safe_torch_load
from ..torch_offsets import offsets_known, read_stored


class MetaFile:
    """A ``torch.save`` file: its object (tensors on the meta device) and their values on demand."""

    def __init__(self, path, *, trust_remote_pickle: bool = False):
        self.path = Path(path)
        self._fd = None
        self.state = safe_torch_load(self.path, trust_remote_pickle=trust_remote_pickle, map_location="meta")
        if not offsets_known(self.state):
            self.state = safe_torch_load(self.path, trust_remote_pickle=trust_remote_pickle)

    def read(self, tensor: torch.Tensor, start: int = 0, numel: int | None = None) -> torch.Tensor:
        """Elements ``[start, start + numel)`` of ``tensor`` (a tensor of :attr:`state`)
        flattened, or the whole tensor in its shape, in a tensor of its own."""
        if numel is not None and not 0 <= start <= start + numel <= tensor.numel():
            raise BadInput(f"{self.path}: elements [{start}, {start + numel}) of a tensor of {tensor.numel()}")
        if tensor.device.type != "meta":
            values = tensor.reshape(-1)[start: start + numel] if numel is not None else tensor
            return values.clone()
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return read_stored(self._fd, tensor, start, numel)

    def materialize(self, value):
        """``value`` (a part of :attr:`state`) with every tensor read: for small entries."""
        if isinstance(value, torch.Tensor):
            return self.read(value)
        if type(value) is dict:
            return {key: self.materialize(item) for key, item in value.items()}
        if type(value) in (list, tuple):
            return type(value)(self.materialize(item) for item in value)
        return value

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
