"""The bridge registry: one entry per architecture (see :mod:`ckptkit.bridges.base`).

Adding a family is one file beside these and one line in ``BRIDGES``. The order is the
order in which a Megatron checkpoint that records no Hugging Face architecture is
claimed, among the bridges of its model kind (BERT and T5 claim only their own kind of
Megatron model; the decoder families never claim them): the most specific families first
(DeepSeek's multi-latent attention, mixtures of experts; Qwen3 has q/k norms, Qwen2 q/k/v-only
biases, Mistral a sliding window), plain Llama and GPT-2 last. Phi-3 claims nothing: its
Megatron model is a Llama's, so only a recorded architecture (or ``--architecture``) picks it.
A Megatron-only entry (T5) has no Hugging Face export or import; it refuses both with why.

>>> bridge_for_config({"architectures": ["Qwen3ForCausalLM"]}).name
'qwen3'
"""
from __future__ import annotations

from ..errors import BadInput, Unsupported
from ..spec import ModelSpec
from .base import Bridge, HfMapping
from .bert import BERT
from .deepseek_v3 import DEEPSEEK_V2, DEEPSEEK_V3
from .gpt2 import GPT2
from .llama import LLAMA
from .mistral import MISTRAL
from .mixtral import MIXTRAL
from .phi3 import PHI3
from .qwen2 import QWEN2
from .qwen2_moe import QWEN2_MOE
from .qwen3 import QWEN3
from .qwen3_moe import QWEN3_MOE
from .t5 import T5

BRIDGES: dict[str, Bridge] = {bridge.name: bridge for bridge in (
    DEEPSEEK_V3, DEEPSEEK_V2, QWEN3_MOE, QWEN2_MOE, MIXTRAL, QWEN3, QWEN2, MISTRAL, PHI3, LLAMA, GPT2, BERT, T5)}
BY_ARCHITECTURE = {bridge.architecture: bridge for bridge in BRIDGES.values()}
BY_MODEL_TYPE = {bridge.model_type: bridge for bridge in BRIDGES.values()}


def bridge_for_config(config: dict, source: str = "config.json") -> Bridge:
    """The bridge of a Hugging Face config, by its architecture, else its model_type."""
    for architecture in config.get("architectures") or []:
        if architecture in BY_ARCHITECTURE:
            return _offered(BY_ARCHITECTURE[architecture])
    model_type = config.get("model_type")
    if model_type in BY_MODEL_TYPE:
        return _offered(BY_MODEL_TYPE[model_type])
    raise Unsupported(f"{source}: unsupported architecture {config.get('architectures') or model_type!r} "
                      f"(supported: {', '.join(BY_ARCHITECTURE)})")


def _offered(bridge: Bridge) -> Bridge:
    bridge.check_hf()
    return bridge


def bridge_for_architecture(architecture: str) -> Bridge:
    """``"MistralForCausalLM"`` (or the registry name ``"mistral"``) -> its bridge."""
    bridge = BY_ARCHITECTURE.get(architecture) or BRIDGES.get(architecture)
    if bridge is None:
        raise BadInput(f"unknown architecture {architecture!r} (supported: {', '.join(BY_ARCHITECTURE)})")
    return bridge


def family_of(spec: ModelSpec, recorded: str | None = None, source: str = "checkpoint") -> str:
    """The family of a model read from Megatron args ("" when no bridge claims it).

    ``recorded`` is the architecture the checkpoint names (written by ckptkit from a
    Hugging Face model, or asked for with ``--architecture``): it wins when the model
    fits it. Otherwise the first bridge that claims the model. A model no bridge claims
    can still be inspected, resharded and trained; only Hugging Face export needs one
    (:func:`bridge_of` refuses it there).
    """
    if recorded:
        bridge = bridge_for_architecture(recorded)
        reason = bridge.problem(spec)
        if reason:
            raise Unsupported(f"{source}: recorded architecture {bridge.architecture} cannot hold this "
                              f"model: {reason}")
        return bridge.name
    for bridge in BRIDGES.values():
        if bridge.model_kind == spec.model_kind and bridge.claims(spec):
            return bridge.name
    return ""


def bridge_of(spec: ModelSpec, source: str = "checkpoint") -> Bridge:
    """The bridge of ``spec``'s family; refuses a model that no architecture holds."""
    if spec.family in BRIDGES:
        BRIDGES[spec.family].check_hf()
        return BRIDGES[spec.family]
    closest = [bridge for bridge in BRIDGES.values() if bridge.model_kind == spec.model_kind
               and bridge.mismatch(spec) not in ("a mixture of experts", "no mixture of experts")]
    reasons = "; ".join(f"{bridge.architecture}: {bridge.mismatch(spec)}" for bridge in closest)
    raise Unsupported(f"{source}: the model matches no supported Hugging Face architecture ({reasons})")


__all__ = ["BRIDGES", "Bridge", "HfMapping", "bridge_for_architecture", "bridge_for_config", "bridge_of",
           "family_of"]
