"""The ``ckptkit`` command line: the ``main`` group and the commands registered on it.

Each command lives in its own module of :mod:`ckptkit.commands` (``train`` in
:mod:`ckptkit.train.command`) and is a thin shell over the library API: it parses
options, calls one library function, and renders its typed result with rich or as
``--json``. What the commands share (exit codes for each kind of error, JSON, progress,
common options) is :mod:`ckptkit.commands.shell`. Command modules never import this
one; adding a command is adding it to its module's ``COMMANDS``.
"""
from __future__ import annotations

import importlib
import warnings

import click

from . import __version__
from .commands import convert, demo, inspect, push, verify

# Commands whose modules import torch at import time, loaded only when run: their name ->
# (module, attribute, the short help ``ckptkit --help`` lists). The conversion commands
# import the library inside their functions, so ``ckptkit --help`` imports no torch.
LAZY_COMMANDS = {
    "train": ("ckptkit.train.command", "train",
              "Train a Megatron-style GPT with tensor, pipeline and data parallelism."),
}


class _Commands(click.Group):
    """The command group, with :data:`LAZY_COMMANDS` imported on first use."""

    def list_commands(self, ctx):
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx, name):
        if name in LAZY_COMMANDS and name not in self.commands:
            module, attribute, _ = LAZY_COMMANDS[name]
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx, formatter):
        """As click lists commands, with the lazy ones' short help from the table."""
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, names))
        rows = []
        for name in names:
            if name in LAZY_COMMANDS and name not in self.commands:
                rows.append((name, LAZY_COMMANDS[name][2]))
                continue
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(__version__, prog_name="ckptkit")
def main(debug):
    """Convert and reshard LLM checkpoints between Megatron-LM and Hugging Face.

    \b
    Example:
      ckptkit inspect ckpt/
      ckptkit megatron-to-hf ckpt/ hf_model/ --dtype bf16
      ckptkit hf-to-megatron hf_model/ megatron/ --tp 2 --pp 2
      ckptkit reshard ckpt/ ckpt_tp1pp4/ --tp 1 --pp 4
      ckptkit verify ckpt/ hf_model/
    """
    if not debug:
        warnings.filterwarnings("ignore", category=FutureWarning)


def _register_commands() -> None:
    for module in (inspect, convert, verify, demo, push):
        for command in module.COMMANDS:
            main.add_command(command)


_register_commands()

if __name__ == "__main__":  # pragma: no cover
    main()
