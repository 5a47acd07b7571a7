"""Tensors of a ``torch.save`` file read by byte offset, after loading only its pickle.

``torch.load(path, map_location="meta")`` (torch >= 2.5, zip files) unpickles the object
without reading any tensor data: each tensor comes back on the meta device with its
shape, dtype and view, and its storage carries ``_checkpoint_offset``, where the
storage's bytes start in the file. :func:`read_stored` then fills a fresh tensor from an
open descriptor with explicit reads, so a many-GB file is read one tensor (or one slice
of one) at a time. Where torch gives no offsets (:func:`offsets_known` is False), callers
load the file memory-mapped instead.

Where torch takes the offsets from (torch/serialization.py, ``_load``): a file with no
``.format_version`` record gets each from its record's local header. A file that declares
``.format_version`` 1 or later (``torch.save``'s own, and
:class:`ckptkit.torch_stream.StreamingTorchWriter`'s) does not: torch computes each offset
from where the previous record ended, assuming the records lie in the file in the order
the pickle first meets their storages, starting at key ``"0"``, each followed by a data
descriptor as miniz writes them. A writer that declares format version 1 must keep its
records in that order, or a meta-device load points at the wrong bytes.

>>> state = torch.load(path, map_location="meta", weights_only=True)
>>> fd = os.open(path, os.O_RDONLY)
>>> read_stored(fd, state["model"]["embedding.weight"], start=0, numel=8).shape
torch.Size([8])
"""
from __future__ import annotations

import torch

from .streaming_io import read_tensor


def tensors_in(value):
    """Every tensor inside ``value`` (nested dicts, lists and tuples), in order."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)


def offsets_known(value) -> bool:
    """Whether torch gave every meta tensor in ``value`` its byte offset (torch >= 2.5 and
    zip files do)."""
    return all(tensor.device.type != "meta" or hasattr(tensor.untyped_storage(), "_checkpoint_offset")
               for tensor in tensors_in(value))


def byte_offset(stored: torch.Tensor) -> int:
    """Where the first element of meta tensor ``stored`` lies in its file."""
    return stored.untyped_storage()._checkpoint_offset + stored.storage_offset() * stored.element_size()


def read_stored(descriptor: int, stored: torch.Tensor, start: int = 0, numel: int | None = None) -> torch.Tensor:
    """The values of meta tensor ``stored`` read from open file ``descriptor``: the whole
    tensor in its shape, or with ``numel`` its flattened elements ``[start, start + numel)``;
    in a tensor of its own. The caller checks the range."""
    offset = byte_offset(stored)
    if stored.is_contiguous():
        if numel is None:
            return read_tensor(descriptor, offset, stored.shape, stored.dtype)
        return read_tensor(descriptor, offset + start * stored.element_size(), (numel,), stored.dtype)
    # A view saved as such (rare): read the span it covers, then take the same view.
    span = 1 + sum((size - 1) * stride for size, stride in zip(stored.shape, stored.stride())) \
        if stored.numel() else 0
    flat = read_tensor(descriptor, offset, (span,), stored.dtype)
    whole = flat.as_strided(stored.shape, stored.stride()).contiguous()
    return whole.reshape(-1)[start: start + numel].clone() if numel is not None else whole
