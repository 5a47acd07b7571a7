"""A ``torch.save`` file whose large tensors are filled a piece at a time.

``distrib_optim.pt`` holds flat tensors as large as a rank's whole share of the model
(three of them per buffer), too large to build in memory. Their sizes are known before
any value is, so this writer lays the zip out up front: each tensor's record gets its
local header and a reserved, 64-byte aligned data region (as torch's own writer aligns
them). Values are then appended to each record in order, from any number of records at
once (``pwrite`` at each record's cursor, its CRC-32 kept running); :meth:`finish`
patches the CRCs into the headers, then writes the pickle that ties the records
together, the small records torch writes, and the central directory (ZIP64 where sizes
or offsets need it). ``torch.load`` (``mmap=True``, ``weights_only=True`` too) reads the
result like any other file.

>>> with PresizedTorchFile(path, "distrib_optim", {"0": (torch.float32, 70)}) as out:
...     out.append("0", torch.zeros(64)); out.append("0", torch.ones(6))
...     out.finish({"param": out.ref("0")})
"""
from __future__ import annotations

import os
import struct
import sys
import zlib

import torch

from ..errors import InternalError
from ..streaming_io import byte_view
from ..torch_stream import STORAGE_TYPE_NAMES, TensorRef, pickle_with_refs

ALIGNMENT = 64  # torch.serialization._get_storage_alignment()
ZIP64_LIMIT = 0xFFFFFFFF  # sizes and offsets at or past this need ZIP64 fields
_UTF8_NAMES = 0x0800
_PADDING_FIELD = 0x4246  # "FB": the extra field torch pads local headers with


class _Record:
    def __init__(self, name: str, header_offset: int, data_offset: int, size: int, zip64: bool):
        self.name, self.header_offset, self.data_offset, self.size = name, header_offset, data_offset, size
        self.zip64 = zip64
        self.written = 0
        self.crc = 0


def _local_header(name: bytes, size: int, crc: int, zip64: bool, header_offset: int) -> bytes:
    """A local file header (stored, no data descriptor), padded so the data is aligned."""
    extra = struct.pack("<HHQQ", 0x0001, 16, size, size) if zip64 else b""
    fixed = 30 + len(name) + len(extra)
    padding = -(header_offset + fixed + 4) % ALIGNMENT
    extra += struct.pack("<HH", _PADDING_FIELD, padding) + b"Z" * padding
    stored_size = 0xFFFFFFFF if zip64 else size
    return struct.pack("<IHHHHHIIIHH", 0x04034B50, 45 if zip64 else 20, _UTF8_NAMES, 0, 0, 0x21, crc,
                       stored_size, stored_size, len(name), len(extra)) + name + extra


def _central_header(record: _Record) -> bytes:
    name = record.name.encode()
    big_size = record.size >= ZIP64_LIMIT or record.zip64
    big_offset = record.header_offset >= ZIP64_LIMIT
    fields = b""
    if big_size:
        fields += struct.pack("<QQ", record.size, record.size)
    if big_offset:
        fields += struct.pack("<Q", record.header_offset)
    extra = struct.pack("<HH", 0x0001, len(fields)) + fields if fields else b""
    return struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45 if extra else 20, _UTF8_NAMES, 0, 0, 0x21,
                       record.crc, 0xFFFFFFFF if big_size else record.size, 0xFFFFFFFF if big_size else record.size,
                       len(name), len(extra), 0, 0, 0, 0,
                       0xFFFFFFFF if big_offset else record.header_offset) + name + extra


class PresizedTorchFile:
    """Write ``path`` as a torch zip (archive folder ``archive``) holding the 1-D tensors
    ``tensors``: record key -> (dtype, numel), each filled by :meth:`append` in order."""

    def __init__(self, path, archive: str, tensors: dict[str, tuple[torch.dtype, int]]):
        self.path, self.archive = path, archive
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._records: dict[str, _Record] = {}
        self._refs: dict[str, TensorRef] = {}
        self._small: list[_Record] = []
        self._finished = False
        offset = 0
        try:
            for key, (dtype, numel) in tensors.items():
                if dtype not in STORAGE_TYPE_NAMES:
                    raise InternalError(f"{path}: no storage type for {dtype}")
                size = numel * torch.empty((), dtype=dtype).element_size()
                name = f"{archive}/data/{key}"
                zip64 = size >= ZIP64_LIMIT
                header = _local_header(name.encode(), size, 0, zip64, offset)
                self._write_at(header, offset)
                record = _Record(name, offset, offset + len(header), size, zip64)
                self._records[key] = record
                self._refs[key] = TensorRef(key, dtype, (numel,))
                offset = record.data_offset + size
            self._end = offset
        except BaseException:
            self.close()
            raise

    def ref(self, key: str) -> TensorRef:
        """The tensor record ``key``, to place in the object :meth:`finish` pickles."""
        return self._refs[key]

    def append(self, key: str, values: torch.Tensor) -> None:
        """Append ``values`` (any shape; its dtype must be the record's) to record ``key``."""
        record, ref = self._records[key], self._refs[key]
        if values.dtype != ref.dtype:
            raise InternalError(f"{self.path}: record {key} holds {ref.dtype}, got {values.dtype}")
        view = byte_view(values.detach().contiguous())
        if record.written + len(view) > record.size:
            raise InternalError(f"{self.path}: record {key} overflows its {record.size} bytes")
        self._write_at(view, record.data_offset + record.written)
        record.crc = zlib.crc32(view, record.crc)
        record.written += len(view)

    def append_zeros(self, key: str, count: int) -> None:
        """Append ``count`` zero elements to record ``key``."""
        if count:
            self.append(key, torch.zeros(count, dtype=self._refs[key].dtype))

    def _write_at(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written

    def _add_small(self, name: str, data: bytes) -> None:
        header = _local_header(name.encode(), len(data), zlib.crc32(data), False, self._end)
        record = _Record(name, self._end, self._end + len(header), len(data), False)
        record.crc = zlib.crc32(data)
        self._write_at(header + data, self._end)
        self._end = record.data_offset + len(data)
        self._small.append(record)

    def finish(self, obj) -> None:
        """Check every record is full, pickle ``obj`` (with :meth:`ref` placeholders), close."""
        for key, record in self._records.items():
            if record.written != record.size:
                raise InternalError(f"{self.path}: record {key} got {record.written} of {record.size} bytes")
            header = _local_header(record.name.encode(), record.size, record.crc, record.zip64, record.header_offset)
            self._write_at(header, record.header_offset)
        self._add_small(f"{self.archive}/data.pkl", pickle_with_refs(obj))
        # No ".format_version": with it, torch >= 2.5 computes where each record's data starts
        # from miniz's own way of writing (records in key order, each followed by a data
        # descriptor) instead of reading the local headers, and this file is written otherwise.
        for name, data in ((".storage_alignment", str(ALIGNMENT).encode()), ("byteorder", sys.byteorder.encode()),
                           ("version", b"3\n")):
            self._add_small(f"{self.archive}/{name}", data)
        records = list(self._records.values()) + self._small
        directory = b"".join(_central_header(record) for record in records)
        start, count = self._end, len(records)
        tail = directory
        if start >= ZIP64_LIMIT or start + len(directory) >= ZIP64_LIMIT or count >= 0xFFFF:
            end64 = start + len(directory)
            tail += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, len(directory), start)
            tail += struct.pack("<IIQI", 0x07064B50, 0, end64, 1)
            tail += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
        else:
            tail += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(directory), start, 0)
        self._write_at(tail, start)
        os.fsync(self._fd)
        self._finished = True
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
