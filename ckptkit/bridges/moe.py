"""Pieces the mixture-of-experts bridges share: router and expert tensor tables, and the
Hugging Face ways of saying which layers are MoE.

Experts are one tensor per expert on both sides (transformers' ``save_pretrained`` writes
the Hub layout even where it fuses experts in memory); ``{expert}`` in a mapping is the
global expert index.
"""
from __future__ import annotations

from ..errors import Unsupported
from ..spec import ModelSpec
from .base import HfMapping, first_problem, halves, halves_back, same, same_back

LAYER = "decoder.layers.{layer}."
EXPERT = LAYER + "mlp.experts.local_experts.{expert}."


def expert_mappings(router: str, expert: str, gate: str, up: str, down: str) -> list[HfMapping]:
    """Router and per-expert MLP rows. ``expert`` is the HF prefix of expert ``{expert}``:
    ``expert_mappings("model.layers.{layer}.mlp.gate.weight", "model.layers.{layer}.mlp.experts.{expert}.",
    "gate_proj.weight", "up_proj.weight", "down_proj.weight")``."""
    return [
        HfMapping(LAYER + "mlp.router.weight", (router,), same, same_back),
        HfMapping(EXPERT + "linear_fc1.weight", (expert + gate, expert + up), halves, halves_back),
        HfMapping(EXPERT + "linear_fc2.weight", (expert + down,), same, same_back),
    ]


def shared_expert_mappings(prefix: str, gate_weight: str) -> list[HfMapping]:
    """Shared expert MLP (``prefix`` + gate/up/down_proj) and its sigmoid gate."""
    shared = LAYER + "mlp.shared_experts."
    return [
        HfMapping(shared + "linear_fc1.weight", (prefix + "gate_proj.weight", prefix + "up_proj.weight"),
                  halves, halves_back),
        HfMapping(shared + "linear_fc2.weight", (prefix + "down_proj.weight",), same, same_back),
        HfMapping(shared + "gate_weight", (gate_weight,), same, same_back),
    ]


def sparse_layers(config: dict, num_layers: int) -> tuple[int, ...] | None:
    """Qwen-MoE's ``mlp_only_layers`` and ``decoder_sparse_step`` as the spec's pattern:
    layer i is MoE unless listed, and only every step-th layer (i + 1 divisible by it)."""
    dense = set(config.get("mlp_only_layers") or [])
    step = config.get("decoder_sparse_step") or 1
    pattern = tuple(int(layer not in dense and (layer + 1) % step == 0) for layer in range(num_layers))
    return None if all(pattern) else pattern


def sparse_layer_fields(spec: ModelSpec) -> dict:
    """The inverse of :func:`sparse_layers`: the largest step whose off-step layers are all
    dense, and the on-step layers that are dense anyway. ``(0, 1, 0, 1)`` -> step 2, none
    listed; ``(0, 1, 1)`` -> step 1, ``[0]``."""
    pattern = spec.moe_layers or (1,) * spec.num_layers
    for step in range(len(pattern), 0, -1):
        on_step = [(layer + 1) % step == 0 for layer in range(len(pattern))]
        if not any(moe and not on for moe, on in zip(pattern, on_step)):
            dense = [layer for layer, (moe, on) in enumerate(zip(pattern, on_step)) if on and not moe]
            return {"decoder_sparse_step": step, "mlp_only_layers": dense}
    raise AssertionError("step 1 always fits")


def routing_fields(config: dict, normalised_key: str | None = "norm_topk_prob") -> dict:
    """Router fields of the spec. Top-k then softmax over the chosen k equals a softmax over
    all experts renormalised over the top k (``norm_topk_prob``), which is Megatron's
    default; without renormalisation it is Megatron's ``moe_router_pre_softmax``."""
    normalised = True if normalised_key is None else bool(config.get(normalised_key, False))
    return {"moe_router_topk": config["num_experts_per_tok"], "moe_router_pre_softmax": not normalised}


def softmax_routing_problem(spec: ModelSpec) -> str | None:
    """Why a router is not a plain softmax router (DeepSeek's routing features)."""
    return first_problem(
        (spec.moe_router_score_function == "softmax", f"{spec.moe_router_score_function} router scores"),
        (not spec.moe_router_expert_bias, "an expert bias"),
        (not spec.moe_router_num_groups, "group-limited routing"),
        (spec.moe_router_topk_scaling_factor == 1.0,
         f"routing weights scaled by {spec.moe_router_topk_scaling_factor}"),
    )


def moe_problem(spec: ModelSpec, *, shared_expert: bool) -> str | None:
    return softmax_routing_problem(spec) or first_problem(
        (spec.num_experts > 0, "no mixture of experts"),
        (bool(spec.moe_shared_expert_size) == shared_expert,
         "a shared expert" if not shared_expert else "no shared expert"),
        (not spec.moe_shared_expert_size or spec.moe_shared_expert_gate, "a shared expert without a gate"),
    )


def dense_problem(spec: ModelSpec) -> str | None:
    return None if not spec.num_experts else "a mixture of experts"


def refuse_zero(config: dict, name: str) -> None:
    if not config.get(name):
        raise Unsupported(f"{name}={config.get(name)!r}: expected a positive size")
