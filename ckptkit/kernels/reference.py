"""Pure PyTorch versions of every fused kernel: the fallbacks and the specification.

Each function computes exactly what its Triton twin in :mod:`ckptkit.kernels.fused`
computes, in plain eager PyTorch. Norms and the loss compute in float32 whatever the
input dtype and cast the result back, as Megatron's fused kernels do.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..errors import BadInput, Unsupported


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none") -> torch.Tensor:
    """``gelu(x + bias)``; ``approximate="tanh"`` is the tanh form Megatron's fused kernel uses."""
    if bias is not None:
        x = x + bias
    return F.gelu(x, approximate=approximate)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(),
                        None if bias is None else bias.float(), eps).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` (Megatron's and HF Llama's RMSNorm)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype)


# Megatron-LM's defaults for ``--use-rope-scaling`` (``RotaryEmbedding._apply_scaling``), which are
# Llama 3.1's: a checkpoint's args record only ``rope_scaling_factor``.
LLAMA3_SCALING_DEFAULTS = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192}


def rope_scaling_parameters(scaling: dict | None) -> dict | None:
    """The Llama 3.1 parameters of a Hugging Face ``rope_scaling`` dict, or None for plain RoPE.

    >>> rope_scaling_parameters({"rope_type": "llama3", "factor": 32.0})
    {'factor': 32.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0, 'original_max_position_embeddings': 8192}

    Missing values take Megatron's defaults. ``rope_type`` ``"default"`` (what transformers
    writes for no scaling) gives None; any other type raises :class:`~ckptkit.errors.Unsupported`.
    """
    if not scaling:
        return None
    rope_type = scaling.get("rope_type", scaling.get("type"))  # "type": transformers before 4.45
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise Unsupported(f"RoPE scaling of type {rope_type!r} is not implemented by the trainer's model "
                          f"(it computes 'llama3' only); rope_scaling is {scaling}")
    parameters = {key: scaling.get(key, default) for key, default in LLAMA3_SCALING_DEFAULTS.items()}
    if parameters["high_freq_factor"] <= parameters["low_freq_factor"]:
        raise BadInput(f"llama3 RoPE scaling needs high_freq_factor > low_freq_factor (got {scaling})")
    return parameters


def llama3_scaled_frequencies(inverse_frequency: torch.Tensor, factor: float, low_freq_factor: float,
                              high_freq_factor: float, original_max_position_embeddings: int) -> torch.Tensor:
    """Llama 3.1's rescaling of RoPE's inverse frequencies (Megatron's ``_apply_scaling``, HF's
    ``_compute_llama3_parameters``).

    By wavelength ``2 pi / f``: shorter than ``original / high_freq_factor``, unchanged;
    longer than ``original / low_freq_factor``, divided by ``factor``; in between,
    ``(1 - smooth) f / factor + smooth f`` with
    ``smooth = (original / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)``.
    """
    original = original_max_position_embeddings
    wavelength = 2 * math.pi / inverse_frequency
    smooth = (original / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inverse_frequency / factor + smooth * inverse_frequency
    scaled = torch.where(wavelength > original / low_freq_factor, inverse_frequency / factor, smoothed)
    return torch.where(wavelength < original / high_freq_factor, inverse_frequency, scaled)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict | None = None,
                             device=None) -> torch.Tensor:
    """``theta^(-2i/head_dim)`` for ``i < head_dim/2`` (float32), rescaled when ``scaling`` says so.

    ``scaling`` is a Hugging Face ``rope_scaling`` dict (see :func:`rope_scaling_parameters`).
    """
    inverse_frequency = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
                                         / head_dim))
    parameters = rope_scaling_parameters(scaling)
    if parameters is None:
        return inverse_frequency
    return llama3_scaled_frequencies(inverse_frequency, **parameters)


def rope_tables(seq_length: int, head_dim: int, theta: float, device=None,
                scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``[seq, head_dim]`` for non-interleaved rotary embeddings.

    Frequencies from :func:`rope_inverse_frequencies`, repeated for both halves of the
    head (Megatron's ``RotaryEmbedding`` and HF Llama compute the same, in float32).
    The Triton and eager ``apply_rope`` both take these tables, so RoPE scaling lives here only.
    """
    inverse_frequency = rope_inverse_frequencies(head_dim, theta, scaling, device=device)
    angles = torch.outer(torch.arange(seq_length, dtype=torch.float32, device=device), inverse_frequency)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``[batch, seq, heads, head_dim]`` by tables ``[seq, head_dim]``.

    ``x * cos + rotate_half(x) * sin`` with the tables cast to ``x``'s dtype first
    (Megatron's ``apply_rotary_pos_emb_bshd``).
    """
    cos = cos[None, :, None, :].to(x.dtype)
    sin = sin[None, :, None, :].to(x.dtype)
    return x * cos + rotate_half(x) * sin


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy when each tensor-parallel rank holds a slice of the vocabulary.

    Megatron's algorithm (``megatron/core/tensor_parallel/cross_entropy.py``): all-reduce
    the row maximum, the target's logit (only the rank owning the target contributes)
    and the sum of exponentials; the gradient is ``softmax - onehot`` on each slice.
    """

    @staticmethod
    def forward(ctx, logits, target, vocab_start, group):
        logits = logits.float()
        row_max = logits.max(dim=-1).values
        if group is not None:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - row_max.unsqueeze(-1)
        local_target = target - vocab_start
        outside = (local_target < 0) | (local_target >= logits.shape[-1])
        local_target = local_target.masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        if group is not None:
            dist.all_reduce(target_logit, group=group)
            dist.all_reduce(sum_exp, group=group)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, outside)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, outside = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -(~outside).unsqueeze(-1).to(grad.dtype))
        return grad * grad_loss.unsqueeze(-1), None, None, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_start: int = 0,
                  group=None) -> torch.Tensor:
    """Per-token loss ``[...]`` (float32) of ``logits [..., vocab_slice]`` against ``target [...]``.

    With ``group`` set, ``logits`` holds vocabulary entries ``vocab_start ..
    vocab_start + logits.shape[-1]`` of this rank and the loss is over the whole
    vocabulary of the group.
    """
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_start, group)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token loss ``[...]`` (float32) of the logits ``x @ weight^T`` (the whole vocabulary)."""
    return cross_entropy(F.linear(x, weight), target)



def adam_schedule(lr: float, beta1: float, beta2: float, weight_decay: float, step: int) -> tuple[float, float, float]:
    """The three numbers of step ``step`` that the fused update takes: ``(lr x weight_decay,
    lr / (1 - beta1^k), sqrt(1 - beta2^k))``, in double (as its scalar arguments are computed)."""
    return lr * weight_decay, lr / (1 - beta1 ** step), math.sqrt(1 - beta2 ** step)


@torch.no_grad()
def adam_step(param: torch.Tensor, master: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
              grad: torch.Tensor, decay: torch.Tensor, grad_scale: torch.Tensor | None, *, lr: float, beta1: float,
              beta2: float, eps: float, weight_decay: float, step: int) -> None:
    """One AdamW update of flat float32 state, in place; ``param`` gets the new weights in its dtype.

    ``grad`` (float32) is first multiplied by ``grad_scale`` (a 0-d tensor: the clipping
    coefficient) when given; the decoupled weight decay ``lr x weight_decay`` applies
    where ``decay`` (bool) is true. Then, with ``k = step``:
    ``m = lerp(m, g, 1 - beta1)``, ``v = beta2 v + (1 - beta2) g^2``,
    ``w -= lr / (1 - beta1^k) x m / (sqrt(v) / sqrt(1 - beta2^k) + eps)``.
    """
    if grad_scale is not None:
        grad = grad * grad_scale
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    master.sub_(master * decay * (lr * weight_decay))
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denominator = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    master.addcdiv_(exp_avg, denominator, value=-lr / bias_correction1)
    param.copy_(master)


class GradientAccumulator:
    """``add(grads)``: ``main[offsets[i]: offsets[i] + numels[i]] += grads[i]`` (float32), one add per tensor."""

    def __init__(self, numels: list[int], offsets: list[int], main: torch.Tensor):
        self.runs = [main[offset: offset + numel] for numel, offset in zip(numels, offsets)]

    @torch.no_grad()
    def add(self, grads: list[torch.Tensor | None]) -> None:
        for run, grad in zip(self.runs, grads):
            if grad is not None:
                run.add_(grad.reshape(-1))
