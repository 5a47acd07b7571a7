"""Megatron's ``latest_checkpointed_iteration.txt``: which iteration folder is the checkpoint.

``DIR/latest_checkpointed_iteration.txt`` holds ``10`` -> ``DIR/iter_0000010/``, or
``release`` -> ``DIR/release/``. Shared by the per-rank and torch_dist layouts.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import BadInput

TRACKER = "latest_checkpointed_iteration.txt"


def iteration_dir_name(iteration: int | None, release: bool = False) -> str:
    return "release" if release or iteration is None else f"iter_{iteration:07d}"


def follow_tracker(root: Path) -> tuple[Path, int | None, bool] | None:
    """``(iteration folder, iteration, is_release)`` named by the tracker, or None without one."""
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    try:
        text = tracker.read_text().strip()
    except (UnicodeDecodeError, OSError) as error:
        raise BadInput(f"{tracker}: unreadable ({type(error).__name__}); expected an iteration number or 'release'") from None
    if text == "release":
        folder, iteration, release = Path(root) / "release", None, True
    elif text.isdigit():
        iteration, release = int(text), False
        folder = Path(root) / iteration_dir_name(iteration)
    else:
        raise BadInput(f"{tracker}: expected an iteration number or 'release', found {text[:40]!r}")
    if not folder.is_dir():
        raise BadInput(f"{tracker}: names {text!r} but {folder} does not exist")
    return folder, iteration, release
