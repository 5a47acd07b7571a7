"""Saving and resuming training runs as Megatron-LM per-rank checkpoints, optimizer included.

A save writes what Megatron writes with ``--ckpt-format torch``::

    SAVE/latest_checkpointed_iteration.txt
    SAVE/iter_0000020/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt
    SAVE/iter_0000020/mp_rank_TT[_PPP]/distrib_optim.pt          with --distributed-optimizer

each ``model_optim_rng.pt`` holding ``args``, ``checkpoint_version``, ``iteration``,
``model`` (this rank's parameters under Megatron-Core names, layer and expert indices
local to the stage and EP rank), ``optimizer``, ``opt_param_scheduler``, ``rng_state``
and ``num_floating_point_operations_so_far``. The optimizer state is Megatron's
(:mod:`.optimizer_state`): ``distrib_optim.pt`` laid out for the run's DP size, or
Adam's state dict in ``optimizer``, so Megatron-LM resumes from it and ``ckptkit
reshard`` carries it to another layout.

Mixture-of-experts runs write one folder per expert-parallel rank (``_EEE``), holding
the stage's tensors and that EP rank's experts under local indices. ckptkit's optimizer
module does not write their state in Megatron's format yet (experts sit in buffers and
optimizers of their own), so it goes into the trainer's own entry,
``optimizer = {"ckptkit_adam": {"step", "params": {local name: {"master", "exp_avg",
"exp_avg_sq"}}}}``, which only this trainer reads, at the same TP, PP and EP (load it
into Megatron-LM with ``--no-load-optim``). Older trainer checkpoints of dense models
have that entry too and load the same way.

Resuming reads the weights of *any* checkpoint ckptkit opens (another TP/PP layout,
Hugging Face, ...) through the canonical tensors, and Megatron's optimizer state of a
per-rank checkpoint at any TP/PP/VPP/DP through
:func:`ckptkit.optimizer.read_optimizer_state`. RNG state comes back only at the same
TP/PP/EP layout (it belongs to each rank). Where there is no optimizer state to read a
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

from ..errors import BadInput, Unsupported
from ..layouts import megatron_legacy, open_checkpoint
from ..megatron_args import megatron_args
from ..optimizer import OptimizerState, read_optimizer_state
from ..spec import ModelSpec
from .optimizer_state import (megatron_format_refusal, megatron_optimizer_info, pieces_path, rank_adam_state,
                              write_megatron_optimizer_state, write_rank_pieces)
from .parallel.groups import Layout
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


def _write_rank_file(path: Path, entries: dict) -> None:
    """``model_optim_rng.pt``, put in place whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(entries, partial)
    os.replace(partial, path)


def _write_tracker(root: Path, iteration: int) -> None:
    """``latest_checkpointed_iteration.txt``, last: Megatron loads the iteration it names."""
    partial = root / (megatron_legacy.TRACKER + ".partial")
    partial.write_text(str(iteration))
    os.replace(partial, root / megatron_legacy.TRACKER)


def rank_file(root: str | Path, iteration: int, tp_rank: int, pp_stage: int, pp: int, ep_rank: int = 0,
              ep: int = 1) -> Path:
    """``root/iter_N/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt``."""
    return (Path(root) / megatron_legacy.iteration_dir_name(iteration)
            / megatron_legacy.rank_dir_name(tp_rank, pp_stage, pp, ep_rank, ep) / megatron_legacy.RANK_FILE)


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def optimizer_saving_note(spec: ModelSpec, config, padded_vocab_size: int) -> str | None:
    """What a save of this run will not do as Megatron does, or None: the optimizer state of
    a model ckptkit cannot write in Megatron's format goes into the trainer's own entry."""
    refusal = megatron_format_refusal(spec, config.tp, config.pp, padded_vocab_size)
    if refusal is None:
        return None
    return (f"the optimizer state is saved in the trainer's own entry (optimizer.{OPTIMIZER_KEY}), not in "
            f"Megatron's format ({refusal}): this trainer resumes it at the same TP, PP and EP, Megatron-LM "
            "needs --no-load-optim, and ckptkit reshard carries the weights only")


def training_args(trainer, iteration: int):
    """The ``args`` Megatron would save for this run (architecture, layout, batch, schedule)."""
    config, adam, batch = trainer.config, trainer.config.optimizer, trainer.config.batch_size
    return megatron_args(
        trainer.spec, tp=config.tp, pp=config.pp, ep=config.ep, dtype=trainer.dtype,
        padded_vocab=trainer.padded_vocab_size, make_vocab_size_divisible_by=config.make_vocab_size_divisible_by,
        iteration=iteration,
        extra_fields=dict(
            data_parallel_size=config.dp, world_size=config.world_size,
            micro_batch_size=config.micro_batch_size, global_batch_size=batch, seq_length=config.seq_length,
            train_iters=config.steps, consumed_train_samples=iteration * batch, seed=config.seed,
            lr=adam.lr, min_lr=adam.min_lr, lr_warmup_iters=adam.warmup_steps,
            lr_decay_iters=adam.decay_steps or config.steps, lr_decay_style="cosine",
            weight_decay=adam.weight_decay, adam_beta1=adam.beta1, adam_beta2=adam.beta2, adam_eps=adam.eps,
            clip_grad=adam.clip_grad, optimizer="adam", use_distributed_optimizer=config.distributed_optimizer,
            sequence_parallel=config.sequence_parallel,
            recompute_granularity="full" if config.recompute else None, hidden_dropout=0.0,
            attention_dropout=0.0, init_method_std=0.02, tokenizer_type="NullTokenizer",
        ))


def save_checkpoint(root, iteration: int, *, trainer) -> Path:
    """Write iteration ``iteration`` of a run (collective: every rank calls it).

    Expert-DP rank 0 of each (TP rank, stage, EP rank) writes its rank file (DP rank 0
    without experts). The optimizer state goes in Megatron's format: each model-parallel
    rank's state, gathered over DP, is set down beside the weights and rank 0 writes it
    for the run's layout (:mod:`.optimizer_state`); where ckptkit cannot write it so
    (:func:`optimizer_saving_note`), each rank file gets the trainer's own entry.
    """
    root = Path(root)
    config, groups, spec = trainer.config, trainer.groups, trainer.spec
    adam_state = trainer.optimizer.state_dict()  # gathered over DP and expert-DP: every rank takes part
    own_entry = optimizer_saving_note(spec, config, trainer.padded_vocab_size) is not None
    info = megatron_optimizer_info(config, step=adam_state["step"], iteration=iteration, dtype=trainer.dtype,
                                   flops=trainer.flops_so_far)
    if groups.expert_dp_rank == 0:
        entries = {"args": training_args(trainer, iteration), "checkpoint_version": CHECKPOINT_VERSION,
                   "iteration": iteration, "model": megatron_state_dict(trainer.model)}
        if own_entry:
            entries.update({"optimizer": {OPTIMIZER_KEY: adam_state}, "opt_param_scheduler": info.opt_param_scheduler,
                            "rng_state": [rng_state()], **info.training})
        else:
            write_rank_pieces(pieces_path(root, iteration, groups.tp_rank, groups.pp_stage, config.pp), adam_state,
                              [rng_state()])
        _write_rank_file(rank_file(root, iteration, groups.tp_rank, groups.pp_stage, config.pp, groups.ep_rank,
                                   config.ep), entries)
    _barrier()
    if groups.rank == 0:
        if not own_entry:
            write_megatron_optimizer_state(root, iteration, config=config, spec=spec,
                                           padded_vocab_size=trainer.padded_vocab_size, dtype=trainer.dtype,
                                           info=info)
        _write_tracker(root, iteration)
    _barrier()
    return root


@dataclass
class Resume:
    """What a run takes from ``--load``."""

    spec: ModelSpec
    padded_vocab_size: int | None  # the checkpoint's (None for Hugging Face folders)
    iteration: int
    weights: Callable[[str], torch.Tensor]  # canonical name -> full tensor
    reader: object
    optimizer: OptimizerState | None = None  # Megatron's optimizer state, canonical (any layout)
    trainer_optimizer: dict | None = None  # this rank's entry in the trainer's own format (same layout)
    rng_state: dict | None = None
    flops_so_far: float = 0.0  # Megatron's num_floating_point_operations_so_far

    def adam_state(self, model, layout: Layout, tp_rank: int, pp_stage: int, ep_rank: int = 0) -> dict | None:
        """This rank's optimizer state as :meth:`DistributedAdam.load_state_dict` takes it, or None."""
        if self.trainer_optimizer is not None:
            return self.trainer_optimizer
        if self.optimizer is not None:
            return rank_adam_state(self.optimizer, model, layout, tp_rank, pp_stage, ep_rank)
        return None

    def close(self):
        if self.optimizer is not None:
            self.optimizer.close()
        self.reader.close()


def _trainer_entry(reader, tp_rank: int, pp_stage: int, ep_rank: int = 0) -> dict | None:
    optimizer = reader.rank_state(tp_rank, pp_stage, ep_rank).get("optimizer")
    return optimizer.get(OPTIMIZER_KEY) if isinstance(optimizer, dict) else None


def open_resume(path, *, layout: Layout, tp_rank: int, pp_stage: int, ep_rank: int = 0,
                announce: bool = True) -> Resume:
    """Open ``path`` for this rank: its weights, its optimizer state (Megatron's at any
    layout, the trainer's own entry at the same TP/PP/EP) and, at the same layout, its
    RNG state. ``announce``: this rank warns when a fresh optimizer starts."""
    reader = open_checkpoint(path)
    try:
        meta = reader.meta
        per_rank = meta.layout == megatron_legacy.NAME
        same_layout = per_rank and (meta.tp, meta.pp, meta.vpp, meta.ep) == (layout.tp, layout.pp, 1, layout.ep)
        resume = Resume(reader.spec, meta.padded_vocab_size, int(meta.iteration or 0), reader.tensor, reader)
        why = None
        if per_rank:
            resume.flops_so_far = float(reader.rank_state(0, 0).get("num_floating_point_operations_so_far") or 0.0)
        if per_rank and _trainer_entry(reader, 0, 0) is not None:
            if same_layout:
                resume.trainer_optimizer = _trainer_entry(reader, tp_rank, pp_stage, ep_rank)
            else:
                why = (f"its optimizer state is the trainer's own entry, read only at the layout that wrote it, "
                       f"TP{meta.tp} PP{meta.pp} EP{meta.ep}")
        else:
            try:
                resume.optimizer = read_optimizer_state(reader)
            except (BadInput, Unsupported) as error:
                why = str(error)
        if same_layout and why is None:
            rng_states = reader.rank_state(tp_rank, pp_stage, ep_rank).get("rng_state")
            resume.rng_state = rng_states[0] if isinstance(rng_states, list) and rng_states else None
    except BaseException:
        reader.close()
        raise
    if why is not None and announce:
        warnings.warn(f"{path}: loading the weights only and starting a fresh optimizer ({why}; this run is "
                      f"{layout})", stacklevel=2)
    return resume
