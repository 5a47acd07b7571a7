"""What every ``ckptkit`` command shares: errors, output, progress and common options.

A command module imports this shell and the library, never ``ckptkit.cli`` (which imports the
command modules to register them). Errors become exit codes here and only here: a
:class:`~ckptkit.errors.CkptError` exits with its ``exit_code`` (2 for bad input or unsupported
checkpoints, 1 for internal errors) after one line on stderr; any other exception is a bug and
exits 1, also in one line; Ctrl-C exits 130. ``ckptkit --debug`` shows the traceback instead.
Results go to stdout (a rich table, or JSON with ``--json``); messages, notes and progress go to
stderr.

    @click.command("inspect")
    @click.argument("checkpoint")
    @source_options
    @handle_errors
    def inspect_command(checkpoint, strict, trust_remote_pickle, as_json):
        info = inspect_checkpoint(checkpoint, strict=strict, trust_remote_pickle=trust_remote_pickle)
        if as_json:
            emit_json(info.to_dict())
        else:
            stdout.print(summary_table(info))
"""
from __future__ import annotations

import contextlib
import functools
import json
import sys

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..errors import CkptError

console = Console(stderr=True)  # messages, notes, progress
stdout = Console()  # results

DTYPE_CHOICES = click.Choice(["bf16", "fp16", "fp32"])


def handle_errors(command):
    """One line per failure, no traceback unless --debug; exit 2 bad input, 1 internal."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return command(*args, **kwargs)
        except CkptError as error:
            if debug:
                raise
            console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            sys.exit(error.exit_code)
        except KeyboardInterrupt:
            console.print("[bold red]interrupted:[/] nothing was written to the destination", highlight=False)
            sys.exit(130)
        except Exception as error:  # a bug: say so, keep it to one line without --debug
            if debug:
                raise
            console.print(f"[bold red]internal error:[/] {type(error).__name__}: {error} "
                          "(rerun with --debug for the traceback)", highlight=False, soft_wrap=True)
            sys.exit(1)

    return wrapper


class TensorProgress:
    """Rich progress bar fed by the library's per-tensor callback (silent with --json).

        with TensorProgress("reshard", enabled=not as_json) as progress:
            reshard(source, destination, tp=1, pp=4, on_start=progress.start, progress=progress.advance)
    """

    def __init__(self, description: str, enabled: bool = True):
        self.description = description
        self.enabled = enabled and console.is_terminal
        self.progress = None
        self.task = None

    def __enter__(self):
        if self.enabled:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[tensor]}"), TimeElapsedColumn(),
                                     console=console, transient=False)
            self.progress.__enter__()
        return self

    def start(self, total: int):
        if self.progress:
            self.task = self.progress.add_task(self.description, total=total, tensor="")

    def advance(self, tensor_name: str):
        if self.progress and self.task is not None:
            self.progress.update(self.task, advance=1, tensor=tensor_name)

    def __exit__(self, *exc):
        if self.progress:
            self.progress.__exit__(*exc)


@contextlib.contextmanager
def hub_progress_bars(enabled: bool):
    """huggingface_hub's upload progress bars, silenced for --json like ckptkit's own."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    silence = not enabled and not are_progress_bars_disabled()
    if silence:
        disable_progress_bars()
    try:
        yield
    finally:
        if silence:
            enable_progress_bars()


def emit_json(payload) -> None:
    """``payload`` as JSON on stdout, the only thing a ``--json`` run prints there."""
    stdout.print_json(json.dumps(payload, default=str))


def show_notes(notes) -> None:
    for note in notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------- options

def json_option(help: str = "Print the result as JSON on stdout."):
    return click.option("--json", "as_json", is_flag=True, help=help)


def _warn_when_trusting(context, parameter, trusting: bool) -> bool:
    if trusting:
        console.print("[bold yellow]warning:[/] --trust-remote-pickle: files are unpickled without the allow-list; "
                      "code hidden in them can run on this machine", highlight=False, soft_wrap=True)
    return trusting


def source_options(command):
    """``--strict``, ``--trust-remote-pickle`` and ``--json``: the options of every command that reads checkpoints."""
    for option in reversed([
        click.option("--strict", is_flag=True,
                     help="Treat diverged replicated tensors and unexpected tensors as errors."),
        click.option("--trust-remote-pickle", is_flag=True, callback=_warn_when_trusting,
                     help="Unpickle without the allow-list. DANGEROUS: the file can run code."),
        json_option(),
    ]):
        command = option(command)
    return command
