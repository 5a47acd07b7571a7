"""What a checkpoint is: layout, family, parallel sizes, iteration, dtype, how each tensor is cut,
for a mixture of experts which experts each expert-parallel rank holds, and its optimizer state."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .bridges import BRIDGES
from .layouts import open_checkpoint
from .optimizer.summary import OptimizerSummary, describe_optimizer_state
from .spec import canonical_tensors, rule_for


@dataclass
class TensorInfo:
    name: str
    shape: tuple
    rule: str
    shard_shape: tuple  # what one TP rank holds in this checkpoint's layout (an expert's: one ETP rank)
    ep_rank: int | None = None  # an expert's tensor: the expert-parallel rank holding it


@dataclass
class InspectResult:
    path: str
    layout: dict
    family: str
    architecture: str
    spec: dict
    num_parameters: int
    tensors: list[TensorInfo] = field(default_factory=list)
    # a mixture of experts: the global experts of each expert-parallel rank, [first, last]
    experts_per_ep_rank: list[list[int]] = field(default_factory=list)
    optimizer: OptimizerSummary | None = None  # the optimizer state: kind, sharding, step, DP size, dtypes

    def to_dict(self) -> dict:
        return {"path": self.path, "layout": self.layout, "family": self.family,
                "architecture": self.architecture, "spec": self.spec, "num_parameters": self.num_parameters,
                "experts_per_ep_rank": self.experts_per_ep_rank,
                "optimizer": self.optimizer.to_dict() if self.optimizer else None,
                "tensors": [{"name": t.name, "shape": list(t.shape), "rule": t.rule,
                             "shard_shape": list(t.shard_shape), "ep_rank": t.ep_rank} for t in self.tensors]}


def inspect_checkpoint(path, **options) -> InspectResult:
    """Describe a checkpoint from its metadata (no tensor data is read).

    >>> info = inspect_checkpoint("checkpoints/gpt2")
    >>> info.layout["tp"], info.family, info.num_parameters
    (2, 'gpt2', 773376)
    >>> info.optimizer.kind
    'fresh-empty'
    """
    with open_checkpoint(path, **options) as reader:
        spec, meta = reader.spec, reader.meta
        per_rank = spec.num_experts // meta.ep if spec.num_experts and spec.num_experts % meta.ep == 0 else 0
        tensors = []
        for canonical in canonical_tensors(spec):
            rule = rule_for(spec, canonical.rule, meta.padded_vocab_size)
            stored = rule.full_shape(canonical.shape)  # the vocabulary with its padding rows
            expert = canonical.expert is not None
            ranks = meta.etp if expert else meta.tp
            tensors.append(TensorInfo(canonical.name, tuple(stored), canonical.rule,
                                      tuple(rule.shard_shape(canonical.shape, ranks)),
                                      canonical.expert // per_rank if expert and per_rank else None))
        count = sum(math.prod(canonical.shape) for canonical in canonical_tensors(spec))
        # a Megatron-only entry (T5) names no Hugging Face class
        architecture = BRIDGES[spec.family].architecture if spec.family in BRIDGES and \
            not BRIDGES[spec.family].no_hf else None
        experts = [[rank * per_rank, (rank + 1) * per_rank - 1] for rank in range(meta.ep)] if per_rank else []
        return InspectResult(str(path), meta.summary(), spec.family, architecture, spec.to_dict(), count, tensors,
                             experts, describe_optimizer_state(reader))
