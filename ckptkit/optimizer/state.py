"""Optimizer state in canonical form, independent of any parallel layout.

Adam keeps, for every weight, an fp32 master copy (``param``) and two moments
(``exp_avg``, ``exp_avg_sq``). In canonical form each is a full, unsharded fp32 tensor
of its canonical tensor's shape (vocabulary tensors with the padding rows the source
had, as :meth:`ckptkit.layouts.CheckpointReader.tensor` returns them), produced one
canonical tensor at a time. Everything else (step, parameter groups, grad scaler, LR
schedule) is :class:`OptimizerInfo`.

>>> from ckptkit.optimizer import read_optimizer_state
>>> with read_optimizer_state("checkpoints/gpt2do") as state:
...     moments = state.tensor("decoder.layers.0.mlp.linear_fc1.weight")
...     sorted(moments), state.info.step
(['exp_avg', 'exp_avg_sq', 'param'], 10.0)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..rules import box_slices
from ..spec import CanonicalTensor, ModelSpec, canonical_tensors, rule_for

STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")

# Args that Megatron's check_checkpoint_args compares, when it resumes, with the run's own
# (beside the architecture and the TP/PP sizes, which the weights' args give), with the
# value Megatron's parser gives by default. ``add_position_embedding`` stays True for a RoPE
# model unless the deprecated ``--no-position-embedding`` is given: args that say False make
# a run with the source's command line stop at "add_position_embedding value from checkpoint
# (False) is not equal to the input argument value (True)".
RESUME_CHECKED_ARGS = {"add_position_embedding": True}


@dataclass
class OptimizerInfo:
    """The optimizer state that is not per weight.

    ``param_groups`` are Megatron's groups (weight decay, then no weight decay for biases
    and 1-D tensors, by default) with their hyper-parameters, without ``params`` and
    ``step``; ``step`` is Adam's step count (the iteration it last updated at).
    """

    kind: str  # "distributed" (--use-distributed-optimizer) or "non-distributed"
    step: int | float
    param_groups: list[dict]
    grad_scaler: dict | None = None
    opt_param_scheduler: dict | None = None
    training: dict = field(default_factory=dict)  # other layout-free entries: num_floating_point_operations_so_far
    source: dict = field(default_factory=dict)  # the layout it was read from
    # args of the run that wrote the state which Megatron compares when it resumes
    # (RESUME_CHECKED_ARGS) and a weight writer may set otherwise
    resume_args: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"kind": self.kind, "step": self.step, "param_groups": len(self.param_groups),
                "grad_scaler": self.grad_scaler is not None, "source": self.source}


def chained_param_groups(param_groups: list[dict], chained: bool) -> list[list[dict]]:
    """The param groups of each optimizer Megatron chains: ``[the others']``, or with expert
    parallelism ``[the others', the experts']``. State read at EP 1 has no experts' group;
    one is made from the decay group (Megatron's experts' group has its hyper-parameters,
    ``is_expert_parallel`` set; experts have no 1-D parameters). At EP 1 the experts' groups
    are left out (their parameters are in the others').

    >>> chained_param_groups([{"wd_mult": 1.0}, {"wd_mult": 0.0}], chained=True)[1]
    [{'wd_mult': 1.0, 'is_expert_parallel': True}]
    """
    others = [group for group in param_groups if not group.get("is_expert_parallel", False)]
    if not chained:
        return [others]
    experts = [group for group in param_groups if group.get("is_expert_parallel", False)]
    if not experts:
        experts = [{**group, "is_expert_parallel": True} for group in others if group.get("wd_mult", 1.0) != 0.0]
    return [others, experts]


class OptimizerState:
    """Canonical optimizer state, read one canonical tensor at a time (a context manager)."""

    spec: ModelSpec
    info: OptimizerInfo
    padded_vocab_size: int

    def canonical(self) -> list[CanonicalTensor]:
        return canonical_tensors(self.spec)

    def tensor(self, name: str, keys: tuple[str, ...] = STATE_KEYS) -> dict[str, torch.Tensor]:
        """``{"param", "exp_avg", "exp_avg_sq"}`` (or only ``keys``): full fp32 tensors of
        canonical tensor ``name``."""
        raise NotImplementedError

    def validate(self) -> list[str]:
        """Check what can be checked before anything is written; return notes."""
        return []

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def assemble(spec: ModelSpec, canonical: CanonicalTensor, padded_vocab_size: int, tp: int,
             read_piece, keys: tuple[str, ...] = STATE_KEYS) -> dict[str, torch.Tensor]:
    """The full fp32 state tensors ``keys`` of ``canonical`` from its TP pieces:
    ``read_piece(tp_rank)`` returns that rank's pieces (``{key: tensor of the rank's stored
    shape}``). A rank whose boxes an earlier rank filled holds a copy (replicated tensors)
    and is not read."""
    rule = rule_for(spec, canonical.rule, padded_vocab_size)
    shape = rule.full_shape(canonical.shape)
    full = {key: torch.empty(shape, dtype=torch.float32) for key in keys}
    filled = set()
    for tp_rank in range(tp):
        boxes = rule.boxes(shape, tp, tp_rank)
        if filled.issuperset(boxes):
            continue
        filled.update(boxes)
        pieces = read_piece(tp_rank)
        for key in keys:
            row = 0
            for box in boxes:  # a rank's piece is its boxes concatenated along dim 0
                target = full[key][box_slices(box)]
                target.copy_(pieces[key][row: row + target.shape[0]])
                row += target.shape[0]
    return full
