"""What Megatron's two checkpoint formats share: where a write goes, and ``args`` both ways.

Per-rank files (:mod:`ckptkit.layouts.megatron_legacy`) and ``torch_dist`` checkpoints
(:mod:`ckptkit.layouts.torch_dist`) keep the same tracker file beside the same iteration
folders, and the same ``args`` namespace Megatron-LM parsed (in every rank file, or in the
common state). Reading, the parallel sizes, the naming and the iteration come from
``args``; writing, ``args`` are made from the model and the :class:`TargetLayout`.

>>> target = TargetLayout(tp=2, pp=2, iteration=10)
>>> target.folder_name, target.tracker_text, target.transformer_impl
('iter_0000010', '10', 'local')
>>> TargetLayout(tp=2, ep=4).expert_tp
2
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import InternalError
from ..megatron_args import megatron_args
from ..safe_load import without_stand_ins
from ..spec import ModelSpec, padded_vocab_size
from .base import CheckpointReader, CheckpointWriter
from .tracker import TRACKER, iteration_dir_name

# The checkpoint_version current Megatron-LM saves (megatron/training/checkpointing.py).
WRITE_CHECKPOINT_VERSION = 3.0


# ---------------------------------------------------------------------------- writing

@dataclass
class TargetLayout:
    """Where a Megatron checkpoint is going: sizes, naming, padding, dtype.

    ``ep`` expert-parallel ranks hold ``num_experts / ep`` experts each; ``etp`` is the
    expert tensor-parallel size (None: TP, Megatron's default when it is unset).
    """

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    ep: int = 1
    etp: int | None = None
    naming: str = "mcore-local"
    make_vocab_size_divisible_by: int = 128
    dtype: torch.dtype | None = None
    iteration: int | None = None
    release: bool = False
    args_base: argparse.Namespace | None = None

    @property
    def expert_tp(self) -> int:
        """The expert tensor-parallel size: ``etp``, or TP when it is not given."""
        return self.tp if self.etp is None else self.etp

    @property
    def saved_iteration(self) -> int | None:
        """The iteration the output is saved at: None for a release checkpoint."""
        return self.iteration if not self.release else None

    @property
    def folder_name(self) -> str:
        """The iteration folder: ``iter_0000010``, or ``release``."""
        return iteration_dir_name(self.saved_iteration, self.release)

    @property
    def tracker_text(self) -> str:
        """What ``latest_checkpointed_iteration.txt`` says: the iteration, or ``release``."""
        return "release" if self.release or self.saved_iteration is None else str(self.saved_iteration)

    @property
    def transformer_impl(self) -> str:
        """``args.transformer_impl`` of a model whose names are ``naming``'s."""
        return "transformer_engine" if self.naming == "mcore-te" else "local"

    def padded_vocab(self, spec: ModelSpec) -> int:
        """Rows of the vocabulary tensors at this TP size (Megatron's padding)."""
        return padded_vocab_size(spec.vocab_size, self.make_vocab_size_divisible_by, self.tp)

    def summary(self, layout: str) -> dict:
        """The target as a conversion reports it."""
        return {"layout": layout, "tp": self.tp, "pp": self.pp, "vpp": self.vpp, "ep": self.ep,
                "etp": self.expert_tp, "naming": self.naming,
                "dtype": str(self.dtype).removeprefix("torch.") if self.dtype else None,
                "iteration": self.iteration, "release": self.release}


def target_args(spec: ModelSpec, target: TargetLayout, dtype: torch.dtype, *,
                extra_fields: dict | None = None) -> argparse.Namespace:
    """The ``args`` Megatron-LM would save for ``spec`` at ``target``'s sizes, based on
    ``target.args_base`` when resharding; Megatron's own types replaced by plain values."""
    args = megatron_args(spec, tp=target.tp, pp=target.pp, vpp=target.vpp, ep=target.ep, etp=target.expert_tp,
                         dtype=dtype,
                         padded_vocab=target.padded_vocab(spec),
                         make_vocab_size_divisible_by=target.make_vocab_size_divisible_by,
                         iteration=target.saved_iteration or 0, transformer_impl=target.transformer_impl,
                         extra_fields=extra_fields, base=target.args_base)
    # pre-Core names: Megatron must build its legacy model; Core names (a pre-Core source
    # rewritten with --naming mcore-local) its Core model
    args.use_legacy_models = target.naming == "legacy"
    return without_stand_ins(args)


def write_tracker(out_dir: Path, target: TargetLayout) -> None:
    """``latest_checkpointed_iteration.txt``: the iteration, or ``release``."""
    (out_dir / TRACKER).write_text(target.tracker_text)


@dataclass(frozen=True)
class MegatronWriter(CheckpointWriter):
    """What the writers of both Megatron formats share: the target, and with
    ``keep_source_args`` the source checkpoint's args (resharding keeps its training
    settings) updated to the target; the tracker written last."""

    target: TargetLayout
    keep_source_args: bool = False

    def target_for(self, reader: CheckpointReader) -> TargetLayout:
        """The target with the source's dtype where none was asked for, and its args."""
        return replace(self.target, dtype=self.target.dtype or reader.meta.dtype,
                       args_base=reader.meta.args if self.keep_source_args else None)

    def finish(self, reader, plan, out) -> list[str]:
        write_tracker(Path(out), self.target)
        return [TRACKER]


def check_tracker(out_dir: Path, target: TargetLayout, label: Path) -> None:
    """The written tracker names the target's iteration (a difference is ckptkit's bug)."""
    tracker = out_dir / TRACKER
    if not tracker.is_file() or tracker.read_text().strip() != target.tracker_text:
        raise InternalError(f"{label / TRACKER}: missing or not naming {target.tracker_text}")


# ---------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class ParallelSizes:
    tp: int
    pp: int
    vpp: int
    ep: int
    etp: int


def parallel_sizes(args) -> ParallelSizes:
    """The parallel sizes of the run that saved ``args`` (1 where they say nothing; the
    expert tensor-parallel size is TP where unset, as Megatron-LM's arguments.py makes it).

    >>> parallel_sizes(argparse.Namespace(tensor_model_parallel_size=2))
    ParallelSizes(tp=2, pp=1, vpp=1, ep=1, etp=2)
    """
    def size(field: str, default: int = 1) -> int:
        return int(getattr(args, field, None) or default)

    tp = size("tensor_model_parallel_size")
    return ParallelSizes(tp, size("pipeline_model_parallel_size"), size("virtual_pipeline_model_parallel_size"),
                         size("expert_model_parallel_size"), size("expert_tensor_parallel_size", tp))


def naming_from_args(args) -> str:
    """The Megatron-Core naming of the model ``args`` build (what a per-rank writer must
    reproduce): the inverse of :attr:`TargetLayout.transformer_impl`."""
    return "mcore-te" if getattr(args, "transformer_impl", "local") == "transformer_engine" else "mcore-local"


def source_iteration(folder_iteration: int | None, release: bool, state: dict) -> int | None:
    """A checkpoint's iteration: its folder's number, else what its saved state records
    (None for a release checkpoint)."""
    if folder_iteration is None and not release:
        return state.get("iteration")
    return folder_iteration
