"""Pipeline parallelism: cut the layers into stages and run the 1F1B schedule.

Layers are split evenly, as Megatron does without uneven-stage options: with 6 layers
on PP=2, stage 0 holds global layers 0-2 and stage 1 layers 3-5 (named
``decoder.layers.0..2`` in both: indices are local to the stage). The first stage
keeps the embedding, the last the final norm and the output layer; with tied
embeddings and PP>1 the last stage holds its own copy of the embedding matrix, whose
gradient is summed with the first stage's after every step so that both stay equal.

The schedule is Megatron's non-interleaved one-forward-one-backward
(``megatron/core/pipeline_parallel/schedules.py``): stage ``s`` of ``P`` runs
``P - s - 1`` warm-up forwards, then alternates one forward and one backward, then
drains the remaining backwards. Activations go forward and their gradients backward
between neighbouring stages with point-to-point sends.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from ..model import GPT
from .groups import ParallelGroups


def stage_layers(num_layers: int, pp: int, pp_stage: int) -> range:
    """Global layer indices of a stage: ``stage_layers(6, 2, 1) == range(3, 6)``."""
    if num_layers % pp:
        raise ValueError(f"PP={pp} does not divide {num_layers} layers")
    per_stage = num_layers // pp
    return range(pp_stage * per_stage, (pp_stage + 1) * per_stage)


def keep_stage(model: GPT, pp_stage: int, pp: int) -> GPT:
    """Reduce a whole model to the part pipeline stage ``pp_stage`` of ``pp`` runs (in place)."""
    if pp == 1:
        return model
    layers = stage_layers(model.spec.num_layers, pp, pp_stage)
    model.decoder.layers = nn.ModuleList(list(model.decoder.layers)[layers.start:layers.stop])
    first, last = pp_stage == 0, pp_stage == pp - 1
    if not first:
        model.embedding = None
    if not last:
        model.decoder.final_layernorm = None
        model.output_layer = None
    elif model.spec.tied_embeddings:
        # Megatron's last stage owns a separate copy of the word embeddings for the head.
        shared = model.output_layer.weight
        model.output_layer.weight = nn.Parameter(torch.empty_like(shared))
    return model


class _PeerToPeer:
    """Sends and receives between this stage and its neighbours (same TP and DP rank)."""

    def __init__(self, groups: ParallelGroups, shape, dtype, device):
        self.groups, self.shape, self.dtype, self.device = groups, tuple(shape), dtype, device
        stage = groups.pp_stage
        self.previous = None if groups.is_first_stage else groups.stage_rank(stage - 1)
        self.next = None if groups.is_last_stage else groups.stage_rank(stage + 1)

    def exchange(self, send: torch.Tensor | None, send_to: int | None, receive_from: int | None):
        operations, received = [], None
        if send is not None and send_to is not None:
            operations.append(dist.P2POp(dist.isend, send.detach().contiguous(), send_to))
        if receive_from is not None:
            received = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            operations.append(dist.P2POp(dist.irecv, received, receive_from))
        if operations:
            for request in dist.batch_isend_irecv(operations):
                request.wait()
        return received

    def recv_forward(self):
        received = self.exchange(None, None, self.previous)
        return None if received is None else received.requires_grad_()

    def send_forward(self, output):
        self.exchange(output, self.next, None)

    def recv_backward(self):
        return self.exchange(None, None, self.next)

    def send_backward(self, input_grad):
        self.exchange(input_grad, self.previous, None)

    def send_forward_recv_backward(self, output):
        return self.exchange(output, self.next, self.next)

    def send_backward_recv_forward(self, input_grad):
        received = self.exchange(input_grad, self.previous, self.previous)
        return None if received is None else received.requires_grad_()


def _backward(inputs, output, output_grad, after_backward: Callable[[], None] | None = None):
    """Backward through one micro-batch of this stage; returns the gradient of its input."""
    if output_grad is None:  # last stage: output is the loss
        torch.autograd.backward(output)
    else:
        torch.autograd.backward(output, grad_tensors=output_grad)
    if after_backward is not None:
        after_backward()
    return None if inputs is None else inputs.grad


def one_forward_one_backward(forward_step: Callable[[int, torch.Tensor | None], torch.Tensor],
                             num_microbatches: int, groups: ParallelGroups, activation_shape,
                             dtype: torch.dtype, device, after_backward: Callable[[], None] | None = None) -> None:
    """Run forward and backward of every micro-batch on this stage in 1F1B order.

    ``forward_step(microbatch, input)`` runs this stage on one micro-batch: ``input`` is
    None on the first stage (it reads its tokens itself) and the received activation
    elsewhere; it returns the activation to send on, or on the last stage the scalar
    loss to differentiate. Gradients accumulate in the parameters; ``after_backward()``
    runs after each micro-batch's backward (the optimizer's batched accumulation).
    """
    pp, stage = groups.layout.pp, groups.pp_stage
    p2p = _PeerToPeer(groups, activation_shape, dtype, device)
    warmup = min(pp - stage - 1, num_microbatches)
    steady = num_microbatches - warmup
    saved = []
    for microbatch in range(warmup):
        inputs = p2p.recv_forward()
        output = forward_step(microbatch, inputs)
        p2p.send_forward(output)
        saved.append((inputs, output))
    inputs = p2p.recv_forward() if steady else None
    for index in range(steady):
        output = forward_step(warmup + index, inputs)
        output_grad = p2p.send_forward_recv_backward(output) if not groups.is_last_stage else None
        saved.append((inputs, output))
        oldest_inputs, oldest_output = saved.pop(0)
        input_grad = _backward(oldest_inputs, oldest_output, output_grad, after_backward)
        if index == steady - 1:
            inputs = None
            p2p.send_backward(input_grad)
        else:
            inputs = p2p.send_backward_recv_forward(input_grad)
    for _ in range(warmup):
        oldest_inputs, oldest_output = saved.pop(0)
        output_grad = p2p.recv_backward()
        p2p.send_backward(_backward(oldest_inputs, oldest_output, output_grad, after_backward))


@torch.no_grad()
def forward_only(forward_step, num_microbatches: int, groups: ParallelGroups, activation_shape,
                 dtype: torch.dtype, device) -> list:
    """Forward every micro-batch through the pipeline; the last stage returns the outputs."""
    p2p = _PeerToPeer(groups, activation_shape, dtype, device)
    outputs = []
    for microbatch in range(num_microbatches):
        output = forward_step(microbatch, p2p.recv_forward())
        if groups.is_last_stage:
            outputs.append(output)
        else:
            p2p.send_forward(output)
    return outputs
