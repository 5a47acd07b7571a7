"""A conversion killed outright (SIGKILL: no handler runs, nothing is cleaned up) at any
moment never leaves a destination that looks complete but is not, and the next run succeeds.

Two conversions of the real GPT-2 checkpoint run side by side, each as its own
``python -m ckptkit.cli`` process: Megatron -> Hugging Face in 500 KB shards (seven
shards and an index), and a reshard to per-rank files at TP1 PP2. For each, the same
conversion made in this process gives the reference output and how long writing takes.
Then, with ``--overwrite`` into the same destination, each run is killed at a seeded
random moment of its writing. After every kill the destination is either byte for byte the reference (which
``ckptkit verify`` accepts) or absent (which it refuses), with the output it was
replacing kept in a hidden sibling; hidden partial folders may remain. One run is
interrupted with SIGINT instead (Ctrl-C: it cleans up after itself). A last run must
succeed, produce the reference, and leave nothing hidden behind.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from click.testing import CliRunner

from ckptkit import atomic
from ckptkit.cli import main
from ckptkit.convert import megatron_to_hf, reshard
from ckptkit.verification import verify

from conftest import fixture_path

SEED = 20240607
KILLS_PER_CONVERSION = 5
SOURCE = ("gpt2_tp2pp2", "conv", "torch")
STARTUP_TIMEOUT_S = 60
_verify_lock = threading.Lock()  # one verification at a time across the two streams


def conversions(source: Path) -> dict[str, tuple[list[str], object]]:
    """Name -> (command-line arguments, the library call they make, given DST and on_start)."""
    return {
        "megatron-to-hf": (["megatron-to-hf", str(source), "{dst}", "--max-shard-size", "500KB"],
                           lambda dst, on_start: megatron_to_hf(source, dst, max_shard_size="500KB",
                                                                on_start=on_start)),
        "reshard": (["reshard", str(source), "{dst}", "--tp", "1", "--pp", "2"],
                    lambda dst, on_start: reshard(source, dst, tp=1, pp=2, on_start=on_start)),
    }


def reference_output(convert, destination: Path) -> float:
    """Convert in this process (what the command line calls) into ``destination``;
    return how long writing took (from the moment the output is planned to the end)."""
    writing = {}
    convert(destination, lambda steps: writing.setdefault("since", time.monotonic()))
    return time.monotonic() - writing["since"]


def command(arguments: list[str], destination: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ckptkit.cli",
            *[str(destination) if arg == "{dst}" else arg for arg in arguments], *extra]


def snapshot(folder: Path) -> dict[str, bytes] | None:
    """Every file under ``folder`` with its bytes, or None when there is no folder."""
    if not folder.is_dir():
        return None
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def hidden_siblings(destination: Path, kind: str = "") -> list[Path]:
    prefix = f".{destination.name}.ckptkit-{kind}"
    return sorted(path for path in destination.parent.iterdir() if path.name.startswith(prefix))


def verify_accepts(destination: Path) -> bool:
    with _verify_lock:
        return verify(destination).equivalent


def own_partial_folder(destination: Path, process: subprocess.Popen) -> bool:
    """Has this process created its partial folder (``.NAME.ckptkit-partial-HOST-PID-XXXX``)?
    Partial folders of earlier, killed runs do not count."""
    return any(f"-{process.pid}-" in path.name for path in hidden_siblings(destination, "partial-"))


def wait_until_writing(process: subprocess.Popen, destination: Path) -> None:
    """Poll until ``process`` is writing (its partial folder exists) or has exited."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not own_partial_folder(destination, process) and time.monotonic() < deadline:
        try:
            process.wait(timeout=0.005)
            return
        except subprocess.TimeoutExpired:
            pass


def finish(process: subprocess.Popen) -> None:
    process.wait(timeout=STARTUP_TIMEOUT_S)
    error = process.stderr.read().decode()
    process.stderr.close()
    assert process.returncode == 0, error


def start(arguments, destination: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(command(arguments, destination, *extra), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def run_and_kill_while_writing(arguments, destination: Path, kill_after_s: float) -> tuple[str, float]:
    """Start a conversion with --overwrite; SIGKILL it ``kill_after_s`` after its partial
    folder appears. Returns ("killed", s), or ("finished", seconds it wrote) if it ended first."""
    process = start(arguments, destination, "--overwrite")
    try:
        wait_until_writing(process, destination)
        writing_since = time.monotonic()
        process.wait(timeout=kill_after_s)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        process.stderr.close()
        return "killed", kill_after_s
    finish(process)
    return "finished", time.monotonic() - writing_since


def interrupt_while_writing(arguments, destination: Path, after_s: float, reference, name: str) -> None:
    """Ctrl-C (SIGINT) mid-write: exit 130, the output being replaced still in place, and
    this run's partial folder removed (the stale ones of killed runs went at its start)."""
    process = start(arguments, destination, "--overwrite")
    try:
        wait_until_writing(process, destination)
        process.wait(timeout=after_s)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGINT)
        process.wait(timeout=STARTUP_TIMEOUT_S)
    error = process.stderr.read().decode()
    process.stderr.close()
    context = f"{name}: SIGINT {after_s:.3f}s into writing"
    # 0 or -SIGINT: it had finished, and was stopped while exiting
    assert process.returncode in (130, 0, -signal.SIGINT), f"{context}: {error}"
    if process.returncode == 130:
        assert "interrupted: nothing was written to the destination" in error, f"{context}: {error}"
    assert snapshot(destination) == reference, context
    assert hidden_siblings(destination, "partial-") == [], context


def kill_repeatedly(name: str, arguments: list[str], destination: Path, reference: dict, writing_s: float) -> list[str]:
    rng = random.Random(f"{SEED}-{name}")
    outcomes = []
    while outcomes.count("killed") < KILLS_PER_CONVERSION:
        assert len(outcomes) < 2 * KILLS_PER_CONVERSION, f"{name}: runs kept ending before the kill: {outcomes}"
        trial = len(outcomes)
        kill_after_s = rng.uniform(0.0, 0.9 * writing_s)
        outcome, seconds = run_and_kill_while_writing(arguments, destination, kill_after_s)
        if outcome == "finished":  # this run wrote faster than the first: aim earlier
            writing_s = min(writing_s, seconds)
        outcomes.append(outcome)
        found = snapshot(destination)
        context = f"{name} trial {trial}: {outcome} {kill_after_s:.3f}s into writing"
        assert found in (None, reference), f"{context}: destination holds a partial output"
        assert verify_accepts(destination) == (found == reference), context
        if found is None:
            # Killed between moving the old output aside and renaming the new one in:
            # the old one waits in a hidden sibling, and the next run puts it back.
            kept = [snapshot(path) for path in hidden_siblings(destination, "previous-")]
            assert reference in kept, f"{context}: the output being replaced was lost"
        for leftover in hidden_siblings(destination):
            assert ".ckptkit-partial-" in leftover.name or ".ckptkit-previous-" in leftover.name, leftover
    interrupt_while_writing(arguments, destination, rng.uniform(0.0, 0.9 * writing_s), reference, name)
    final = subprocess.run(command(arguments, destination, "--overwrite"), capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert snapshot(destination) == reference
    assert verify_accepts(destination)
    assert hidden_siblings(destination) == [], "stale partial folders of killed runs were not removed"
    return outcomes


def test_sigkill_at_random_moments_never_leaves_a_destination_that_looks_complete(tmp_path):
    source = fixture_path(*SOURCE)
    streams = conversions(source)
    references, writing_s = {}, {}
    for name, (_, convert) in streams.items():
        (tmp_path / name).mkdir()
        writing_s[name] = reference_output(convert, tmp_path / name / "out")
        references[name] = snapshot(tmp_path / name / "out")
        assert verify_accepts(tmp_path / name / "out")
        assert verify(source, tmp_path / name / "out", ignore_dtype=True).equivalent
    with ThreadPoolExecutor(max_workers=len(streams)) as pool:
        futures = {name: pool.submit(kill_repeatedly, name, arguments, tmp_path / name / "out", references[name],
                                     writing_s[name])
                   for name, (arguments, _) in streams.items()}
        outcomes = {name: future.result() for name, future in futures.items()}
    kills = sum(outcome == "killed" for results in outcomes.values() for outcome in results)
    assert kills >= 10, f"only {kills} runs were killed mid-write: {outcomes}"


# ---------------------------------------------------------------------------- what the next run does with leftovers

def a_finished_process_id() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_next_run_removes_partial_folders_of_dead_processes_and_keeps_live_ones(tmp_path):
    destination = tmp_path / "out"
    dead = tmp_path / f".out.ckptkit-partial-{atomic._HOST}-{a_finished_process_id()}-abc123"
    live = tmp_path / f".out.ckptkit-partial-{atomic._HOST}-{os.getpid()}-def456"
    other_machine = tmp_path / f".out.ckptkit-partial-00000000-{a_finished_process_id()}-ghi789"
    for folder in (dead, live, other_machine):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half written")
    result = CliRunner().invoke(main, ["megatron-to-hf", str(fixture_path(*SOURCE)), str(destination)])
    assert result.exit_code == 0, result.output
    assert not dead.exists() and live.exists() and other_machine.exists()
    assert verify_accepts(destination)


def test_output_moved_aside_by_a_killed_overwrite_is_put_back_by_the_next_run(tmp_path):
    destination = tmp_path / "out"
    moved_aside = tmp_path / f".out.ckptkit-previous-{atomic._HOST}-{a_finished_process_id()}"
    moved_aside.mkdir()
    (moved_aside / "keep.txt").write_text("the old output")
    result = CliRunner().invoke(main, ["megatron-to-hf", str(fixture_path(*SOURCE)), str(destination)])
    assert result.exit_code == 2 and "--overwrite" in result.output  # it is back, and not empty
    assert (destination / "keep.txt").read_text() == "the old output"
    assert hidden_siblings(destination) == []
