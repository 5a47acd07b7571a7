"""What tools/megatron_families.py and tools/megatron_moe.py share: their command line
(``prepare DIR``, ``compare DIR RESULTS [--json FILE]``) and the comparison of a Megatron
run's ``RUN_logits.pt`` (tools/megatron_logits.py) with reference logits.

    rows = [{"run": "qwen3_torch", **logits_row(results, "qwen3_torch", reference)}]
    print_rows(rows, 18, lambda row: "vs Megatron-LM")
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

VOCAB = 1000  # the real vocabulary of every checked model; Megatron pads its logits past it


def ckptkit(*args: str) -> None:
    """Run the ckptkit CLI in a process of its own, importing ckptkit from ``CKPTKIT_PATH``
    when set (a clean copy of a commit) and from outside the repo, which would shadow it."""
    env = dict(os.environ)
    if os.environ.get("CKPTKIT_PATH"):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ["CKPTKIT_PATH"], env.get("PYTHONPATH")]))
    command = [sys.executable, "-c", "from ckptkit.cli import main; main()", *args]
    print("$ ckptkit", " ".join(args), flush=True)
    subprocess.run(command, check=True, env=env, cwd="/")


def logits_row(results: Path, run: str, reference: dict) -> dict:
    """``{"shape", "max_abs", "mean_abs"}`` of ``results/RUN_logits.pt`` against
    ``reference`` ({"tokens", "logits"}, optionally "vocab") over the real vocabulary,
    or ``{"error"}`` when the run left no logits."""
    path = results / f"{run}_logits.pt"
    if not path.exists():
        return {"error": "no logits (Megatron run failed)"}
    ours = torch.load(path, weights_only=True)
    assert torch.equal(ours["tokens"], reference["tokens"]), run
    logits, expected = ours["logits"].float(), reference["logits"].float()
    # Megatron's logits may come sequence-first ([s, b, v]) where the reference is [b, s, v].
    if logits.shape != expected.shape and logits.transpose(0, 1).shape == expected.shape:
        logits = logits.transpose(0, 1)
    vocab = reference.get("vocab", VOCAB)
    diff = (logits[..., :vocab] - expected[..., :vocab]).abs()
    return {"shape": list(logits.shape), "max_abs": diff.max().item(), "mean_abs": diff.mean().item()}


def print_rows(rows: list[dict], width: int, tail: Callable[[dict], str]) -> None:
    """One line per run: its error, or max / mean |Megatron - reference|, the shape and ``tail(row)``."""
    for row in rows:
        if "error" in row:
            print(f"{row['run']:{width}s} {row['error']}")
        else:
            print(f"{row['run']:{width}s} max {row['max_abs']:.3g}  mean {row['mean_abs']:.3g}  "
                  f"shape {row['shape']}  {tail(row)}")


def main(description: str, prepare: Callable[[Path], None], compare: Callable[[Path, Path], list[dict]]) -> None:
    """``prepare DIR`` or ``compare DIR RESULTS [--json FILE]`` (the rows also written to FILE)."""
    parser = argparse.ArgumentParser(description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare").add_argument("dir", type=Path)
    cmp = sub.add_parser("compare")
    cmp.add_argument("dir", type=Path)
    cmp.add_argument("results", type=Path)
    cmp.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.dir)
    else:
        rows = compare(args.dir, args.results)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
