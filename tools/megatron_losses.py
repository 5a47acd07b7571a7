"""The per-iteration ``lm loss`` of Megatron-LM training runs, read from their logs, for the
resume checks (tools/megatron_resume_check.sh, tools/megatron_trainer_resume_check.sh).

Megatron does not reset its loss sum after logging a run's first iteration (``training_log``:
``should_reset = not is_first_iteration``), so the loss it logs at a run's second iteration is
the mean of the first two; :func:`run_losses` gives that iteration's own loss, 2 x logged - first.
A resumed run must load strictly: Megatron retries a failed strict load non-strictly and prints
``load_return: ...``, so such a line (or a traceback, or a nonzero exit) makes the run FAILED.

    >>> run_losses(["iteration        1/      15 | lm loss: 6.0", "iteration        2/      15 | lm loss: 5.5",
    ...             "rc=0"])
    ({1: 6.0, 2: 5.0}, [])
"""
from __future__ import annotations

import os
import re

_LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*lm loss: ([0-9.E+-]+)")


def run_losses(lines: list[str]) -> tuple[dict[int, float], list[str]]:
    """``({iteration: loss}, problems)`` of one run's log lines; problems are empty for a run
    that loaded strictly and exited 0."""
    problems = [line for line in lines if line.startswith("load_return") or re.match(r"\w*(Error|Exception)\b", line)]
    if "rc=0" not in lines and not problems:
        problems = ["no rc=0: the run did not finish"]
    found = {int(match.group(1)): float(match.group(2)) for match in map(_LOSS.search, lines) if match}
    if found:  # the second logged iteration averages the first two
        first = min(found)
        if first + 1 in found:
            found[first + 1] = 2 * found[first + 1] - found[first]
    return found, problems


def read_runs(out: str, runs: list[str]) -> dict[str, dict[int, float]]:
    """Each run's losses from ``out/RUN.log``, printing ``RUN: FAILED`` and why for a run with
    problems."""
    losses = {}
    for run in runs:
        path = f"{out}/{run}.log"
        lines = open(path, errors="replace").read().splitlines() if os.path.exists(path) else []
        losses[run], problems = run_losses(lines)
        if problems:
            print(f"{run}: FAILED", *problems[:4], sep="\n  ")
    return losses
