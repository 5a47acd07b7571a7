"""``ckptkit demo``: the whole flow on the Megatron-LM checkpoint shipped with ckptkit (over ``ckptkit.demo``)."""
from __future__ import annotations

import sys

import click
from rich.table import Table

from .shell import console, emit_json, handle_errors, json_option, stdout


@click.command("demo")
@click.option("--keep", type=click.Path(), help="Keep the outputs in this folder instead of a temporary one.")
@json_option(help="Print the summary as JSON.")
@handle_errors
def demo_command(keep, as_json):
    """Run the whole flow on a tiny real Megatron-LM checkpoint shipped with ckptkit.

    Copies it, inspects it, converts it to Hugging Face, checks the logits against the
    ones Megatron-LM computed, reshards it to TP1 PP3, and verifies everything.

    \b
    Example:
      ckptkit demo
    """
    from ..demo import run_demo

    summary = run_demo(keep, log=(lambda message: None) if as_json else
                       (lambda message: console.print(message, highlight=False)))
    if as_json:
        emit_json(summary.to_dict())
    else:
        table = Table(title="ckptkit demo")
        for column in ("step", "result", "detail"):
            table.add_column(column)
        for step in summary.steps:
            table.add_row(step.name, "[green]ok[/]" if step.ok else "[red]FAILED[/]", step.detail)
        stdout.print(table)
    sys.exit(0 if summary.ok else 1)


COMMANDS = (demo_command,)
