"""A conversion's reads, CPU work and writes at the same time.

A writer knows from its plan which canonical tensors it needs, in which order, and what
it does to each (cast, transpose, regroup, cut into TP pieces). :func:`produced` reads
them one after the other on a reading thread (:meth:`CheckpointReader.fetch`: the file
I/O, in order, one thread using the reader), hands each to a small pool of threads for
the CPU work (:meth:`CheckpointReader.assemble`, then the writer's own function), and
gives the results back in order to the calling thread, which writes them (its files'
write threads copy and send the bytes). torch releases the GIL in its copies and casts,
and the reads and writes release it in their system calls, so on two cores the
transposes of one tensor run while the next is read and the previous one written.

Memory: the reading thread starts no new read while more than ``max_bytes`` of read
tensors wait for the caller, so at most ``max_bytes`` plus one tensor (and what the pool
makes of them) are held here, however large the model; a tensor larger than
``max_bytes`` goes through alone.

>>> jobs = [("decoder.layers.0.mlp.linear_fc1.weight", lambda full: full.t().contiguous())]
>>> for name, transposed in produced(reader, jobs):
...     out.write(name, transposed)
"""
from __future__ import annotations

import concurrent.futures
import queue
import threading
from typing import Callable, Iterator, TypeVar

import torch

from .torch_offsets import tensors_in

Result = TypeVar("Result")

# Threads doing the CPU work: the benchmark machine has 2 cores, already shared with the
# reading and writing threads; more threads would only hold more tensors at once.
WORKERS = 2
# Read tensors waiting for the caller: two of a 1.3B model's largest matrices, small next
# to the memory budget (1 GiB + 3 x the largest tensor).
MAX_BYTES = 64 << 20


def _nbytes(fetched) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors_in(fetched))


def produced(reader, jobs: list[tuple[str, Callable[[torch.Tensor], Result]]], *, workers: int | None = None,
             max_bytes: int | None = None) -> Iterator[tuple[str, Result]]:
    """``(name, make(tensor))`` for each ``(name, make)`` of ``jobs``, in order, where
    ``tensor`` is ``reader``'s canonical tensor ``name``; reads run ahead on one thread and
    ``make`` on ``workers`` threads (``workers=0``: everything on the calling thread).

    The first error (reading or making) is raised at its place in the order, after the
    results before it; closing the generator early stops the reading thread and waits for
    the pool. ``reader`` must not be used by anyone else until then.
    """
    jobs = list(jobs)
    workers = WORKERS if workers is None else workers
    max_bytes = MAX_BYTES if max_bytes is None else max_bytes
    if workers < 1 or len(jobs) < 2:
        for name, make in jobs:
            yield name, make(reader.assemble(name, reader.fetch(name)))
        return
    room = threading.Condition()
    waiting = [0]  # bytes read and not yet taken by the caller
    stopping = threading.Event()
    results: queue.Queue = queue.Queue()
    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="ckptkit reshape")

    def make_result(name, make, fetched):
        return make(reader.assemble(name, fetched))

    def read_all() -> None:
        for name, make in jobs:
            with room:
                while waiting[0] > max_bytes and not stopping.is_set():
                    room.wait()
            if stopping.is_set():
                return
            try:
                fetched = reader.fetch(name)
            except BaseException as error:  # noqa: BLE001 - raised by the caller, in order
                results.put((error, 0))
                return
            nbytes = _nbytes(fetched)
            with room:
                waiting[0] += nbytes
            results.put((pool.submit(make_result, name, make, fetched), nbytes))
            del fetched

    reading = threading.Thread(target=read_all, name="ckptkit read", daemon=True)
    reading.start()
    try:
        for name, _ in jobs:
            pending, nbytes = results.get()
            if isinstance(pending, BaseException):
                raise pending
            try:
                result = pending.result()
            finally:
                with room:
                    waiting[0] -= nbytes
                    room.notify_all()
            yield name, result
            del result
    finally:
        stopping.set()
        with room:
            room.notify_all()
        reading.join()
        pool.shutdown(wait=True, cancel_futures=True)
