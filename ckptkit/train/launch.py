"""Starting the processes of a parallel run: our own spawned workers, or torchrun's.

A run's device and its ``torch.distributed`` backend are chosen together, by the caller:
``launch(fn, world_size, *args, device="cpu")`` runs ``fn(*args)`` on ``world_size``
fresh processes joined over gloo, to compute on CPU tensors; ``device="cuda"`` joins
them over NCCL with rank ``r`` on GPU ``r`` (one GPU per rank). It returns every rank's
return value. :func:`run_device` is the default a run takes when it is not told
(``"auto"``): CUDA when there is a GPU for every rank, else the CPU. A worker's
:class:`~ckptkit.errors.CkptError` is raised again in the caller unchanged; any other
failure becomes a ``RuntimeError`` carrying the worker's traceback. Under ``torchrun``
the process group comes from the environment instead (:func:`init_from_environment`).
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

from ..errors import BadInput, CkptError


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ
                                                   and "MASTER_ADDR" in os.environ)


DEVICES = ("cpu", "cuda")
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}  # collectives on CPU tensors need gloo, on CUDA tensors NCCL


def run_device(requested: str = "auto", world_size: int = 1) -> str:
    """The device type of a run: ``requested`` unless it is ``"auto"``, which is
    ``"cuda"`` when there is a GPU for each of ``world_size`` ranks, else ``"cpu"``.

    >>> run_device("cpu", 4), run_device("auto", 1)   # on a machine with one GPU
    ('cpu', 'cuda')
    """
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "cpu"
    if requested not in DEVICES:
        raise BadInput(f"device {requested!r}: choose auto, {' or '.join(DEVICES)}")
    if requested == "cuda" and torch.cuda.device_count() < world_size:
        raise BadInput(f"device cuda needs a GPU for each of {world_size} ranks; "
                       f"{torch.cuda.device_count()} found")
    return requested


def init_from_environment(device_type: str = "auto") -> torch.device:
    """Join the process group torchrun describes; returns this rank's device.

    ``"cuda"`` (``"auto"`` where GPUs are present): NCCL, this rank on GPU ``LOCAL_RANK``;
    ``"cpu"``: gloo.
    """
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(BACKENDS[device.type])
    return device


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rank_device(device_type: str) -> torch.device:
    """This process's device in a run on ``device_type``: its own GPU (set by the launcher) or the CPU."""
    if device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _worker(rank, world_size, port, device_type, results, fn, args):
    # Share the machine's cores between the workers instead of oversubscribing them.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    if device_type == "cuda":
        torch.cuda.set_device(rank)  # before the process group, so NCCL binds this rank to its GPU
    dist.init_process_group(BACKENDS[device_type], init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
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


def launch(fn, world_size: int, *args, device: str) -> list:
    """Run ``fn(*args)`` on ``world_size`` spawned ranks; returns their results in rank order.

    ``device`` is where the ranks compute: ``"cpu"`` (gloo) or ``"cuda"`` (NCCL, rank
    ``r`` on GPU ``r``; :func:`rank_device` gives a rank its device). There is no
    default: a run's tensors and its backend must agree, so the caller says which.
    ``fn`` must be importable by name (a module-level function): the workers do not
    share this interpreter's state.
    """
    if device not in DEVICES:
        raise ValueError(f"launch(device={device!r}): expected one of {', '.join(DEVICES)}")
    if device == "cuda" and torch.cuda.device_count() < world_size:
        raise BadInput(f"{world_size} ranks on CUDA need {world_size} GPUs; {torch.cuda.device_count()} found")
    with tempfile.TemporaryDirectory(prefix="ckptkit-launch-") as results:
        try:
            mp.start_processes(_worker, args=(world_size, _free_port(), device, results, fn, args),
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
