"""Saving and resuming training runs as Megatron-LM per-rank checkpoints.

A save writes what Megatron writes with ``--ckpt-format torch``::

    SAVE/latest_checkpointed_iteration.txt
    SAVE/iter_0000020/mp_rank_TT[_PPP]/model_optim_rng.pt

each file holding ``args``, ``checkpoint_version``, ``iteration``, ``model`` (this
rank's parameters under Megatron-Core names, layer indices local to the stage),
``optimizer``, ``opt_param_scheduler``, ``rng_state`` and
``num_floating_point_operations_so_far``. Data-parallel rank 0 of each model-parallel
rank writes; the Adam state is first gathered over DP, so a file does not depend on
the DP size. Our ``optimizer`` entry is ``{"ckptkit_adam": {"step", "params": {name:
{"master", "exp_avg", "exp_avg_sq"}}}}``, not Megatron's: load these checkpoints into
Megatron-LM with ``--no-load-optim`` (and ``--no-load-rng`` to be safe).

Resuming reads the weights of *any* checkpoint ckptkit opens (another TP/PP layout,
Hugging Face, ...) through the canonical tensors. The optimizer and RNG state come
back only from per-rank files this trainer wrote at the same TP and PP; otherwise a
warning says a fresh optimizer starts. The data position needs nothing saved: the
global batch of a step depends only on the step.
"""
from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from ..errors import Unsupported
from ..layouts import megatron_legacy, open_checkpoint
from ..megatron_args import megatron_args
from ..spec import ModelSpec
from .weights import megatron_state_dict

OPTIMIZER_KEY = "ckptkit_adam"
CHECKPOINT_VERSION = 3.0


def rng_state() -> dict:
    """This process's random states, under the keys Megatron uses."""
    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "rng_tracker_states": {},
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if torch.cuda.is_available() and state.get("cuda_rng_state") is not None:
        torch.cuda.set_rng_state(state["cuda_rng_state"])


def _write_rank_file(path: Path, *, model_state: dict, args, iteration: int, extra: dict | None = None) -> None:
    writer = getattr(megatron_legacy, "write_rank_file", None)
    if writer is not None:
        writer(path, model_state=model_state, args=args, iteration=iteration, extra=extra)
        return
    # Same content as megatron_legacy.write_rank_file, for versions of ckptkit without it.
    state = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration, "model": model_state}
    state.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def _finalize(root: Path, iteration: int) -> None:
    finalize = getattr(megatron_legacy, "finalize_checkpoint_dir", None)
    if finalize is not None:
        finalize(root, iteration)
        return
    partial = root / (megatron_legacy.TRACKER + ".partial")
    partial.write_text(str(iteration))
    os.replace(partial, root / megatron_legacy.TRACKER)


def rank_file(root: str | Path, iteration: int, tp_rank: int, pp_stage: int, pp: int) -> Path:
    return (Path(root) / megatron_legacy.iteration_dir_name(iteration)
            / megatron_legacy.rank_dir_name(tp_rank, pp_stage, pp) / megatron_legacy.RANK_FILE)


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def check_can_save(spec: ModelSpec, config) -> None:
    """Refuse, before training, a run whose checkpoint ckptkit could not write or read back.

    Mixture-of-experts checkpoints need the Megatron layouts' expert parallelism: a
    folder per expert-parallel rank (``mp_rank_TT[_PPP]_EEE``) holding that rank's
    experts under local indices, and a reader that maps them back to global experts.
    The layouts do not have it yet, so such a run could not be resumed, converted or
    checked with ``verify --logits``.
    """
    if spec.num_experts:
        raise Unsupported(f"saving a mixture-of-experts run ({spec.num_experts} experts, EP={config.ep}) is not "
                          "supported yet: the Megatron checkpoint layouts do not write or read experts per "
                          "expert-parallel rank; train it without --save for now")


def save_checkpoint(root, iteration: int, *, trainer) -> Path:
    """Write iteration ``iteration`` of a run (collective: every rank calls it)."""
    root = Path(root)
    config, groups, spec = trainer.config, trainer.groups, trainer.spec
    check_can_save(spec, config)
    optimizer_state = trainer.optimizer.state_dict()  # gathered over DP: every DP rank takes part
    if groups.dp_rank == 0:
        batch = config.batch_size
        adam = config.optimizer
        decay_steps = adam.decay_steps or config.steps
        args = megatron_args(
            spec, tp=config.tp, pp=config.pp, dtype=trainer.dtype, padded_vocab=trainer.padded_vocab_size,
            make_vocab_size_divisible_by=config.make_vocab_size_divisible_by, iteration=iteration,
            extra_fields=dict(
                data_parallel_size=config.dp, world_size=config.world_size,
                micro_batch_size=config.micro_batch_size, global_batch_size=batch, seq_length=config.seq_length,
                train_iters=config.steps, consumed_train_samples=iteration * batch, seed=config.seed,
                lr=adam.lr, min_lr=adam.min_lr, lr_warmup_iters=adam.warmup_steps, lr_decay_iters=decay_steps,
                lr_decay_style="cosine", weight_decay=adam.weight_decay, adam_beta1=adam.beta1,
                adam_beta2=adam.beta2, adam_eps=adam.eps, clip_grad=adam.clip_grad, optimizer="adam",
                use_distributed_optimizer=config.distributed_optimizer, sequence_parallel=config.sequence_parallel,
                recompute_granularity="full" if config.recompute else None, hidden_dropout=0.0,
                attention_dropout=0.0, init_method_std=0.02, tokenizer_type="NullTokenizer",
            ))
        scheduler = {  # Megatron counts these in samples
            "max_lr": adam.lr, "min_lr": adam.min_lr, "lr_warmup_steps": adam.warmup_steps * batch,
            "num_steps": iteration * batch, "lr_decay_style": "cosine", "lr_decay_steps": decay_steps * batch,
            "start_wd": adam.weight_decay, "end_wd": adam.weight_decay, "wd_incr_style": "constant",
            "wd_incr_steps": decay_steps * batch,
        }
        extra = {"optimizer": {OPTIMIZER_KEY: optimizer_state}, "opt_param_scheduler": scheduler,
                 "rng_state": [rng_state()], "num_floating_point_operations_so_far": trainer.flops_so_far}
        _write_rank_file(rank_file(root, iteration, groups.tp_rank, groups.pp_stage, config.pp),
                         model_state=megatron_state_dict(trainer.model), args=args, iteration=iteration,
                         extra=extra)
    _barrier()
    if groups.rank == 0:
        _finalize(root, iteration)
    _barrier()
    return root


@dataclass
class Resume:
    """What a run takes from ``--load``."""

    spec: ModelSpec
    padded_vocab_size: int | None  # the checkpoint's (None for Hugging Face folders)
    iteration: int
    weights: Callable[[str], torch.Tensor]  # canonical name -> full tensor
    optimizer_state: dict | None
    rng_state: dict | None
    reader: object

    def close(self):
        self.reader.close()


def open_resume(path, *, tp: int, pp: int, tp_rank: int, pp_stage: int) -> Resume:
    """Open ``path`` for this rank; optimizer and RNG state only from our own files at the same TP/PP."""
    reader = open_checkpoint(path)
    meta = reader.meta
    iteration = int(meta.iteration or 0)
    optimizer_state = rng = None
    same_layout = meta.layout == megatron_legacy.NAME and (meta.tp, meta.pp, meta.vpp) == (tp, pp, 1)
    if same_layout:
        state = reader.rank_state(tp_rank, pp_stage)
        optimizer = state.get("optimizer")
        if isinstance(optimizer, dict) and OPTIMIZER_KEY in optimizer:
            optimizer_state = optimizer[OPTIMIZER_KEY]
            rng_states = state.get("rng_state")
            rng = rng_states[0] if isinstance(rng_states, list) and rng_states else None
    if optimizer_state is None and tp_rank == 0 and pp_stage == 0:
        why = (f"it is a {meta.layout} checkpoint at TP{meta.tp} PP{meta.pp}" if not same_layout else
               "it holds no optimizer state written by ckptkit's trainer")
        warnings.warn(f"{path}: loading the weights only and starting a fresh optimizer ({why}; "
                      f"this run is TP{tp} PP{pp})", stacklevel=2)
    return Resume(reader.spec, meta.padded_vocab_size, iteration, reader.tensor, optimizer_state, rng, reader)
