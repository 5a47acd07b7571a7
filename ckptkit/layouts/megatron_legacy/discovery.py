"""Finding Megatron per-rank files: the iteration folder, its rank folders, a ``.zip`` of them.

``mp_rank_TT`` with PP=1, ``mp_rank_TT_PPP`` otherwise, and ``_EEE`` after either with
expert parallelism (megatron/training/checkpointing.py, ``get_checkpoint_name``); each
holds ``model_optim_rng.pt``. Layout and reader are detected from the folders alone (no
file is opened); which sizes the names mean (``mp_rank_00_001`` is PP stage 1, or EP rank
1 with PP=1) comes from the args.

>>> rank_dir_name(1, 0, pp_size=2)
'mp_rank_01_000'
>>> rank_dir_name(1, 0, pp_size=1, ep_rank=3, ep_size=4)
'mp_rank_01_003'
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

from ...errors import BadInput
from ..tracker import TRACKER, locate_iteration_folder

NAME = "megatron-legacy"
RANK_FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


def rank_dir_name(tp_rank: int, pp_stage: int, pp_size: int, ep_rank: int = 0, ep_size: int = 1) -> str:
    """``mp_rank_TT`` with PP=1, ``mp_rank_TT_PPP`` otherwise, then ``_EEE`` with EP > 1
    (Megatron's spelling)."""
    name = f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_stage:03d}"
    return name if ep_size == 1 else f"{name}_{ep_rank:03d}"


def _has_rank_dirs(path: Path) -> bool:
    return path.is_dir() and any(_RANK_DIR.match(child.name) for child in path.iterdir())


def locate_iteration_dir(root: Path) -> tuple[Path, int | None, bool]:
    """``(iteration folder, iteration, is_release)`` for a checkpoint root or iteration folder."""
    return locate_iteration_folder(
        root, _has_rank_dirs, tracked_mismatch="no mp_rank_* folders", unwrap_single_child=True,
        not_found=f"not a Megatron checkpoint ({TRACKER} missing and no single iter_* folder)")


def detect(path: Path) -> bool:
    path = Path(path)
    if path.suffix == ".zip" and path.is_file():
        return True
    if not path.is_dir():
        return False
    if _has_rank_dirs(path):
        return any((child / RANK_FILE).exists() for child in path.iterdir() if _RANK_DIR.match(child.name))
    tracker = path / TRACKER
    if tracker.is_file():
        try:
            folder, _, _ = locate_iteration_dir(path)
        except BadInput:
            return not any(path.glob("iter_*/.metadata"))
        return any((child / RANK_FILE).exists() for child in folder.iterdir())
    return False


def _extract_zip(archive: Path) -> Path:
    """Unpack an NGC-style ``.zip`` into a private temporary folder (refusing unsafe paths)."""
    target = Path(tempfile.mkdtemp(prefix="ckptkit-zip-"))
    try:
        with zipfile.ZipFile(archive) as opened:
            for member in opened.namelist():
                resolved = (target / member).resolve()
                if not str(resolved).startswith(str(target.resolve()) + os.sep) and resolved != target.resolve():
                    raise BadInput(f"{archive}: member {member!r} would unpack outside the folder")
            opened.extractall(target)
    except zipfile.BadZipFile as error:
        shutil.rmtree(target, ignore_errors=True)
        raise BadInput(f"{archive}: not a readable zip ({error})") from None
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return target


def scan_ranks(folder: Path) -> dict:
    """The ``mp_rank_*`` folders of an iteration folder, by name."""
    ranks = {}
    for child in folder.iterdir():
        match = _RANK_DIR.match(child.name)
        if match and child.is_dir():
            ranks[child.name] = match
    if not ranks:
        raise BadInput(f"{folder}: no mp_rank_* folders")
    return ranks

def check_rank_set(folder: Path, ranks: dict, tp: int, pp: int, ep: int = 1) -> None:
    """Exactly the rank folders (and files) that TP x PP x EP ranks write."""
    expected = {rank_dir_name(t, p, pp, e, ep) for t in range(tp) for p in range(pp) for e in range(ep)}
    sizes = f"TP={tp}, PP={pp}" + (f", EP={ep}" if ep > 1 else "")
    missing = sorted(expected - set(ranks))
    if missing:
        raise BadInput(f"{folder / missing[0]}: rank folder missing (args say {sizes})")
    extra = sorted(set(ranks) - expected)
    if extra:
        raise BadInput(f"{folder / extra[0]}: unexpected rank folder for {sizes} (args)")
    for name in sorted(expected):
        path = folder / name / RANK_FILE
        if not path.is_file():
            raise BadInput(f"{path}: rank file missing")
