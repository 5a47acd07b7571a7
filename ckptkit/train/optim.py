"""Gradients and the optimizer: flat buffers, gradient reduction, clipping, Adam, LR schedule.

Like Megatron's ``DistributedDataParallel`` + ``DistributedOptimizer``:

* every parameter of a rank is a view into one flat parameter buffer, and its
  gradient is accumulated in float32 into a view of one flat gradient buffer
  (``param.main_grad``), whatever the parameter dtype;
* after the last micro-batch the gradients are summed where a parameter lives on
  several ranks: over TP for the norms under sequence parallelism and for the query
  and key norms (each TP rank normalises only its own heads), between the first and
  last stage for tied embeddings, and over DP for everything;
* the Adam state and the float32 master weights are kept for a contiguous slice of
  the flat buffer: slice ``d`` of ``DP`` with the distributed optimizer (gradients are
  reduce-scattered, updated weights all-gathered), the whole buffer without it.

Adam is element-wise, so the update of each weight is the same whatever the slicing:
runs of different layouts stay equal to float32 rounding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..spec import ModelSpec
from .model import GPT
from .parallel.groups import ParallelGroups, group_size
from .weights import canonical_name, canonical_table

# torch 2.13 renamed the flat-tensor collectives; older versions only have the old names.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


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


class _Slices:
    """Offsets of each parameter in the flat buffers."""

    def __init__(self, named_parameters, dp: int):
        self.entries = []
        offset = 0
        for name, parameter in named_parameters:
            self.entries.append((name, parameter, offset, parameter.numel()))
            offset += parameter.numel()
        self.numel = offset
        self.padded = math.ceil(max(offset, 1) / dp) * dp  # room for DP equal slices


class DistributedAdam:
    """AdamW on float32 master weights, sharded over the data-parallel group when asked.

    ``distributed=False`` keeps the whole state on every DP rank (gradients all-reduced);
    ``distributed=True`` keeps ``1/DP`` of it (Megatron's ``--use-distributed-optimizer``).
    """

    def __init__(self, model: GPT, groups: ParallelGroups, config: AdamConfig, *, distributed: bool = False,
                 sequence_parallel: bool = False):
        self.model, self.groups, self.config = model, groups, config
        self.distributed = distributed and group_size(groups.dp_group) > 1
        spec: ModelSpec = model.spec
        dp = group_size(groups.dp_group)
        first = next(model.parameters())
        self.slices = _Slices(model.named_parameters(), dp)
        self.param_flat = torch.zeros(self.slices.padded, dtype=first.dtype, device=first.device)
        self.grad_flat = torch.zeros(self.slices.padded, dtype=torch.float32, device=first.device)
        decays = torch.zeros(self.slices.padded, dtype=torch.bool, device=first.device)
        table = canonical_table(spec)
        self.counted_ranges = []  # (offset, numel) counted once in the gradient norm
        self.tp_summed_params, self.embedding_params = [], []
        tp_rank, pp_stage, pp = groups.tp_rank, groups.pp_stage, groups.layout.pp
        for name, parameter, offset, numel in self.slices.entries:
            self.param_flat[offset: offset + numel].copy_(parameter.detach().reshape(-1))
            parameter.data = self.param_flat[offset: offset + numel].view_as(parameter)
            parameter.main_grad = self.grad_flat[offset: offset + numel].view_as(parameter)
            parameter.register_post_accumulate_grad_hook(_accumulate_main_grad)
            # Megatron's default: no weight decay on biases and norm weights (1-D tensors).
            decays[offset: offset + numel] = parameter.dim() > 1
            rule = table[canonical_name(spec, name, pp_stage, pp)].rule
            tied_copy = name == "output_layer.weight" and spec.tied_embeddings and pp > 1
            if (rule != "replicated" or tp_rank == 0) and not tied_copy:
                if self.counted_ranges and sum(self.counted_ranges[-1]) == offset:  # one range per contiguous run
                    self.counted_ranges[-1] = (self.counted_ranges[-1][0], self.counted_ranges[-1][1] + numel)
                else:
                    self.counted_ranges.append((offset, numel))
            # Replicated weights whose TP ranks see different data: under sequence parallelism every
            # norm and bias inside the layers (a slice of the sequence each); the query and key norms
            # always (a slice of the heads each). Megatron's _allreduce_layernorm_grads sums the same
            # ones, when config.sequence_parallel or config.qk_layernorm.
            per_head_norm = name.split(".")[-2] in ("q_layernorm", "k_layernorm")
            if rule == "replicated" and name.startswith("decoder.") and (sequence_parallel or per_head_norm):
                self.tp_summed_params.append(parameter)
            if spec.tied_embeddings and pp > 1 and name in ("embedding.word_embeddings.weight",
                                                          "output_layer.weight"):
                self.embedding_params.append(parameter)
        shard_size = self.slices.padded // dp if self.distributed else self.slices.padded
        start = groups.dp_rank * shard_size if self.distributed else 0
        self.shard = slice(start, start + shard_size)
        self.decay = decays[self.shard]
        self.master = self.param_flat[self.shard].to(torch.float32, copy=True)
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)
        self.step_count = 0

    # -- gradients ------------------------------------------------------------------

    def zero_grad(self):
        self.grad_flat.zero_()

    def reduce_gradients(self):
        """Sum gradients over every rank holding the same weights (after the last micro-batch)."""
        groups = self.groups
        if self.tp_summed_params and groups.tp_group is not None:
            for parameter in self.tp_summed_params:
                dist.all_reduce(parameter.main_grad, group=groups.tp_group)
        if groups.embedding_group is not None:
            for parameter in self.embedding_params:
                dist.all_reduce(parameter.main_grad, group=groups.embedding_group)
        if groups.dp_group is None:
            return
        if self.distributed:
            shard = self.grad_flat[self.shard].clone()
            _reduce_scatter_flat(shard, self.grad_flat, group=groups.dp_group)
            self.grad_flat[self.shard] = shard
        else:
            dist.all_reduce(self.grad_flat, group=groups.dp_group)

    def gradient_norm(self) -> torch.Tensor:
        """L2 norm of the whole model's gradient, each weight counted once (a 0-d tensor)."""
        total = torch.zeros((), dtype=torch.float32, device=self.grad_flat.device)
        for offset, numel in self.counted_ranges:
            low, high = max(offset, self.shard.start), min(offset + numel, self.shard.stop)
            if low < high:
                total += self.grad_flat[low:high].pow(2).sum()
        # Distributed: each DP rank holds a different slice, so sum over everyone;
        # otherwise the DP replicas hold the same gradients: sum over one model (TP x PP).
        group = self.groups.world_group if self.distributed else self.groups.model_group
        if group is not None:
            dist.all_reduce(total, group=group)
        return total.sqrt()

    # -- update ---------------------------------------------------------------------

    @torch.no_grad()
    def step(self, lr: float) -> torch.Tensor:
        """Reduce gradients, clip, update; returns the gradient norm before clipping (0-d tensor).

        Nothing here waits for the device: the norm stays a tensor and clipping scales
        by ``min(1, clip / (norm + 1e-6))`` (Megatron's coefficient) on the device.
        """
        self.reduce_gradients()
        grad_norm = self.gradient_norm()
        config = self.config
        grad = self.grad_flat[self.shard]
        if config.clip_grad > 0:
            grad = grad * (config.clip_grad / (grad_norm + 1e-6)).clamp(max=1.0)
        self.step_count += 1
        self.master.sub_(self.master * self.decay * (lr * config.weight_decay))
        self.exp_avg.lerp_(grad, 1 - config.beta1)
        self.exp_avg_sq.mul_(config.beta2).addcmul_(grad, grad, value=1 - config.beta2)
        bias_correction1 = 1 - config.beta1 ** self.step_count
        bias_correction2 = 1 - config.beta2 ** self.step_count
        denominator = (self.exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(config.eps)
        self.master.addcdiv_(self.exp_avg, denominator, value=-lr / bias_correction1)
        self.param_flat[self.shard] = self.master.to(self.param_flat.dtype)
        if self.distributed:
            mine = self.param_flat[self.shard].clone()
            _all_gather_flat(self.param_flat, mine, group=self.groups.dp_group)
        self.zero_grad()
        return grad_norm

    # -- checkpoint -----------------------------------------------------------------

    def _gathered(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return tensor
        full = torch.empty(self.slices.padded, dtype=tensor.dtype, device=tensor.device)
        _all_gather_flat(full, tensor.contiguous(), group=self.groups.dp_group)
        return full

    def state_dict(self) -> dict:
        """Per-parameter state of this model-parallel rank, gathered over DP (collective over DP).

        ``{"step": n, "params": {local name: {"master", "exp_avg", "exp_avg_sq"}}}``:
        independent of the DP size and of the slicing.
        """
        full = {key: self._gathered(value).cpu() for key, value in
                (("master", self.master), ("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq))}
        params = {}
        for name, parameter, offset, numel in self.slices.entries:
            params[name] = {key: value[offset: offset + numel].view(parameter.shape).clone()
                            for key, value in full.items()}
        return {"step": self.step_count, "params": params}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        full = {key: torch.zeros(self.slices.padded, dtype=torch.float32) for key in ("master", "exp_avg",
                                                                                      "exp_avg_sq")}
        for name, parameter, offset, numel in self.slices.entries:
            if name not in state["params"]:
                raise KeyError(f"optimizer state has no entry for {name}")
            for key, value in full.items():
                saved = state["params"][name][key]
                if tuple(saved.shape) != tuple(parameter.shape):
                    raise ValueError(f"optimizer state {key} of {name} has shape {tuple(saved.shape)}; "
                                     f"the parameter is {tuple(parameter.shape)}")
                value[offset: offset + numel] = saved.reshape(-1)
        device = self.master.device
        self.master.copy_(full["master"][self.shard].to(device))
        self.exp_avg.copy_(full["exp_avg"][self.shard].to(device))
        self.exp_avg_sq.copy_(full["exp_avg_sq"][self.shard].to(device))
        self.step_count = int(state["step"])


def _accumulate_main_grad(parameter):
    """Move each micro-batch's gradient into the float32 flat buffer."""
    parameter.main_grad.add_(parameter.grad)
    parameter.grad = None
