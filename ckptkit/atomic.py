"""Outputs that appear whole or not at all.

Everything is written into a hidden sibling of the destination
(``.NAME.ckptkit-partial-XXXX``, same file system, so the final ``rename`` is atomic).
Only a complete output is renamed into place; an existing destination (with
``--overwrite``) is moved aside first and deleted only after the new one is in place.
On any error, Ctrl-C included, the partial folder is removed and the destination is
left as it was.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import BadInput

PARTIAL_MARK = ".ckptkit-partial-"


def check_destination(destination: Path, overwrite: bool) -> None:
    if destination.exists():
        if destination.is_file():
            raise BadInput(f"{destination}: exists and is a file")
        if any(destination.iterdir()) and not overwrite:
            raise BadInput(f"{destination}: exists and is not empty (pass --overwrite to replace it)")
    parent = destination.parent if str(destination.parent) else Path(".")
    if not parent.exists():
        raise BadInput(f"{parent}: parent folder of the destination does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"{parent}: not writable (permission denied)")


@contextlib.contextmanager
def atomic_directory(destination, overwrite: bool = False):
    """Yield a fresh folder; on success it becomes ``destination``."""
    destination = Path(destination)
    check_destination(destination, overwrite)
    partial = Path(tempfile.mkdtemp(prefix=f".{destination.name}{PARTIAL_MARK}", dir=destination.parent))
    try:
        yield partial
        os.chmod(partial, 0o755)
        _replace(partial, destination)
    except OSError as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise BadInput(f"{error.filename or destination}: {error.strerror or error} while writing the output") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _replace(partial: Path, destination: Path) -> None:
    if not destination.exists():
        os.rename(partial, destination)
        return
    previous = destination.parent / f".{destination.name}.ckptkit-previous"
    if previous.exists():
        shutil.rmtree(previous)
    os.rename(destination, previous)
    try:
        os.rename(partial, destination)
    except BaseException:
        os.rename(previous, destination)
        raise
    shutil.rmtree(previous, ignore_errors=True)
