"""Time and peak memory of ckptkit's conversions against the copy floor and the transformers script.

For each model size it generates synthetic checkpoints (``make_synthetic.py``), then
measures, each in its own process, with the source's pages already cached and a
``sync`` before the clock starts and inside the timed span:

* the copy floor: ``cp -r SOURCE DEST && sync`` (the same bytes, the same disk);
* the direct-copy floor: each file copied by ``dd bs=64M oflag=direct`` then ``sync``
  (writes around the page cache, as ckptkit's are);
* ``ckptkit megatron-to-hf --max-shard-size 1GB``, ``hf-to-megatron --tp 2 --pp 2`` and ``reshard --tp 1 --pp 4``,
  each followed by ``sync`` (a conversion is done when its bytes are on disk);
* with ``--anchor-python``: transformers 4.46's
  ``checkpoint_reshaping_and_interoperability.py`` on the same Megatron checkpoint.

Peak RSS is the child's ``ru_maxrss`` from ``wait4`` (the largest of the process and
the children it waited for, e.g. ``--workers`` processes). Every figure is printed
with its ratio to the copy floor; nothing here is a pass/fail test.

    python benchmarks/bench_convert.py --sizes 125m,1.3b --work /work/bench \\
        --anchor-python /tmp/anchor-venv/bin/python --workers 1,2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from make_synthetic import gpt_spec, make, parameter_count  # noqa: E402

GIB = 1024 ** 3
SOURCE_TP, SOURCE_PP = 2, 2
ANCHOR_SCRIPT = "transformers/models/megatron_gpt2/checkpoint_reshaping_and_interoperability.py"


@dataclass
class Measurement:
    size: str
    what: str
    workers: int
    seconds: float
    peak_rss_bytes: int
    bytes_read: int
    bytes_written: int
    floor_seconds: float
    returncode: int
    load_before: float = 0.0
    direct_floor_seconds: float = 0.0

    @property
    def ratio_to_floor(self) -> float:
        return self.seconds / self.floor_seconds


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def warm(folder: Path) -> None:
    """Read every file once so each run starts with the source in the page cache."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                while handle.read(64 << 20):
                    pass


def timed(command: list[str], env=None) -> tuple[float, int, int]:
    """Run ``command`` then ``sync``; return (seconds, peak RSS in bytes, return code)."""
    subprocess.run(["sync"], check=True)
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    subprocess.run(["sync"], check=True)
    seconds = time.perf_counter() - started
    returncode = os.waitstatus_to_exitcode(status)
    if returncode:
        error = process.stderr.read().decode(errors="replace")[-2000:]
        print(f"  ! {' '.join(command[:4])} ... exited {returncode}:\n{error}", file=sys.stderr)
    process.stderr.close()
    return seconds, usage.ru_maxrss * 1024, returncode


def copy_floor(source: Path, scratch: Path) -> float:
    destination = scratch / "copy"
    shutil.rmtree(destination, ignore_errors=True)
    warm(source)
    seconds, _, _ = timed(["cp", "-r", str(source), str(destination)])
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
    seconds, _, _ = timed(["sh", "-c", " && ".join(script)])
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


def bench_size(size: str, work: Path, *, workers: list[int], anchor_python: str | None, repeat: int,
               keep: bool) -> list[Measurement]:
    """Every measurement for one model size (sources generated when missing)."""
    spec = gpt_spec(size)
    megatron_source = work / f"gpt-{size}-tp{SOURCE_TP}pp{SOURCE_PP}"
    hf_source = work / f"gpt-{size}-hf"
    if not megatron_source.exists():
        make(megatron_source, size=size, tp=SOURCE_TP, pp=SOURCE_PP, naming="legacy")
    if not hf_source.exists():
        make(hf_source, size=size, format="hf")
    scratch = work / "scratch"
    scratch.mkdir(exist_ok=True)
    tokenizer = gpt2_tokenizer_folder(work / "gpt2-tokenizer")
    floors = {source: min(copy_floor(source, scratch) for _ in range(repeat))
              for source in (megatron_source, hf_source)}
    direct_floors = {source: min(direct_copy_floor(source, scratch) for _ in range(repeat))
                     for source in (megatron_source, hf_source)}
    # 1 GB shards: several output files, so that workers have files to share.
    cases = [("megatron-to-hf", megatron_source, ["megatron-to-hf", megatron_source, None, "--max-shard-size", "1GB"]),
             ("hf-to-megatron", hf_source, ["hf-to-megatron", hf_source, None, "--tp", 2, "--pp", 2]),
             ("reshard", megatron_source, ["reshard", megatron_source, None, "--tp", 1, "--pp", 4])]
    results = []
    for what, source, arguments in cases:
        for worker_count in workers:
            best = None
            for _ in range(repeat):
                destination = scratch / what
                shutil.rmtree(destination, ignore_errors=True)
                command = [destination if argument is None else argument for argument in arguments]
                warm(source)
                load = os.getloadavg()[0]
                extra = ["--workers", worker_count] if worker_count > 1 else []
                seconds, peak, code = timed(ckptkit_command(*command, *extra))
                written = folder_bytes(destination) if destination.exists() else 0
                if not keep:
                    shutil.rmtree(destination, ignore_errors=True)
                if best is None or seconds < best.seconds:
                    best = Measurement(size, what, worker_count, seconds, peak, folder_bytes(source), written,
                                       floors[source], code, load, direct_floors[source])
            results.append(best)
    if anchor_python:
        best = None
        for _ in range(repeat):
            destination = scratch / "anchor"
            shutil.rmtree(destination, ignore_errors=True)
            warm(megatron_source)
            load = os.getloadavg()[0]
            env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", PYTHONWARNINGS="ignore")
            seconds, peak, code = timed(anchor_command(anchor_python, megatron_source, destination, tokenizer), env)
            written = folder_bytes(destination) if destination.exists() else 0
            shutil.rmtree(destination, ignore_errors=True)
            if best is None or seconds < best.seconds:
                best = Measurement(size, "transformers script (megatron->hf)", 1, seconds, peak,
                                   folder_bytes(megatron_source), written, floors[megatron_source], code, load,
                                   direct_floors[megatron_source])
        results.append(best)
    print(f"  {size}: {parameter_count(spec) / 1e9:.2f}B parameters", file=sys.stderr)
    return results


def largest_tensor_bytes(size: str) -> int:
    spec = gpt_spec(size)
    padded = -(-spec.vocab_size // (128 * SOURCE_TP)) * 128 * SOURCE_TP
    return padded * spec.hidden_size * 2  # the fp16 word embeddings


def machine() -> str:
    cpus = os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    return f"{platform.machine()}, {cpus} cores, {memory:.0f} GiB RAM, Python {platform.python_version()}, " \
           f"load average {load}"


def render(results: list[Measurement]) -> str:
    lines = ["| size | conversion | workers | GB read | GB written | seconds | GB/s (read) | x copy floor "
             "| x direct-copy floor | peak RSS GiB | RSS bound GiB | x script time | x script RSS | load before |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    anchors = {m.size: m for m in results if m.what.startswith("transformers")}
    for m in results:
        bound = 1 + 3 * largest_tensor_bytes(m.size) / GIB
        anchor = anchors.get(m.size)
        versus = ("", "")
        if anchor and m.what == "megatron-to-hf":
            versus = (f"{m.seconds / anchor.seconds:.2f}", f"{m.peak_rss_bytes / anchor.peak_rss_bytes:.2f}")
        failed = " (FAILED)" if m.returncode else ""
        lines.append(f"| {m.size} | {m.what}{failed} | {m.workers} | {m.bytes_read / 1e9:.2f} | "
                     f"{m.bytes_written / 1e9:.2f} | {m.seconds:.1f} | {m.bytes_read / 1e9 / m.seconds:.2f} | "
                     f"{m.ratio_to_floor:.2f} | {m.seconds / m.direct_floor_seconds:.2f} | {m.peak_rss_bytes / GIB:.2f} | {bound:.2f} | {versus[0]} | {versus[1]} | "
                     f"{m.load_before:.1f} |")
    floors = sorted({(m.size, m.floor_seconds, m.direct_floor_seconds, m.bytes_read) for m in results})
    lines.append("")
    lines.append("copy floors (cp -r + sync | dd oflag=direct + sync): " + "; ".join(
        f"{size} {nbytes / 1e9:.2f} GB {seconds:.1f} s | {direct:.1f} s" for size, seconds, direct, nbytes in floors))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="125m,1.3b", help="comma-separated, from make_synthetic.SIZES")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ckptkit-bench"),
                        help="scratch folder on the disk to measure")
    parser.add_argument("--workers", default="1", help="comma-separated worker counts, e.g. 1,2")
    parser.add_argument("--anchor-python", help="python of a venv with transformers==4.46.*")
    parser.add_argument("--anchor-sizes", help="sizes to run the transformers script on (default: all; it "
                        "needs about 6x the checkpoint in RAM)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case; the fastest is kept")
    parser.add_argument("--keep", action="store_true", help="keep the generated sources and outputs")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    options = parser.parse_args(argv)
    options.work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}", flush=True)
    results = []
    for size in options.sizes.split(","):
        anchor = options.anchor_python
        if options.anchor_sizes is not None and size not in options.anchor_sizes.split(","):
            anchor = None
        results += bench_size(size, options.work, workers=[int(n) for n in options.workers.split(",")],
                              anchor_python=anchor, repeat=options.repeat, keep=options.keep)
        if not options.keep:
            for source in options.work.glob(f"gpt-{size}-*"):
                shutil.rmtree(source)
    print(f"machine after: {machine()}")
    print(render(results))
    if options.json:
        options.json.write_text(json.dumps([asdict(m) for m in results], indent=1))


if __name__ == "__main__":
    main()
