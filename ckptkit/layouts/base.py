"""The small interface every storage layout implements.

A layout entry knows how to ``detect`` itself on disk and ``open`` a
:class:`CheckpointReader`; layouts that can be written also provide a
``plan_output``/``write`` pair used by :mod:`ckptkit.convert`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..spec import CanonicalTensor, ModelSpec, canonical_tensors


@dataclass
class CheckpointMeta:
    """What a checkpoint says about itself, besides the architecture."""

    layout: str  # registry name: "megatron-legacy", "torch_dist", "hf-safetensors", "hf-bin"
    path: Path
    dtype: torch.dtype
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    ep: int = 1
    iteration: int | None = None
    release: bool = False
    checkpoint_version: float | None = None
    naming: str | None = None
    padded_vocab_size: int | None = None
    make_vocab_size_divisible_by: int | None = None
    args: object | None = None  # argparse.Namespace for Megatron sources
    hf_config: dict | None = None
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "layout": self.layout, "path": str(self.path), "dtype": str(self.dtype).removeprefix("torch."),
            "tp": self.tp, "pp": self.pp, "vpp": self.vpp, "ep": self.ep,
            "iteration": self.iteration, "release": self.release,
            "checkpoint_version": self.checkpoint_version, "naming": self.naming,
            "padded_vocab_size": self.padded_vocab_size, "files": len(self.files),
        }


class CheckpointReader:
    """Canonical tensors of one checkpoint, read lazily one at a time."""

    spec: ModelSpec
    meta: CheckpointMeta
    strict: bool = False

    def canonical(self) -> list[CanonicalTensor]:
        return canonical_tensors(self.spec)

    def tensor(self, name: str) -> torch.Tensor:
        """The full canonical tensor ``name`` (vocab tensors may keep padding rows)."""
        raise NotImplementedError

    def validate(self) -> list[str]:
        """Check the files before anything is written; return warnings, raise BadInput."""
        return []

    def warn(self, message: str) -> None:
        warnings.warn(message, stacklevel=3)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
