"""The ``ckptkit`` command line: a thin shell over the library API.

Each command parses options, calls one library function, and renders its typed
result with rich or as ``--json``. Errors are mapped to exit codes here and only
here: 2 for bad input or unsupported checkpoints, 1 for internal errors.
"""
from __future__ import annotations

import functools
import json
import sys
import warnings

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .errors import CkptError

console = Console(stderr=True)
stdout = Console()


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
    """Rich progress bar fed by the library's per-tensor callback (silent with --json)."""

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


def emit_json(payload) -> None:
    stdout.print_json(json.dumps(payload, default=str))


def show_notes(notes) -> None:
    for note in notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)


def render_conversion(result, as_json: bool) -> None:
    if as_json:
        emit_json(result.to_dict())
        return
    show_notes(result.notes)
    table = Table(title=f"{result.source} -> {result.destination}", show_header=False)
    table.add_row("family", result.family)
    table.add_row("parameters", f"{result.num_parameters:,}")
    table.add_row("source", ", ".join(f"{k}={v}" for k, v in result.source_layout.items()
                                      if k in ("layout", "tp", "pp", "vpp", "iteration", "dtype", "naming")))
    table.add_row("target", ", ".join(f"{k}={v}" for k, v in result.target_layout.items()))
    table.add_row("files", str(len(result.files)))
    table.add_row("written", f"{result.bytes_written / 1e6:.1f} MB in {result.seconds:.2f} s")
    stdout.print(table)


def _warn_when_trusting(context, parameter, trusting: bool) -> bool:
    if trusting:
        console.print("[bold yellow]warning:[/] --trust-remote-pickle: files are unpickled without the allow-list; "
                      "code hidden in them can run on this machine", highlight=False, soft_wrap=True)
    return trusting


common_source_options = [
    click.option("--strict", is_flag=True, help="Treat diverged replicated tensors and unexpected tensors as errors."),
    click.option("--trust-remote-pickle", is_flag=True, callback=_warn_when_trusting,
                 help="Unpickle without the allow-list. DANGEROUS: the file can run code."),
    click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout."),
]


def with_options(options):
    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command
    return decorate


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


@main.command("inspect")
@click.argument("checkpoint", type=click.Path(exists=False))
@click.option("--tensors/--no-tensors", default=True, help="List every tensor and its partitioning.")
@with_options(common_source_options)
@handle_errors
def inspect_command(checkpoint, tensors, strict, trust_remote_pickle, as_json):
    """Show a checkpoint's layout, family, parallel sizes, iteration, dtype and tensors.

    \b
    Example:
      ckptkit inspect checkpoints/gpt2/ --json
    """
    from .inspection import inspect_checkpoint

    info = inspect_checkpoint(checkpoint, strict=strict, trust_remote_pickle=trust_remote_pickle)
    if as_json:
        emit_json(info.to_dict())
        return
    layout = info.layout
    summary = Table(title=str(checkpoint), show_header=False)
    for key, value in [("layout", layout["layout"]), ("naming", layout.get("naming")),
                       ("family", f"{info.family} ({info.architecture})"),
                       ("parallel", f"TP={layout['tp']} PP={layout['pp']} VPP={layout['vpp']}"),
                       ("iteration", "release" if layout.get("release") else layout.get("iteration")),
                       ("checkpoint_version", layout.get("checkpoint_version")), ("dtype", layout["dtype"]),
                       ("parameters", f"{info.num_parameters:,}"),
                       ("padded vocab", layout.get("padded_vocab_size"))]:
        if value is not None:
            summary.add_row(key, str(value))
    spec = info.spec
    summary.add_row("architecture", f"{spec['num_layers']} layers, hidden {spec['hidden_size']}, "
                    f"{spec['num_attention_heads']} heads / {spec['num_query_groups']} groups, ffn "
                    f"{spec['ffn_hidden_size']}, vocab {spec['vocab_size']}, {spec['normalization']}, "
                    f"{spec['activation']}, {spec['position_embedding']}, "
                    f"{'tied' if spec['tied_embeddings'] else 'untied'} embeddings")
    stdout.print(summary)
    if tensors:
        table = Table(title="tensors")
        table.add_column("name", overflow="fold", min_width=24)
        for column in ("shape", "partition", "per TP rank"):
            table.add_column(column)
        for tensor in info.tensors:
            table.add_row(tensor.name, str(list(tensor.shape)), tensor.rule, str(list(tensor.shard_shape)))
        stdout.print(table)


@main.command("megatron-to-hf")
@click.argument("source", type=click.Path(exists=False))
@click.argument("destination", type=click.Path())
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), help="Output dtype (default: the checkpoint's).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest safetensors shard.")
@click.option("--tokenizer", type=click.Path(), help="Folder whose tokenizer files are copied into the output.")
@click.option("--vocab-size", type=int, help="True vocabulary size, when the checkpoint's args lack it.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty destination (only once the new one is complete).")
@click.option("--push-to-hub", "push_to_hub", metavar="OWNER/NAME", help="Upload the result to the Hugging Face Hub.")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repository private.")
@click.option("--revision", help="With --push-to-hub: branch to upload to.")
@click.option("--commit-message", help="With --push-to-hub: commit message.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes writing disjoint output files (under torchrun: per rank).")
@with_options(common_source_options)
@handle_errors
def megatron_to_hf_command(source, destination, dtype, max_shard_size, tokenizer, vocab_size, overwrite,
                           push_to_hub, private, revision, commit_message, workers, strict, trust_remote_pickle,
                           as_json):
    """Convert a Megatron checkpoint (per-rank files, torch_dist or .zip) to a Hugging Face folder.

    \b
    Example:
      ckptkit megatron-to-hf checkpoints/gpt2/ gpt2-hf/ --dtype bf16 --max-shard-size 2GB
      torchrun --nnodes 2 --nproc-per-node 4 ... -m ckptkit.cli megatron-to-hf ckpt/ hf/  (shared file system)
    """
    from .convert import megatron_to_hf
    from .streaming_io import keep_freed_memory_for_reuse

    keep_freed_memory_for_reuse()  # a conversion process: reuse freed pages (see streaming_io)

    with TensorProgress("megatron -> hf", enabled=not as_json) as progress:
        result = megatron_to_hf(source, destination, dtype=dtype, max_shard_size=max_shard_size, tokenizer=tokenizer,
                                overwrite=overwrite, vocab_size=vocab_size, strict=strict,
                                trust_remote_pickle=trust_remote_pickle, progress=progress.advance,
                                on_start=progress.start, workers=workers)
    payload = result
    if push_to_hub:
        payload = _push_after_conversion(result, destination, push_to_hub, private, revision, commit_message)
    render_conversion(payload, as_json)


def _push_after_conversion(result, destination, repo_id, private, revision, commit_message):
    try:
        from .hub import push_folder
        from .model_card import write_model_card
    except ImportError as error:  # pragma: no cover - shipped together
        raise CkptError(f"publishing is unavailable: {error}") from None
    write_model_card(destination, {
        "source_format": result.source_layout.get("layout"), "source_layout": result.source_layout,
        "architecture": result.target_layout.get("architecture"), "family": result.family,
        "num_parameters": result.num_parameters, "dtype": result.target_layout.get("dtype"),
        "ckptkit_version": __version__,
    })
    pushed = push_folder(destination, repo_id, private=private, revision=revision, commit_message=commit_message)
    result.notes.append(f"pushed to {repo_id} ({getattr(pushed, 'revision', None) or 'main'})")
    return result


def _megatron_target_options(command):
    options = [
        click.option("--tp", type=int, required=True, help="Target tensor-parallel size."),
        click.option("--pp", type=int, required=True, help="Target pipeline-parallel size."),
        click.option("--vpp", type=int, default=1, show_default=True, help="Virtual pipeline stages per rank."),
        click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), help="Output dtype."),
        click.option("--naming", type=click.Choice(["mcore-local", "mcore-te", "legacy"]),
                     help="Parameter names to write (default: Megatron-Core local, or the source's for reshard)."),
        click.option("--overwrite", is_flag=True, help="Replace a non-empty destination."),
        click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Processes writing disjoint rank files (under torchrun: per rank)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command("hf-to-megatron")
@click.argument("source", type=click.Path(exists=False))
@click.argument("destination", type=click.Path())
@_megatron_target_options
@click.option("--make-vocab-size-divisible-by", type=int, default=128, show_default=True,
              help="Pad the vocabulary to a multiple of this times TP (Megatron's rule).")
@click.option("--format", "target_format", type=click.Choice(["torch", "torch_dist"]), default="torch",
              show_default=True, help="Per-rank files (torch) or Megatron-Core distributed (torch_dist).")
@with_options(common_source_options)
@handle_errors
def hf_to_megatron_command(source, destination, tp, pp, vpp, dtype, naming, overwrite, workers,
                           make_vocab_size_divisible_by, target_format, strict, trust_remote_pickle, as_json):
    """Convert a Hugging Face folder to a Megatron checkpoint at any TP/PP.

    \b
    Example:
      ckptkit hf-to-megatron llama-hf/ megatron-llama/ --tp 2 --pp 2 --dtype bf16
    """
    from .convert import hf_to_megatron
    from .streaming_io import keep_freed_memory_for_reuse

    keep_freed_memory_for_reuse()  # a conversion process: reuse freed pages (see streaming_io)

    with TensorProgress("hf -> megatron", enabled=not as_json) as progress:
        result = hf_to_megatron(source, destination, tp=tp, pp=pp, vpp=vpp, dtype=dtype,
                                make_vocab_size_divisible_by=make_vocab_size_divisible_by, format=target_format,
                                naming=naming or "mcore-local", overwrite=overwrite, strict=strict,
                                trust_remote_pickle=trust_remote_pickle, progress=progress.advance,
                                on_start=progress.start, workers=workers)
    render_conversion(result, as_json)


@main.command("reshard")
@click.argument("source", type=click.Path(exists=False))
@click.argument("destination", type=click.Path())
@_megatron_target_options
@click.option("--format", "target_format", type=click.Choice(["torch", "torch_dist"]),
              help="Output format (default: the source's).")
@click.option("--make-vocab-size-divisible-by", type=int, help="Default: the source's.")
@with_options(common_source_options)
@handle_errors
def reshard_command(source, destination, tp, pp, vpp, dtype, naming, overwrite, workers, target_format,
                    make_vocab_size_divisible_by, strict, trust_remote_pickle, as_json):
    """Rewrite a Megatron checkpoint at other TP/PP sizes, keeping iteration and args.

    Optimizer and RNG state belong to the old layout and are dropped with a notice.

    \b
    Example:
      ckptkit reshard checkpoints/gpt2/ checkpoints/gpt2-tp1pp4/ --tp 1 --pp 4
    """
    from .convert import reshard
    from .streaming_io import keep_freed_memory_for_reuse

    keep_freed_memory_for_reuse()  # a conversion process: reuse freed pages (see streaming_io)

    with TensorProgress("reshard", enabled=not as_json) as progress:
        result = reshard(source, destination, tp=tp, pp=pp, vpp=vpp, dtype=dtype, format=target_format,
                         naming=naming, make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                         overwrite=overwrite, strict=strict, trust_remote_pickle=trust_remote_pickle,
                         progress=progress.advance, on_start=progress.start, workers=workers)
    render_conversion(result, as_json)


@main.command("verify")
@click.argument("a", type=click.Path(exists=False))
@click.argument("b", type=click.Path(exists=False), required=False)
@click.option("--atol", type=float, default=0.0, show_default=True, help="Largest allowed |a - b| per element.")
@click.option("--ignore-dtype", is_flag=True, help="Compare values across dtypes (e.g. fp32 vs bf16).")
@click.option("--all-rows", is_flag=True, help="Show every tensor, not only the ones that differ.")
@click.option("--logits", is_flag=True,
              help="Run both checkpoints on the same tokens and compare logits (Megatron in its own TP/PP layout).")
@click.option("--rtol", type=float, default=0.0, show_default=True, help="With --logits: relative tolerance.")
@click.option("--tokens", "tokens_file", type=click.Path(), help="With --logits: token ids (.pt or .json [batch, seq]).")
@with_options(common_source_options)
@handle_errors
def verify_command(a, b, atol, ignore_dtype, all_rows, logits, rtol, tokens_file, strict, trust_remote_pickle,
                   as_json):
    """Check that two checkpoints (any layouts) hold the same model, tensor by tensor.

    With one path, check that checkpoint alone: files, index coverage, headers, shapes.
    Exits 0 only when equivalent (or intact).

    \b
    Example:
      ckptkit verify checkpoints/gpt2/ gpt2-hf/
      ckptkit verify gpt2-hf/
      ckptkit verify --logits checkpoints/gpt2/ gpt2-hf/ --atol 1e-4
    """
    if logits:
        _verify_logits(a, b, atol, rtol, tokens_file, as_json)
        return
    from .verification import verify

    result = verify(a, b, atol=atol, ignore_dtype=ignore_dtype, strict=strict,
                    trust_remote_pickle=trust_remote_pickle)
    if as_json:
        emit_json(result.to_dict())
    else:
        show_notes(result.notes)
        for problem in result.problems:
            console.print(f"[red]problem:[/] {problem}", highlight=False, soft_wrap=True)
        table = Table(title=f"{a} vs {b}" if b else f"{a}")
        table.add_column("tensor", overflow="fold", min_width=24)
        for column in ("status", "shape A", "shape B", "dtype A", "dtype B", "max |a-b|"):
            table.add_column(column)
        shown = [row for row in result.tensors if all_rows or not row.ok]
        for row in shown:
            style = "green" if row.ok else "red"
            table.add_row(row.name, f"[{style}]{row.status}[/]", str(list(row.shape_a or [])),
                          str(list(row.shape_b or [])), row.dtype_a or "", row.dtype_b or "",
                          "" if row.max_abs_diff is None else f"{row.max_abs_diff:.3g}")
        if shown:
            stdout.print(table)
        verdict = "[green]equivalent[/]" if b else "[green]intact[/]"
        if not result.equivalent:
            verdict = "[red]NOT equivalent[/]" if b else "[red]NOT intact[/]"
        stdout.print(f"{verdict}: {len(result.tensors)} tensors, max |a-b| = {result.max_abs_diff:.3g}")
    sys.exit(0 if result.equivalent else 1 if b else 2)


def _verify_logits(a, b, atol, rtol, tokens_file, as_json):
    from .errors import BadInput
    from .logits_check import compare_logits, load_tokens

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


@main.command("demo")
@click.option("--keep", type=click.Path(), help="Keep the outputs in this folder instead of a temporary one.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@handle_errors
def demo_command(keep, as_json):
    """Run the whole flow on a tiny real Megatron-LM checkpoint shipped with ckptkit.

    Copies it, inspects it, converts it to Hugging Face, checks the logits against the
    ones Megatron-LM computed, reshards it to TP1 PP3, and verifies everything.

    \b
    Example:
      ckptkit demo
    """
    from .demo import run_demo

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


def _register_commands_from_their_modules():
    """Publishing and training live in their own modules."""
    from .commands.push import push
    from .train.command import train

    main.add_command(push)
    main.add_command(train)


_register_commands_from_their_modules()

if __name__ == "__main__":  # pragma: no cover
    main()
