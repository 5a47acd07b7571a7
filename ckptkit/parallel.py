"""Run a conversion's plan in several processes, on one host or on many.

A conversion's output is a list of files (Megatron rank files, safetensors shards),
each written from the source alone, so they can be written by different processes
without talking to each other. The plan's files are cut into contiguous runs of about
equal size (:func:`partition`), keeping the TP ranks of one pipeline stage, which read
the same source tensors, in the same run where it can.

* ``--workers N`` on one host: N processes, each reopening the source and writing its
  run (:func:`run_parts`).
* Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set; any number of nodes that see the same
  file system): every rank runs the same command, takes run ``RANK`` of ``WORLD_SIZE``
  (times ``--workers`` on each), and rank 0 writes the files that describe the whole
  output (index, tracker, config) once every rank has finished, then moves the output
  into place (:class:`SharedOutput`).

>>> partition([("a", 4), ("b", 4), ("c", 1), ("d", 7)], 2)
[['a', 'b'], ['c', 'd']]
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import tempfile
from pathlib import Path
from typing import Callable

from .atomic import (PARTIAL_MARK, _owner, _remove, _replace, _sync_tree, atomic_directory, check_destination,
                     remove_stale_siblings)
from .errors import BadInput, CkptError


def partition(files: list[tuple[str, int]], parts: int) -> list[list[str]]:
    """Cut ``(name, bytes)`` items, in order, into ``parts`` contiguous runs of about equal bytes.

    Every item lands in exactly one run; runs may be empty when there are fewer items
    than parts. A run ends where the running total crosses its share of the whole.
    """
    if parts < 1:
        raise BadInput(f"the number of parts must be at least 1 (got {parts})")
    total = sum(max(size, 1) for _, size in files)
    runs: list[list[str]] = [[] for _ in range(parts)]
    running = 0
    for name, size in files:
        midpoint = running + max(size, 1) / 2  # the run whose share holds the item's middle gets it
        runs[min(int(midpoint * parts / total), parts - 1)].append(name)
        running += max(size, 1)
    return runs


def distributed_world() -> tuple[int, int]:
    """``(rank, world size)`` from torchrun's environment, ``(0, 1)`` outside it."""
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise BadInput(f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} "
                       "are not integers") from None
    if not 0 <= rank < world:
        raise BadInput(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world


def my_share(files: list[tuple[str, int]], *, workers: int = 1, rank: int = 0, world: int = 1) -> list[list[str]]:
    """This process's runs of the plan: one per local worker, out of ``world x workers`` runs."""
    runs = partition(files, world * workers)
    return runs[rank * workers: (rank + 1) * workers]


def _worker_started() -> None:
    from .streaming_io import settle_conversion_process

    settle_conversion_process()


def run_parts(job: Callable[[list[str]], list[str]], runs: list[list[str]],
              in_process: Callable[[list[str]], list[str]] | None = None) -> list[str]:
    """Write each non-empty run and return the files written, in the runs' order.

    The first run is written here (by ``in_process``, or ``job``), the others by as many
    spawned processes (``job`` must pickle). They are started first, so their start-up
    (a fresh interpreter imports torch: about a second) overlaps this process's run.
    """
    runs = [run for run in runs if run]
    here = in_process or job
    if len(runs) <= 1:
        return here(runs[0]) if runs else []
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    with concurrent.futures.ProcessPoolExecutor(len(runs) - 1, mp_context=context,
                                                initializer=_worker_started) as pool:
        elsewhere = [pool.submit(job, run) for run in runs[1:]]
        try:
            written = here(runs[0])
        except BaseException:
            for future in elsewhere:
                future.cancel()
            concurrent.futures.wait(elsewhere)  # their files are in the same partial folder
            raise
        for future in elsewhere:
            written += future.result()
    return written


class _LocalGroup:
    rank, world = 0, 1

    def broadcast(self, value):
        return value

    def all_succeeded(self, ok: bool) -> bool:
        return ok

    def close(self) -> None:
        pass


class _TorchGroup:
    """The ranks of a ``torchrun`` job, over ``torch.distributed``'s CPU (gloo) backend."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.owned = not dist.is_initialized()
        if self.owned:
            dist.init_process_group("gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def broadcast(self, value):
        box = [value]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_succeeded(self, ok: bool) -> bool:
        import torch

        failures = torch.tensor([0 if ok else 1])
        self.dist.all_reduce(failures)
        return int(failures.item()) == 0

    def close(self) -> None:
        if self.owned:
            self.dist.destroy_process_group()


class SharedOutput:
    """The output folder of a conversion run by every rank of a job.

    Rank 0 checks the destination and makes the hidden partial folder next to it; every
    rank writes its files there; :meth:`parts_done` waits for all of them (and raises if
    any failed); rank 0 then writes the describing files and, on leaving the ``with``,
    renames the folder into place. On any failure the partial folder is removed.
    """

    def __init__(self, destination, overwrite: bool = False):
        self.destination = Path(destination)
        self.overwrite = overwrite
        rank, world = distributed_world()
        self.group = _TorchGroup() if world > 1 else _LocalGroup()
        self.leader = self.group.rank == 0
        self._reported = False
        self._local = None

    def __enter__(self) -> "SharedOutput":
        if self.group.world == 1:
            self._local = atomic_directory(self.destination, self.overwrite)
            self.path = self._local.__enter__()
            return self
        made = None
        if self.leader:
            try:
                if self.destination.parent.is_dir():
                    with contextlib.suppress(OSError):  # folders of killed runs on this host
                        remove_stale_siblings(self.destination)
                check_destination(self.destination, self.overwrite)
                # named like atomic_directory's, so a killed job's folder is cleaned up the same way
                made = tempfile.mkdtemp(prefix=f".{self.destination.name}{PARTIAL_MARK}{_owner()}-",
                                        dir=self.destination.parent)
            except CkptError as error:
                made = error
            except OSError as error:
                made = BadInput(f"{self.destination.parent}: cannot create the output there "
                                f"({error.strerror or error})")
        made = self.group.broadcast(made)
        if isinstance(made, BaseException):
            self.group.close()
            raise made
        self.path = Path(made)
        return self

    def parts_done(self) -> None:
        """Wait until every rank has written its files; raise if any could not."""
        self._reported = True
        if not self.group.all_succeeded(True):
            raise BadInput(f"{self.destination}: another rank failed; nothing was written")

    def __exit__(self, exc_type, exc, traceback):
        if self._local is not None:
            return self._local.__exit__(exc_type, exc, traceback)
        try:
            if not self._reported:
                self.group.all_succeeded(False)
            succeeded = self.group.all_succeeded(exc_type is None)
            publish_error = None
            if self.leader:
                try:
                    if not succeeded:
                        raise BadInput(f"{self.destination}: another rank failed; nothing was written")
                    os.chmod(self.path, 0o755)
                    _sync_tree(self.path)
                    _replace(self.path, self.destination)
                except BaseException as error:  # reported to every rank below, raised here
                    publish_error = error
                    _remove(self.path)
            # in place of a barrier: every rank learns whether the output was published
            published = self.group.all_succeeded(publish_error is None)
            if publish_error is not None and exc_type is None:
                if isinstance(publish_error, OSError):
                    raise BadInput(f"{self.destination}: {publish_error.strerror or publish_error} "
                                   "while publishing the output") from None
                raise publish_error
            if not published and exc_type is None:
                raise BadInput(f"{self.destination}: another rank failed; nothing was written")
        finally:
            self.group.close()
        return False
