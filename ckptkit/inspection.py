"""What a checkpoint is: layout, family, parallel sizes, iteration, dtype, and how each tensor is cut."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .bridges import BRIDGES
from .layouts import open_checkpoint
from .spec import canonical_tensors, rule_for


@dataclass
class TensorInfo:
    name: str
    shape: tuple
    rule: str
    shard_shape: tuple  # what one TP rank holds in this checkpoint's layout


@dataclass
class InspectResult:
    path: str
    layout: dict
    family: str
    architecture: str
    spec: dict
    num_parameters: int
    tensors: list[TensorInfo] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"path": self.path, "layout": self.layout, "family": self.family,
                "architecture": self.architecture, "spec": self.spec, "num_parameters": self.num_parameters,
                "tensors": [{"name": t.name, "shape": list(t.shape), "rule": t.rule,
                             "shard_shape": list(t.shard_shape)} for t in self.tensors]}


def inspect_checkpoint(path, **options) -> InspectResult:
    """Describe a checkpoint from its metadata (no tensor data is read).

    >>> info = inspect_checkpoint("checkpoints/gpt2")
    >>> info.layout["tp"], info.family, info.num_parameters
    (2, 'gpt2', 773376)
    """
    with open_checkpoint(path, **options) as reader:
        spec, meta = reader.spec, reader.meta
        tensors = []
        for canonical in canonical_tensors(spec):
            shape = canonical.shape
            if canonical.rule == "vocab" and meta.padded_vocab_size:
                shape = (meta.padded_vocab_size, *shape[1:])
            rule = rule_for(spec, canonical.rule, meta.padded_vocab_size)
            shard = rule.split(torch.empty(shape, device="meta"), meta.tp)[0].shape if meta.tp > 1 else shape
            tensors.append(TensorInfo(canonical.name, tuple(shape), canonical.rule, tuple(shard)))
        count = 0
        for canonical in canonical_tensors(spec):
            size = 1
            for dimension in canonical.shape:
                size *= dimension
            count += size
        return InspectResult(str(path), meta.summary(), spec.family, BRIDGES[spec.family].architecture if spec.family in BRIDGES else None,
                             spec.to_dict(), count, tensors)
