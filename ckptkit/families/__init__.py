"""Model families: how the canonical namespace maps onto a Hugging Face architecture.

A family is data: a ``HfFamily`` entry with the transformers architecture, a
function from the HF config to a :class:`~ckptkit.spec.ModelSpec` and back, and a
table of :class:`HfMapping` rows (canonical name pattern -> HF name patterns plus a
pure tensor transform). Adding a family is adding an entry to ``FAMILIES``.
"""
from __future__ import annotations

from ..errors import Unsupported
from .base import HfFamily, HfMapping
from .gpt2 import GPT2
from .llama import LLAMA, MISTRAL, QWEN2

FAMILIES: dict[str, HfFamily] = {family.name: family for family in (GPT2, LLAMA, MISTRAL, QWEN2)}
BY_ARCHITECTURE = {family.architecture: family for family in FAMILIES.values()}
BY_MODEL_TYPE = {family.model_type: family for family in FAMILIES.values()}


def family_for_config(config: dict, source: str = "config.json") -> HfFamily:
    for architecture in config.get("architectures") or []:
        if architecture in BY_ARCHITECTURE:
            return BY_ARCHITECTURE[architecture]
    model_type = config.get("model_type")
    if model_type in BY_MODEL_TYPE:
        return BY_MODEL_TYPE[model_type]
    raise Unsupported(f"{source}: unsupported architecture {config.get('architectures') or model_type!r} "
                      f"(supported: {', '.join(BY_ARCHITECTURE)})")


__all__ = ["FAMILIES", "HfFamily", "HfMapping", "family_for_config"]
