"""Gradients and the optimizer: flat buffers, gradient reduction, clipping, Adam, LR schedule.

Like Megatron's ``DistributedDataParallel`` + ``DistributedOptimizer``:

* every parameter of a rank is a view into one flat parameter buffer, and its
  gradient is accumulated in float32 into a view of one flat gradient buffer
  (``param.main_grad``), whatever the parameter dtype: by a hook on each parameter as
  its gradient arrives (``GRAD_ACCUMULATION["hooks"]``), or for all of them at once
  after each micro-batch's backward (``"batched"``: :meth:`DistributedAdam.accumulate_gradients`,
  one Triton launch per eight tensors instead of a launch per tensor);
* after the last micro-batch the gradients are summed where a parameter lives on
  several ranks: over TP for the norms under sequence parallelism and for the query
  and key norms (each TP rank normalises only its own heads), between the first and
  last stage for tied embeddings, and over DP for everything but the routed experts,
  which are summed over the expert-data-parallel group (the ranks holding the same
  experts) in a flat buffer of their own;
* the Adam state and the float32 master weights are kept for a contiguous slice of
  each flat buffer: slice ``d`` of ``DP`` (of expert-DP for the experts) with the
  distributed optimizer (gradients are reduce-scattered, updated weights
  all-gathered), the whole buffer without it.

Adam is element-wise, so the update of each weight is the same whatever the slicing:
runs of different layouts stay equal to float32 rounding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import kernels
from ..spec import ModelSpec
from .model import GPT
from .parallel.groups import ParallelGroups, group_rank, group_size
from .weights import canonical_name, canonical_table, is_expert_parameter

# torch 2.13 renamed the flat-tensor collectives; older versions only have the old names.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# How each micro-batch's gradients reach the float32 main_grad buffers: a post-accumulate hook per
# parameter, or the trainer calling DistributedAdam.accumulate_gradients after each backward.
GRAD_ACCUMULATION = ("hooks", "batched")


@dataclass(frozen=True)
class AdamConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 0
    decay_steps: int | None = None  # defaults to the run's step count
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    clip_grad: float = 1.0  # 0 disables clipping


def learning_rate(step: int, config: AdamConfig, total_steps: int) -> float:
    """Megatron's linear warm-up then cosine decay, at ``step`` completed iterations.

    ``lr = max_lr x step / warmup`` while ``step <= warmup`` (so the first update uses
    lr 0 when there is a warm-up, as in Megatron), then
    ``min + (max - min) x (1 + cos(pi x progress)) / 2``, then ``min_lr`` for good.
    """
    decay_steps = config.decay_steps or total_steps
    if config.warmup_steps > 0 and step <= config.warmup_steps:
        return config.lr * step / config.warmup_steps
    if step > decay_steps:
        return config.min_lr
    progress = (step - config.warmup_steps) / max(1, decay_steps - config.warmup_steps)
    return config.min_lr + 0.5 * (math.cos(math.pi * progress) + 1.0) * (config.lr - config.min_lr)


class _FlatBuffer:
    """The parameters one group of replicas holds alike, as views into flat buffers, and the
    Adam state of this rank's slice of them.

    ``group`` is the ranks holding the same values (DP for most parameters, expert-DP
    for routed experts): gradients are summed over it, and when ``distributed`` each
    rank keeps slice ``rank`` of ``size`` of the state.
    """

    def __init__(self, named_parameters, group, distributed: bool, device, dtype, hooks: bool = True,
                 fused: bool = False):
        self.group = group
        size, rank = group_size(group), group_rank(group)
        self.distributed = distributed and size > 1
        self.replica_rank = rank
        self.entries = []  # (name, parameter, offset, numel)
        offset = 0
        for name, parameter in named_parameters:
            self.entries.append((name, parameter, offset, parameter.numel()))
            offset += parameter.numel()
        padded = math.ceil(max(offset, 1) / size) * size  # room for equal slices
        self.param_flat = torch.zeros(padded, dtype=dtype, device=device)
        self.grad_flat = torch.zeros(padded, dtype=torch.float32, device=device)
        self.counted_ranges = []  # (offset, numel) counted once in the gradient norm
        decays = torch.zeros(padded, dtype=torch.bool, device=device)
        for name, parameter, offset, numel in self.entries:
            self.param_flat[offset: offset + numel].copy_(parameter.detach().reshape(-1))
            parameter.data = self.param_flat[offset: offset + numel].view_as(parameter)
            parameter.main_grad = self.grad_flat[offset: offset + numel].view_as(parameter)
            if hooks:
                parameter.register_post_accumulate_grad_hook(_accumulate_main_grad)
            # Megatron's default: no weight decay on biases and norm weights (1-D tensors).
            decays[offset: offset + numel] = parameter.dim() > 1
        shard_size = padded // size if self.distributed else padded
        start = rank * shard_size if self.distributed else 0
        self.shard = slice(start, start + shard_size)
        self.decay = decays[self.shard]
        self.accumulator = None if hooks else kernels.gradient_accumulator(
            [numel for _, _, _, numel in self.entries], [offset for _, _, offset, _ in self.entries],
            self.grad_flat, fused=fused)
        self.master = self.param_flat[self.shard].to(torch.float32, copy=True)
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)

    def accumulate(self) -> None:
        """Add every parameter's ``.grad`` to its ``main_grad`` and drop it (the batched path)."""
        parameters = [parameter for _, parameter, _, _ in self.entries]
        self.accumulator.add([parameter.grad for parameter in parameters])
        for parameter in parameters:
            parameter.grad = None

    def count(self, offset: int, numel: int) -> None:
        if self.counted_ranges and sum(self.counted_ranges[-1]) == offset:  # one range per contiguous run
            self.counted_ranges[-1] = (self.counted_ranges[-1][0], self.counted_ranges[-1][1] + numel)
        else:
            self.counted_ranges.append((offset, numel))

    def reduce(self):
        if self.group is None:
            return
        if self.distributed:
            shard = self.grad_flat[self.shard].clone()
            _reduce_scatter_flat(shard, self.grad_flat, group=self.group)
            self.grad_flat[self.shard] = shard
        else:
            dist.all_reduce(self.grad_flat, group=self.group)

    def squared_norm(self) -> torch.Tensor:
        """Sum of squares of the counted gradients this rank answers for: its slice when
        distributed, else everything on replica 0 and nothing on the other replicas."""
        total = torch.zeros((), dtype=torch.float32, device=self.grad_flat.device)
        if not self.distributed and self.replica_rank != 0:
            return total
        for offset, numel in self.counted_ranges:
            low, high = max(offset, self.shard.start), min(offset + numel, self.shard.stop)
            if low < high:
                piece = self.grad_flat[low:high]
                total += torch.dot(piece, piece)  # one read of the gradient; pow(2).sum() writes a copy first
        return total

    def gathered(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return tensor
        full = torch.empty(self.param_flat.numel(), dtype=tensor.dtype, device=tensor.device)
        _all_gather_flat(full, tensor.contiguous(), group=self.group)
        return full


class DistributedAdam:
    """AdamW on float32 master weights, sharded over the data-parallel group when asked.

    ``distributed=False`` keeps the whole state on every DP rank (gradients all-reduced);
    ``distributed=True`` keeps ``1/DP`` of it (Megatron's ``--use-distributed-optimizer``).
    Routed experts live in a buffer of their own, reduced (and sharded) over the
    expert-data-parallel group instead, as Megatron's ``expert_parallel_buffers``.
    """

    def __init__(self, model: GPT, groups: ParallelGroups, config: AdamConfig, *, distributed: bool = False,
                 sequence_parallel: bool = False, fused: bool = False, grad_accumulation: str = "hooks"):
        self.model, self.groups, self.config = model, groups, config
        self.fused = fused  # the update as one Triton kernel over each buffer (on a GPU with Triton)
        if grad_accumulation not in GRAD_ACCUMULATION:
            raise ValueError(f"grad_accumulation {grad_accumulation!r}: choose {' or '.join(GRAD_ACCUMULATION)}")
        self.grad_accumulation = grad_accumulation
        # The step's learning-rate numbers in device memory (use_device_schedule), for a captured step.
        self.schedule: torch.Tensor | None = None
        spec: ModelSpec = model.spec
        first = next(model.parameters())
        named = list(model.named_parameters())
        dense = [(name, parameter) for name, parameter in named if not is_expert_parameter(name)]
        experts = [(name, parameter) for name, parameter in named if is_expert_parameter(name)]
        hooks = grad_accumulation == "hooks"
        self.buffers = [_FlatBuffer(dense, groups.dp_group, distributed, first.device, first.dtype, hooks, fused)]
        if experts:
            self.buffers.append(_FlatBuffer(experts, groups.expert_dp_group, distributed, first.device, first.dtype,
                                            hooks, fused))
        table = canonical_table(spec)
        self.tp_summed_params, self.embedding_params = [], []
        tp_rank, pp_stage, pp = groups.tp_rank, groups.pp_stage, groups.layout.pp
        for buffer in self.buffers:
            for name, parameter, offset, numel in buffer.entries:
                rule = table[canonical_name(spec, name, pp_stage, pp, groups.ep_rank, groups.layout.ep)].rule
                tied_copy = name == "output_layer.weight" and spec.tied_embeddings and pp > 1
                if (rule != "replicated" or tp_rank == 0) and not tied_copy:
                    buffer.count(offset, numel)
                # Replicated weights whose TP ranks see different data: under sequence parallelism every
                # norm and bias inside the layers (a slice of the sequence each), and a MoE layer's router
                # and shared-expert gate; the query and key norms always (a slice of the heads each).
                # Megatron's _allreduce_layernorm_grads / _allreduce_non_tensor_model_parallel_grads sum
                # the same ones, when config.sequence_parallel or config.qk_layernorm.
                per_head_norm = name.split(".")[-2] in ("q_layernorm", "k_layernorm")
                if rule == "replicated" and name.startswith("decoder.") and (sequence_parallel or per_head_norm):
                    self.tp_summed_params.append(parameter)
                if spec.tied_embeddings and pp > 1 and name in ("embedding.word_embeddings.weight",
                                                              "output_layer.weight"):
                    self.embedding_params.append(parameter)
        self.step_count = 0

    # -- gradients ------------------------------------------------------------------

    def accumulate_gradients(self) -> None:
        """After a micro-batch's backward (``grad_accumulation="batched"``): add the parameters'
        gradients to their float32 ``main_grad`` and drop them. Nothing to do with hooks."""
        if self.grad_accumulation == "batched":
            for buffer in self.buffers:
                buffer.accumulate()

    def zero_grad(self):
        for buffer in self.buffers:
            buffer.grad_flat.zero_()

    def reduce_gradients(self):
        """Sum gradients over every rank holding the same weights (after the last micro-batch)."""
        groups = self.groups
        if self.tp_summed_params and groups.tp_group is not None:
            for parameter in self.tp_summed_params:
                dist.all_reduce(parameter.main_grad, group=groups.tp_group)
        if groups.embedding_group is not None:
            for parameter in self.embedding_params:
                dist.all_reduce(parameter.main_grad, group=groups.embedding_group)
        for buffer in self.buffers:
            buffer.reduce()

    def gradient_norm(self) -> torch.Tensor:
        """L2 norm of the whole model's gradient, each weight counted once (a 0-d tensor)."""
        total = sum(buffer.squared_norm() for buffer in self.buffers)
        # Each weight is counted on one rank of the world (one TP rank for replicated ones,
        # one replica or one slice over DP / expert-DP), so the sum over everyone is the norm.
        if self.groups.world_group is not None:
            dist.all_reduce(total, group=self.groups.world_group)
        return total.sqrt()

    # -- update ---------------------------------------------------------------------

    @torch.no_grad()
    def step(self, lr: float) -> torch.Tensor:
        """Reduce gradients, clip, update; returns the gradient norm before clipping (0-d tensor).

        Nothing here waits for the device: the norm stays a tensor and clipping scales
        by ``min(1, clip / (norm + 1e-6))`` (Megatron's coefficient) on the device.
        """
        self.advance(lr)
        return self.update(lr)

    def use_device_schedule(self) -> None:
        """Read the step's learning-rate numbers from device memory (written by :meth:`advance`),
        so that :meth:`update`, once captured in a CUDA graph, replays right at every step."""
        if not self.fused:
            raise ValueError("a device-side learning-rate schedule needs the Triton AdamW kernel")
        self.schedule = torch.zeros(3, dtype=torch.float32, device=self.buffers[0].master.device)

    def advance(self, lr: float) -> None:
        """Count one more step, and with a device schedule queue its numbers (no host sync)."""
        self.step_count += 1
        if self.schedule is not None:
            config = self.config
            values = kernels.adam_schedule(lr, config.beta1, config.beta2, config.weight_decay, self.step_count)
            self.schedule.copy_(torch.tensor(values, dtype=torch.float32).pin_memory(), non_blocking=True)

    @torch.no_grad()
    def update(self, lr: float) -> torch.Tensor:
        """The device work of :meth:`step` at the step :meth:`advance` counted."""
        self.reduce_gradients()
        grad_norm = self.gradient_norm()
        config = self.config
        clip = (config.clip_grad / (grad_norm + 1e-6)).clamp(max=1.0) if config.clip_grad > 0 else None
        for buffer in self.buffers:
            kernels.adam_step(buffer.param_flat[buffer.shard], buffer.master, buffer.exp_avg, buffer.exp_avg_sq,
                              buffer.grad_flat[buffer.shard], buffer.decay, clip, lr=lr, beta1=config.beta1,
                              beta2=config.beta2, eps=config.eps, weight_decay=config.weight_decay,
                              step=self.step_count, fused=self.fused, schedule=self.schedule)
            if buffer.distributed:
                mine = buffer.param_flat[buffer.shard].clone()
                _all_gather_flat(buffer.param_flat, mine, group=buffer.group)
        self.zero_grad()
        return grad_norm

    # -- checkpoint -----------------------------------------------------------------

    def state_dict(self) -> dict:
        """Per-parameter state of this model-parallel rank, gathered over DP (collective over DP).

        ``{"step": n, "params": {local name: {"master", "exp_avg", "exp_avg_sq"}}}``:
        independent of the DP size and of the slicing.
        """
        params = {}
        for buffer in self.buffers:
            full = {key: buffer.gathered(value).cpu() for key, value in
                    (("master", buffer.master), ("exp_avg", buffer.exp_avg), ("exp_avg_sq", buffer.exp_avg_sq))}
            for name, parameter, offset, numel in buffer.entries:
                params[name] = {key: value[offset: offset + numel].view(parameter.shape).clone()
                                for key, value in full.items()}
        return {"step": self.step_count, "params": params}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for buffer in self.buffers:
            full = {key: torch.zeros(buffer.param_flat.numel(), dtype=torch.float32)
                    for key in ("master", "exp_avg", "exp_avg_sq")}
            for name, parameter, offset, numel in buffer.entries:
                if name not in state["params"]:
                    raise KeyError(f"optimizer state has no entry for {name}")
                for key, value in full.items():
                    saved = state["params"][name][key]
                    if tuple(saved.shape) != tuple(parameter.shape):
                        raise ValueError(f"optimizer state {key} of {name} has shape {tuple(saved.shape)}; "
                                         f"the parameter is {tuple(parameter.shape)}")
                    value[offset: offset + numel] = saved.reshape(-1)
            device = buffer.master.device
            buffer.master.copy_(full["master"][buffer.shard].to(device))
            buffer.exp_avg.copy_(full["exp_avg"][buffer.shard].to(device))
            buffer.exp_avg_sq.copy_(full["exp_avg_sq"][buffer.shard].to(device))
        self.step_count = int(state["step"])


def _accumulate_main_grad(parameter):
    """Move each micro-batch's gradient into the float32 flat buffer."""
    parameter.main_grad.add_(parameter.grad)
    parameter.grad = None
