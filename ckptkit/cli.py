"""The ``ckptkit`` command line: the ``main`` group and the commands registered on it.

Each command lives in its own module of :mod:`ckptkit.commands` (``train`` in
:mod:`ckptkit.train.command`) and is a thin shell over the library API: it parses
options, calls one library function, and renders its typed result with rich or as
``--json``. What the commands share (exit codes for each kind of error, JSON, progress,
common options) is :mod:`ckptkit.commands.shell`. Command modules never import this
one; adding a command is adding it to its module's ``COMMANDS``.
"""
from __future__ import annotations

import warnings

import click

from . import __version__
from .commands import convert, demo, inspect, push, verify
from .train.command import train


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
    main.add_command(train)  # the trainer's command lives with the trainer


_register_commands()

if __name__ == "__main__":  # pragma: no cover
    main()
