"""Peak memory of megatron-to-hf on a checkpoint whose copies differ, against the RSS bound.

Megatron keeps copies of some tensors (replicated tensors on every TP rank, the tied
output head on the last stage); validation compares them before anything is written.
This makes a synthetic GPT checkpoint (TP2 PP2, ``make_synthetic.py``), converts it with
``megatron-to-hf --max-shard-size 1GB``, then makes its copies differ
(``make_synthetic.diverge_copies``: every replicated tensor on TP rank 1, the tied head
on both ranks) and converts it again. Each run is its own process; peak RSS is its
``ru_maxrss`` from ``wait4``; the bound is 1 GiB + 3 x the largest tensor (the padded
fp16 word embeddings), as in ``bench_convert.py``.

    python benchmarks/bench_diverged_copies.py --size 1.3b --work /work/bench
    # the same runs with another checkout's ckptkit (e.g. an older commit), for comparison
    python benchmarks/bench_diverged_copies.py --size 1.3b --work /work/bench --also /tmp/ckptkit-before
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench_convert import GIB, SOURCE_PP, SOURCE_TP, largest_tensor_bytes, warm  # noqa: E402
from make_synthetic import diverge_copies, make  # noqa: E402


def convert(checkout: Path, source: Path, destination: Path) -> tuple[float, int, int, list[str]]:
    """``megatron-to-hf`` with ``checkout``'s ckptkit: (seconds, peak RSS bytes, exit code, notes)."""
    shutil.rmtree(destination, ignore_errors=True)
    warm(source)
    command = [sys.executable, "-m", "ckptkit.cli", "megatron-to-hf", str(source), str(destination),
               "--max-shard-size", "1GB", "--json"]
    environment = dict(os.environ, PYTHONPATH=str(checkout))
    with tempfile.TemporaryFile() as output:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=checkout, env=environment, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        output.seek(0)
        text = output.read().decode(errors="replace")
    shutil.rmtree(destination, ignore_errors=True)
    code = os.waitstatus_to_exitcode(status)
    try:
        notes = json.loads(text[text.index("{"):])["notes"]
    except ValueError:
        notes = [text.strip()[-300:]]
    return seconds, usage.ru_maxrss * 1024, code, notes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="350m", help="a size of make_synthetic.SIZES")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ckptkit-bench"))
    parser.add_argument("--also", type=Path, action="append", default=[],
                        help="another checkout of ckptkit to run the same conversions with")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    options = parser.parse_args(argv)
    source = options.work / f"gpt-{options.size}-tp{SOURCE_TP}pp{SOURCE_PP}-copies"
    destination = options.work / "scratch" / "diverged-copies-hf"
    shutil.rmtree(source, ignore_errors=True)
    destination.parent.mkdir(parents=True, exist_ok=True)
    make(source, size=options.size, tp=SOURCE_TP, pp=SOURCE_PP, naming="legacy")
    checkouts = [HERE.parent, *options.also]
    bound = 1 + 3 * largest_tensor_bytes(options.size) / GIB
    rows = []
    for state in ("identical", "diverged"):
        if state == "diverged":
            print(f"copies of {diverge_copies(source)} tensors made to differ", file=sys.stderr)
        for checkout in checkouts:
            seconds, peak, code, notes = convert(checkout, source, destination)
            about_copies = [note for note in notes if "differ" in note]
            if code:
                print(f"  ! {checkout} exited {code}: {notes[-1]}", file=sys.stderr)
            rows.append(f"| {options.size} | {state} | {checkout} | {code} | {seconds:.1f} | {peak / GIB:.2f} | "
                        f"{bound:.2f} | {len(about_copies)} |")
    if not options.keep:
        shutil.rmtree(source)
    print("| size | copies | ckptkit | exit | seconds | peak RSS GiB | RSS bound GiB | notes about copies |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
