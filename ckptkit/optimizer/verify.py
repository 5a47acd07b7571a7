"""Checking optimizer state against the weights it belongs to.

Megatron copies each fp32 master into its weight after every step (rounded to the
weight's dtype), so every master, rounded so, equals its stored weight bit for bit. State
read through a wrong layout (another parameter order, other offsets or padding) fails
this at once: it is how the layout was proven on the real fixture, and what ``verify DIR``
checks (:func:`master_copy_problems`).

>>> from ckptkit.layouts import open_checkpoint
>>> from ckptkit.optimizer import read_optimizer_state
>>> with open_checkpoint("checkpoints/gpt2do") as weights, read_optimizer_state(weights) as state:
...     masters_match_weights(state, weights)
[]
"""
from __future__ import annotations

import torch

from ..layouts.base import CheckpointReader
from .state import OptimizerState


def masters_match_weights(state: OptimizerState, weights) -> list[str]:
    """One line per canonical tensor whose master copy, rounded to the weight's dtype,
    differs from the stored weight (vocabulary padding rows included); empty when all match."""
    mismatches = []
    for canonical in state.canonical():
        master = state.tensor(canonical.name, ("param",))["param"]
        weight = weights.tensor(canonical.name)
        rows = min(master.shape[0], weight.shape[0])  # the two may be padded differently
        rounded = master[:rows].to(weight.dtype)
        if master.shape[1:] != weight.shape[1:] or not torch.equal(rounded, weight[:rows]):
            differing = (rounded != weight[:rows]).sum().item() if master.shape[1:] == weight.shape[1:] else "all"
            mismatches.append(f"{canonical.name}: {differing} of {weight[:rows].numel()} master values do not round "
                              f"to the stored {str(weight.dtype).removeprefix('torch.')} weight")
    return mismatches


def master_copy_problems(weights: CheckpointReader) -> list[str]:
    """:func:`masters_match_weights` for the optimizer state of the checkpoint ``weights``
    reads, each line naming the checkpoint; empty where it holds no state (none, or an
    optimizer saved before its first step). ``verify DIR`` reports these."""
    from . import read_optimizer_state
    from .summary import describe_optimizer_state

    if describe_optimizer_state(weights).kind in ("none", "fresh-empty"):
        return []
    with read_optimizer_state(weights) as state:
        return [f"{weights.meta.path}: optimizer master copy of {line}" for line in masters_match_weights(state, weights)]
