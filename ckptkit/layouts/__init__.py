"""The registry of storage layouts ckptkit can detect and read.

Each entry: a name, ``detect(path) -> bool`` and ``open(path, **options) -> reader``.
The first entry whose ``detect`` accepts a path wins, so more specific layouts come
first. Writers live beside their readers (``megatron_legacy.write``, ``hf.write``,
``torch_dist.write``) and are picked by :mod:`ckptkit.convert` from the target format.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import BadInput
from . import hf, megatron_legacy, torch_dist_folders
from .base import CheckpointMeta, CheckpointReader


def _open_torch_dist(path, **options) -> CheckpointReader:
    from . import torch_dist  # imports torch.distributed.checkpoint: only for torch_dist sources

    return torch_dist.open_reader(path, **options)


@dataclass(frozen=True)
class LayoutEntry:
    name: str
    detect: Callable[[Path], bool]
    open: Callable[..., CheckpointReader]
    description: str


LAYOUTS: list[LayoutEntry] = [
    LayoutEntry(torch_dist_folders.NAME, torch_dist_folders.detect, _open_torch_dist,
                "Megatron-Core distributed checkpoint (iter_*/metadata.json, .metadata, *.distcp)"),
    LayoutEntry(megatron_legacy.NAME, megatron_legacy.detect, megatron_legacy.open_reader,
                "Megatron-LM per-rank files (iter_*/mp_rank_*/model_optim_rng.pt), or a .zip of them"),
    LayoutEntry("hf-safetensors", hf.detect_safetensors, hf.HfReader,
                "Hugging Face folder: config.json + model*.safetensors (+ index)"),
    LayoutEntry("hf-bin", hf.detect_bin, hf.HfBinReader,
                "Hugging Face folder: config.json + pytorch_model*.bin (+ index)"),
]


def register(entry: LayoutEntry, *, first: bool = True) -> None:
    """Add a layout; ``first`` puts it ahead of the existing ones in detection."""
    LAYOUTS.insert(0 if first else len(LAYOUTS), entry)


def detect_layout(path) -> LayoutEntry:
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no such file or folder")
    for entry in LAYOUTS:
        if entry.detect(path):
            return entry
    raise BadInput(f"{path}: not a checkpoint ckptkit recognises "
                   f"(known layouts: {', '.join(entry.name for entry in LAYOUTS)})")


def open_checkpoint(path, **options) -> CheckpointReader:
    """Open any supported checkpoint and return a reader of canonical tensors.

    >>> with open_checkpoint("checkpoints/gpt2") as reader:
    ...     reader.spec.num_layers, reader.meta.tp, reader.meta.pp
    (6, 2, 2)
    """
    return detect_layout(path).open(path, **options)


__all__ = ["LAYOUTS", "LayoutEntry", "CheckpointMeta", "CheckpointReader", "detect_layout", "open_checkpoint", "register"]
