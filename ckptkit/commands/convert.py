"""``ckptkit megatron-to-hf``, ``hf-to-megatron`` and ``reshard``: the conversions (over ``ckptkit.convert``).

Each command streams one conversion into a hidden partial folder that appears at the destination
only when complete (:mod:`ckptkit.atomic`), and prints the :class:`~ckptkit.convert.ConvertResult`.
``megatron-to-hf --push-to-hub`` adds a model card to that folder before it is published, then
uploads the folder (:mod:`ckptkit.hub`).
"""
from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from .shell import (DTYPE_CHOICES, TensorProgress, emit_json, handle_errors, hub_progress_bars, show_notes,
                    source_options, stdout)


def render_conversion(result, as_json: bool, dry_run: bool = False) -> None:
    if as_json:
        emit_json(result.to_dict())
        return
    show_notes(result.notes)
    if dry_run:
        render_plan(result)
        return
    table = Table(title=f"{result.source} -> {result.destination}", show_header=False)
    table.add_row("family", result.family)
    table.add_row("parameters", f"{result.num_parameters:,}")
    experts = result.source_layout.get("ep", 1) > 1 or result.source_layout.get("etp") != result.source_layout.get("tp")
    shown = ("layout", "tp", "pp", "vpp", "iteration", "dtype", "naming") + (("ep", "etp") if experts else ())
    table.add_row("source", ", ".join(f"{k}={v}" for k, v in result.source_layout.items() if k in shown))
    table.add_row("target", ", ".join(f"{k}={v}" for k, v in result.target_layout.items()))
    table.add_row("files", str(len(result.files)))
    table.add_row("written", f"{result.bytes_written / 1e6:.1f} MB in {result.seconds:.2f} s")
    stdout.print(table)


def render_plan(result) -> None:
    """The files a conversion would write: path, size, canonical tensors read."""
    plan = result.plan
    title = (f"{result.source} -> {result.destination} (dry run: nothing written)\n"
             + ", ".join(f"{key}={value}" for key, value in plan["target"].items()))
    table = Table(title=title)
    table.add_column("file")
    table.add_column("MB", justify="right")
    table.add_column("tensors", justify="right")
    for planned in plan["files"]:
        table.add_row(planned["path"], f"{planned['bytes'] / 1e6:.1f}", str(len(planned["tensors"])))
    for name in plan["finish_files"]:
        table.add_row(name, "", "")
    table.add_row("total", f"{plan['total_bytes'] / 1e6:.1f}", "", style="bold")
    stdout.print(table)


def dry_run_option(command):
    return click.option("--dry-run", is_flag=True,
                        help="Print the plan (every file, its size, the tensors it reads) and write nothing.")(command)


def _conversion_process() -> None:
    from ..streaming_io import settle_conversion_process

    settle_conversion_process()


# ---------------------------------------------------------------------------- megatron-to-hf

@click.command("megatron-to-hf")
@click.argument("source", type=click.Path(exists=False))
@click.argument("destination", type=click.Path())
@click.option("--dtype", type=DTYPE_CHOICES, help="Output dtype (default: the checkpoint's).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest safetensors shard.")
@click.option("--tokenizer", type=click.Path(), help="Folder whose tokenizer files are copied into the output.")
@click.option("--vocab-size", type=int, help="True vocabulary size, when the checkpoint's args lack it.")
@click.option("--architecture", metavar="CLASS",
              help="Hugging Face class to write (e.g. Phi3ForCausalLM), when the checkpoint does not record it; "
                   "refused if the model does not fit it.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty destination (only once the new one is complete).")
@click.option("--push-to-hub", "push_to_hub", metavar="OWNER/NAME", help="Upload the result to the Hugging Face Hub.")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repository private.")
@click.option("--revision", help="With --push-to-hub: branch to upload to.")
@click.option("--commit-message", help="With --push-to-hub: commit message.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes writing disjoint output files (under torchrun: per rank).")
@dry_run_option
@source_options
@handle_errors
def megatron_to_hf_command(source, destination, dtype, max_shard_size, tokenizer, vocab_size, architecture,
                           overwrite, push_to_hub, private, revision, commit_message, workers, dry_run, strict,
                           trust_remote_pickle, as_json):
    """Convert a Megatron checkpoint (per-rank files, torch_dist or .zip) to a Hugging Face folder.

    \b
    Example:
      ckptkit megatron-to-hf checkpoints/gpt2/ gpt2-hf/ --dtype bf16 --max-shard-size 2GB
      ckptkit megatron-to-hf checkpoints/phi3-sft/ phi3-hf/ --architecture Phi3ForCausalLM
      ckptkit megatron-to-hf checkpoints/gpt2/ gpt2-hf/ --max-shard-size 1GB --dry-run
      torchrun --nnodes 2 --nproc-per-node 4 ... -m ckptkit.cli megatron-to-hf ckpt/ hf/  (shared file system)
    """
    from ..convert import megatron_to_hf

    _conversion_process()
    with TensorProgress("megatron -> hf", enabled=not as_json) as progress:
        result = megatron_to_hf(source, destination, dtype=dtype, max_shard_size=max_shard_size, tokenizer=tokenizer,
                                overwrite=overwrite, vocab_size=vocab_size, strict=strict,
                                trust_remote_pickle=trust_remote_pickle, progress=progress.advance,
                                on_start=progress.start, workers=workers, architecture=architecture,
                                dry_run=dry_run, extra_files=add_model_card if push_to_hub else None)
    if push_to_hub and _is_leader() and not dry_run:
        from ..hub import push_folder

        with hub_progress_bars(enabled=not as_json):
            pushed = push_folder(destination, push_to_hub, private=private, revision=revision,
                                 commit_message=commit_message)
        result.notes.append(f"pushed to {push_to_hub} ({pushed.revision or 'main'})")
    render_conversion(result, as_json, dry_run)


def add_model_card(folder: Path, result) -> list[str]:
    """Write README.md describing the conversion into ``folder``, the output before it is published."""
    from .. import __version__
    from ..model_card import write_model_card

    written = write_model_card(folder, {
        "source_format": result.source_layout.get("layout"), "source_layout": result.source_layout,
        "architecture": result.target_layout.get("architecture"), "family": result.family,
        "num_parameters": result.num_parameters, "dtype": result.target_layout.get("dtype"),
        "ckptkit_version": __version__,
    })
    return [written.name] if written else []


def _is_leader() -> bool:
    """Under torchrun every rank runs the command; rank 0 alone publishes the shared output."""
    from ..parallel import distributed_world

    return distributed_world()[0] == 0


# ---------------------------------------------------------------------------- to Megatron

def megatron_target_options(command):
    """The target layout of ``hf-to-megatron`` and ``reshard``."""
    for option in reversed([
        click.option("--tp", type=int, required=True, help="Target tensor-parallel size."),
        click.option("--pp", type=int, required=True, help="Target pipeline-parallel size."),
        click.option("--vpp", type=int, default=1, show_default=True, help="Virtual pipeline stages per rank."),
        click.option("--ep", type=int, help="Expert-parallel size of a mixture of experts: each rank holds "
                                            "num_experts/EP experts (default: 1, or the source's for reshard)."),
        click.option("--etp", type=int, help="Expert tensor-parallel size (default: TP, Megatron's default; "
                                             "per-rank files need ETP = TP)."),
        click.option("--dtype", type=DTYPE_CHOICES, help="Output dtype."),
        click.option("--naming", type=click.Choice(["mcore-local", "mcore-te", "legacy"]),
                     help="Parameter names to write (default: Megatron-Core local, or the source's for reshard)."),
        click.option("--overwrite", is_flag=True, help="Replace a non-empty destination."),
        click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Processes writing disjoint rank files (under torchrun: per rank)."),
    ]):
        command = option(command)
    return command


@click.command("hf-to-megatron")
@click.argument("source", type=click.Path(exists=False))
@click.argument("destination", type=click.Path())
@megatron_target_options
@click.option("--make-vocab-size-divisible-by", type=int, default=128, show_default=True,
              help="Pad the vocabulary to a multiple of this times TP (Megatron's rule).")
@click.option("--format", "target_format", type=click.Choice(["torch", "torch_dist"]), default="torch",
              show_default=True, help="Per-rank files (torch) or Megatron-Core distributed (torch_dist).")
@click.option("--optimizer", type=click.Choice(["none", "fresh"]), default="none", show_default=True,
              help="fresh: add a fresh optimizer state (fp32 masters of the weights at full precision, zero moments, "
                   "step 0) at iteration 0, so Megatron trains without --no-load-optim/--finetune.")
@click.option("--dp", type=click.IntRange(min=1), help="With --optimizer fresh: data-parallel size of the run "
              "(default 1).")
@click.option("--distributed-optimizer/--no-distributed-optimizer", default=None,
              help="With --optimizer fresh: state for Megatron's distributed optimizer or the plain one "
                   "(default: --use-distributed-optimizer in --megatron-args, else plain).")
@click.option("--megatron-args", metavar="'--lr 3e-4 ...'",
              help="With --optimizer fresh: the training run's Megatron flags (--lr at least; the LR schedule, "
                   "Adam's betas and eps, bucket settings); the whole command line may be pasted.")
@dry_run_option
@source_options
@handle_errors
def hf_to_megatron_command(source, destination, tp, pp, vpp, ep, etp, dtype, naming, overwrite, workers,
                           make_vocab_size_divisible_by, target_format, optimizer, dp, distributed_optimizer,
                           megatron_args, dry_run, strict, trust_remote_pickle, as_json):
    """Convert a Hugging Face folder to a Megatron checkpoint at any TP/PP (and EP for experts).

    With --optimizer fresh the output is iteration 0 with a fresh optimizer state for the run
    that --megatron-args describe; start that run with --no-load-rng.

    \b
    Example:
      ckptkit hf-to-megatron llama-hf/ megatron-llama/ --tp 2 --pp 2 --dtype bf16
      ckptkit hf-to-megatron mixtral-hf/ megatron-mixtral/ --tp 2 --pp 2 --ep 4
      ckptkit hf-to-megatron llama-hf/ megatron-llama/ --tp 2 --pp 1 --dtype bf16 --optimizer fresh --dp 4 \\
          --distributed-optimizer --megatron-args "--lr 3e-4 --min-lr 3e-5 --train-iters 5000 --global-batch-size 256"
    """
    from ..convert import hf_to_megatron

    _conversion_process()
    with TensorProgress("hf -> megatron", enabled=not as_json) as progress:
        result = hf_to_megatron(source, destination, tp=tp, pp=pp, vpp=vpp, ep=ep or 1, etp=etp, dtype=dtype,
                                make_vocab_size_divisible_by=make_vocab_size_divisible_by, format=target_format,
                                naming=naming or "mcore-local", overwrite=overwrite, strict=strict,
                                trust_remote_pickle=trust_remote_pickle, progress=progress.advance,
                                on_start=progress.start, workers=workers, dry_run=dry_run, optimizer=optimizer,
                                dp=dp, distributed_optimizer=distributed_optimizer, megatron_args=megatron_args)
    render_conversion(result, as_json, dry_run)


@click.command("reshard")
@click.argument("source", type=click.Path(exists=False))
@click.argument("destination", type=click.Path())
@megatron_target_options
@click.option("--format", "target_format", type=click.Choice(["torch", "torch_dist"]),
              help="Output format (default: the source's).")
@click.option("--make-vocab-size-divisible-by", type=int, help="Default: the source's.")
@click.option("--optimizer/--no-optimizer", default=True, show_default=True,
              help="Carry the optimizer state to the new layout, or drop it.")
@click.option("--dp", type=click.IntRange(min=1), help="Data-parallel size of the run that resumes "
              "(default: the source's); re-buckets the distributed optimizer's state.")
@click.option("--distributed-optimizer/--no-distributed-optimizer", default=None,
              help="Write the state for Megatron's distributed optimizer or the plain one (default: as the source).")
@click.option("--optimizer-sharding", type=click.Choice(["dp_reshardable", "fully_reshardable"]),
              help="With --format torch_dist: how the distributed optimizer's state is stored (default: the "
                   "source's torch_dist sharding, else dp_reshardable, Megatron's default).")
@dry_run_option
@source_options
@handle_errors
def reshard_command(source, destination, tp, pp, vpp, ep, etp, dtype, naming, overwrite, workers, target_format,
                    make_vocab_size_divisible_by, optimizer, dp, distributed_optimizer, optimizer_sharding, dry_run,
                    strict, trust_remote_pickle, as_json):
    """Rewrite a Megatron checkpoint at other TP/PP/EP/DP sizes, keeping iteration, args and
    the optimizer state, so that training resumes on the new layout.

    RNG states that depend on the rank are dropped when the layout changes (notes say what
    was not carried).

    \b
    Example:
      ckptkit reshard checkpoints/gpt2/ checkpoints/gpt2-tp1pp4/ --tp 1 --pp 4
      ckptkit reshard checkpoints/llama-tp2dp4/ checkpoints/llama-tp4dp2/ --tp 4 --pp 1 --dp 2
      ckptkit reshard checkpoints/gpt2/ checkpoints/gpt2-tp1pp4/ --tp 1 --pp 4 --dry-run --json
      ckptkit reshard checkpoints/mixtral-ep2/ checkpoints/mixtral-ep4/ --tp 1 --pp 1 --ep 4
      ckptkit reshard checkpoints/llama-dist/ checkpoints/llama-tp2pp2/ --tp 2 --pp 2 --dp 4 \\
          --format torch_dist --optimizer-sharding fully_reshardable
    """
    from ..convert import reshard

    _conversion_process()
    with TensorProgress("reshard", enabled=not as_json) as progress:
        result = reshard(source, destination, tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp, dtype=dtype, format=target_format,
                         naming=naming, make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                         overwrite=overwrite, strict=strict, trust_remote_pickle=trust_remote_pickle,
                         progress=progress.advance, on_start=progress.start, workers=workers, dry_run=dry_run,
                         optimizer=optimizer, dp=dp, distributed_optimizer=distributed_optimizer,
                         optimizer_sharding=optimizer_sharding)
    render_conversion(result, as_json, dry_run)


COMMANDS = (megatron_to_hf_command, hf_to_megatron_command, reshard_command)
