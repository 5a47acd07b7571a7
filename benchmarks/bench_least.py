"""The least any converter built on torch must spend, against ckptkit and the copy floor.

    python benchmarks/bench_least.py --work /dev/shm/bench [--size 1.3b] [--repeat 3]

Each "least" program is a few lines of torch that do only what a conversion cannot skip,
with none of the conversion's work: no merges or splits, no checks, no plan, no index. The
rank files are spread over two threads, because this machine has two cores.

* **start-up**: ``import torch, safetensors.torch``, and nothing else;
* **megatron-to-hf, bytes only**: every Megatron rank file is loaded (``torch.load(mmap=True,
  weights_only=True)``), and its tensors are written unchanged to one safetensors file;
* **megatron-to-hf, with GPT-2's transposes**: the same, but every 2-D weight other than the
  embeddings is transposed first. Hugging Face's GPT-2 ``Conv1D`` stores ``[in, out]``,
  Megatron stores ``[out, in]``, so a GPT-2 export cannot skip this copy;
* **hf-to-megatron, bytes only**: every safetensors shard is loaded, and its tensors are
  written with ``torch.save`` (the format of Megatron's rank files), in two files, one per
  thread;
* **reshard, bytes only**: every rank file is loaded and saved again with ``torch.save``.

Floors and programs alternate, and so do ckptkit's own conversions of the same sources, so
that all of them see the same minutes. Every run is followed by a ``sync``. Each program
runs in its own process, interpreter start included. The median of ``--repeat`` runs is
printed, with its ratio to the ``cp -r`` + ``sync`` floor of the same source.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_convert import ckptkit_command, copy_floor, make_sources, run_measured, warm  # noqa: E402

# The programs' shared part: flatten a loaded rank file and run one job per file on two threads.
_PRELUDE = """
import argparse, sys, torch
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from safetensors.torch import load_file, save_file
source, destination = Path(sys.argv[1]), Path(sys.argv[2])
destination.mkdir(parents=True)
torch.serialization.add_safe_globals([argparse.Namespace])  # Megatron's args
def flat(tree, prefix=""):
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from flat(value, f"{prefix}.{key}" if prefix else str(key))
def megatron_tensors(path):
    return dict(flat(torch.load(path, mmap=True, weights_only=True, map_location="cpu")["model"]))
def each(pattern, job):
    files = sorted(source.rglob(pattern))
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda pair: job(*pair), enumerate(files)))
"""

LEAST = {
    "start-up (import torch, safetensors)": ("megatron", "import torch, safetensors.torch"),
    "megatron-to-hf, bytes only": ("megatron", _PRELUDE + """
each("model_optim_rng.pt", lambda index, path: save_file(
    {name: tensor.contiguous() for name, tensor in megatron_tensors(path).items()},
    destination / f"model-{index}.safetensors"))
"""),
    "megatron-to-hf, with GPT-2's transposes": ("megatron", _PRELUDE + """
def conv1d(name, tensor):
    return tensor.t().contiguous() if tensor.dim() == 2 and "embedding" not in name else tensor.contiguous()
each("model_optim_rng.pt", lambda index, path: save_file(
    {name: conv1d(name, tensor) for name, tensor in megatron_tensors(path).items()},
    destination / f"model-{index}.safetensors"))
"""),
    "hf-to-megatron, bytes only": ("hf", _PRELUDE + """
tensors = {}
for path in sorted(source.rglob("*.safetensors")):
    tensors.update(load_file(path))
halves = [sorted(tensors)[0::2], sorted(tensors)[1::2]]  # two output files, one per thread
with ThreadPoolExecutor(2) as pool:
    list(pool.map(lambda index: torch.save({"model": {name: tensors[name] for name in halves[index]}},
                                           destination / f"model_optim_rng_{index}.pt"), range(2)))
"""),
    "reshard, bytes only": ("megatron", _PRELUDE + """
each("model_optim_rng.pt", lambda index, path: torch.save({"model": megatron_tensors(path)},
                                                          destination / f"model_optim_rng_{index}.pt"))
"""),
}


def ckptkit_cases(reshard_pp: int) -> dict[str, tuple[str, list]]:
    """ckptkit's conversions of the same sources, as ``bench_convert`` runs them."""
    return {
        "ckptkit megatron-to-hf": ("megatron", ["megatron-to-hf", "SOURCE", "DEST", "--max-shard-size", "1GB"]),
        "ckptkit hf-to-megatron": ("hf", ["hf-to-megatron", "SOURCE", "DEST", "--tp", 2, "--pp", 2]),
        f"ckptkit reshard --tp 1 --pp {reshard_pp}": ("megatron", ["reshard", "SOURCE", "DEST", "--tp", 1,
                                                                  "--pp", reshard_pp]),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="where the sources and outputs go (tmpfs: fast)")
    parser.add_argument("--size", default="1.3b")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    sources = dict(zip(("megatron", "hf"), make_sources(args.size, args.work)))
    scratch = args.work / "scratch"
    scratch.mkdir(exist_ok=True)
    commands = {label: (kind, [sys.executable, "-c", program, "SOURCE", "DEST"])
                for label, (kind, program) in LEAST.items()}
    commands.update({label: (kind, ckptkit_command(*arguments))
                     for label, (kind, arguments) in ckptkit_cases(4).items()})
    floors = {kind: [] for kind in sources}
    runs = {label: [] for label in commands}
    loads = []
    for _ in range(args.repeat):
        for kind, source in sources.items():
            floors[kind].append(copy_floor(source, scratch))
        for label, (kind, command) in commands.items():
            destination = scratch / "out"
            shutil.rmtree(destination, ignore_errors=True)
            warm(sources[kind])
            loads.append(os.getloadavg()[0])
            concrete = [str(sources[kind]) if part == "SOURCE" else str(destination) if part == "DEST" else part
                        for part in command]
            seconds, _, code, _, _ = run_measured(concrete)
            shutil.rmtree(destination, ignore_errors=True)
            if code:
                raise SystemExit(f"bench_least: {label} exited {code}")
            runs[label].append(seconds)
    print(f"{args.size}, work {args.work}; 1-minute load before the runs {min(loads):.1f}-{max(loads):.1f}")
    for kind, values in floors.items():
        print(f"  copy floor ({kind} source, cp -r + sync): {statistics.median(values):.2f} s "
              f"({' / '.join(f'{value:.2f}' for value in values)})")
    print(f"  {'program':<44}{'seconds':>9}  {'x copy floor':>12}  runs")
    for label, values in runs.items():
        floor = statistics.median(floors[commands[label][0]])
        print(f"  {label:<44}{statistics.median(values):>9.2f}  {statistics.median(values) / floor:>11.2f}x  "
              + " / ".join(f"{value:.2f}" for value in values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
