"""What a bridge is, and the tensor transforms bridges share.

A bridge is one architecture's whole story between Megatron-LM and Hugging Face:

* which models it is (``mismatch``: why a :class:`~ckptkit.spec.ModelSpec` cannot be
  this architecture, or None), and which Megatron models it claims when a checkpoint
  does not record its Hugging Face architecture (``claims``);
* its ``config.json`` <-> :class:`~ckptkit.spec.ModelSpec`, both ways (Megatron args <->
  spec is one vocabulary for every family: :mod:`ckptkit.megatron_args`);
* its canonical <-> Hugging Face tensor table (:class:`HfMapping` rows, each with a pure
  transform and its inverse).

The canonical tensors themselves come from the spec (:func:`ckptkit.spec.canonical_tensors`):
optional pieces such as biases and q/k norms are spec fields, so a bridge chooses them by
the spec it builds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import Unsupported
from ..spec import ModelSpec

# A transform takes the canonical tensor and the spec and returns the HF tensors in the
# order of ``hf_names``; its inverse takes those HF tensors back to the canonical one.
ToHf = Callable[[torch.Tensor, ModelSpec], list]
FromHf = Callable[[list, ModelSpec], torch.Tensor]


@dataclass(frozen=True)
class HfMapping:
    """One canonical tensor <-> one or more HF tensors. ``{layer}`` is the layer index."""

    canonical: str
    hf_names: tuple[str, ...]
    to_hf: ToHf
    from_hf: FromHf
    # a dtype the HF tensors keep whatever the model's (transformers' _keep_in_fp32_modules_strict)
    hf_dtype: torch.dtype | None = None


@dataclass(frozen=True)
class Bridge:
    """One architecture. ``name`` is the registry key and :attr:`ModelSpec.family`."""

    name: str
    architecture: str  # the transformers class written to config.json
    model_type: str
    config_to_spec: Callable[[dict], ModelSpec]
    spec_to_config: Callable[[ModelSpec, torch.dtype], dict]
    mappings: Callable[[ModelSpec], list]
    mismatch: Callable[[ModelSpec], "str | None"]
    claims: Callable[[ModelSpec], bool] = lambda spec: False
    # HF tensors transformers keeps in a checkpoint that carry no weights of ours
    ignorable: tuple[str, ...] = ()
    model_kind: str = "decoder"  # the Megatron model it is (a key of ckptkit.spec.MODEL_KINDS)
    # why Hugging Face export and import are not offered, for a Megatron-only entry; None: offered
    no_hf: str | None = None

    def problem(self, spec: ModelSpec) -> str | None:
        """Why this architecture cannot hold ``spec`` (another kind of Megatron model, or the
        bridge's own :attr:`mismatch`), or None."""
        if spec.model_kind != self.model_kind:
            return f"a Megatron {spec.model_kind} model; {self.architecture} is a {self.model_kind} model"
        if spec.residual_post_layernorm:
            return "the residual taken after the layer norm (--apply-residual-connection-post-layernorm)"
        return self.mismatch(spec)

    def check(self, spec: ModelSpec) -> None:
        """Refuse a model this architecture cannot hold, in one line."""
        reason = self.problem(spec)
        if reason:
            raise Unsupported(f"{self.architecture} cannot hold this model: {reason}")
        self.check_hf()

    def check_hf(self) -> None:
        """Refuse Hugging Face export or import of a Megatron-only entry, with the reason."""
        if self.no_hf:
            raise Unsupported(f"{self.name}: no Hugging Face export or import: {self.no_hf}")


def same(tensor, spec):
    return [tensor]


def same_back(tensors, spec):
    return tensors[0]


def transposed(tensor, spec):
    return [tensor.t().contiguous()]


def transposed_back(tensors, spec):
    return tensors[0].t().contiguous()


def vocab_rows(tensor, spec):
    """Drop Megatron's padding rows: HF keeps exactly ``vocab_size`` rows."""
    return [tensor[: spec.vocab_size].contiguous()]


def qkv_parts(fused: torch.Tensor, spec: ModelSpec):
    """Split canonical fused QKV rows (grouped per query group) into q, k, v.

    2 groups of 2 heads: rows ``[q0 q1 k0 v0 q2 q3 k1 v1]`` -> q ``[q0 q1 q2 q3]``,
    k ``[k0 k1]``, v ``[v0 v1]`` (each head ``head_dim`` rows).
    """
    groups, per_group, head_dim = spec.num_query_groups, spec.heads_per_group, spec.head_dim
    tail = fused.shape[1:]
    grouped = fused.reshape(groups, per_group + 2, head_dim, *tail)
    query = grouped[:, :per_group].reshape(groups * per_group * head_dim, *tail)
    key = grouped[:, per_group].reshape(groups * head_dim, *tail)
    value = grouped[:, per_group + 1].reshape(groups * head_dim, *tail)
    return [query.contiguous(), key.contiguous(), value.contiguous()]


def qkv_fuse(parts, spec: ModelSpec):
    """Inverse of :func:`qkv_parts`."""
    query, key, value = parts
    groups, per_group, head_dim = spec.num_query_groups, spec.heads_per_group, spec.head_dim
    tail = query.shape[1:]
    grouped = torch.cat([
        query.reshape(groups, per_group, head_dim, *tail),
        key.reshape(groups, 1, head_dim, *tail),
        value.reshape(groups, 1, head_dim, *tail),
    ], dim=1)
    return grouped.reshape(groups * (per_group + 2) * head_dim, *tail).contiguous()


def halves(tensor, spec):
    """Canonical gated fc1 ``[all gate; all up]`` -> gate, up."""
    gate, up = torch.chunk(tensor, 2, dim=0)
    return [gate.contiguous(), up.contiguous()]


def halves_back(tensors, spec):
    return torch.cat(tensors, dim=0)


def first_problem(*checks: tuple[bool, str]) -> str | None:
    """The message of the first failed check: ``first_problem((ok, "why not"), ...)``."""
    for ok, why in checks:
        if not ok:
            return why
    return None
