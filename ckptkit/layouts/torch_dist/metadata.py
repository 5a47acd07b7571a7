"""Unpickling what a ``torch_dist`` checkpoint pickles, without running code from it.

``.metadata`` is unpickled with an allow-list of torch.distributed.checkpoint's own
record types; bytes entries (the common state, ShardedObjects) with
:mod:`ckptkit.safe_load`'s allow-list. ``trust_remote_pickle`` turns both off, with a
warning.
"""
from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import Metadata

from ... import safe_load
from ...errors import BadInput
from ..torch_dist_folders import DCP_METADATA


_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    # StorageMeta.checkpoint_id is a path object when the writer was given one
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles ``.metadata`` allowing only torch.distributed.checkpoint's own record types.

    ``FileSystemReader.read_metadata`` uses plain ``pickle.load``, which would run whatever
    a hostile ``.metadata`` names. Megatron's own ``MCoreMetadata`` (mcore 0.15, a subclass
    of ``Metadata``) loads as ``Metadata``; other ``megatron.*`` records as inert stand-ins.
    """

    def __init__(self, file, where: Path):
        super().__init__(file)
        self.where = where

    def find_class(self, module, name):
        if (module, name) in _METADATA_CLASSES or \
                (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        if (module, name) == ("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"):
            return Metadata
        if module.startswith("megatron."):
            return safe_load._stand_in_for(f"{module}.{name}")
        raise BadInput(f"{self.where}: refuses to unpickle disallowed global '{module}.{name}' "
                       "(it could run code; pass --trust-remote-pickle only for files you trust)")


def read_dcp_metadata(folder: Path, *, trust_remote_pickle: bool = False) -> Metadata:
    """The torch.distributed.checkpoint ``Metadata`` of ``folder``, unpickled with an allow-list."""
    path = folder / DCP_METADATA
    if not path.is_file():
        raise BadInput(f"{path}: file not found (every torch_dist checkpoint has one)")
    if trust_remote_pickle:
        warnings.warn(f"{path}: loading with full unpickling (--trust-remote-pickle): "
                      "code inside this file can run", stacklevel=2)
    try:
        with open(path, "rb") as opened:
            metadata = pickle.load(opened) if trust_remote_pickle else _MetadataUnpickler(opened, path).load()
    except BadInput:
        raise
    except Exception as error:  # truncated or foreign pickles raise many kinds of errors
        raise BadInput(f"{path}: cannot read torch.distributed.checkpoint metadata "
                       f"({safe_load._first_line(error)})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise BadInput(f"{path}: expected torch.distributed.checkpoint Metadata, found {type(metadata).__name__}")
    return metadata


def load_pickled_bytes(data: bytes, where: str, *, trust_remote_pickle: bool = False):
    """``torch.load`` bytes from a ShardedObject with :mod:`ckptkit.safe_load`'s allow-list:
    harmless standard types, Megatron's enums as inert stand-ins, anything else refused."""
    if trust_remote_pickle:
        warnings.warn(f"{where}: loading with full unpickling (--trust-remote-pickle): "
                      "code inside this entry can run", stacklevel=2)
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    try:
        unknown = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
    except Exception as error:
        raise BadInput(f"{where}: not a readable torch.save payload ({safe_load._first_line(error)})") from None
    harmless = {safe_load._dotted(entry) for entry in safe_load.HARMLESS_GLOBALS}
    refused = [name for name in unknown if name not in harmless and not name.startswith("megatron.")]
    if refused:
        raise BadInput(f"{where}: refuses to unpickle disallowed global {refused[0]!r} "
                       "(it could run code; pass --trust-remote-pickle only for files you trust)")
    stand_ins = [(safe_load._stand_in_for(name), name) for name in unknown if name.startswith("megatron.")]
    try:
        with torch.serialization.safe_globals(safe_load.HARMLESS_GLOBALS + stand_ins):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:
        raise BadInput(f"{where}: cannot load ({safe_load._first_line(error)})") from None
