"""Triton kernels (forward and backward) for the trainer's memory-bound operations.

Imported only when a CUDA device and Triton are present (:func:`ckptkit.kernels.fused_available`).
Each kernel reads and writes every element once, in one pass, computing in float32:

* ``bias_gelu``: ``gelu(x + bias)`` (erf or tanh form); backward recomputes from ``x``.
* ``layer_norm`` / ``rms_norm``: one program per block of rows, the row held in
  registers; the backward accumulates the weight (and bias) gradients of its rows
  in registers and writes one partial sum per program (summed by torch after).
* ``apply_rope``: rotate-half rotary embedding of ``[batch, seq, heads, head_dim]``;
  the backward is the same rotation by the opposite angle.
* ``cross_entropy``: one pass over each row of logits for its max, sum of exponentials
  (online) and target logit, then (under tensor parallelism) the all-reduces of
  Megatron's vocab-parallel algorithm; the backward writes ``softmax - onehot``
  without keeping the softmax in memory.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
import triton
import triton.language as tl

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


# ----------------------------------------------------------------------------- bias + GeLU

@triton.jit
def _gelu_forward(z, TANH: tl.constexpr):
    if TANH:
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        return 0.5 * z * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
    return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))


@triton.jit
def _gelu_derivative(z, TANH: tl.constexpr):
    if TANH:
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
    return 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327


@triton.jit
def _bias_gelu_forward_kernel(x_ptr, bias_ptr, out_ptr, numel, width, HAS_BIAS: tl.constexpr,
                              TANH: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    z = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(bias_ptr + offsets % width, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, _gelu_forward(z, TANH).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_backward_kernel(grad_ptr, x_ptr, bias_ptr, out_ptr, numel, width, HAS_BIAS: tl.constexpr,
                               TANH: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    z = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(bias_ptr + offsets % width, mask=mask, other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, (grad * _gelu_derivative(z, TANH)).to(out_ptr.dtype.element_ty), mask=mask)


_ELEMENTWISE_BLOCK = 1024


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, approximate):
        x = x.contiguous()
        out = torch.empty_like(x)
        tanh = approximate == "tanh"
        grid = (triton.cdiv(x.numel(), _ELEMENTWISE_BLOCK),)
        _bias_gelu_forward_kernel[grid](x, bias if bias is not None else x, out, x.numel(), x.shape[-1],
                                        HAS_BIAS=bias is not None, TANH=tanh, BLOCK=_ELEMENTWISE_BLOCK)
        ctx.save_for_backward(x, bias)
        ctx.tanh = tanh
        return out

    @staticmethod
    def backward(ctx, grad):
        x, bias = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = torch.empty_like(x)
        grid = (triton.cdiv(x.numel(), _ELEMENTWISE_BLOCK),)
        _bias_gelu_backward_kernel[grid](grad, x, bias if bias is not None else x, grad_x, x.numel(), x.shape[-1],
                                         HAS_BIAS=bias is not None, TANH=ctx.tanh, BLOCK=_ELEMENTWISE_BLOCK)
        grad_bias = None
        if bias is not None:
            grad_bias = grad_x.reshape(-1, x.shape[-1]).sum(0, dtype=torch.float32).to(bias.dtype)
        return grad_x, grad_bias, None


def bias_gelu(x, bias, approximate: str = "none"):
    return _BiasGelu.apply(x, bias, approximate)


# ----------------------------------------------------------------------------- LayerNorm / RMSNorm

@triton.jit
def _norm_forward_kernel(x_ptr, weight_ptr, bias_ptr, out_ptr, mean_ptr, rstd_ptr, rows, width, eps,
                         RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    columns = tl.arange(0, BLOCK)
    mask = columns < width
    x = tl.load(x_ptr + row * width + columns, mask=mask, other=0.0).to(tl.float32)
    if RMS:
        mean = 0.0
        centered = x
    else:
        mean = tl.sum(x, axis=0) / width
        centered = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / width + eps)
    weight = tl.load(weight_ptr + columns, mask=mask, other=0.0).to(tl.float32)
    out = centered * rstd * weight
    if HAS_BIAS:
        out += tl.load(bias_ptr + columns, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * width + columns, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _norm_backward_kernel(grad_ptr, x_ptr, weight_ptr, mean_ptr, rstd_ptr, grad_x_ptr, partial_weight_ptr,
                          partial_bias_ptr, rows, width, rows_per_program,
                          RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    program = tl.program_id(0)
    columns = tl.arange(0, BLOCK)
    mask = columns < width
    weight = tl.load(weight_ptr + columns, mask=mask, other=0.0).to(tl.float32)
    weight_grad = tl.zeros((BLOCK,), dtype=tl.float32)
    bias_grad = tl.zeros((BLOCK,), dtype=tl.float32)
    first = program * rows_per_program
    for row in range(first, tl.minimum(first + rows_per_program, rows)):
        x = tl.load(x_ptr + row * width + columns, mask=mask, other=0.0).to(tl.float32)
        grad = tl.load(grad_ptr + row * width + columns, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        normed = tl.where(mask, (x - mean) * rstd, 0.0)
        weighted = grad * weight
        correction = normed * (tl.sum(weighted * normed, axis=0) / width)
        if not RMS:
            correction += tl.sum(weighted, axis=0) / width
        grad_x = (weighted - correction) * rstd
        tl.store(grad_x_ptr + row * width + columns, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
        weight_grad += grad * normed
        if HAS_BIAS:
            bias_grad += grad
    tl.store(partial_weight_ptr + program * width + columns, weight_grad, mask=mask)
    if HAS_BIAS:
        tl.store(partial_bias_ptr + program * width + columns, bias_grad, mask=mask)


@functools.cache
def _multiprocessors(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _block(width: int) -> int:
    return triton.next_power_of_2(width)


class _Norm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms):
        shape = x.shape
        x2d = x.reshape(-1, shape[-1]).contiguous()
        rows, width = x2d.shape
        out = torch.empty_like(x2d)
        mean = torch.empty(rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        _norm_forward_kernel[(rows,)](x2d, weight, bias if bias is not None else weight, out, mean, rstd, rows,
                                      width, eps, RMS=rms, HAS_BIAS=bias is not None, BLOCK=_block(width),
                                      num_warps=min(max(_block(width) // 256, 1), 16))
        ctx.save_for_backward(x2d, weight, bias, mean, rstd)
        ctx.rms, ctx.shape = rms, shape
        return out.view(shape)

    @staticmethod
    def backward(ctx, grad):
        x2d, weight, bias, mean, rstd = ctx.saved_tensors
        rows, width = x2d.shape
        grad2d = grad.reshape(rows, width).contiguous()
        grad_x = torch.empty_like(x2d)
        programs = min(rows, 4 * _multiprocessors(x2d.device))
        rows_per_program = triton.cdiv(rows, programs)
        programs = triton.cdiv(rows, rows_per_program)
        partial_weight = torch.empty(programs, width, dtype=torch.float32, device=x2d.device)
        partial_bias = torch.empty_like(partial_weight) if bias is not None else partial_weight
        _norm_backward_kernel[(programs,)](grad2d, x2d, weight, mean, rstd, grad_x, partial_weight, partial_bias,
                                           rows, width, rows_per_program, RMS=ctx.rms, HAS_BIAS=bias is not None,
                                           BLOCK=_block(width), num_warps=min(max(_block(width) // 256, 1), 16))
        grad_weight = partial_weight.sum(0).to(weight.dtype)
        grad_bias = partial_bias.sum(0).to(bias.dtype) if bias is not None else None
        return grad_x.view(ctx.shape), grad_weight, grad_bias, None, None


def layer_norm(x, weight, bias, eps: float):
    return _Norm.apply(x, weight, bias, eps, False)


def rms_norm(x, weight, eps: float):
    return _Norm.apply(x, weight, None, eps, True)


# ----------------------------------------------------------------------------- RoPE

@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, seq, heads, head_dim, sin_sign,
                 HEAD_BLOCK: tl.constexpr, HALF_BLOCK: tl.constexpr):
    token = tl.program_id(0)  # one (batch, position): all its heads, sharing the position's angles
    position = token % seq
    half = head_dim // 2
    head = tl.arange(0, HEAD_BLOCK)[:, None]
    columns = tl.arange(0, HALF_BLOCK)[None, :]
    mask = (head < heads) & (columns < half)
    offsets = token.to(tl.int64) * heads * head_dim + head * head_dim + columns
    first = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    second = tl.load(x_ptr + offsets + half, mask=mask, other=0.0).to(tl.float32)
    table = position * head_dim + columns
    in_half = columns < half
    cos_first = tl.load(cos_ptr + table, mask=in_half, other=0.0)
    cos_second = tl.load(cos_ptr + table + half, mask=in_half, other=0.0)
    sin_first = tl.load(sin_ptr + table, mask=in_half, other=0.0) * sin_sign
    sin_second = tl.load(sin_ptr + table + half, mask=in_half, other=0.0) * sin_sign
    # x * cos + rotate_half(x) * sin, rotate_half(x) = [-second, first]
    tl.store(out_ptr + offsets, (first * cos_first - second * sin_first).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + offsets + half, (second * cos_second + first * sin_second).to(out_ptr.dtype.element_ty),
             mask=mask)


def _rope(x, cos, sin, sin_sign):
    x = x.contiguous()
    batch, seq, heads, head_dim = x.shape
    out = torch.empty_like(x)
    _rope_kernel[(batch * seq,)](x, cos.float().contiguous(), sin.float().contiguous(), out, seq, heads, head_dim,
                                 sin_sign, HEAD_BLOCK=triton.next_power_of_2(heads),
                                 HALF_BLOCK=triton.next_power_of_2(head_dim // 2))
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        # The tables repeat the same angles in both halves, so the adjoint is the rotation by -angle.
        return _rope(grad, cos, sin, -1.0), None, None


def apply_rope(x, cos, sin):
    return _Rope.apply(x, cos, sin)


# ----------------------------------------------------------------------------- cross-entropy

@triton.jit
def _cross_entropy_stats_kernel(logits_ptr, target_ptr, max_ptr, sum_exp_ptr, target_logit_ptr, width,
                                BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * width
    target = tl.load(target_ptr + row)
    running_max = -float("inf")
    running_sum = 0.0
    target_logit = 0.0
    for start in range(0, width, BLOCK):
        columns = start + tl.arange(0, BLOCK)
        mask = columns < width
        values = tl.load(base + columns, mask=mask, other=-float("inf")).to(tl.float32)
        block_max = tl.max(values, axis=0)
        new_max = tl.maximum(running_max, block_max)
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(values - new_max), axis=0)
        running_max = new_max
        target_logit += tl.sum(tl.where(columns == target, values, 0.0), axis=0)
    tl.store(max_ptr + row, running_max)
    tl.store(sum_exp_ptr + row, running_sum)
    tl.store(target_logit_ptr + row, target_logit)


@triton.jit
def _cross_entropy_backward_kernel(logits_ptr, target_ptr, max_ptr, sum_exp_ptr, grad_loss_ptr, grad_ptr, width,
                                   BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offset = row.to(tl.int64) * width
    target = tl.load(target_ptr + row)
    row_max = tl.load(max_ptr + row)
    scale = tl.load(grad_loss_ptr + row) / tl.load(sum_exp_ptr + row)
    grad_loss = tl.load(grad_loss_ptr + row)
    for start in range(0, width, BLOCK):
        columns = start + tl.arange(0, BLOCK)
        mask = columns < width
        values = tl.load(logits_ptr + offset + columns, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(values - row_max) * scale - tl.where(columns == target, grad_loss, 0.0)
        tl.store(grad_ptr + offset + columns, grad.to(grad_ptr.dtype.element_ty), mask=mask)


_CROSS_ENTROPY_BLOCK = 4096


def cross_entropy_partial_stats(logits2d: torch.Tensor, local_target: torch.Tensor):
    """Per row of this vocabulary slice: ``(max, sum exp(x - max), x[target] or 0)``.

    ``local_target`` outside ``0 .. width-1`` (another rank's token) contributes 0.
    """
    rows, width = logits2d.shape
    stats = torch.empty(3, rows, dtype=torch.float32, device=logits2d.device)
    _cross_entropy_stats_kernel[(rows,)](logits2d, local_target, stats[0], stats[1], stats[2], width,
                                         BLOCK=min(_CROSS_ENTROPY_BLOCK, triton.next_power_of_2(width)))
    return stats[0], stats[1], stats[2]


def combine_partial_stats(row_max, sum_exp, target_logit, group):
    """Megatron's vocab-parallel reduction of the per-slice statistics: ``(global max, sum exp, loss)``."""
    global_max = row_max.clone()
    if group is not None:
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    total = sum_exp * torch.exp(row_max - global_max)
    target_logit = target_logit.clone()
    if group is not None:
        dist.all_reduce(total, group=group)
        dist.all_reduce(target_logit, group=group)
    return global_max, total, torch.log(total) + global_max - target_logit


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, group):
        shape = target.shape
        logits2d = logits.reshape(-1, logits.shape[-1]).contiguous()
        local_target = (target.reshape(-1) - vocab_start).contiguous()
        stats = cross_entropy_partial_stats(logits2d, local_target)
        global_max, sum_exp, loss = combine_partial_stats(*stats, group)
        ctx.save_for_backward(logits2d, local_target, global_max, sum_exp)
        ctx.logits_shape = logits.shape
        return loss.view(shape)

    @staticmethod
    def backward(ctx, grad_loss):
        logits2d, local_target, global_max, sum_exp = ctx.saved_tensors
        rows, width = logits2d.shape
        grad = torch.empty_like(logits2d)
        _cross_entropy_backward_kernel[(rows,)](logits2d, local_target, global_max, sum_exp,
                                                grad_loss.reshape(-1).float().contiguous(), grad, width,
                                                BLOCK=min(_CROSS_ENTROPY_BLOCK, triton.next_power_of_2(width)))
        return grad.view(ctx.logits_shape), None, None, None


def cross_entropy(logits, target, vocab_start: int = 0, group=None):
    return _CrossEntropy.apply(logits, target, vocab_start, group)


@triton.jit
def _cross_entropy_loss_and_grad_kernel(logits_ptr, target_ptr, loss_ptr, width, BLOCK: tl.constexpr):
    """One row: its loss, then ``softmax - onehot(target)`` written over the row's logits.

    The row is read twice (statistics, then the gradient); the second read mostly comes
    from L2 (one 100 KB row per program in flight), so HBM sees about one read and one write.
    """
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * width
    target = tl.load(target_ptr + row)
    running_max = -float("inf")
    running_sum = 0.0
    target_logit = 0.0
    for start in range(0, width, BLOCK):
        columns = start + tl.arange(0, BLOCK)
        mask = columns < width
        values = tl.load(base + columns, mask=mask, other=-float("inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(values, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(values - new_max), axis=0)
        running_max = new_max
        target_logit += tl.sum(tl.where(columns == target, values, 0.0), axis=0)
    tl.store(loss_ptr + row, tl.log(running_sum) + running_max - target_logit)
    inverse_sum = 1.0 / running_sum
    for start in range(0, width, BLOCK):
        columns = start + tl.arange(0, BLOCK)
        mask = columns < width
        values = tl.load(base + columns, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(values - running_max) * inverse_sum - tl.where(columns == target, 1.0, 0.0)
        tl.store(base + columns, grad.to(logits_ptr.dtype.element_ty), mask=mask)


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-token loss of ``x @ weight^T``; the logits buffer becomes the (unscaled) logit gradient.

    The forward pass computes the logits, then one kernel gives the loss and overwrites the
    logits with ``softmax - onehot``: the gradient for an output gradient of 1. The output
    gradient ``g`` (one value per token) is applied in the backward products, where it
    costs nothing: ``dx = g * (d @ W)`` and ``dW = d^T @ (g * x)`` (scaling rows of ``d``
    commutes with both). Against the separate cross-entropy this saves a read of the
    logits (the backward kernel's) and a buffer their size.
    """

    @staticmethod
    def forward(ctx, x, weight, target):
        x2d = x.reshape(-1, x.shape[-1])
        grad_logits = x2d @ weight.t()  # the logits until the kernel overwrites them
        rows, width = grad_logits.shape
        loss = torch.empty(rows, dtype=torch.float32, device=x.device)
        _cross_entropy_loss_and_grad_kernel[(rows,)](grad_logits, target.reshape(-1).contiguous(), loss, width,
                                                     BLOCK=min(_CROSS_ENTROPY_BLOCK, triton.next_power_of_2(width)))
        ctx.save_for_backward(x2d, weight, grad_logits)
        ctx.x_shape = x.shape
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        x2d, weight, grad_logits = ctx.saved_tensors
        scale = grad_loss.reshape(-1, 1).to(torch.float32)
        grad_x = ((grad_logits @ weight).float() * scale).to(x2d.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = grad_logits.t() @ (x2d.float() * scale).to(x2d.dtype) if ctx.needs_input_grad[1] else None
        return None if grad_x is None else grad_x.view(ctx.x_shape), grad_weight, None


def linear_cross_entropy(x, weight, target):
    return _LinearCrossEntropy.apply(x, weight, target)


# ----------------------------------------------------------------------------- AdamW

@triton.jit
def _adam_kernel(param_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr, grad_ptr, decay_ptr, scale_ptr, numel,
                 decay_factor, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bias_correction2_sqrt,
                 HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0)
    if HAS_SCALE:
        grad = grad * tl.load(scale_ptr)
    master = tl.load(master_ptr + offsets, mask=mask, other=0.0)
    decay = tl.load(decay_ptr + offsets, mask=mask, other=0) != 0
    master = tl.where(decay, master - master * decay_factor, master)
    exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask, other=0.0)
    exp_avg = exp_avg + one_minus_beta1 * (grad - exp_avg)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=0.0)
    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * grad * grad
    # IEEE square root and division, as torch computes them (Triton's defaults are approximations).
    denominator = tl.div_rn(tl.sqrt_rn(exp_avg_sq), bias_correction2_sqrt) + eps
    master = master - step_size * tl.div_rn(exp_avg, denominator)
    tl.store(exp_avg_ptr + offsets, exp_avg, mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq, mask=mask)
    tl.store(master_ptr + offsets, master, mask=mask)
    tl.store(param_ptr + offsets, master.to(param_ptr.dtype.element_ty), mask=mask)


_ADAM_BLOCK = 2048


@torch.no_grad()
def adam_step(param, master, exp_avg, exp_avg_sq, grad, decay, grad_scale, *, lr: float, beta1: float,
              beta2: float, eps: float, weight_decay: float, step: int) -> None:
    """One pass over the state: reads gradient, master, moments and decay flag once, writes each output once."""
    numel = master.numel()
    for tensor in (param, exp_avg, exp_avg_sq, grad, decay):
        assert tensor.numel() == numel and tensor.is_contiguous(), "adam_step takes contiguous flat tensors"
    # 1 - beta computed here in double: in float32, 1 - 0.999f is 1.3e-5 away from 0.001.
    _adam_kernel[(triton.cdiv(numel, _ADAM_BLOCK),)](
        param, master, exp_avg, exp_avg_sq, grad, decay.view(torch.uint8),
        grad_scale if grad_scale is not None else master, numel, lr * weight_decay, beta1, 1.0 - beta1, beta2,
        1.0 - beta2, eps, lr / (1 - beta1 ** step), math.sqrt(1 - beta2 ** step), HAS_SCALE=grad_scale is not None,
        BLOCK=_ADAM_BLOCK, num_warps=8)
