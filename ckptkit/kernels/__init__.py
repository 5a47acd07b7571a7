"""Fused kernels for the trainer, with pure PyTorch fallbacks picked automatically.

Every function takes ``fused``: when true, and the input is on a CUDA device, and
Triton imports, the Triton kernel of :mod:`ckptkit.kernels.fused` runs; otherwise
the eager version of :mod:`ckptkit.kernels.reference` does. Both compute the same
thing (the tests compare each against a float64 reference).

>>> from ckptkit import kernels
>>> y = kernels.rms_norm(x, weight, eps=1e-5, fused=True)   # Triton on a GPU, eager elsewhere
"""
from __future__ import annotations

import functools

import torch

from . import ops, reference
from .reference import adam_schedule, rope_inverse_frequencies, rope_scaling_parameters, rope_tables

__all__ = ["fused_available", "bias_gelu", "bias_gelu_operator", "layer_norm", "rms_norm", "apply_rope", "rope_tables",
           "rope_inverse_frequencies", "rope_scaling_parameters", "cross_entropy", "linear_cross_entropy",
           "adam_step", "adam_schedule", "gradient_accumulator"]


@functools.cache
def fused_available() -> bool:
    """True when a CUDA device is present and Triton imports (checked once, lazily)."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _fused(tensor: torch.Tensor, fused: bool):
    """The Triton module when it should run for ``tensor``, else None."""
    if fused and tensor.is_cuda and fused_available():
        from . import fused as fused_module
        return fused_module
    return None


def bias_gelu(x, bias, approximate: str = "none", *, fused: bool = False):
    """``gelu(x + bias)``: exact (erf) GeLU, or the tanh form with ``approximate="tanh"``."""
    if _fused(x, fused) is None:
        return reference.bias_gelu(x, bias, approximate)
    return ops.bias_gelu(x, bias, approximate)


# What the GeLU operator's backward reads: "x" (the pre-activation, from which it recomputes erf and
# exp) or "derivative" (gelu'(x + bias), written by the forward: one more write there, no erf or exp in
# the backward; its kernels run nearer their memory floors on an H100, but with the step graph its
# training runs drifted from every other path after a dozen steps, not understood: docs/trainer.md).
GELU_OPERATOR_BACKWARD_FROM = "x"


def bias_gelu_operator(x, bias, approximate: str = "none"):
    """``bias_gelu`` as an operator ``torch.compile`` keeps whole (``torch.ops.ckptkit.bias_gelu``, or
    ``bias_gelu_and_derivative`` when :data:`GELU_OPERATOR_BACKWARD_FROM` is ``"derivative"``): the
    Triton kernels on a GPU (the backward one pass), the same math elsewhere."""
    if GELU_OPERATOR_BACKWARD_FROM == "derivative":
        return ops.bias_gelu_and_derivative(x, bias, approximate)[0]
    return ops.bias_gelu(x, bias, approximate)


def layer_norm(x, weight, bias, eps: float, *, fused: bool = False):
    module = _fused(x, fused)
    if module is None:
        return reference.layer_norm(x, weight, bias, eps)
    return module.layer_norm(x, weight, bias, eps)


def rms_norm(x, weight, eps: float, *, fused: bool = False):
    module = _fused(x, fused)
    if module is None:
        return reference.rms_norm(x, weight, eps)
    return module.rms_norm(x, weight, eps)


def apply_rope(x, cos, sin, *, fused: bool = False):
    """Rotate ``x [batch, seq, heads, head_dim]`` by ``cos, sin [seq, head_dim]`` (rotate-half form)."""
    module = _fused(x, fused)
    if module is None:
        return reference.apply_rope(x, cos, sin)
    return module.apply_rope(x, cos, sin)


def cross_entropy(logits, target, vocab_start: int = 0, group=None, *, fused: bool = False):
    """Per-token float32 loss; vocabulary-parallel when ``group`` spans several ranks."""
    module = _fused(logits, fused)
    if module is None:
        return reference.cross_entropy(logits, target, vocab_start, group)
    return module.cross_entropy(logits, target, vocab_start, group)


def linear_cross_entropy(x, weight, target, *, fused: bool = False):
    """Per-token float32 loss of the output layer's logits ``x @ weight^T`` (one rank holds the
    whole vocabulary). The Triton version never keeps the logits and their gradient apart:
    the kernel that computes the loss writes the gradient over the logits."""
    module = _fused(x, fused)
    if module is None:
        return reference.linear_cross_entropy(x, weight, target)
    return module.linear_cross_entropy(x, weight, target)


def adam_step(param, master, exp_avg, exp_avg_sq, grad, decay, grad_scale=None, *, lr: float, beta1: float,
              beta2: float, eps: float, weight_decay: float, step: int, fused: bool = False,
              schedule: torch.Tensor | None = None) -> None:
    """AdamW on flat float32 state, in place (see :func:`ckptkit.kernels.reference.adam_step`);
    the Triton version makes one pass over it. ``schedule`` (Triton only): a float32 device
    tensor with :func:`adam_schedule`'s numbers, read when the kernel
    runs instead of ``lr`` and ``step``, so that a captured CUDA graph replays every step."""
    module = _fused(master, fused)
    if module is None:
        if schedule is not None:
            raise ValueError("adam_step: a device-side schedule needs the Triton kernel (a CUDA tensor)")
        reference.adam_step(param, master, exp_avg, exp_avg_sq, grad, decay, grad_scale, lr=lr, beta1=beta1,
                            beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)
        return
    module.adam_step(param, master, exp_avg, exp_avg_sq, grad, decay, grad_scale, lr=lr, beta1=beta1, beta2=beta2,
                     eps=eps, weight_decay=weight_decay, step=step, schedule=schedule)


def gradient_accumulator(numels: list[int], offsets: list[int], main: torch.Tensor, *, fused: bool = False):
    """An object whose ``add(grads)`` does ``main[offsets[i]: offsets[i] + numels[i]] += grads[i]``
    for every ``i`` (``None``: nothing) in float32: with Triton in one launch per eight
    tensors, else one add each (:class:`ckptkit.kernels.reference.GradientAccumulator`)."""
    module = _fused(main, fused)
    return (reference if module is None else module).GradientAccumulator(numels, offsets, main)
