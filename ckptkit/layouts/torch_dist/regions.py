"""Reading boxes of stored tensors, and raw bytes entries, through torch.distributed.checkpoint.

A box (one layer of a stacked tensor, or a whole global tensor) is read from the stored
chunks it overlaps into a tensor of the box's shape; bytes entries come back unparsed
(:mod:`.metadata` unpickles them).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from ... import safe_load
from ...errors import BadInput, CkptError
from ..torch_dist_folders import DCP_METADATA


class _DistFiles(FileSystemReader):
    """``FileSystemReader`` whose metadata was read once, with the allow-listed unpickler."""

    def __init__(self, folder: Path, metadata: Metadata):
        super().__init__(folder)
        self.cached_metadata = metadata

    def read_metadata(self, *args, **kwargs) -> Metadata:
        return self.cached_metadata


@dataclasses.dataclass
class _Region:
    """A box of one stored tensor, to be copied into ``target`` (which has the box's shape)."""

    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    target: torch.Tensor


class _RegionLoadPlanner(LoadPlanner):
    """Reads boxes of stored tensors and raw bytes entries, nothing else.

    The default planner reads whole tensors into a state dict and ``torch.load``s bytes
    entries without an allow-list; here a box (one layer of a stacked tensor) is read
    from the stored chunks it overlaps, and bytes entries come back unparsed.
    """

    def __init__(self, regions: list[_Region], byte_keys: list[str]):
        self.regions = {region.key: region for region in regions}
        self.byte_keys = byte_keys
        self.raw_bytes: dict[str, bytes] = {}
        self.elements_read: dict[str, int] = {key: 0 for key in self.regions}

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, region in self.regions.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(region.offsets), sizes=torch.Size(region.sizes))
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
        for key in self.byte_keys:
            index = MetadataIndex(key)
            zero = torch.Size((0,))
            items.append(ReadItem(type=LoadItemType.BYTE_IO, dest_index=index, dest_offsets=zero,
                                  storage_index=index, storage_offsets=zero, lengths=zero))
        return LoadPlan(items)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value):
        self.raw_bytes[read_item.dest_index.fqn] = value.getvalue()

    def resolve_tensor(self, read_item):
        target = self.regions[read_item.dest_index.fqn].target
        for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            target = target.narrow(dim, offset, length)
        return target

    def commit_tensor(self, read_item, tensor):
        self.elements_read[read_item.dest_index.fqn] += math.prod(read_item.lengths)


def _read_regions(files: _DistFiles, regions: list[_Region], byte_keys: list[str] = ()) -> dict[str, bytes]:
    """Fill every region's target from the files; return the raw bytes of ``byte_keys``."""
    planner = _RegionLoadPlanner(regions, list(byte_keys))
    try:
        with warnings.catch_warnings():
            # "torch.distributed is disabled ... assuming single process": intended here.
            warnings.simplefilter("ignore")
            dcp.load({}, storage_reader=files, planner=planner, no_dist=True)
    except (Exception, dcp.CheckpointException) as error:
        inner = _inner_error(error)
        if isinstance(inner, CkptError):
            raise inner from None
        keys = ", ".join([region.key for region in regions] + list(byte_keys))
        raise BadInput(f"{files.path}: cannot read {keys} ({safe_load._first_line(inner)})") from None
    for region in regions:
        if planner.elements_read[region.key] != region.target.numel():
            raise BadInput(f"{files.path}: {region.key}: stored chunks cover "
                           f"{planner.elements_read[region.key]} of the {region.target.numel()} elements "
                           f"at offset {region.offsets} (chunks missing from {DCP_METADATA})")
    return planner.raw_bytes


def _inner_error(error: BaseException) -> BaseException:
    """The exception behind a ``CheckpointException`` (which wraps each rank's failure, with
    its traceback, and derives from BaseException)."""
    failures = getattr(error, "failures", None)
    if isinstance(error, dcp.CheckpointException) and isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        return first[0] if isinstance(first, tuple) else first
    return error
