"""File reads and writes at disk speed without holding the file in memory.

Reading: :func:`read_into` fills a fresh tensor from a byte range of a file with
``preadv``. Tensors read this way are ordinary anonymous memory, freed when dropped;
touching the pages of a memory-mapped source instead would leave the whole source
resident in (and counted against) the process until it is unmapped.

Writing: :class:`DirectWriteFile` sends a file's bytes to the disk without going
through the page cache (``O_DIRECT``, gathered into aligned blocks), and
:class:`OrderedWriteThread` runs a file's writes in order on one thread, so the next
tensor is read and reshaped while the previous one goes to the file (the copies and
write calls used here release the GIL). Closing waits for the data to be on disk
(``fdatasync``) before the output is renamed into place.

>>> buffer = torch.empty((4, 8), dtype=torch.float16)
>>> read_into(fd, buffer, offset=4096)
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import gc
import itertools
import mmap
import os
import queue
import threading
import time
from typing import Callable

import numpy
import torch

# Bytes handed to a process's write threads before the producer waits (all files
# together): two large tensors in flight, enough to keep the disk busy, small next to the
# RSS budget.
MAX_PENDING_BYTES = 256 << 20
_CHUNK = 1 << 30  # Linux moves at most ~2 GiB per read call
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024  # buffers per preadv
# Each of an unbuffered file's two staging buffers: large enough that each write is one
# big request (8 to 32 MiB wrote at the same 1.7-1.8 GB/s here).
STAGING_BYTES = 16 << 20


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (any dtype, bfloat16 too)."""
    if tensor.numel() == 0:
        return memoryview(b"")
    return memoryview(tensor.view(-1).view(torch.uint8).numpy())


def contiguous_runs(tensor: torch.Tensor) -> list[memoryview]:
    """The memory of ``tensor``, in its element order, as runs of contiguous bytes.

    A contiguous tensor is one run. A view whose trailing dimensions are contiguous (a
    block of columns of a matrix: each of its rows) is one run per index of its leading
    dimensions, so that a file's bytes can be read straight into place with one
    ``preadv``, without a staging buffer and a copy:

    >>> merged = torch.empty((4, 6), dtype=torch.float16)
    >>> [len(run) for run in contiguous_runs(merged[:, 3:])]   # 4 rows of 3 halves
    [6, 6, 6, 6]
    """
    if tensor.is_contiguous():
        return [byte_view(tensor)]
    element = tensor.element_size()
    inner, expected, numel = tensor.dim(), 1, 1  # the contiguous trailing dimensions start at ``inner``
    while inner > 0 and (tensor.shape[inner - 1] == 1 or tensor.stride(inner - 1) == expected):
        expected *= tensor.shape[inner - 1]
        inner -= 1
    run_bytes = expected * element
    storage = torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage())
    whole = memoryview(storage.numpy())
    runs = []
    for index in itertools.product(*(range(size) for size in tensor.shape[:inner])):
        start = (tensor.storage_offset() + sum(i * stride for i, stride in zip(index, tensor.stride()))) * element
        runs.append(whole[start: start + run_bytes])
    return runs


def read_into(fd: int, tensor: torch.Tensor, offset: int) -> torch.Tensor:
    """Fill ``tensor`` with the bytes at ``offset`` of open file ``fd`` (in its element
    order: a strided view is filled in place, :func:`contiguous_runs`); return it."""
    runs = [run[start: start + _CHUNK] for run in contiguous_runs(tensor) for start in range(0, len(run), _CHUNK)]
    first, wanted = 0, sum(len(run) for run in runs)
    while first < len(runs):
        batch, batch_bytes = [], 0
        for run in runs[first: first + _IOV_MAX]:
            if batch and batch_bytes + len(run) > _CHUNK:
                break
            batch.append(run)
            batch_bytes += len(run)
        count = os.preadv(fd, batch, offset)
        if count == 0:
            raise EOFError(f"file ends {wanted} bytes before the tensor does")
        offset += count
        wanted -= count
        while count and count >= len(runs[first]):  # whole runs filled
            count -= len(runs[first])
            first += 1
        if count:  # a short read ended inside this run
            runs[first] = runs[first][count:]
    return tensor


def read_tensor(fd: int, offset: int, shape, dtype: torch.dtype) -> torch.Tensor:
    """A new tensor of ``shape``/``dtype`` read from ``offset`` of ``fd``."""
    return read_into(fd, torch.empty(tuple(shape), dtype=dtype), offset)


# How often keep_freed_memory_for_reuse looks at the freed heap pages nobody reused, and how
# many it leaves resident before giving them back
GIVE_BACK_SECONDS = 0.2
SPARE_BYTES = 256 << 20
_giving_back: list[threading.Thread] = []


class _MallocInfo(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (malloc.h, glibc >= 2.33)."""

    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _resident_anonymous_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) << 10
    return 0


def keep_freed_memory_for_reuse() -> None:
    """Process-wide, for the conversion commands and their worker processes (not for a library
    call inside someone else's program): make glibc's malloc keep freed memory for reuse,
    for a moment.

    By default every block over 32 MiB (most weights) is a fresh ``mmap``, and each of its
    4 KiB pages costs a page fault and zeroing on first touch. Measured on the benchmark
    machine: reading into fresh 256 MiB buffers ran at 1.35 GB/s, into reused ones at
    7.8 GB/s; a 1.3B megatron-to-hf took 10.4 s instead of 6.2 s. Serving every block from
    the heap (``M_MMAP_MAX=0``) and trimming it only past 1 GiB free (``M_TRIM_THRESHOLD``)
    reuses the same pages.

    The heap does not reuse everything, though: torch allocates with 64-byte alignment, and
    the slack glibc cuts off around an aligned block stays in its small-chunk caches, so a
    freed block is a little too small for the next request of the same size, and the heap
    grows past the hole. A thread looks every :data:`GIVE_BACK_SECONDS` at the resident
    memory malloc holds free and gives the pages of such holes back (``malloc_trim``) once
    they pass :data:`SPARE_BYTES`: on a synthetic DeepSeek-V3-width MoE layer (64 experts)
    ``reshard --ep 4`` peaked at 3.8 GiB resident of which 0.5 GiB was in use, and at 1.3
    GiB when holes were given back. Giving them back every time costs page faults when they
    are reused (a 1.3B reshard: 0.7 s more system time), hence the spare bytes. No-op where
    glibc is not the allocator.
    """
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not hasattr(os, "posix_fadvise"):
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # glibc's malloc.h
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, 1 << 30)
    # One heap for every thread: a tensor read on one thread and freed on another goes back
    # where the next one is allocated (with an arena per thread, each kept its own high-water
    # mark: 1.3B megatron-to-hf peaked at 1.66 GiB instead of 0.6).
    mallopt(m_arena_max, 1)
    mallinfo2 = getattr(libc, "mallinfo2", None)
    if _giving_back or mallinfo2 is None:
        return
    mallinfo2.restype = _MallocInfo

    def spare() -> int:
        """Resident anonymous memory that malloc does not hand out (plus what the interpreter
        holds outside malloc, a constant)."""
        info = mallinfo2()
        return _resident_anonymous_bytes() - info.uordblks - info.hblkhd

    def give_back() -> None:
        outside_malloc = spare()
        while True:
            time.sleep(GIVE_BACK_SECONDS)
            if spare() - outside_malloc > SPARE_BYTES:
                malloc_trim(0)

    _giving_back.append(threading.Thread(target=give_back, name="give back freed memory", daemon=True))
    _giving_back[0].start()


def one_thread_per_operation() -> None:
    """Process-wide, like :func:`keep_freed_memory_for_reuse`: every torch operation on one
    thread.

    A conversion spreads its CPU work over threads of its own (:mod:`ckptkit.pipeline`),
    beside its reading and writing threads; torch's intra-op threads on top of them wait
    for cores that are already busy. Measured on the benchmark machine (2 cores, other jobs
    running): copying into a 32 MiB block of columns ran at 2.1 GB/s with torch's 2
    intra-op threads and at 8.2 GB/s with one.
    """
    torch.set_num_threads(1)


def freeze_imported_objects() -> None:
    """Process-wide, like :func:`keep_freed_memory_for_reuse`: the objects that exist now (the
    imported modules' own, torch's above all) are left out of the cyclic garbage collector's
    passes from here on (``gc.freeze``).

    A conversion allocates many short-lived objects (unpickled dicts and tuples, tensor views),
    so the collector runs often, and each of its full passes walked every object the imports
    made. In a ``perf`` profile of a 1.3B ``reshard`` on tmpfs the collector took 8% of the
    process's CPU; frozen, the same reshard took 3.94-4.46 s against 4.24-4.71 s (3 runs each,
    alternating). Frozen objects are still freed when their last reference goes.
    """
    gc.freeze()


def settle_conversion_process() -> None:
    """Every process-wide setting of a conversion process, a command's or one of its workers'
    (never of a library call inside someone else's program): freed memory kept for reuse,
    one thread per torch operation, the imported objects frozen. Called once the conversion's
    modules are imported."""
    keep_freed_memory_for_reuse()
    one_thread_per_operation()
    freeze_imported_objects()


def _advise_writeback(fd: int, start: int, end: int) -> None:
    if end > start and hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)


# Set to 1 to write through the page cache anyway (a file system that accepts O_DIRECT
# but serves it slowly, such as some FUSE mounts).
BUFFERED_WRITES_VARIABLE = "CKPTKIT_BUFFERED_WRITES"


def _open_direct(path) -> int | None:
    """``path`` created for writing with ``O_DIRECT``, or None where the file system refuses it."""
    if not hasattr(os, "O_DIRECT") or os.environ.get(BUFFERED_WRITES_VARIABLE, "") not in ("", "0"):
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except OSError as error:
        if error.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # tmpfs and some network file systems
            return None
        raise


class DirectWriteFile:
    """A write-only file object that sends its bytes to the disk without the page cache.

    Buffered writes cost the kernel a copy into the page cache, dirty-page accounting and
    throttling, and writeback later; on the benchmark machine's virtual disk a 2.9 GB
    torch zip went to disk at 0.35 GB/s that way and at 1.4 GB/s with ``O_DIRECT`` (CRC-32s
    included). ``O_DIRECT`` needs the memory, the file offset and the length of each write
    aligned to the device's block, so bytes are gathered in page-aligned staging buffers
    and written out in whole blocks by a flusher thread; the last block is zero-padded,
    and the file is cut back to its true length on :meth:`close`. Where the file system refuses ``O_DIRECT``
    (at open, or at the first write) the file is written through the page cache.

    ``write`` accepts any contiguous bytes-like object (a ``memoryview`` from torch's zip
    writer, ``bytes``); copies of large writes release the GIL.

    >>> out = DirectWriteFile(path)
    >>> out.write(header_bytes); out.write(byte_view(tensor))
    >>> out.close()          # fdatasync, then the file is complete on disk
    """

    BLOCK = 4096  # a multiple of every logical block size Linux supports

    def __init__(self, path, *, staging_bytes: int = STAGING_BYTES):
        self.path = path
        self.size = 0
        self._fd = _open_direct(path)
        self.direct = self._fd is not None
        if not self.direct:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._advised = 0
            return
        # Two staging buffers: one fills while the other is written by the flusher
        # thread, so copying and the disk overlap even when the caller writes synchronously
        # (torch.distributed.checkpoint's writer does).
        self._buffers = [mmap.mmap(-1, staging_bytes) for _ in range(2)]  # anonymous: page-aligned
        self._arrays = [numpy.frombuffer(buffer, dtype=numpy.uint8) for buffer in self._buffers]
        self._current = 0  # the buffer being filled
        self._fill = 0
        self._sent = 0  # file offset where the next block goes
        self._flusher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="direct write")
        self._in_flight: concurrent.futures.Future | None = None
        self._write_fd = self._fd  # another descriptor, without O_DIRECT, if writes are refused

    def write(self, data) -> int:
        if memoryview(data).nbytes == 0:
            return 0
        incoming = numpy.frombuffer(data, dtype=numpy.uint8)
        count = len(incoming)
        self.size += count
        if not self.direct:
            self._write_all(memoryview(incoming))
            _advise_writeback(self._fd, self._advised, self.size)
            self._advised = self.size
            return count
        done, staging = 0, self._arrays[self._current]
        while done < count:
            take = min(count - done, len(staging) - self._fill)
            staging[self._fill: self._fill + take] = incoming[done: done + take]
            self._fill += take
            done += take
            if self._fill == len(staging):
                self._send(len(staging))
                staging = self._arrays[self._current]
        return count

    def _write_all(self, view: memoryview) -> None:
        while len(view):
            written = os.write(self._fd, view[:_CHUNK])
            view = view[written:]

    def _pwrite_all(self, buffer: mmap.mmap, length: int, offset: int) -> None:
        whole = memoryview(buffer)
        try:
            done = 0
            while done < length:
                try:
                    done += os.pwrite(self._write_fd, whole[done:length], offset + done)
                except OSError as error:
                    # Accepted at open, refused at write (an alignment larger than BLOCK, some
                    # FUSE file systems): the rest goes through the page cache instead.
                    if error.errno != errno.EINVAL or self._write_fd != self._fd:
                        raise
                    self._write_fd = os.open(self.path, os.O_WRONLY)
        finally:
            # An error's traceback keeps this frame: a live view would pin the buffer.
            whole.release()

    def _wait_in_flight(self) -> None:
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            in_flight.result()  # raises the write's error (a full disk, say)

    def _send(self, length: int) -> None:
        """Hand the current buffer's first ``length`` bytes to the flusher; fill the other."""
        self._wait_in_flight()  # the other buffer is free once its write is done
        self._in_flight = self._flusher.submit(self._pwrite_all, self._buffers[self._current], length, self._sent)
        self._sent += length
        self._current ^= 1
        self._fill = 0

    def flush(self) -> None:
        """Nothing to do: whole blocks are written as they fill, the rest on :meth:`close`."""

    def tell(self) -> int:
        """Bytes written so far (staged ones included): the file's length once closed."""
        return self.size

    def fileno(self) -> int:
        """The descriptor (an ``fsync`` on it before :meth:`close` does not cover staged bytes;
        :meth:`close` itself waits for all of them)."""
        return self._fd

    def writable(self) -> bool:
        return True

    def close(self, *, durable: bool = True) -> None:
        """Write what is staged, fix the length, and wait for the disk.

        ``durable=False`` abandons the file (an error path: it is about to be removed):
        nothing is waited for, and bytes still staged may be dropped.
        """
        if self._fd is None:
            return
        try:
            if self.direct:
                try:
                    tail = self._fill
                    if tail and durable:
                        padded = -(-tail // self.BLOCK) * self.BLOCK
                        self._arrays[self._current][tail:padded] = 0
                        self._send(padded)
                    self._wait_in_flight()
                finally:
                    self._flusher.shutdown(wait=True)  # no write may outlive the descriptor
                if durable:
                    os.ftruncate(self._fd, self.size)
            if durable:
                os.fdatasync(self._fd)
        finally:
            if self.direct and self._write_fd != self._fd:
                os.close(self._write_fd)
            os.close(self._fd)
            self._fd = None
            if self.direct:
                # Dropped, not closed: a view may live on in an error's traceback; the
                # memory goes back when the last reference does.
                self._arrays = self._buffers = None


class PendingBytes:
    """Bytes handed to write threads and not yet written, counted against one budget.

    Every :class:`OrderedWriteThread` of a process shares :data:`PENDING` unless given
    another, so the memory a conversion's writes hold stays the same whether it writes
    one file at a time or eight TP ranks' files at once.
    """

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = max_bytes  # None: MAX_PENDING_BYTES, read when waiting
        self.pending = 0
        self.changed = threading.Condition()

    def take(self, nbytes: int) -> None:
        """Wait while ``nbytes`` more would pass the budget (a job larger than the whole
        budget waits until nothing else is pending), then count them."""
        with self.changed:
            limit = MAX_PENDING_BYTES if self.max_bytes is None else self.max_bytes
            while self.pending and self.pending + nbytes > limit:
                self.changed.wait()
            self.pending += nbytes

    def give_back(self, nbytes: int) -> None:
        with self.changed:
            self.pending -= nbytes
            self.changed.notify_all()


PENDING = PendingBytes()


class OrderedWriteThread:
    """Run ``submit``ted write jobs for one file in order on a background thread.

    ``out`` is the :class:`DirectWriteFile` the jobs write to; it is closed by
    :meth:`close`. A job is a callable that writes; its ``nbytes`` count against
    ``pending`` (the process's :data:`PENDING`, at most :data:`MAX_PENDING_BYTES`, by
    default) until it has run. The first error of a job is raised by the next ``submit``,
    ``drain`` or ``close``.
    """

    def __init__(self, out: DirectWriteFile, *, pending: PendingBytes | None = None):
        self.out = out
        self._jobs: queue.Queue = queue.Queue()
        self._pending = PENDING if pending is None else pending
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"write {os.path.basename(str(out.path))}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, nbytes = item
            if isinstance(job, threading.Event):  # a marker from drain()
                job.set()
                continue
            try:
                if self._error is None:
                    job()
            except BaseException as error:  # handed to the producer thread
                self._error = error
            finally:
                self._pending.give_back(nbytes)

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, job: Callable[[], None], nbytes: int = 0) -> None:
        """Queue ``job``; wait first while more than the budget of bytes is pending."""
        self._raise_error()
        self._pending.take(nbytes)
        self._jobs.put((job, nbytes))

    def drain(self) -> None:
        """Wait until every submitted job has run."""
        done = threading.Event()
        self._jobs.put((done, 0))
        done.wait()
        self._raise_error()

    def close(self, *, durable: bool = True) -> None:
        """Finish the queued jobs, stop the thread, close the file; with ``durable`` wait for the disk."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        try:
            self.out.close(durable=durable and self._error is None)
        finally:
            self._raise_error()
