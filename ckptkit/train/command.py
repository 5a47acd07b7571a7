"""``ckptkit train``: the command line of the trainer (a thin shell over :func:`ckptkit.train.train`)."""
from __future__ import annotations

import json
import os
import sys
import warnings

import click

from ..errors import CkptError
from .config import COMPILE_SCOPES, MODEL_PRESETS, TrainConfig, model_spec
from .launch import launched_by_torchrun
from .optim import GRAD_ACCUMULATION, AdamConfig

EXAMPLE = """\b
Examples:
  # 20 steps of a small Llama-style model on 4 CPU processes (TP2 x PP2), saved as Megatron files
  ckptkit train --model llama --tp 2 --pp 2 --steps 20 --save runs/llama
\b
  # go on to step 40 from there on another layout, optimizer state included, logging JSON lines
  ckptkit train --load runs/llama --tp 1 --pp 2 --dp 2 --steps 40 --save runs/llama2 --log-json log.jsonl
\b
  # on 8 GPUs: torchrun starts the ranks, ckptkit joins them (NCCL, bf16)
  torchrun --nproc-per-node 8 -m ckptkit.train --model gpt2 --config gpt2_124m.json \\
      --tp 2 --pp 2 --dp 2 --global-batch-size 64 --seq-length 1024 --data corpus_text_document
"""


@click.command("train", epilog=EXAMPLE, context_settings={"max_content_width": 100})
@click.option("--model", "preset", type=click.Choice(sorted(MODEL_PRESETS)), default="gpt2", show_default=True,
              help="Model family preset (ignored with --load: the checkpoint's architecture is used).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="JSON file of ModelSpec fields replacing the preset's (num_layers, hidden_size, ...).")
@click.option("--tp", default=1, show_default=True, help="Tensor-parallel size.")
@click.option("--pp", default=1, show_default=True, help="Pipeline-parallel size.")
@click.option("--dp", default=1, show_default=True, help="Data-parallel size.")
@click.option("--ep", default=1, show_default=True,
              help="Expert-parallel size (mixture-of-experts models): experts split over groups of EP "
                   "data-parallel ranks; must divide --dp and the number of experts.")
@click.option("--steps", default=10, show_default=True, help="Total iterations (with --load, counting the loaded ones).")
@click.option("--micro-batch-size", default=2, show_default=True)
@click.option("--global-batch-size", type=int, help="Sequences per step [default: micro-batch-size x dp].")
@click.option("--seq-length", default=64, show_default=True)
@click.option("--data", type=click.Path(), help="Megatron indexed dataset prefix (PREFIX.bin/.idx) or a .jsonl file; "
                                                "default: a deterministic synthetic corpus.")
@click.option("--tokenizer", type=click.Path(exists=True, file_okay=False),
              help="transformers tokenizer folder, for .jsonl data.")
@click.option("--seed", default=1234, show_default=True)
@click.option("--lr", default=3e-4, show_default=True, help="Peak learning rate.")
@click.option("--min-lr", default=3e-5, show_default=True)
@click.option("--warmup-steps", default=0, show_default=True)
@click.option("--clip-grad", default=1.0, show_default=True, help="Gradient norm clip (0: off).")
@click.option("--weight-decay", default=0.01, show_default=True)
@click.option("--sequence-parallel", is_flag=True, help="Cut activations along the sequence over TP ranks.")
@click.option("--distributed-optimizer", is_flag=True, help="Shard Adam state and master weights over DP ranks.")
@click.option("--recompute", is_flag=True, help="Recompute each layer's activations in the backward pass.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True,
              help="Parameter and compute dtype (auto: bf16 on GPU with fp32 master weights, fp32 on CPU).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the ranks compute: cpu (gloo), cuda (NCCL, one GPU per rank); auto: cuda when "
                   "there is a GPU for every rank.")
@click.option("--fused-kernels/--no-fused-kernels", default=None,
              help="Triton kernels [default: on when a GPU and Triton are present].")
@click.option("--compile", "compile_layers", is_flag=True,
              help="torch.compile each transformer layer (TP 1 and EP 1 only; the first step compiles).")
@click.option("--compile-scope", type=click.Choice(COMPILE_SCOPES), default="layers", show_default=True,
              help="With --compile: each transformer layer, or the whole model in one graph.")
@click.option("--compile-mode", help="With --compile: torch.compile's mode (reduce-overhead: CUDA graphs; "
                                     "max-autotune-no-cudagraphs; ...).")
@click.option("--gelu-operator/--no-gelu-operator", default=True, show_default=True,
              help="With --compile: bias + GeLU stays the Triton operator (one-pass backward) inside the compiled "
                   "graph, or the compiler writes its own kernels for it.")
@click.option("--grad-accumulation", type=click.Choice(GRAD_ACCUMULATION), default="batched", show_default=True,
              help="How gradients reach the float32 main_grad: a hook per parameter, or all at once after each "
                   "micro-batch's backward.")
@click.option("--step-graph", is_flag=True,
              help="Replay the whole step as one CUDA graph (one rank on a GPU; the second step captures it).")
@click.option("--save", type=click.Path(file_okay=False), help="Folder for Megatron per-rank checkpoints.")
@click.option("--save-interval", type=int, help="Also save every N iterations (always at the end).")
@click.option("--load", type=click.Path(exists=True),
              help="Any checkpoint ckptkit reads (Megatron, HF) to start from; Megatron's optimizer state of "
                   "per-rank files is restored at any layout.")
@click.option("--log-json", type=click.Path(dir_okay=False), help="Write one JSON line per step.")
@click.option("--log-interval", default=1, show_default=True, help="Print a line every N steps (0: quiet).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def train(preset, config_file, tp, pp, dp, ep, steps, micro_batch_size, global_batch_size, seq_length, data, tokenizer,
          seed, lr, min_lr, warmup_steps, clip_grad, weight_decay, sequence_parallel, distributed_optimizer,
          recompute, dtype, device, fused_kernels, compile_layers, compile_scope, compile_mode, gelu_operator,
          grad_accumulation, step_graph, save, save_interval, load, log_json, log_interval, as_json):
    """Train a Megatron-style GPT with tensor, pipeline and data parallelism.

    Runs TP x PP x DP ranks: worker processes on this machine (gloo on its CPUs, or
    NCCL with one GPU per rank: --device), or under torchrun the ranks it starts.
    Checkpoints are Megatron-LM per-rank files (iter_*/mp_rank_*/model_optim_rng.pt)
    that every ckptkit command reads.
    """
    from .trainer import train as run

    try:
        config = TrainConfig(
            model=None if load else model_spec(preset, config_file), tp=tp, pp=pp, dp=dp, ep=ep, steps=steps,
            micro_batch_size=micro_batch_size, global_batch_size=global_batch_size, seq_length=seq_length,
            seed=seed, data=data, tokenizer=tokenizer, save=save, save_interval=save_interval, load=load,
            log_json=log_json, distributed_optimizer=distributed_optimizer, sequence_parallel=sequence_parallel,
            recompute=recompute, fused_kernels=fused_kernels, compile=compile_layers, compile_scope=compile_scope,
            compile_mode=compile_mode, gelu_operator=gelu_operator, grad_accumulation=grad_accumulation,
            step_graph=step_graph, dtype=dtype, device=device,
            log_interval=0 if as_json else log_interval,
            optimizer=AdamConfig(lr=lr, min_lr=min_lr, warmup_steps=warmup_steps, clip_grad=clip_grad,
                                 weight_decay=weight_decay),
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = run(config)
    except CkptError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
    if not _is_rank_zero():
        return
    for warning in caught:
        if "ckptkit" in warning.filename:  # ours, not third-party deprecation notices
            click.echo(f"warning: {warning.message}", err=True)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    if not result.records:
        click.echo(f"nothing to do: the run is already at iteration {result.start_iteration} of {steps}")
    else:
        last = result.records[-1]
        click.echo(f"trained iterations {result.start_iteration + 1}..{result.iteration} at {result.layout} "
                   f"({result.parameters:,} parameters on rank 0): loss {result.records[0].loss:.4f} -> "
                   f"{last.loss:.4f}, {last.tokens_per_s:,.0f} tokens/s")
    if result.checkpoint:
        click.echo(f"saved iteration {result.iteration} to {result.checkpoint}")


def _is_rank_zero() -> bool:
    """Under torchrun every rank runs this command; only rank 0 reports."""
    return not launched_by_torchrun() or os.environ.get("RANK", "0") == "0"
