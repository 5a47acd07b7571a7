"""T5 as Megatron-LM trains it (``T5Model``): inspected, resharded and verified; no Hugging
Face export or import.

transformers has no class with this architecture. Its ``T5ForConditionalGeneration``
(transformers/models/t5/modeling_t5.py) adds relative position buckets to the attention
scores (``relative_attention_bias``), normalises with ``T5LayerNorm`` (root mean square, no
mean, no bias), has no bias on any linear (``bias=False``), does not scale the attention
scores (``self.scaling = 1.0``) and scales the decoder output by ``d_model ** -0.5`` before a
tied head without bias. Megatron's T5 (megatron/core/models/T5/) learns absolute positions,
uses LayerNorm with biases and biased linears, scales scores by ``1/sqrt(head_dim)`` and adds
a vocabulary bias to the tied head (``T5LMHead``).
"""
from __future__ import annotations

from ..errors import Unsupported
from .base import Bridge

WHY_NOT = ("transformers has no class with Megatron's T5 architecture: T5ForConditionalGeneration uses relative "
           "position buckets, RMS-style T5LayerNorm without bias, no linear biases, unscaled attention scores and "
           "a head scaled by d_model**-0.5 without bias; Megatron's T5 learns absolute positions and uses "
           "LayerNorm with biases, biased linears and a biased head")


def _refused(*arguments):
    raise Unsupported(f"t5: no Hugging Face export or import: {WHY_NOT}")


T5 = Bridge("t5", "T5ForConditionalGeneration", "t5", _refused, _refused, _refused, lambda spec: None,
            lambda spec: True, model_kind="encoder_decoder", no_hf=WHY_NOT)
