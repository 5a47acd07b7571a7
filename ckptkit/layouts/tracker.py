"""Megatron's ``latest_checkpointed_iteration.txt``: which iteration folder is the checkpoint.

``DIR/latest_checkpointed_iteration.txt`` holds ``10`` -> ``DIR/iter_0000010/``, or
``release`` -> ``DIR/release/``. Shared by the per-rank and torch_dist layouts.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

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


def locate_iteration_folder(root: Path, is_iteration_folder: Callable[[Path], bool], *, tracked_mismatch: str,
                            not_found: str, unwrap_single_child: bool = False) -> tuple[Path, int | None, bool]:
    """``(iteration folder, iteration, is_release)`` for a checkpoint root or iteration folder.

    ``root`` itself if it is an iteration folder; else the one its tracker names; else its
    only child that is one (or, with ``unwrap_single_child``, whatever its only child
    folder holds: archives usually wrap a checkpoint in one top-level folder).
    ``tracked_mismatch`` and ``not_found`` end the errors for a tracker that names a
    folder of the wrong kind and for a root holding no single iteration folder.
    """
    def again(folder: Path):
        return locate_iteration_folder(folder, is_iteration_folder, tracked_mismatch=tracked_mismatch,
                                       not_found=not_found, unwrap_single_child=unwrap_single_child)

    root = Path(root)
    if is_iteration_folder(root):
        match = re.match(r"^iter_(\d+)$", root.name)
        return root, (int(match.group(1)) if match else None), root.name == "release"
    followed = follow_tracker(root)
    if followed is not None:
        if not is_iteration_folder(followed[0]):
            raise BadInput(f"{followed[0]}: {tracked_mismatch}")
        return followed
    children = sorted(root.iterdir()) if root.is_dir() else []
    candidates = [child for child in children if is_iteration_folder(child)]
    if len(candidates) == 1:
        return again(candidates[0])
    if unwrap_single_child and len(children) == 1 and children[0].is_dir():
        return again(children[0])
    raise BadInput(f"{root}: {not_found}")
