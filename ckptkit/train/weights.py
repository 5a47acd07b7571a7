"""Weights of a (parallel) model <-> canonical tensors.

A rank's parameters are named as Megatron names them in that rank's file (layer
indices local to the pipeline stage, expert indices local to the expert-parallel
rank); each one is a piece of one canonical tensor (:mod:`ckptkit.spec`: global layer
and expert indices, full shapes), cut by that tensor's partition rule. Going through
the canonical namespace makes three things the same operation:

* initialising a run: every canonical tensor is drawn from its own seeded generator,
  then split, so every layout starts from the same model;
* loading any checkpoint ckptkit reads (``open_checkpoint(path).tensor(name)``);
* comparing runs of different layouts (merge each rank's pieces back).
"""
from __future__ import annotations

import math
import zlib
from collections import OrderedDict
from typing import Callable, Mapping

import torch

from ..spec import CanonicalTensor, ModelSpec, canonical_tensors, rule_for
from .model import GPT, Linear, tie_embeddings
from .parallel.groups import Layout
from .parallel.pipeline import stage_layers
from .parallel.tensor import ColumnParallelLinear, RowParallelLinear

INIT_STD = 0.02  # Megatron's --init-method-std default
EXPERTS = "mlp.experts.local_experts."


def is_expert_parameter(local_name: str) -> bool:
    """A routed expert's weight: held by one expert-parallel rank, replicated over expert-DP."""
    return ".mlp.experts." in local_name


def canonical_name(spec: ModelSpec, local_name: str, pp_stage: int, pp: int, ep_rank: int = 0, ep: int = 1) -> str:
    """``decoder.layers.0.mlp.linear_fc1.weight`` on stage 1 of 6 layers / PP2 ->
    ``decoder.layers.3.mlp.linear_fc1.weight``; a tied head copy -> the embeddings;
    ``decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight`` on EP rank 1 of 2
    with 8 experts -> ``...local_experts.5...`` (expert ``ep_rank x 8/2 + 1``)."""
    if local_name.startswith("decoder.layers."):
        _, _, index, rest = local_name.split(".", 3)
        first = stage_layers(spec.num_layers, pp, pp_stage).start
        if rest.startswith(EXPERTS):
            local_expert, tail = rest[len(EXPERTS):].split(".", 1)
            rest = f"{EXPERTS}{ep_rank * (spec.num_experts // ep) + int(local_expert)}.{tail}"
        return f"decoder.layers.{first + int(index)}.{rest}"
    if local_name == "output_layer.weight" and spec.tied_embeddings:
        return "embedding.word_embeddings.weight"
    return local_name


def canonical_table(spec: ModelSpec) -> dict[str, CanonicalTensor]:
    return {entry.name: entry for entry in canonical_tensors(spec)}


def initial_tensor(entry: CanonicalTensor, spec: ModelSpec, seed: int, init_std: float = INIT_STD) -> torch.Tensor:
    """Megatron's initialisation of one canonical tensor, from a generator seeded by its name.

    Norm weights are ones, biases zeros, other weights ``N(0, init_std)``, and the two
    projections back into the residual stream (``linear_proj``, ``linear_fc2``)
    ``N(0, init_std / sqrt(2 x num_layers))`` (Megatron's ``scaled_init_method_normal``).
    """
    name = entry.name
    if "layernorm" in name:
        return torch.ones(entry.shape) if name.endswith(".weight") else torch.zeros(entry.shape)
    if name.endswith(".bias"):
        return torch.zeros(entry.shape)
    std = init_std
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        std = init_std / math.sqrt(2.0 * spec.num_layers)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(entry.shape, generator=generator) * std


def initial_weights(spec: ModelSpec, seed: int) -> Callable[[str], torch.Tensor]:
    """A ``canonical name -> full tensor`` source for a fresh model."""
    table = canonical_table(spec)
    return lambda name: initial_tensor(table[name], spec, seed)


def materialize(model: GPT, device, dtype: torch.dtype) -> GPT:
    """Allocate a model built on the ``meta`` device (values are loaded afterwards)."""
    model.to_empty(device=device)
    model.to(dtype)
    if model.spec.tied_embeddings:
        tie_embeddings(model)
    return model


def rank_parameters(model: GPT, layout: Layout, tp_rank: int, pp_stage: int, ep_rank: int = 0):
    """Each parameter of this rank with the canonical tensor it is a piece of:
    ``(local name, parameter, canonical name, rule)``, where ``rule.shard(full, layout.tp,
    tp_rank)`` of the full canonical tensor is the parameter's value (experts: only the
    global experts of expert-parallel rank ``ep_rank``)."""
    spec = model.spec
    table = canonical_table(spec)
    for local_name, parameter in model.named_parameters():
        name = canonical_name(spec, local_name, pp_stage, layout.pp, ep_rank, layout.ep)
        if name not in table:
            raise KeyError(f"{local_name}: no canonical tensor {name} in the {spec.family} table")
        yield local_name, parameter, name, rule_for(spec, table[name].rule, model.padded_vocab_size)


@torch.no_grad()
def load_weights(model: GPT, full_tensor: Callable[[str], torch.Tensor], layout: Layout, tp_rank: int,
                 pp_stage: int, ep_rank: int = 0) -> None:
    """Fill every parameter with its piece of the canonical tensor ``full_tensor(name)``
    (experts: only the global experts of expert-parallel rank ``ep_rank``)."""
    cache: dict[str, torch.Tensor] = {}
    for local_name, parameter, name, rule in rank_parameters(model, layout, tp_rank, pp_stage, ep_rank):
        if name not in cache:
            cache[name] = full_tensor(name)
        piece = rule.shard(cache[name], layout.tp, tp_rank)
        if tuple(piece.shape) != tuple(parameter.shape):
            raise ValueError(f"{local_name}: the {rule.name} piece of {name} for TP rank {tp_rank} "
                             f"has shape {tuple(piece.shape)}; the parameter is {tuple(parameter.shape)}")
        parameter.copy_(piece)


def _is_linear(module) -> bool:
    return isinstance(module, (Linear, ColumnParallelLinear, RowParallelLinear))


def megatron_state_dict(model: GPT) -> OrderedDict:
    """What Megatron writes under ``model`` for this rank, on the CPU.

    Parameters in module order with local layer indices, plus the ``_extra_state``
    entry (None) every Megatron-Core local linear layer saves. A tied head on a
    single stage shares the embedding parameter, so only the embedding is listed.
    """
    state = OrderedDict()
    seen = set()
    for prefix, module in model.named_modules():
        for name, parameter in module.named_parameters(recurse=False):
            if parameter is None or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            state[f"{prefix}.{name}" if prefix else name] = parameter.detach().to("cpu", copy=True)
        if _is_linear(module):
            state[f"{prefix}._extra_state"] = None
    return state


def merge_ranks(spec: ModelSpec, layout: Layout, rank_tensors: Mapping[tuple[int, ...], Mapping[str, torch.Tensor]],
                padded_vocab_size: int) -> dict[str, torch.Tensor]:
    """Canonical full tensors from per-rank local tensors ``{(tp_rank, pp_stage): {local name: tensor}}``,
    or ``{(tp_rank, pp_stage, ep_rank): ...}`` with expert parallelism (every EP rank is
    needed for the experts; the other tensors are the same on each).

    Used to compare runs of different layouts (weights or gradients). The tied head
    copy on the last stage is skipped: it must equal the embeddings.
    """
    table = canonical_table(spec)
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    for coordinates, tensors in rank_tensors.items():
        tp_rank, pp_stage, ep_rank = (*coordinates, 0)[:3]
        for local_name, tensor in tensors.items():
            if tensor is None or local_name.endswith("_extra_state"):
                continue
            if local_name == "output_layer.weight" and spec.tied_embeddings and layout.pp > 1:
                continue
            name = canonical_name(spec, local_name, pp_stage, layout.pp, ep_rank, layout.ep)
            pieces.setdefault(name, {})[tp_rank] = tensor
    merged = {}
    for name, by_rank in pieces.items():
        rule = rule_for(spec, table[name].rule, padded_vocab_size)
        merged[name] = rule.merge([by_rank[tp_rank] for tp_rank in range(layout.tp)])
    return merged
