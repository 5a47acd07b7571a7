"""Logits of a Megatron checkpoint, computed by running it in its own parallel layout.

``verify --logits`` compares these with another checkpoint's (a converted Hugging Face
model, say). Running the in-repo model at the checkpoint's TP/PP exercises the same
split of the weights Megatron used: each rank loads only its own piece and the
pieces meet only through the model's collectives.

>>> logits = megatron_logits("checkpoints/gpt2_tp2pp2", torch.tensor([[1, 2, 3, 4]]))
>>> logits.shape            # [batch, seq, padded vocabulary]
torch.Size([1, 4, 1024])
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..layouts import open_checkpoint
from ..spec import padded_vocab_size
from .launch import launch
from .parallel import Layout, build_groups
from .parallel.pipeline import forward_only
from .trainer import build_model


def megatron_logits(checkpoint_path, tokens: torch.Tensor, *, dtype: torch.dtype | None = None,
                    ep: int | None = None) -> torch.Tensor:
    """Full-vocabulary logits ``[batch, seq, padded_vocab]`` (float32) for ``tokens [batch, seq]``.

    Computed in the checkpoint's dtype unless ``dtype`` says otherwise, at its TP and
    PP (virtual pipeline stages run as that many real stages: the same layer blocks)
    and, for a mixture of experts, its expert-parallel size (``ep`` overrides it): EP
    data-parallel replicas each run the same tokens, with the experts split between
    them. Causal attention over positions ``0..seq-1``. A single rank runs in this
    process, larger layouts on ``TP x PP x EP`` spawned CPU processes.
    """
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    with open_checkpoint(checkpoint_path) as reader:
        tp, pp = reader.meta.tp, reader.meta.pp * reader.meta.vpp
        ep = ep or reader.meta.ep
    if tp * pp * ep == 1:
        return _logits_on_this_rank(str(checkpoint_path), tokens, 1, 1, 1, dtype)
    results = launch(_logits_on_this_rank, tp * pp * ep, str(checkpoint_path), tokens, tp, pp, ep, dtype,
                     device="cpu")
    return next(result for result in results if result is not None)


def _logits_on_this_rank(path: str, tokens: torch.Tensor, tp: int, pp: int, ep: int, dtype) -> torch.Tensor | None:
    groups = build_groups(Layout(tp, pp, dp=ep, ep=ep))
    device = torch.device("cpu")
    with open_checkpoint(path) as reader:
        spec = reader.spec
        padded = reader.meta.padded_vocab_size or padded_vocab_size(
            spec.vocab_size, reader.meta.make_vocab_size_divisible_by or 128, tp)
        dtype = dtype or reader.meta.dtype
        model = build_model(spec, groups, padded, reader.tensor, device=device, dtype=dtype)
    model.eval()
    outputs = forward_only(lambda _, inputs: model(tokens if groups.is_first_stage else inputs), 1, groups,
                           (tokens.shape[0], tokens.shape[1], spec.hidden_size), dtype, device)
    if not groups.is_last_stage:
        return None
    logits = outputs[0]
    if groups.tp_group is not None:
        pieces = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(pieces, logits.contiguous(), group=groups.tp_group)
        logits = torch.cat(pieces, dim=-1)
    return logits.float() if groups.tp_rank == 0 and groups.dp_rank == 0 else None
