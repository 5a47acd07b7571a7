"""The whole training step as one CUDA graph (``TrainConfig.step_graph``, one rank on a GPU).

Launched op by op, a step of GPT-2 124M leaves the device idle part of the time: the
host cannot queue kernels as fast as the device runs them (the compiled functions'
calls, a hook per parameter, the optimizer's launches; see docs/trainer.md). Captured
once and replayed, the step (forward and backward of every micro-batch, the gradient
accumulation, the gradient norm, clipping and AdamW) costs the host one call.

A replay repeats the captured kernels on the captured buffers, so what changes from
step to step lives in device memory the graph reads:

* the tokens: each step's micro-batches are copied into fixed input buffers
  (``[micro_batch, seq + 1]`` each) before the replay;
* the learning-rate numbers: AdamW reads them from a device tensor that
  :meth:`~ckptkit.train.optim.DistributedAdam.advance` writes before the replay
  (:meth:`~ckptkit.train.optim.DistributedAdam.use_device_schedule`).

The loss and gradient norm the graph writes are copied out after each replay, since the
next replay overwrites them. The first step runs eagerly on the capture stream (it
compiles what is compiled and lets libraries set up their per-stream state, as
``torch.cuda.graphs`` asks of a warm-up); the second is captured, then replayed, and
every later step is a replay: the same kernels on the same data as the eager step,
so the losses are the eager path's.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import Unsupported

if TYPE_CHECKING:
    from .trainer import Trainer


class StepGraph:
    """Runs a trainer's steps: the first eagerly, every later one as a replay of one CUDA graph."""

    def __init__(self, trainer: "Trainer"):
        if trainer.device.type != "cuda" or not trainer.optimizer.fused:
            raise Unsupported("a CUDA graph of the whole step needs a GPU and the Triton AdamW kernel")
        self.trainer = trainer
        self.stream = torch.cuda.Stream(device=trainer.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list[torch.Tensor] = []  # the fixed micro-batch buffers the graph reads
        self.outputs: tuple[torch.Tensor, torch.Tensor] | None = None  # loss and gradient norm it writes
        trainer.optimizer.use_device_schedule()

    def _device_step(self, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        loss = self.trainer.forward_backward_on(self.inputs)
        return loss, self.trainer.optimizer.update(lr)

    def run(self, host_microbatches: list[torch.Tensor], lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Queue one step on these micro-batches; its loss and gradient norm (device tensors)."""
        trainer = self.trainer
        trainer.optimizer.advance(lr)
        if not self.inputs:
            self.inputs = [trainer.to_device(batch) for batch in host_microbatches]
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                outputs = self._device_step(lr)
            torch.cuda.current_stream().wait_stream(self.stream)
            return outputs
        for fixed, batch in zip(self.inputs, host_microbatches, strict=True):
            fixed.copy_(batch.pin_memory(), non_blocking=True)
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=self.stream):
                self.outputs = self._device_step(lr)
        self.graph.replay()
        return self.outputs[0].clone(), self.outputs[1].clone()
