"""Megatron-LM optimizer state: its layout, read into canonical form, written for any layout.

:mod:`.parameters` lists a model chunk's parameters in the order Megatron optimizes them;
:mod:`.buffers` computes the distributed optimizer's flat buffers from that list (bucket
order and padding); :mod:`.distrib_optim` reads the per-rank ``distrib_optim.pt`` files
through that layout; :mod:`.per_rank` turns a per-rank checkpoint's optimizer state
(distributed or not) and :mod:`.torch_dist` a ``torch_dist`` checkpoint's (distributed
optimizer, ``dp_reshardable`` or ``fully_reshardable``) into canonical form (:mod:`.state`): per canonical tensor, full
fp32 ``param``, ``exp_avg`` and ``exp_avg_sq``; :mod:`.write` writes canonical state as
Megatron lays it out for any TP/PP/VPP/DP, distributed or not.

:mod:`.carry` wraps a per-rank weight writer so that a conversion carries the state;
:mod:`.fresh` makes the state of an optimizer before its first step from the weights
(``hf-to-megatron --optimizer fresh``); :mod:`.summary` says what state a checkpoint
holds (``inspect``) and :mod:`.verify` checks it against the weights (``verify DIR``).

Entry points: :func:`read_optimizer_state`, :func:`write_optimizer_state` and
:class:`OptimizerTarget`; for conversions, :class:`.carry.WithOptimizerState`.
"""
from __future__ import annotations

from ..errors import BadInput, Unsupported
from .state import STATE_KEYS, OptimizerInfo, OptimizerState
from .write import OptimizerTarget, output_files, write_optimizer_state


def read_optimizer_state(source, *, trust_remote_pickle: bool = False) -> OptimizerState:
    """The optimizer state of a Megatron checkpoint in canonical form (close it when done).

    ``source`` is a checkpoint path or an open :class:`ckptkit.layouts.CheckpointReader`
    (left open when the state is closed). Tensors are read one canonical tensor at a
    time: ``state.tensor(name)`` gives ``{"param", "exp_avg", "exp_avg_sq"}``.

    >>> with read_optimizer_state("checkpoints/gpt2do") as state:
    ...     state.info.kind, state.info.step, state.tensor("decoder.final_layernorm.weight")["exp_avg"].shape
    ('distributed', 10.0, torch.Size([64]))
    """
    from ..layouts import CheckpointReader, megatron_legacy, open_checkpoint
    from .per_rank import PerRankOptimizerState

    owns = not isinstance(source, CheckpointReader)
    weights = open_checkpoint(source, trust_remote_pickle=trust_remote_pickle) if owns else source
    try:
        layout = weights.meta.layout
        if layout == megatron_legacy.NAME:
            state = PerRankOptimizerState(weights, trust_remote_pickle=trust_remote_pickle)
        elif layout == "torch_dist":
            from .torch_dist import TorchDistOptimizerState

            state = TorchDistOptimizerState(weights, trust_remote_pickle=trust_remote_pickle)
        else:
            raise BadInput(f"{weights.meta.path}: a {layout} checkpoint holds no optimizer state")
    except BaseException:
        if owns:
            weights.close()
        raise
    state.owns_weights = owns
    return state


__all__ = ["STATE_KEYS", "OptimizerInfo", "OptimizerState", "OptimizerTarget", "output_files", "read_optimizer_state",
           "write_optimizer_state"]
