"""Triton kernels (forward and backward) for the trainer's memory-bound operations.

Imported only when a CUDA device and Triton are present (:func:`ckptkit.kernels.fused_available`).
Each kernel reads and writes every element once, in one pass, computing in float32:

* ``bias_gelu``: ``gelu(x + bias)`` (erf or tanh form); backward recomputes from ``x`` and
  writes the input gradient and, per program of 256 rows, column sums for the bias gradient in one pass
  (the autograd wiring is the operator ``torch.ops.ckptkit.bias_gelu``, :mod:`.ops`).
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

import dataclasses
import functools
import math

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from .reference import adam_schedule

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


_ELEMENTWISE_BLOCK = 1024


def bias_gelu_forward(x: torch.Tensor, bias: torch.Tensor | None, approximate: str) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    grid = (triton.cdiv(x.numel(), _ELEMENTWISE_BLOCK),)
    _bias_gelu_forward_kernel[grid](x, bias if bias is not None else x, out, x.numel(), x.shape[-1],
                                    HAS_BIAS=bias is not None, TANH=approximate == "tanh", BLOCK=_ELEMENTWISE_BLOCK)
    return out


def bias_gelu_backward(grad: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, approximate: str):
    """``(grad_x, grad_bias)`` in one pass over ``grad`` and ``x``; the bias gradient sums the float32
    input gradients of each program's rows, then the programs' sums (``[programs, width]``, small)."""
    return bias_gelu_backward_rows(grad, x, bias, approximate, False, GELU_BACKWARD_ROWS_PER_PROGRAM)


@triton.jit
def _bias_gelu_and_derivative_kernel(x_ptr, bias_ptr, out_ptr, derivative_ptr, numel, width, HAS_BIAS: tl.constexpr,
                                     TANH: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    z = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(bias_ptr + offsets % width, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, _gelu_forward(z, TANH).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(derivative_ptr + offsets, _gelu_derivative(z, TANH).to(derivative_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_backward_rows_kernel(grad_ptr, source_ptr, bias_ptr, out_ptr, partial_ptr, rows, width,
                                    rows_per_program, FROM_DERIVATIVE: tl.constexpr, HAS_BIAS: tl.constexpr,
                                    TANH: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    # Program (g, c): rows [g x rows_per_program, (g + 1) x rows_per_program) of feature block c, BLOCK_ROWS
    # at a time, the bias gradient's float32 sums kept in registers and reduced once at the end (one row of
    # ``partial`` per program group). ``source`` is the pre-activation x, or with FROM_DERIVATIVE the
    # derivative gelu'(x + bias) the forward wrote.
    group, col_block = tl.program_id(0), tl.program_id(1)
    col_index = col_block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = col_index < width
    if not FROM_DERIVATIVE:
        if HAS_BIAS:
            bias = tl.load(bias_ptr + col_index, mask=col_mask, other=0.0).to(tl.float32)
    sums = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
    first = group * rows_per_program
    for start in range(0, rows_per_program, BLOCK_ROWS):
        row_index = first + start + tl.arange(0, BLOCK_ROWS)
        mask = (row_index[:, None] < rows) & col_mask[None, :]
        offsets = row_index[:, None].to(tl.int64) * width + col_index[None, :]
        grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if FROM_DERIVATIVE:
            grad_z = grad * tl.load(source_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        else:
            z = tl.load(source_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                z += bias[None, :]
            grad_z = grad * _gelu_derivative(z, TANH)
        tl.store(out_ptr + offsets, grad_z.to(out_ptr.dtype.element_ty), mask=mask)
        sums += grad_z
    if HAS_BIAS:
        tl.store(partial_ptr + group * width + col_index, tl.sum(sums, axis=0), mask=col_mask)


# Rows per program of the bias + GeLU backward (a multiple of 32): each program loops over them, 128
# features wide, its bias-gradient sums kept in registers. On an H100, [32768, 3072] bf16 from x:
# 0.297 / 0.269 / 0.259 / 0.253 ms over 64 / 128 / 256 / 512 rows, 0.330 ms with one 64 x 128 tile per
# program (the kernel this replaced); floor 0.205 ms. From the derivative: 0.225 / 0.221 ms (128 / 256).
GELU_BACKWARD_ROWS_PER_PROGRAM = 256
_GELU_ROWS_TILE = (32, 128)


def bias_gelu_and_derivative(x: torch.Tensor, bias: torch.Tensor | None, approximate: str):
    """``(gelu(x + bias), gelu'(x + bias))``, both in ``x``'s dtype, in one pass."""
    x = x.contiguous()
    out, derivative = torch.empty_like(x), torch.empty_like(x)
    grid = (triton.cdiv(x.numel(), _ELEMENTWISE_BLOCK),)
    _bias_gelu_and_derivative_kernel[grid](x, bias if bias is not None else x, out, derivative, x.numel(),
                                           x.shape[-1], HAS_BIAS=bias is not None, TANH=approximate == "tanh",
                                           BLOCK=_ELEMENTWISE_BLOCK)
    return out, derivative


def bias_gelu_backward_rows(grad: torch.Tensor, source: torch.Tensor, bias: torch.Tensor | None, approximate: str,
                            from_derivative: bool, rows_per_program: int):
    """:func:`bias_gelu_backward` with programs looping over ``rows_per_program`` rows; ``source`` is
    ``x``, or gelu'(x + bias) with ``from_derivative`` (then ``bias`` only says whether there is one)."""
    source, grad = source.contiguous(), grad.contiguous()
    width = source.shape[-1]
    rows = source.numel() // width
    block_rows, block_cols = _GELU_ROWS_TILE
    rows_per_program = triton.cdiv(max(rows_per_program, block_rows), block_rows) * block_rows
    grad_x = torch.empty_like(source)
    groups = triton.cdiv(rows, rows_per_program)
    partial = torch.empty((groups, width), dtype=torch.float32, device=source.device) if bias is not None else source
    _bias_gelu_backward_rows_kernel[(groups, triton.cdiv(width, block_cols))](
        grad, source, bias if bias is not None else source, grad_x, partial, rows, width, rows_per_program,
        FROM_DERIVATIVE=from_derivative, HAS_BIAS=bias is not None, TANH=approximate == "tanh",
        BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=8)
    grad_bias = partial.sum(0).to(bias.dtype) if bias is not None else None
    return grad_x, grad_bias


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
def _cross_entropy_loss_and_grad_kernel(logits_ptr, target_ptr, loss_ptr, width, BLOCK: tl.constexpr,
                                        BACKWARDS: tl.constexpr):
    """One row: its loss, then ``softmax - onehot(target)`` written over the row's logits.

    The row is read twice (statistics, then the gradient). ``BACKWARDS``: the second pass
    walks the row from its end, so that it starts with the blocks the first pass read last,
    the likeliest to be still in L2.
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
    blocks = tl.cdiv(width, BLOCK)
    for index in range(0, blocks):
        if BACKWARDS:
            columns = (blocks - 1 - index) * BLOCK + tl.arange(0, BLOCK)
        else:
            columns = index * BLOCK + tl.arange(0, BLOCK)
        mask = columns < width
        values = tl.load(base + columns, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(values - running_max) * inverse_sum - tl.where(columns == target, 1.0, 0.0)
        tl.store(base + columns, grad.to(logits_ptr.dtype.element_ty), mask=mask)


@dataclasses.dataclass(frozen=True)
class LossKernelLaunch:
    """How the output layer's loss+grad kernel is launched (one program per row).

    ``block``: columns per iteration; ``warps``: warps per program (more warps, fewer rows in
    flight, so more of each row is still in L2 for its second read); ``backwards``: the second
    pass walks the row from its end. Written ``"4096,8,backwards"`` on command lines.

    The defaults are the fastest of 4 blocks x 4 warp counts x both orders on an H100: 32768
    rows of GPT-2's 50304 logits in 3.116 ms (1.39x the floor of one read and one write),
    against 3.343 ms for ``"4096,4,forwards"``, the launch before.
    """
    block: int = 4096
    warps: int = 8
    backwards: bool = True

    @classmethod
    def parse(cls, text: str) -> "LossKernelLaunch":
        block, warps, order = text.split(",")
        if order not in ("forwards", "backwards"):
            raise ValueError(f"loss kernel launch {text!r}: the order is 'forwards' or 'backwards'")
        return cls(int(block), int(warps), order == "backwards")

    def __str__(self) -> str:
        return f"{self.block},{self.warps},{'backwards' if self.backwards else 'forwards'}"


LOSS_KERNEL_LAUNCH = LossKernelLaunch()  # the benchmarks set another


def cross_entropy_loss_and_grad(logits2d: torch.Tensor, target: torch.Tensor, loss: torch.Tensor,
                                launch: LossKernelLaunch | None = None) -> None:
    """``loss[r]`` for each row of ``logits2d [rows, vocab]``, whose row becomes its gradient."""
    launch = launch or LOSS_KERNEL_LAUNCH
    rows, width = logits2d.shape
    _cross_entropy_loss_and_grad_kernel[(rows,)](logits2d, target, loss, width,
                                                 BLOCK=min(launch.block, triton.next_power_of_2(width)),
                                                 BACKWARDS=launch.backwards, num_warps=launch.warps)


@triton.jit
def _scale_rows_kernel(x_ptr, scale_ptr, out_ptr, width, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = columns < width
    offsets = row.to(tl.int64) * width + columns
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, (x * tl.load(scale_ptr + row)).to(out_ptr.dtype.element_ty), mask=mask)


def _scale_rows(x2d: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(x2d.float() * scale[:, None]).to(x2d.dtype)`` in one pass (no float32 copy of ``x2d``)."""
    x2d = x2d.contiguous()
    out = torch.empty_like(x2d)
    rows, width = x2d.shape
    block = min(1024, triton.next_power_of_2(width))
    _scale_rows_kernel[(rows, triton.cdiv(width, block))](x2d, scale.contiguous(), out, width, BLOCK=block)
    return out


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
        cross_entropy_loss_and_grad(grad_logits, target.reshape(-1).contiguous(), loss)
        ctx.save_for_backward(x2d, weight, grad_logits)
        ctx.x_shape = x.shape
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        x2d, weight, grad_logits = ctx.saved_tensors
        scale = grad_loss.reshape(-1).to(torch.float32)
        grad_x = _scale_rows(grad_logits @ weight, scale) if ctx.needs_input_grad[0] else None
        grad_weight = grad_logits.t() @ _scale_rows(x2d, scale) if ctx.needs_input_grad[1] else None
        return None if grad_x is None else grad_x.view(ctx.x_shape), grad_weight, None


def linear_cross_entropy(x, weight, target):
    return _LinearCrossEntropy.apply(x, weight, target)


# ----------------------------------------------------------------------------- AdamW

@triton.jit
def _adam_kernel(param_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr, grad_ptr, decay_ptr, scale_ptr, schedule_ptr,
                 numel, decay_factor, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, step_size,
                 bias_correction2_sqrt, HAS_SCALE: tl.constexpr, HAS_SCHEDULE: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    if HAS_SCHEDULE:  # the step's numbers from device memory (a captured CUDA graph replays other steps)
        decay_factor = tl.load(schedule_ptr)
        step_size = tl.load(schedule_ptr + 1)
        bias_correction2_sqrt = tl.load(schedule_ptr + 2)
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
              beta2: float, eps: float, weight_decay: float, step: int, schedule: torch.Tensor | None = None) -> None:
    """One pass over the state: reads gradient, master, moments and decay flag once, writes each output once.

    ``schedule``: a float32 device tensor holding :func:`adam_schedule`'s three numbers, read
    by the kernel when it runs instead of ``lr`` and ``step`` (so a CUDA graph that captured
    the update can replay it at every step).
    """
    numel = master.numel()
    for tensor in (param, exp_avg, exp_avg_sq, grad, decay):
        assert tensor.numel() == numel and tensor.is_contiguous(), "adam_step takes contiguous flat tensors"
    decay_factor, step_size, bias_correction2_sqrt = adam_schedule(lr, beta1, beta2, weight_decay, step)
    # 1 - beta computed here in double: in float32, 1 - 0.999f is 1.3e-5 away from 0.001.
    _adam_kernel[(triton.cdiv(numel, _ADAM_BLOCK),)](
        param, master, exp_avg, exp_avg_sq, grad, decay.view(torch.uint8),
        grad_scale if grad_scale is not None else master, schedule if schedule is not None else master, numel,
        decay_factor, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, step_size, bias_correction2_sqrt,
        HAS_SCALE=grad_scale is not None, HAS_SCHEDULE=schedule is not None, BLOCK=_ADAM_BLOCK, num_warps=8)


# ----------------------------------------------------------------------------- gradient accumulation

@triton.jit
def _add_run(grad_ptr, main_ptr, start, numel, BLOCK: tl.constexpr):
    offsets = start + tl.arange(0, BLOCK)
    mask = offsets < numel
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(main_ptr + offsets, tl.load(main_ptr + offsets, mask=mask, other=0.0) + grad, mask=mask)


@triton.jit(do_not_specialize=["present"])  # a bit mask, not a size: no variant for present == 1
def _accumulate_gradients_kernel(g0, g1, g2, g3, g4, g5, g6, g7, main_ptr, chunk_tensor_ptr, chunk_start_ptr,
                                 numel_ptr, offset_ptr, present, BLOCK: tl.constexpr):
    # Program c adds elements [start, start + BLOCK) of gradient t = chunk_tensor[c] (one of the eight
    # passed, bit t of ``present`` set) to main[offset[t] + start:].
    chunk = tl.program_id(0)
    tensor = tl.load(chunk_tensor_ptr + chunk)
    start = tl.load(chunk_start_ptr + chunk)
    numel = tl.load(numel_ptr + tensor)
    if (present >> tensor) & 1:
        target = main_ptr + tl.load(offset_ptr + tensor)
        if tensor == 0:
            _add_run(g0, target, start, numel, BLOCK)
        elif tensor == 1:
            _add_run(g1, target, start, numel, BLOCK)
        elif tensor == 2:
            _add_run(g2, target, start, numel, BLOCK)
        elif tensor == 3:
            _add_run(g3, target, start, numel, BLOCK)
        elif tensor == 4:
            _add_run(g4, target, start, numel, BLOCK)
        elif tensor == 5:
            _add_run(g5, target, start, numel, BLOCK)
        elif tensor == 6:
            _add_run(g6, target, start, numel, BLOCK)
        else:
            _add_run(g7, target, start, numel, BLOCK)


_ACCUMULATE_BLOCK = 4096
_ACCUMULATE_GROUP = 8  # gradients per launch: the kernel's pointer arguments


class _AccumulateGroup:
    """Up to eight tensors' chunk tables (which tensor, from where, its size and place in ``main``)."""

    def __init__(self, indices: list[int], numels: list[int], offsets: list[int], device):
        chunk_tensor, chunk_start = [], []
        for position, index in enumerate(indices):
            for start in range(0, numels[index], _ACCUMULATE_BLOCK):
                chunk_tensor.append(position)
                chunk_start.append(start)
        self.indices = indices
        self.chunks = len(chunk_tensor)
        self.chunk_tensor = torch.tensor(chunk_tensor, dtype=torch.int32, device=device)
        self.chunk_start = torch.tensor(chunk_start, dtype=torch.int64, device=device)
        self.numels = torch.tensor([numels[index] for index in indices], dtype=torch.int64, device=device)
        self.offsets = torch.tensor([offsets[index] for index in indices], dtype=torch.int64, device=device)


class GradientAccumulator:
    """Adds the gradients of many tensors (tensor ``i`` is ``main[offsets[i]: offsets[i] + numels[i]]``
    of one flat float32 buffer) to that buffer: one kernel launch per eight tensors, each
    program adding one chunk of one tensor, instead of one launch per tensor.

    Gradients are passed as kernel arguments (no table of addresses in device memory), so a
    CUDA graph that captures the launches replays them on the same buffers.
    """

    def __init__(self, numels: list[int], offsets: list[int], main: torch.Tensor):
        self.main = main
        self.groups = [_AccumulateGroup(list(range(first, min(first + _ACCUMULATE_GROUP, len(numels)))), numels,
                                        offsets, main.device)
                       for first in range(0, len(numels), _ACCUMULATE_GROUP)]

    @torch.no_grad()
    def add(self, grads: list[torch.Tensor | None]) -> None:
        for group in self.groups:
            members = [grads[index] for index in group.indices]
            present = sum(1 << position for position, grad in enumerate(members) if grad is not None)
            if not present:
                continue
            stand_in = next(grad for grad in members if grad is not None)
            for grad in members:
                assert grad is None or (grad.is_contiguous() and grad.dtype == stand_in.dtype), \
                    "gradients must be contiguous, of one dtype"
            pointers = [grad if grad is not None else stand_in for grad in members]
            pointers += [stand_in] * (_ACCUMULATE_GROUP - len(pointers))
            _accumulate_gradients_kernel[(group.chunks,)](
                *pointers, self.main, group.chunk_tensor, group.chunk_start, group.numels, group.offsets, present,
                BLOCK=_ACCUMULATE_BLOCK, num_warps=8)
