"""What a checkpoint is: layout, family, parallel sizes, iteration, dtype, and how each tensor is cut."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

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
            rule = rule_for(spec, canonical.rule, meta.padded_vocab_size)
            stored = rule.full_shape(canonical.shape)  # the vocabulary with its padding rows
            tensors.append(TensorInfo(canonical.name, tuple(stored), canonical.rule,
                                      tuple(rule.shard_shape(canonical.shape, meta.tp))))
        count = sum(math.prod(canonical.shape) for canonical in canonical_tensors(spec))
        architecture = BRIDGES[spec.family].architecture if spec.family in BRIDGES else None
        return InspectResult(str(path), meta.summary(), spec.family, architecture, spec.to_dict(), count, tensors)
