"""Time and peak memory of ckptkit's conversions against the copy floors and the memory bound.

For each model size it generates synthetic checkpoints (``make_synthetic.py``: a Megatron
TP2 PP2 one and a Hugging Face one), then measures, each in its own process, with the
source's pages already cached and a ``sync`` before the clock starts and inside the
timed span:

* the copy floor: ``cp -r SOURCE DEST && sync`` (the same bytes, the same disk);
* the direct-copy floor: each file copied by ``dd bs=64M oflag=direct`` then ``sync``
  (writes around the page cache, as ckptkit's are);
* ``ckptkit megatron-to-hf --max-shard-size 1GB``, ``hf-to-megatron --tp 2 --pp 2`` and
  ``reshard --tp 1 --pp 4`` (``--pp 2`` for models of fewer than 4 layers), each followed
  by ``sync`` (a conversion is done when its bytes are on disk);
* with ``--diverge-copies``, last: ``megatron-to-hf`` again once the Megatron source's copies
  of replicated tensors (and of a tied head) are made to differ (``make_synthetic.diverge_copies``);
* with ``--anchor-python``: transformers 4.46's
  ``checkpoint_reshaping_and_interoperability.py`` on the same Megatron checkpoint.

Every case runs ``--repeat`` times (floors and conversions alternating, so that they see
the same disk) and the median is reported, with the 1-minute load average before each
run. Time to first byte is when the first data byte reached the output file on disk
(a thread polls the output's hidden partial folder every 10 ms; ckptkit writes data in
16 MiB blocks). Peak RSS is the command's ``ru_maxrss`` as GNU ``time`` reports it (the
largest of the process and the children it waited for, e.g. ``--workers`` processes);
the bound is 1 GiB + 3 x the model's largest tensor. Nothing here is a pass/fail test.

    python benchmarks/bench_convert.py --sizes 1.3b,2.7b --work /work/bench --repeat 3 --workers 1,2
    python benchmarks/bench_convert.py --sizes llama3-70b-width --work /work/bench --repeat 1 --diverge-copies
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from ckptkit.spec import canonical_tensors  # noqa: E402
from make_synthetic import DTYPES, LLAMA_SIZES, diverge_copies, make, model_spec, parameter_count  # noqa: E402

GIB = 1024 ** 3
SOURCE_TP, SOURCE_PP = 2, 2
ANCHOR_SCRIPT = "transformers/models/megatron_gpt2/checkpoint_reshaping_and_interoperability.py"


@dataclass
class Measurement:
    """One case: every run's seconds (and load before it), the median reported."""

    size: str
    what: str
    workers: int
    runs: list[float]
    loads_before: list[float]
    first_byte_runs: list[float]
    peak_rss_bytes: int  # the largest of the runs
    bytes_read: int
    bytes_written: int
    floor_runs: list[float]
    direct_floor_runs: list[float]
    returncode: int
    rss_bound_bytes: int
    notes: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return statistics.median(self.runs)

    @property
    def first_byte_seconds(self) -> float:
        return statistics.median(self.first_byte_runs) if self.first_byte_runs else float("nan")

    @property
    def floor_seconds(self) -> float:
        return statistics.median(self.floor_runs)

    @property
    def direct_floor_seconds(self) -> float:
        return statistics.median(self.direct_floor_runs)


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def warm(folder: Path) -> None:
    """Read every file once so each run starts with the source in the page cache."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                while handle.read(64 << 20):
                    pass


class FirstByteWatch:
    """Polls ``destination``'s hidden partial folder (and ``destination``) for the first file
    holding data; ``seconds`` is then the time since ``started``."""

    def __init__(self, destination: Path, started: float):
        self.destination, self.started = destination, started
        self.seconds: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _has_data(self) -> bool:
        prefix = f".{self.destination.name}"
        for entry in os.scandir(self.destination.parent):
            if entry.name == self.destination.name or entry.name.startswith(prefix):
                for path in Path(entry.path).rglob("*"):
                    try:
                        if path.suffix in (".pt", ".safetensors") and path.stat().st_size > 0:
                            return True
                    except OSError:  # renamed or removed meanwhile
                        pass
        return False

    def _poll(self) -> None:
        while not self._stop.is_set():
            if self._has_data():
                self.seconds = time.perf_counter() - self.started
                return
            self._stop.wait(0.01)

    def stop(self) -> float | None:
        self._stop.set()
        self._thread.join()
        return self.seconds


# GNU time reports the command's ru_maxrss from its own wait4. Measured from this process
# instead, the child's peak would include this process's resident pages at the fork (Linux
# carries the old mm's high-water mark over exec): the sources generated here, gigabytes.
GNU_TIME = shutil.which("time", path="/usr/bin:/bin")


def run_measured(command: list[str], env=None, watch: Path | None = None):
    """Run ``command`` then ``sync``; return (seconds, peak RSS in bytes, return code, seconds to
    the first data byte of the output ``watch``, stdout)."""
    subprocess.run(["sync"], check=True)
    rss_file = tempfile.NamedTemporaryFile(prefix="maxrss-", delete=False)
    rss_file.close()
    if GNU_TIME:
        command = [GNU_TIME, "-f", "%M", "-o", rss_file.name, *command]
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    watcher = FirstByteWatch(watch, started) if watch is not None else None
    output, errors = [], []
    drains = [threading.Thread(target=lambda: output.append(process.stdout.read()), daemon=True),
              threading.Thread(target=lambda: errors.append(process.stderr.read()), daemon=True)]
    for drain in drains:
        drain.start()
    _, status, usage = os.wait4(process.pid, 0)
    for drain in drains:
        drain.join()
    subprocess.run(["sync"], check=True)
    seconds = time.perf_counter() - started
    first_byte = watcher.stop() if watcher else None
    returncode = os.waitstatus_to_exitcode(status)
    if returncode:
        print(f"  ! {' '.join(map(str, command[:6]))} ... exited {returncode}:\n"
              f"{b''.join(errors).decode(errors='replace')[-2000:]}", file=sys.stderr)
    peak = usage.ru_maxrss * 1024
    if GNU_TIME:
        reported = Path(rss_file.name).read_text().split()
        peak = int(reported[-1]) * 1024 if reported and reported[-1].isdigit() else 0
    os.unlink(rss_file.name)
    return seconds, peak, returncode, first_byte, b"".join(output).decode(errors="replace")


def copy_floor(source: Path, scratch: Path) -> float:
    destination = scratch / "copy"
    shutil.rmtree(destination, ignore_errors=True)
    warm(source)
    seconds = run_measured(["cp", "-r", str(source), str(destination)])[0]
    shutil.rmtree(destination)
    return seconds


def direct_copy_floor(source: Path, scratch: Path) -> float:
    """The same copy with the page cache bypassed on the write side (``dd oflag=direct``, as
    ckptkit writes): what the disk itself takes for these bytes."""
    destination = scratch / "copy-direct"
    shutil.rmtree(destination, ignore_errors=True)
    warm(source)
    files = [path for path in sorted(source.rglob("*")) if path.is_file()]
    script = []
    for path in files:
        target = destination / path.relative_to(source)
        script.append(f"mkdir -p '{target.parent}' && dd if='{path}' of='{target}' bs=64M oflag=direct status=none")
    seconds = run_measured(["sh", "-c", " && ".join(script)])[0]
    shutil.rmtree(destination)
    return seconds


def gpt2_tokenizer_folder(folder: Path) -> Path:
    """A byte-level GPT-2 tokenizer with no merges (the transformers script saves a tokenizer
    and would otherwise download one)."""
    folder.mkdir(parents=True, exist_ok=True)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    characters, extra = [], 0
    for byte in range(256):
        if byte in printable:
            characters.append(chr(byte))
        else:
            characters.append(chr(256 + extra))
            extra += 1
    vocab = {character: index for index, character in enumerate(characters)}
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    return folder


def ckptkit_command(*arguments) -> list[str]:
    return [sys.executable, "-m", "ckptkit.cli", *map(str, arguments)]


def anchor_command(anchor_python: str, source: Path, destination: Path, tokenizer: Path) -> list[str]:
    script = subprocess.run([anchor_python, "-c", "import transformers, os; print(os.path.dirname("
                             "os.path.dirname(transformers.__file__)))"],
                            check=True, capture_output=True, text=True).stdout.strip()
    iteration_folder = next(path for path in source.iterdir() if path.is_dir())
    return [anchor_python, f"{script}/{ANCHOR_SCRIPT}", "--convert_checkpoint_from_megatron_to_transformers",
            "--load_path", str(iteration_folder), "--save_path", str(destination),
            "--tokenizer_name", str(tokenizer), "--max_shard_size", "5GB"]


def largest_tensor_bytes(size: str) -> int:
    """The model's largest canonical tensor in its source dtype, vocabulary padded for TP2."""
    spec = model_spec(size)
    element = torch.empty((), dtype=DTYPES[source_dtype(size)]).element_size()
    padded = -(-spec.vocab_size // (128 * SOURCE_TP)) * 128 * SOURCE_TP
    sizes = [(padded if "word_embeddings" in tensor.name or tensor.name == "output_layer.weight" else tensor.shape[0])
             * torch.Size(tensor.shape[1:]).numel() if tensor.shape else 1 for tensor in canonical_tensors(spec)]
    return max(sizes) * element


def source_dtype(size: str) -> str:
    return "bf16" if size in LLAMA_SIZES else "fp16"


def make_sources(size: str, work: Path) -> tuple[Path, Path]:
    megatron_source = work / f"{size}-tp{SOURCE_TP}pp{SOURCE_PP}"
    hf_source = work / f"{size}-hf"
    naming = "mcore-local" if size in LLAMA_SIZES else "legacy"  # GPT: the form the transformers script reads
    if not megatron_source.exists():
        make(megatron_source, size=size, tp=SOURCE_TP, pp=SOURCE_PP, naming=naming, dtype=source_dtype(size))
    if not hf_source.exists():
        make(hf_source, size=size, format="hf", dtype=source_dtype(size))
    return megatron_source, hf_source


def bench_size(size: str, work: Path, *, workers: list[int], anchor_python: str | None, repeat: int,
               keep: bool, diverge: bool) -> list[Measurement]:
    """Every measurement for one model size (sources generated when missing)."""
    spec = model_spec(size)
    megatron_source, hf_source = make_sources(size, work)
    scratch = work / "scratch"
    scratch.mkdir(exist_ok=True)
    tokenizer = gpt2_tokenizer_folder(work / "gpt2-tokenizer")
    bound = GIB + 3 * largest_tensor_bytes(size)
    reshard_pp = 4 if spec.num_layers >= 4 else 2
    # 1 GB shards: several output files, so that workers have files to share.
    cases = [("megatron-to-hf", megatron_source, ["megatron-to-hf", megatron_source, None, "--max-shard-size", "1GB"]),
             ("hf-to-megatron", hf_source, ["hf-to-megatron", hf_source, None, "--tp", 2, "--pp", 2]),
             (f"reshard --tp 1 --pp {reshard_pp}", megatron_source,
              ["reshard", megatron_source, None, "--tp", 1, "--pp", reshard_pp])]
    floors = {source: [] for source in (megatron_source, hf_source)}
    direct_floors = {source: [] for source in (megatron_source, hf_source)}
    results = {}
    for _ in range(repeat):
        for source in floors:  # alternating with the conversions: the same disk, minute by minute
            floors[source].append(copy_floor(source, scratch))
            direct_floors[source].append(direct_copy_floor(source, scratch))
        for what, source, arguments in cases:
            for worker_count in workers:
                destination = scratch / "out"
                shutil.rmtree(destination, ignore_errors=True)
                command = [destination if argument is None else argument for argument in arguments]
                extra = ["--workers", worker_count] if worker_count > 1 else []
                warm(source)
                load = os.getloadavg()[0]
                seconds, peak, code, first_byte, _ = run_measured(ckptkit_command(*command, *extra),
                                                                  watch=destination)
                written = folder_bytes(destination) if destination.exists() else 0
                shutil.rmtree(destination, ignore_errors=True)
                measurement = results.setdefault((what, worker_count), Measurement(
                    size, what, worker_count, [], [], [], 0, folder_bytes(source), written, floors[source],
                    direct_floors[source], 0, bound))
                measurement.runs.append(seconds)
                measurement.loads_before.append(load)
                if first_byte is not None:
                    measurement.first_byte_runs.append(first_byte)
                measurement.peak_rss_bytes = max(measurement.peak_rss_bytes, peak)
                measurement.returncode = measurement.returncode or code
    measurements = list(results.values())
    if anchor_python:
        measurements.append(anchor(size, megatron_source, scratch, tokenizer, anchor_python, repeat, bound,
                                   floors[megatron_source], direct_floors[megatron_source]))
    if diverge:
        measurements.append(diverged(size, megatron_source, scratch, repeat, bound, floors[megatron_source],
                                     direct_floors[megatron_source]))
    print(f"  {size}: {parameter_count(spec) / 1e9:.2f}B parameters", file=sys.stderr)
    return measurements


def anchor(size, source, scratch, tokenizer, anchor_python, repeat, bound, floors, direct_floors) -> Measurement:
    measurement = Measurement(size, "transformers script (megatron->hf)", 1, [], [], [], 0, folder_bytes(source), 0,
                              floors, direct_floors, 0, bound)
    for _ in range(repeat):
        destination = scratch / "anchor"
        shutil.rmtree(destination, ignore_errors=True)
        warm(source)
        measurement.loads_before.append(os.getloadavg()[0])
        env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", PYTHONWARNINGS="ignore")
        seconds, peak, code, _, _ = run_measured(anchor_command(anchor_python, source, destination, tokenizer), env)
        measurement.bytes_written = folder_bytes(destination) if destination.exists() else 0
        shutil.rmtree(destination, ignore_errors=True)
        measurement.runs.append(seconds)
        measurement.peak_rss_bytes = max(measurement.peak_rss_bytes, peak)
        measurement.returncode = measurement.returncode or code
    return measurement


def diverged(size, source, scratch, repeat, bound, floors, direct_floors) -> Measurement:
    """``megatron-to-hf`` once the source's copies differ; the source is renamed ``...-diverged``."""
    changed = diverge_copies(source)
    diverged_source = source.with_name(source.name + "-diverged")
    source.rename(diverged_source)
    measurement = Measurement(size, f"megatron-to-hf, copies of {changed} tensors differ", 1, [], [], [], 0,
                              folder_bytes(diverged_source), 0, floors, direct_floors, 0, bound)
    for _ in range(repeat):
        destination = scratch / "out"
        shutil.rmtree(destination, ignore_errors=True)
        warm(diverged_source)
        measurement.loads_before.append(os.getloadavg()[0])
        seconds, peak, code, first_byte, output = run_measured(ckptkit_command(
            "megatron-to-hf", diverged_source, destination, "--max-shard-size", "1GB", "--json"), watch=destination)
        measurement.bytes_written = folder_bytes(destination) if destination.exists() else 0
        shutil.rmtree(destination, ignore_errors=True)
        measurement.runs.append(seconds)
        if first_byte is not None:
            measurement.first_byte_runs.append(first_byte)
        measurement.peak_rss_bytes = max(measurement.peak_rss_bytes, peak)
        measurement.returncode = measurement.returncode or code
        if not code:
            measurement.notes = [note for note in json.loads(output).get("notes", []) if "differ" in note]
    return measurement


def machine() -> str:
    cpus = os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    return f"{platform.machine()}, {cpus} cores, {memory:.0f} GiB RAM, Python {platform.python_version()}, " \
           f"torch {torch.__version__}, load average {load}"


def render(results: list[Measurement]) -> str:
    lines = ["| size | conversion | workers | GB read | GB written | seconds (median) | runs | GB/s (read) "
             "| x copy floor | x direct-copy floor | first byte, s | peak RSS GiB | RSS bound GiB | load before |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in results:
        failed = " (FAILED)" if m.returncode else ""
        runs = " / ".join(f"{seconds:.1f}" for seconds in m.runs)
        loads = " / ".join(f"{load:.1f}" for load in m.loads_before)
        lines.append(f"| {m.size} | {m.what}{failed} | {m.workers} | {m.bytes_read / 1e9:.2f} | "
                     f"{m.bytes_written / 1e9:.2f} | {m.seconds:.2f} | {runs} | {m.bytes_read / 1e9 / m.seconds:.2f} | "
                     f"{m.seconds / m.floor_seconds:.2f} | {m.seconds / m.direct_floor_seconds:.2f} | "
                     f"{m.first_byte_seconds:.2f} | {m.peak_rss_bytes / GIB:.2f} | {m.rss_bound_bytes / GIB:.2f} | "
                     f"{loads} |")
    floors = sorted({(m.size, tuple(m.floor_runs), tuple(m.direct_floor_runs), m.bytes_read) for m in results
                     if not m.what.startswith(("transformers", "megatron-to-hf, copies"))})
    lines.append("")
    lines.append("copy floors, median (runs) of cp -r + sync | dd oflag=direct + sync: " + "; ".join(
        f"{size} {nbytes / 1e9:.2f} GB {statistics.median(copy):.2f} s ({' / '.join(f'{s:.1f}' for s in copy)}) | "
        f"{statistics.median(direct):.2f} s ({' / '.join(f'{s:.1f}' for s in direct)})"
        for size, copy, direct, nbytes in floors))
    for m in results:
        for note in m.notes:
            lines.append(f"{m.size} {m.what}: {note}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="125m,1.3b",
                        help="comma-separated, from make_synthetic.SIZES and LLAMA_SIZES")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ckptkit-bench"),
                        help="scratch folder on the disk to measure")
    parser.add_argument("--workers", default="1", help="comma-separated worker counts, e.g. 1,2")
    parser.add_argument("--anchor-python", help="python of a venv with transformers==4.46.*")
    parser.add_argument("--anchor-sizes", help="sizes to run the transformers script on (default: all; it "
                        "needs about 6x the checkpoint in RAM)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the median is reported")
    parser.add_argument("--diverge-copies", action="store_true",
                        help="last, megatron-to-hf on the Megatron source with its copies made to differ")
    parser.add_argument("--keep", action="store_true", help="keep the generated sources")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    options = parser.parse_args(argv)
    options.work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}", flush=True)
    results = []
    for size in options.sizes.split(","):
        anchor_python = options.anchor_python
        if options.anchor_sizes is not None and size not in options.anchor_sizes.split(","):
            anchor_python = None
        results += bench_size(size, options.work, workers=[int(n) for n in options.workers.split(",")],
                              anchor_python=anchor_python, repeat=options.repeat, keep=options.keep,
                              diverge=options.diverge_copies)
        print(render(results), flush=True)
        if not options.keep:
            for source in options.work.glob(f"{size}-*"):
                shutil.rmtree(source)
    print(f"machine after: {machine()}")
    print(render(results))
    if options.json:
        options.json.write_text(json.dumps([dict(asdict(m), seconds=m.seconds, first_byte_seconds=m.first_byte_seconds)
                                            for m in results], indent=1))


if __name__ == "__main__":
    main()
