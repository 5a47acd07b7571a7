"""Write a ``torch.save`` file one tensor at a time.

``torch.save`` pickles a whole state dict that must already sit in memory. A
Megatron rank file can be many GB, so we write it the way ``torch.save`` lays it
out on disk (a zip with ``data/<key>`` records and a ``data.pkl`` pickle that
refers to them) but in the other order: each tensor's bytes are written as soon as
they are produced and freed, and the pickle that ties them together comes last.
``torch.load`` (including ``mmap=True`` and ``weights_only=True``) reads the result
like any other file.

>>> with StreamingTorchWriter(path) as writer:
...     ref = writer.add_tensor(torch.ones(3))       # bytes on disk now
...     writer.finish({"model": {"w": ref}, "iteration": 10})
"""
from __future__ import annotations

import collections
import io
import pickle
import sys
from typing import Callable

import torch
import torch.serialization as serialization

from .errors import InternalError
from .streaming_io import DirectWriteFile, OrderedWriteThread

# dtype -> the storage class name a torch.save pickle refers to for it
STORAGE_TYPE_NAMES = {
    torch.float32: "FloatStorage", torch.float64: "DoubleStorage", torch.float16: "HalfStorage",
    torch.bfloat16: "BFloat16Storage", torch.int64: "LongStorage", torch.int32: "IntStorage",
    torch.int16: "ShortStorage", torch.int8: "CharStorage", torch.uint8: "ByteStorage",
    torch.bool: "BoolStorage",
}


class TensorRef:
    """A tensor already written to the file: its record key, dtype and shape."""

    def __init__(self, key: str, dtype: torch.dtype, shape: tuple[int, ...]):
        self.key, self.dtype, self.shape = key, dtype, tuple(shape)

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


class _StorageRef:
    def __init__(self, ref: TensorRef):
        self.ref = ref


def _contiguous_stride(shape):
    stride, running = [], 1
    for size in reversed(shape):
        stride.append(running)
        running *= size
    return tuple(reversed(stride))


def pickle_with_refs(obj, add_tensor: Callable[[torch.Tensor], TensorRef] | None = None) -> bytes:
    """Pickle ``obj`` as ``torch.save`` pickles its ``data.pkl``, each :class:`TensorRef`
    in it as a tensor on record ``data/<key>``.

    A plain tensor in ``obj`` is handed to ``add_tensor`` (which writes it and returns
    its reference); without ``add_tensor`` it is an :class:`InternalError`.

    >>> data = pickle_with_refs({"param": TensorRef("0", torch.float32, (70,))})
    >>> zip_writer.write_record("archive/data.pkl", data, len(data))
    """

    class Pickler(pickle.Pickler):
        def reducer_override(self, value):
            if isinstance(value, torch.Tensor):
                if add_tensor is None:
                    raise InternalError("a plain tensor in the object: only TensorRefs to records "
                                        "already in the file can be pickled here")
                if type(value) is torch.Tensor:
                    value = add_tensor(value)
            if isinstance(value, TensorRef):
                return torch._utils._rebuild_tensor_v2, (
                    _StorageRef(value), 0, value.shape, _contiguous_stride(value.shape),
                    False, collections.OrderedDict())
            return NotImplemented

        def persistent_id(self, value):
            if isinstance(value, _StorageRef):
                ref = value.ref
                return ("storage", getattr(torch, STORAGE_TYPE_NAMES[ref.dtype]), ref.key, "cpu", ref.numel)
            return None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


class StreamingTorchWriter:
    """Append tensors to a torch zip file, then pickle the object that refers to them."""

    def __init__(self, path):
        # torch's zip writer accepts a file object: it then hands every byte it writes,
        # CRC-32s computed, to our unbuffered file.
        self._writes = OrderedWriteThread(DirectWriteFile(path))
        self._opener = serialization._open_zipfile_writer(self._writes.out)
        self._zip = self._opener.__enter__()
        self._next_key = 0
        self._closed = False

    def add_tensor(self, tensor: torch.Tensor) -> TensorRef:
        """Write one tensor's bytes now; return the reference to place in the object."""
        if tensor.dtype not in STORAGE_TYPE_NAMES:
            raise TypeError(f"unsupported dtype {tensor.dtype}")
        tensor = tensor.detach().cpu().contiguous()
        key = str(self._next_key)
        self._next_key += 1
        num_bytes = tensor.numel() * tensor.element_size()
        start = tensor.storage_offset() * tensor.element_size()
        # A slice of the storage shares its memory: a view into a larger tensor (a TP
        # piece) is written without a copy. On the write thread, which keeps it alive.
        storage = tensor.untyped_storage()[start: start + num_bytes]
        self._writes.submit(lambda: self._zip.write_record(f"data/{key}", storage, num_bytes), num_bytes)
        return TensorRef(key, tensor.dtype, tensor.shape)

    def finish(self, obj) -> None:
        """Pickle ``obj`` (TensorRefs and plain tensors inside it allowed) and close.

        The file declares ``.format_version`` 1, as ``torch.save``'s do, so a meta-device
        load computes each record's offset from the one before instead of reading its
        header (:mod:`ckptkit.torch_offsets`): the pickle must meet the records in the
        order they lie in the file. Keys count up in :meth:`add_tensor` order, so ``obj``
        refers to its TensorRefs in the order they were added, and any plain tensor in it
        (added when the pickle meets it, so with a later key) after all of them.
        """
        data = pickle_with_refs(obj, add_tensor=self.add_tensor)
        self._writes.drain()
        self._zip.write_record("data.pkl", data, len(data))
        self._zip.write_record(".format_version", "1", 1)
        alignment = str(serialization._get_storage_alignment())
        self._zip.write_record(".storage_alignment", alignment, len(alignment))
        self._zip.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        self.close(complete=True)

    def close(self, complete: bool = False):
        """Close the file; ``complete`` (from :meth:`finish`) also waits until it is on disk."""
        if not self._closed:
            self._closed = True
            try:
                self._writes.drain()
            finally:
                try:
                    self._opener.__exit__(None, None, None)
                finally:
                    self._writes.close(durable=complete)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
