"""Starting the processes of a parallel run: our own spawned workers, or torchrun's.

``launch(fn, world_size, *args)`` runs ``fn(*args)`` on ``world_size`` fresh processes
with ``torch.distributed`` initialised (gloo on CPU; NCCL when there is one GPU per
rank) and returns every rank's return value. A worker's :class:`~ckptkit.errors.CkptError`
is raised again in the caller unchanged; any other failure becomes a ``RuntimeError``
carrying the worker's traceback. Under ``torchrun`` the process group comes from the
environment instead (:func:`init_from_environment`).
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from ..errors import CkptError


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ
                                                   and "MASTER_ADDR" in os.environ)


def init_from_environment() -> torch.device:
    """Join the process group torchrun describes; returns this rank's device."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return device


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def spawned_backend(world_size: int) -> str:
    """NCCL when every rank can have its own GPU, gloo on CPU otherwise."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= world_size:
        return "nccl"
    return "gloo"


def current_device() -> torch.device:
    """The device of this rank: its GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if not dist.is_initialized() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _worker(rank, world_size, port, backend, results, fn, args):
    # Share the machine's cores between the workers instead of oversubscribing them.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        result = fn(*args)
        with open(Path(results) / f"rank{rank}.pkl", "wb") as stream:
            pickle.dump(result, stream)
    except BaseException as error:
        with open(Path(results) / f"error{rank}.pkl", "wb") as stream:
            try:
                pickle.dump((error, traceback.format_exc()), stream)
            except Exception:  # an error that does not pickle
                pickle.dump((RuntimeError(str(error)), traceback.format_exc()), stream)
        raise
    finally:
        dist.destroy_process_group()


def _start_method() -> str:
    """``forkserver`` where the platform has it, else ``spawn``.

    Both start clean interpreters (no inherited threads or CUDA state). The fork server
    imports torch and this package once; every later worker forks from it in
    milliseconds instead of importing everything again (seconds per process).
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    multiprocessing.set_forkserver_preload(["torch", "ckptkit.train"])
    return "forkserver"


def launch(fn, world_size: int, *args, backend: str | None = None) -> list:
    """Run ``fn(*args)`` on ``world_size`` spawned ranks; returns their results in rank order.

    ``fn`` must be importable by name (a module-level function): the workers do not
    share this interpreter's state.
    """
    backend = backend or spawned_backend(world_size)
    with tempfile.TemporaryDirectory(prefix="ckptkit-launch-") as results:
        try:
            mp.start_processes(_worker, args=(world_size, _free_port(), backend, results, fn, args),
                               nprocs=world_size, join=True, start_method=_start_method())
        except ProcessException as failure:
            _raise_worker_error(Path(results), failure)
        outputs = []
        for rank in range(world_size):
            with open(Path(results) / f"rank{rank}.pkl", "rb") as stream:
                outputs.append(pickle.load(stream))  # written by our own workers just now
        return outputs


def _raise_worker_error(results: Path, failure: Exception):
    for path in sorted(results.glob("error*.pkl")):
        with open(path, "rb") as stream:
            error, trace = pickle.load(stream)
        if isinstance(error, CkptError):
            raise error from None
        raise RuntimeError(f"worker {path.stem.removeprefix('error')} failed:\n{trace}") from None
    raise RuntimeError(f"a worker process failed: {failure}") from None
