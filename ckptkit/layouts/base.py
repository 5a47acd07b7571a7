"""The small interfaces every storage layout implements.

A layout entry knows how to ``detect`` itself on disk and ``open`` a
:class:`CheckpointReader`; a layout that can be written has a :class:`CheckpointWriter`:
``plan(reader)`` once from metadata, ``write`` of some or all of the plan's data files,
``finish`` once they are all there, ``check`` of what was written against the plan.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InternalError
from ..plan import Plan
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
    etp: int = 1  # expert tensor-parallel size (Megatron's default: TP)
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
            "tp": self.tp, "pp": self.pp, "vpp": self.vpp, "ep": self.ep, "etp": self.etp,
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

    def fetch(self, name: str):
        """The file reads of :meth:`tensor`: what :meth:`assemble` makes ``name`` from.

        A conversion (:mod:`ckptkit.pipeline`) fetches on one thread, in order, and
        assembles on a pool of threads; a reader whose tensors need CPU work after the
        reads (transposes, regrouping) splits :meth:`tensor` into the two. By default
        everything happens here.
        """
        return self.tensor(name)

    def assemble(self, name: str, fetched) -> torch.Tensor:
        """``name`` from what :meth:`fetch` returned, without touching the files or the
        reader's state (it runs on any thread)."""
        return fetched

    # Whether validate(compare_copies=False) leaves the comparison of the copies a checkpoint
    # keeps of some tensors to compare_copies(), which may run while tensors are fetched
    compares_copies_apart = False

    def validate(self) -> list[str]:
        """Check the files before anything is written; return warnings, raise BadInput."""
        return []

    def compare_copies(self) -> list[str]:
        """With :attr:`compares_copies_apart`: compare the copies that should be identical
        (what ``validate(compare_copies=False)`` left out); it reads tensor data and may run
        on its own thread while a conversion fetches tensors. Returns notes, raises BadInput
        in strict mode."""
        return []

    def warn(self, message: str) -> None:
        warnings.warn(message, stacklevel=3)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class CheckpointWriter:
    """Writes a reader's model in one layout. Writers are small picklable dataclasses, so
    worker processes get the same writer and make the same plan from the same source."""

    def plan(self, reader: CheckpointReader) -> Plan:
        """Every file to write, from metadata only; refuses what cannot be written."""
        raise NotImplementedError

    def write(self, reader: CheckpointReader, plan: Plan, out: Path, files: list[str] | None = None,
              progress=None) -> list[str]:
        """Write the plan's data files (``files``: only these) into ``out``; returns their paths."""
        raise NotImplementedError

    def finish(self, reader: CheckpointReader, plan: Plan, out: Path) -> list[str]:
        """Write what comes once every data file is written (index, config, tracker)."""
        return []

    def check(self, plan: Plan, out: Path, label: Path) -> None:
        """Re-open what was written (headers and pickles, no tensor data) and compare it with
        the plan; any difference is ckptkit's bug (:class:`InternalError`), named at ``label``."""


def compare_with_plan(where: Path, found: dict, planned: dict) -> None:
    """``found`` and ``planned`` map tensor names to (dtype, shape); any difference is our bug."""
    for name in planned:
        if name not in found:
            raise InternalError(f"{where}: tensor {name} is missing from the written file")
        if found[name] != planned[name]:
            raise InternalError(f"{where}: tensor {name} was written as {found[name]}; planned {planned[name]}")
    for name in found:
        if name not in planned:
            raise InternalError(f"{where}: tensor {name} was written but not planned")
