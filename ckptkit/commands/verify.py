"""``ckptkit verify``: are two checkpoints the same model, or is one intact (over ``ckptkit.verification``)?

Exit codes are the verdict: 0 equivalent (or intact); 1 different, 2 not intact; with ``--logits``,
0 when the logits match and 1 when they differ.
"""
from __future__ import annotations

import sys

import click
from rich.table import Table

from .shell import console, emit_json, handle_errors, show_notes, source_options, stdout


@click.command("verify")
@click.argument("a", type=click.Path(exists=False))
@click.argument("b", type=click.Path(exists=False), required=False)
@click.option("--atol", type=float, default=0.0, show_default=True, help="Largest allowed |a - b| per element.")
@click.option("--ignore-dtype", is_flag=True, help="Compare values across dtypes (e.g. fp32 vs bf16).")
@click.option("--all-rows", is_flag=True, help="Show every tensor, not only the ones that differ.")
@click.option("--optimizer", is_flag=True,
              help="Also compare the optimizer states (step, groups, LR schedule; per canonical tensor its master "
                   "copy, exp_avg and exp_avg_sq, within --atol) across layouts and kinds.")
@click.option("--logits", is_flag=True,
              help="Run both checkpoints on the same tokens and compare logits (Megatron in its own TP/PP layout).")
@click.option("--rtol", type=float, default=0.0, show_default=True, help="With --logits: relative tolerance.")
@click.option("--tokens", "tokens_file", type=click.Path(), help="With --logits: token ids (.pt or .json [batch, seq]).")
@source_options
@handle_errors
def verify_command(a, b, atol, ignore_dtype, all_rows, optimizer, logits, rtol, tokens_file, strict,
                   trust_remote_pickle, as_json):
    """Check that two checkpoints (any layouts) hold the same model, tensor by tensor.

    With one path, check that checkpoint alone: files, index coverage, headers, shapes, and
    that every fp32 master copy of its optimizer state rounds to its stored weight.
    Exits 0 only when equivalent (or intact).

    \b
    Example:
      ckptkit verify checkpoints/gpt2/ gpt2-hf/
      ckptkit verify gpt2-hf/
      ckptkit verify --optimizer checkpoints/gpt2-tp2dp2/ checkpoints/gpt2-tp1pp2dp4/
      ckptkit verify --logits checkpoints/gpt2/ gpt2-hf/ --atol 1e-4
    """
    if logits:
        _verify_logits(a, b, atol, rtol, tokens_file, as_json)
        return
    from ..verification import verify

    result = verify(a, b, atol=atol, ignore_dtype=ignore_dtype, optimizer=optimizer, strict=strict,
                    trust_remote_pickle=trust_remote_pickle)
    if as_json:
        emit_json(result.to_dict())
    else:
        show_notes(result.notes)
        for problem in result.problems:
            console.print(f"[red]problem:[/] {problem}", highlight=False, soft_wrap=True)
        _print_rows(f"{a} vs {b}" if b else f"{a}", result.tensors, all_rows)
        _print_rows("optimizer state", result.optimizer, all_rows)
        verdict = "[green]equivalent[/]" if b else "[green]intact[/]"
        if not result.equivalent:
            verdict = "[red]NOT equivalent[/]" if b else "[red]NOT intact[/]"
        line = f"{verdict}: {len(result.tensors)} tensors, max |a-b| = {result.max_abs_diff:.3g}"
        if result.optimizer:
            state_diff = max(row.max_abs_diff or 0.0 for row in result.optimizer)
            line += f"; {len(result.optimizer)} optimizer state tensors, max |a-b| = {state_diff:.3g}"
        stdout.print(line)
    sys.exit(0 if result.equivalent else 1 if b else 2)


def _print_rows(title, rows, all_rows) -> None:
    table = Table(title=title)
    table.add_column("tensor", overflow="fold", min_width=24)
    for column in ("status", "shape A", "shape B", "dtype A", "dtype B", "max |a-b|"):
        table.add_column(column)
    shown = [row for row in rows if all_rows or not row.ok]
    for row in shown:
        style = "green" if row.ok else "red"
        table.add_row(row.name, f"[{style}]{row.status}[/]", str(list(row.shape_a or [])),
                      str(list(row.shape_b or [])), row.dtype_a or "", row.dtype_b or "",
                      "" if row.max_abs_diff is None else f"{row.max_abs_diff:.3g}")
    if shown:
        stdout.print(table)


def _verify_logits(a, b, atol, rtol, tokens_file, as_json):
    from ..errors import BadInput
    from ..logits_check import compare_logits, load_tokens

    if b is None:
        raise BadInput("verify --logits needs two checkpoints")
    tokens = load_tokens(tokens_file) if tokens_file else None
    result = compare_logits(a, b, tokens=tokens, atol=atol or 1e-4, rtol=rtol)
    if as_json:
        emit_json(result.to_dict())
    else:
        verdict = "[green]logits match[/]" if result.equivalent else "[red]logits differ[/]"
        stdout.print(f"{verdict}: max |a-b| = {result.max_abs_diff:.3g}, max rel = {result.max_rel_diff:.3g} "
                     f"(atol {result.atol:g}, rtol {result.rtol:g}); A ran on {result.runner_a}, "
                     f"B on {result.runner_b}", highlight=False)
    sys.exit(0 if result.equivalent else 1)


COMMANDS = (verify_command,)
