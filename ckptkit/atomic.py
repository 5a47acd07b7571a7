"""Outputs that appear whole or not at all.

Everything is written into a hidden sibling of the destination
(``.NAME.ckptkit-partial-HOST-PID-XXXX``, same file system, so the final ``rename`` is
atomic). Only a complete output, flushed to disk, is renamed into place; an existing
destination (with ``--overwrite``) is moved aside (``.NAME.ckptkit-previous-HOST-PID``)
first and deleted only after the new one is in place. On any error, Ctrl-C included,
the partial folder is removed and the destination is left as it was.

A process killed outright (SIGKILL, out of memory, power loss) cannot clean up: its
hidden folder stays, and never looks like the destination. The next run into the same
destination on the same machine removes the partial folders of processes that no
longer exist, and puts back a destination that was moved aside but never replaced.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from .errors import BadInput, Unsupported

PARTIAL_MARK = ".ckptkit-partial-"
PREVIOUS_MARK = ".ckptkit-previous-"
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_NEARLY_FULL_BYTES = 1 << 20


def _owner() -> str:
    """``HOST-PID``: which process a hidden folder belongs to (the host as a short hash)."""
    return f"{_HOST}-{os.getpid()}"


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
        raise BadInput(f"{parent}: not writable (permission denied or read-only file system)")


@contextlib.contextmanager
def atomic_directory(destination, overwrite: bool = False):
    """Yield a fresh folder; on success it becomes ``destination``."""
    destination = Path(destination)
    if destination.parent.is_dir():
        with contextlib.suppress(OSError):  # best effort: check_destination reports what matters
            remove_stale_siblings(destination)
    check_destination(destination, overwrite)
    try:
        partial = Path(tempfile.mkdtemp(prefix=f".{destination.name}{PARTIAL_MARK}{_owner()}-",
                                        dir=destination.parent))
    except OSError as error:
        raise BadInput(f"{destination.parent}: cannot create the output there "
                       f"({error.strerror or error})") from None
    try:
        yield partial
        os.chmod(partial, 0o755)
        _sync_tree(partial)
        _replace(partial, destination)
    except OSError as error:
        _remove(partial)
        where = str(error.filename or destination).replace(str(partial), str(destination))
        raise BadInput(f"{where}: {error.strerror or error} while writing the output") from None
    except (BadInput, Unsupported):
        _remove(partial)
        raise
    except Exception as error:
        # Some writers (torch's zip writer) hide the errno of a failed write: say what it was.
        full = _nearly_full(destination.parent)
        _remove(partial)
        if full:
            detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise BadInput(f"{destination}: no space left on device while writing the output "
                           f"({detail.replace(str(partial), str(destination))})") from None
        raise
    except BaseException:
        _remove(partial)
        raise


def _nearly_full(folder: Path) -> bool:
    try:
        stats = os.statvfs(folder)
    except (OSError, AttributeError):
        return False
    return stats.f_bavail * stats.f_frsize < _NEARLY_FULL_BYTES


def _sync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` to disk, so that the rename never
    publishes an output whose contents a crash could still lose."""
    for root, folders, files in os.walk(folder):
        for name in files:
            _fsync(os.path.join(root, name), os.O_RDONLY)
        _fsync(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync(path, flags: int) -> None:
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _replace(partial: Path, destination: Path) -> None:
    if not destination.exists() and not destination.is_symlink():
        os.rename(partial, destination)
    else:
        previous = destination.parent / f".{destination.name}{PREVIOUS_MARK}{_owner()}"
        _remove(previous)
        os.rename(destination, previous)
        try:
            os.rename(partial, destination)
        except BaseException:
            os.rename(previous, destination)
            raise
        _remove(previous)
    with contextlib.suppress(OSError):
        _fsync(destination.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        with contextlib.suppress(OSError):
            path.unlink()
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    if os.name != "posix":
        return True  # cannot tell safely: keep the folder
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def remove_stale_siblings(destination: Path) -> list[str]:
    """Clean up after runs into ``destination`` that were killed outright on this machine.

    Their partial folders are removed; a destination they had moved aside for
    ``--overwrite`` is put back if nothing replaced it (otherwise removed). Folders of
    live processes, and of other machines sharing the file system, are left alone.
    Returns the names handled.
    """
    pattern = re.compile(rf"^\.{re.escape(destination.name)}\.ckptkit-(partial|previous)-"
                         r"([0-9a-f]{8})-(\d+)(?:-|$)")
    stale = []
    for sibling in destination.parent.iterdir():
        match = pattern.match(sibling.name)
        if match and match.group(2) == _HOST and not _process_exists(int(match.group(3))):
            stale.append((match.group(1) != "previous", sibling))
    handled = []
    for is_partial, sibling in sorted(stale):
        if not is_partial and not destination.exists() and not destination.is_symlink():
            try:
                os.rename(sibling, destination)
            except OSError:
                continue  # leave the user's previous output where it is
            handled.append(sibling.name)
            continue
        _remove(sibling)
        handled.append(sibling.name)
    return handled
