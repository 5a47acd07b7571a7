"""Kernels as torch custom operators, so that ``torch.compile`` keeps each one whole.

Inside a compiled graph the compiler would trace an eager GeLU and write its own kernels
for it; its backward then reads the pre-activation and the incoming gradient twice (once
for the input gradient, once for the bias gradient's column sums). As an operator the
Triton forward and one-pass backward (:func:`ckptkit.kernels.fused.bias_gelu_backward`)
run as they are, between the compiler's kernels:

>>> y = torch.ops.ckptkit.bias_gelu(x, bias, "none")   # x [tokens, ffn] (bias not yet added), bias [ffn]

On a CUDA tensor with Triton the operators run the Triton kernels; elsewhere the same
math in PyTorch (float32 inside, or float64 for float64), so they can be compiled and checked on CPU.
"""
from __future__ import annotations

import torch

from . import reference


def _triton_for(tensor: torch.Tensor):
    from . import fused_available
    if tensor.is_cuda and fused_available():
        from . import fused
        return fused
    return None


@torch.library.custom_op("ckptkit::bias_gelu", mutates_args=())
def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None, approximate: str) -> torch.Tensor:
    """``gelu(x + bias)`` (erf, or tanh with ``approximate="tanh"``)."""
    module = _triton_for(x)
    if module is None:
        return reference.bias_gelu(x, bias, approximate).clone()  # an operator's output owns its memory
    return module.bias_gelu_forward(x, bias, approximate)


@bias_gelu.register_fake
def _(x, bias, approximate):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("ckptkit::bias_gelu_backward", mutates_args=())
def bias_gelu_backward(grad: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None,
                       approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_bias)``; without a bias the second is an empty tensor (an operator
    returns tensors only)."""
    module = _triton_for(x)
    if module is None:
        wide = torch.promote_types(x.dtype, torch.float32)  # float32 at least, as the Triton kernel computes
        z = x.to(wide) if bias is None else x.to(wide) + bias.to(wide)
        grad_z = torch.ops.aten.gelu_backward(grad.to(wide), z, approximate=approximate)
        grad_bias = grad_z.reshape(-1, x.shape[-1]).sum(0).to(bias.dtype) if bias is not None else x.new_empty(0)
        return grad_z.to(x.dtype), grad_bias
    grad_x, grad_bias = module.bias_gelu_backward(grad, x, bias, approximate)
    return grad_x, grad_bias if grad_bias is not None else x.new_empty(0)


@bias_gelu_backward.register_fake
def _(grad, x, bias, approximate):
    grad_bias = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    return torch.empty_like(x, memory_format=torch.contiguous_format), grad_bias


def _save_inputs(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate = approximate


def _bias_gelu_grad(ctx, grad):
    x, bias = ctx.saved_tensors
    grad_x, grad_bias = torch.ops.ckptkit.bias_gelu_backward(grad, x, bias, ctx.approximate)
    return grad_x, grad_bias if bias is not None else None, None


bias_gelu.register_autograd(_bias_gelu_grad, setup_context=_save_inputs)


# ----------------------------------------------------------------------------- saved derivative
# The same operator with a cheaper backward: the forward also writes gelu'(x + bias) (in x's dtype,
# one more write), so the backward multiplies instead of recomputing erf and exp from x (the
# recomputation makes the one-pass backward run at about 1.6x its memory floor on an H100).

@torch.library.custom_op("ckptkit::bias_gelu_and_derivative", mutates_args=())
def bias_gelu_and_derivative(x: torch.Tensor, bias: torch.Tensor | None,
                             approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gelu(x + bias), gelu'(x + bias))``, both in ``x``'s dtype."""
    module = _triton_for(x)
    if module is None:
        wide = torch.promote_types(x.dtype, torch.float32)
        z = x.to(wide) if bias is None else x.to(wide) + bias.to(wide)
        derivative = torch.ops.aten.gelu_backward(torch.ones_like(z), z, approximate=approximate)
        return torch.nn.functional.gelu(z, approximate=approximate).to(x.dtype), derivative.to(x.dtype)
    return module.bias_gelu_and_derivative(x, bias, approximate)


@bias_gelu_and_derivative.register_fake
def _(x, bias, approximate):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


@torch.library.custom_op("ckptkit::bias_gelu_backward_from_derivative", mutates_args=())
def bias_gelu_backward_from_derivative(grad: torch.Tensor, derivative: torch.Tensor,
                                       bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad x gelu', its column sums)``; ``bias`` only says whether there is a bias gradient and its dtype."""
    module = _triton_for(derivative)
    if module is None:
        wide = torch.promote_types(derivative.dtype, torch.float32)
        grad_z = grad.to(wide) * derivative.to(wide)
        grad_bias = (grad_z.reshape(-1, derivative.shape[-1]).sum(0).to(bias.dtype) if bias is not None
                     else derivative.new_empty(0))
        return grad_z.to(derivative.dtype), grad_bias
    grad_x, grad_bias = module.bias_gelu_backward_rows(grad, derivative, bias, "none", True,
                                                       module.GELU_BACKWARD_ROWS_PER_PROGRAM)
    return grad_x, grad_bias if grad_bias is not None else derivative.new_empty(0)


@bias_gelu_backward_from_derivative.register_fake
def _(grad, derivative, bias):
    grad_bias = torch.empty_like(bias) if bias is not None else derivative.new_empty(0)
    return torch.empty_like(derivative, memory_format=torch.contiguous_format), grad_bias


def _save_derivative(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1], bias)


def _bias_gelu_grad_from_derivative(ctx, grad, grad_of_derivative):
    derivative, bias = ctx.saved_tensors
    grad_x, grad_bias = torch.ops.ckptkit.bias_gelu_backward_from_derivative(grad, derivative, bias)
    return grad_x, grad_bias if bias is not None else None, None


bias_gelu_and_derivative.register_autograd(_bias_gelu_grad_from_derivative, setup_context=_save_derivative)
