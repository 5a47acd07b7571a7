"""Recognising a Megatron-Core ``torch_dist`` checkpoint from its folders alone.

Kept apart from :mod:`ckptkit.layouts.torch_dist` because that module needs
``torch.distributed.checkpoint``, whose import costs more than half a second: every
command detects layouts, only ``torch_dist`` sources and targets need the reader.

    checkpoint/                       <- detect() accepts the root ...
      latest_checkpointed_iteration.txt    "1000"
      iter_0001000/                   <- ... or the iteration folder
        metadata.json                 {"sharded_backend": "torch_dist", ...}
        .metadata                     torch.distributed.checkpoint's index
        __0_0.distcp ...
"""
from __future__ import annotations

from pathlib import Path

from ..errors import BadInput
from .tracker import TRACKER, locate_iteration_folder

NAME = "torch_dist"
CONFIG_FILE = "metadata.json"
DCP_METADATA = ".metadata"


def is_dist_folder(folder: Path) -> bool:
    """Holds torch.distributed.checkpoint metadata, or a Megatron ``metadata.json``."""
    if not folder.is_dir():
        return False
    if (folder / DCP_METADATA).is_file():
        return True
    config = folder / CONFIG_FILE
    try:
        return config.is_file() and config.stat().st_size < 4096 and "sharded_backend" in config.read_text()
    except (OSError, UnicodeDecodeError):
        return False


def locate_checkpoint_dir(root: Path) -> tuple[Path, int | None, bool]:
    """``(iteration folder, iteration, is_release)`` for a checkpoint root or iteration folder."""
    return locate_iteration_folder(
        root, is_dist_folder, tracked_mismatch=f"no {CONFIG_FILE} or {DCP_METADATA}: not a torch_dist checkpoint",
        not_found=f"not a torch_dist checkpoint ({TRACKER} missing and no single iteration folder)")


def detect(path: Path) -> bool:
    """A torch_dist iteration folder, or a checkpoint root whose iteration folders are."""
    path = Path(path)
    if not path.is_dir():
        return False
    if is_dist_folder(path):
        return True
    if (path / TRACKER).is_file():
        try:
            locate_checkpoint_dir(path)
            return True
        except BadInput:
            # A broken tracker beside torch_dist folders is still ours: the reader says what is wrong.
            return any(is_dist_folder(child) for child in path.iterdir())
    return sum(is_dist_folder(child) for child in path.iterdir()) == 1
