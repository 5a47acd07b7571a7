"""The :class:`CheckpointWriter` of Megatron's ``torch_dist`` format.

Kept apart from :mod:`ckptkit.layouts.torch_dist` so that making a plan (``--dry-run``)
or choosing the writer does not import ``torch.distributed.checkpoint`` (0.6-0.9 s).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BadInput, InternalError, Unsupported
from ..plan import Plan, PlannedFile
from ..spec import ModelSpec, canonical_tensors, check_parallel_sizes, rule_for
from .base import CheckpointReader, compare_with_plan
from .megatron_common import MegatronWriter, TargetLayout, check_tracker
from .torch_dist_folders import CONFIG_FILE, DCP_METADATA, NAME
from .tracker import TRACKER


@dataclass
class _DistPlan:
    spec: ModelSpec
    target: TargetLayout


@dataclass(frozen=True)
class TorchDistWriter(MegatronWriter):
    """A ``torch_dist`` checkpoint at ``target``'s sizes, saved by one process (the data
    files are named by the saver as it goes, so the plan is one entry for the folder)."""

    def plan(self, reader: CheckpointReader) -> Plan:
        spec, target = reader.spec, self.target_for(reader)
        if target.naming == "legacy":
            raise Unsupported("torch_dist output needs Megatron-Core names: choose naming mcore-local or mcore-te")
        check_parallel_sizes(spec, target.tp, target.pp, target.vpp, target.ep, target.etp)
        padded = target.padded_vocab(spec)
        element = torch.empty((), dtype=target.dtype).element_size()
        tensors = canonical_tensors(spec)
        size = sum(math.prod(rule_for(spec, tensor.rule, padded).full_shape(tensor.shape)) * element
                   for tensor in tensors)
        folder = target.folder_name
        data = PlannedFile(f"{folder}/*.distcp", size, tuple(tensor.name for tensor in tensors))
        return Plan(target.summary(NAME), [data], [f"{folder}/{DCP_METADATA}", f"{folder}/{CONFIG_FILE}", TRACKER],
                    splittable=False, reads=len(tensors), detail=_DistPlan(spec, target))

    def write(self, reader, plan, out, files=None, progress=None) -> list[str]:
        from . import torch_dist

        return torch_dist.write(reader, Path(out), plan.detail.target, progress=progress, finish=False)

    def check(self, plan, out, label, *, other_keys: tuple[str, ...] = ()) -> None:
        """The tracker, the data files the metadata names, and every tensor's key, dtype and
        global shape (from ``.metadata``) against the plan; keys starting with ``other_keys``
        belong to another part of the save (optimizer state) and are left to its check."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        from . import torch_dist

        spec, target = plan.detail.spec, plan.detail.target
        out, label = Path(out), Path(label)
        check_tracker(out, target, label)
        folder = out / target.folder_name
        where = label / target.folder_name
        try:
            metadata = torch_dist.read_dcp_metadata(folder)
            torch_dist.TorchDistReader._check_data_files(folder, metadata)
        except BadInput as error:
            raise InternalError(f"{where}: written checkpoint does not read back ({error})") from None
        items, _ = torch_dist.plan_items(spec, target.tp, target.padded_vocab(spec), target.dtype, etp=target.etp,
                                         naming=target.naming)
        planned = {item.index.fqn: (item.tensor_data.properties.dtype, tuple(item.tensor_data.size)) for item in items}
        stored = metadata.state_dict_metadata
        found = {key: (entry.properties.dtype, tuple(entry.size)) for key, entry in stored.items()
                 if isinstance(entry, TensorStorageMetadata) and not key.startswith(other_keys)}
        compare_with_plan(where / DCP_METADATA, found, planned)
        if torch_dist.COMMON_STATE_KEY not in stored or not (folder / CONFIG_FILE).is_file():
            raise InternalError(f"{where}: common state or {CONFIG_FILE} was not written")
