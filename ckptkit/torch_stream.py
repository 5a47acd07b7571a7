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

import torch
import torch.serialization as serialization

from .streaming_io import DirectWriteFile, OrderedWriteThread

_STORAGE_TYPE_NAMES = {
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
        if tensor.dtype not in _STORAGE_TYPE_NAMES:
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
        """Pickle ``obj`` (TensorRefs and plain tensors inside it allowed) and close."""
        writer = self

        class Pickler(pickle.Pickler):
            def reducer_override(self, value):
                if isinstance(value, torch.Tensor) and type(value) is torch.Tensor:
                    value = writer.add_tensor(value)
                if isinstance(value, TensorRef):
                    return torch._utils._rebuild_tensor_v2, (
                        _StorageRef(value), 0, value.shape, _contiguous_stride(value.shape),
                        False, collections.OrderedDict())
                return NotImplemented

            def persistent_id(self, value):
                if isinstance(value, _StorageRef):
                    ref = value.ref
                    return ("storage", getattr(torch, _STORAGE_TYPE_NAMES[ref.dtype]), ref.key, "cpu", ref.numel)
                return None

        buffer = io.BytesIO()
        Pickler(buffer, protocol=2).dump(obj)
        self._writes.drain()
        data = buffer.getvalue()
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
