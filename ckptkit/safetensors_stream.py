"""Write a ``.safetensors`` file one tensor at a time.

``safetensors.torch.save_file`` needs every tensor of the file in memory at once; a
5 GB shard would then cost 5 GB of RAM. The format is a little-endian u64 header
length, a JSON header giving each tensor's dtype, shape and byte range, and the raw
bytes. Everything in the header is known from the plan before any tensor exists,
so we write the header first and stream the bytes after it. The result is byte for
byte what ``save_file`` writes for the same tensors (tested), and reads back with
``safe_open``.

>>> with StreamingSafetensorsWriter(path, {"b": (torch.float32, (2,)), "a": (torch.bfloat16, (3,))}) as out:
...     for name in out.order:          # the order the file stores them in
...         out.write(name, tensors[name])
"""
from __future__ import annotations

import json
import struct

import torch

from .streaming_io import DirectWriteFile, OrderedWriteThread, byte_view

# safetensors' Dtype enum order; files store tensors by descending dtype, then by name.
_DTYPE_CODES = [
    (torch.bool, "BOOL"), (torch.uint8, "U8"), (torch.int8, "I8"), (torch.float8_e5m2, "F8_E5M2"),
    (torch.float8_e4m3fn, "F8_E4M3"), (torch.int16, "I16"), (torch.float16, "F16"),
    (torch.bfloat16, "BF16"), (torch.int32, "I32"), (torch.float32, "F32"), (torch.float64, "F64"),
    (torch.int64, "I64"),
]
DTYPE_NAMES = {dtype: code for dtype, code in _DTYPE_CODES}
_DTYPE_RANK = {dtype: rank for rank, (dtype, _) in enumerate(_DTYPE_CODES)}


def storage_order(entries: dict) -> list[str]:
    """Names in the order safetensors stores them: dtype descending, then name."""
    return sorted(entries, key=lambda name: (-_DTYPE_RANK[entries[name][0]], name))


class StreamingSafetensorsWriter:
    """Header from the planned ``{name: (dtype, shape)}``, then tensors in ``order``."""

    def __init__(self, path, entries: dict, metadata: dict | None = None):
        self.path = path
        self.entries = {name: (dtype, tuple(shape)) for name, (dtype, shape) in entries.items()}
        self.order = storage_order(self.entries)
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for name in self.order:
            dtype, shape = self.entries[name]
            size = torch.empty((), dtype=dtype).element_size()
            for dimension in shape:
                size *= dimension
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._writes = OrderedWriteThread(DirectWriteFile(path))
        self._writes.out.write(struct.pack("<Q", len(encoded)) + encoded)
        self._next = 0
        self._closed = False

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.order[self._next]
        if name != expected:
            raise ValueError(f"{self.path}: tensor {name} written out of order (expected {expected})")
        dtype, shape = self.entries[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: {name} is {tensor.dtype} {tuple(tensor.shape)}; "
                             f"planned {dtype} {shape}")
        data = tensor.detach().cpu().contiguous()
        # On the write thread: the caller reads and reshapes the next tensor meanwhile.
        self._writes.submit(lambda: self._writes.out.write(byte_view(data)), data.numel() * data.element_size())
        self._next += 1

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            complete = self._next == len(self.order)
            try:
                self._writes.drain()
            finally:
                self._writes.close(durable=complete)
            if not complete:
                raise ValueError(f"{self.path}: closed after {self._next} of {len(self.order)} tensors")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *rest):
        if exc_type is None:
            self.close()
        elif not self._closed:
            self._closed = True
            self._writes.close(durable=False)
