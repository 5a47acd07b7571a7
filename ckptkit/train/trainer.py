"""The training loop: build this rank's part of the model, run 1F1B, step the optimizer.

>>> from ckptkit.train import TrainConfig, train, MODEL_PRESETS
>>> result = train(TrainConfig(model=MODEL_PRESETS["llama"], tp=2, pp=2, steps=20, save="run1"))
>>> [record.step for record in result.records][-1], result.checkpoint
(20, 'run1')

``train`` runs in this process for a single rank, spawns ``TP x PP x DP`` worker
processes otherwise, and under ``torchrun`` joins the process group the environment
describes. ``config.device`` says where: ``"cpu"`` (gloo), ``"cuda"`` (NCCL, one GPU
per rank) or ``"auto"`` (CUDA when every rank has a GPU). Each step:

1. every DP rank takes its micro-batches of the step's global batch
   (:class:`~ckptkit.train.data.GlobalBatches`: the same for every layout);
2. the pipeline schedule runs forward and backward of every micro-batch; the last
   stage's loss is the summed token cross-entropy divided by the number of tokens in
   the global batch, so summing gradients over micro-batches and DP ranks gives the
   gradient of the global batch's mean loss;
3. the optimizer reduces gradients, clips them and updates the weights
   (:class:`~ckptkit.train.optim.DistributedAdam`).
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from .. import kernels
from ..spec import ModelSpec, padded_vocab_size
from .checkpoint import open_resume, optimizer_saving_note, save_checkpoint, set_rng_state
from .config import MODEL_PRESETS, TrainConfig
from .data import GlobalBatches, open_samples
from .launch import init_from_environment, launch, launched_by_torchrun, rank_device, run_device
from .model import GPT, MLP
from .optim import DistributedAdam, learning_rate
from .parallel import Layout, ParallelGroups, build_groups, parallelize
from .parallel.pipeline import one_forward_one_backward
from .step_graph import StepGraph
from .weights import initial_weights, load_weights, materialize


@dataclass
class StepRecord:
    """One line of ``--log-json``."""

    step: int  # 1-based iteration number just completed
    loss: float
    grad_norm: float
    lr: float
    tokens_per_s: float


@dataclass
class PendingStep:
    """A step queued on the device: its loss and gradient norm are still device tensors."""

    step: int  # 0-based
    loss: torch.Tensor
    grad_norm: torch.Tensor
    lr: float
    started: float  # time.perf_counter() at launch


@dataclass
class TrainResult:
    records: list[StepRecord] = field(default_factory=list)
    start_iteration: int = 0
    iteration: int = 0
    checkpoint: str | None = None
    layout: str = ""
    parameters: int = 0

    @property
    def losses(self) -> list[float]:
        return [record.loss for record in self.records]

    def to_dict(self) -> dict:
        return {"start_iteration": self.start_iteration, "iteration": self.iteration, "checkpoint": self.checkpoint,
                "layout": self.layout, "parameters": self.parameters,
                "steps": [asdict(record) for record in self.records]}


def model_flops_per_token(spec: ModelSpec, seq_length: int, padded_vocab: int | None = None) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward), attention included.

    ``6 x (weights in matmuls) + 12 x layers x hidden x seq`` for the attention scores
    and their use (the "6N + attention" estimate of the PaLM paper, causal masking not
    subtracted), with the output layer over the padded vocabulary. A MoE layer counts the
    weights one token meets: the router, its top-k experts and the shared expert.
    """
    hidden, heads, groups, head_dim = spec.hidden_size, spec.num_attention_heads, spec.num_query_groups, spec.head_dim
    qkv = hidden * (heads + 2 * groups) * head_dim
    projection = heads * head_dim * hidden
    matrices = 3 if spec.gated else 2
    mlps = 0
    for layer in range(spec.num_layers):
        if spec.is_moe_layer(layer):  # the router, the k experts a token goes to, the shared expert and its gate
            mlps += hidden * (spec.num_experts + spec.moe_router_topk * spec.moe_ffn_hidden_size * matrices
                              + spec.moe_shared_expert_size * matrices + int(spec.moe_shared_expert_gate))
        else:
            mlps += hidden * spec.ffn_hidden_size * matrices
    matmul_weights = spec.num_layers * (qkv + projection) + mlps + hidden * (padded_vocab or spec.vocab_size)
    attention = spec.num_layers * 2 * heads * head_dim * seq_length
    return 6.0 * matmul_weights + 6.0 * attention


def build_model(spec: ModelSpec, groups: ParallelGroups, padded_vocab: int, weights, *, device, dtype,
                sequence_parallel: bool = False, recompute: bool = False, fused_kernels: bool = False,
                compile: bool = False, compile_scope: str = "layers", compile_mode: str | None = None,
                gelu_operator: bool = False) -> GPT:
    """This rank's part of the model, filled from ``weights`` (canonical name -> full tensor).

    ``compile``: ``torch.compile`` (with ``compile_mode``) of each transformer layer
    (``compile_scope="layers"``: compiled once and reused by every layer, as they run the
    same code on weights of the same shapes) or of the whole model (``"model"``:
    embedding, layers, final norm and output layer in one graph). What is compiled runs
    the eager norms and activations (the compiler fuses them with their neighbours); the
    Triton kernels stay for what is outside (the cross-entropy, AdamW, and with
    ``"layers"`` the final norm). ``gelu_operator``: the MLPs' bias + GeLU stays the
    operator ``torch.ops.ckptkit.bias_gelu`` (Triton, one-pass backward) inside what is
    compiled, instead of the compiler's kernels.
    """
    with torch.device("meta"):
        model = GPT(spec, padded_vocab, fused_kernels=fused_kernels and not compile)
    parallelize(model, groups, sequence_parallel=sequence_parallel, recompute=recompute)
    materialize(model, device, dtype)
    load_weights(model, weights, groups.layout, groups.tp_rank, groups.pp_stage, groups.ep_rank)
    for module in model.modules():
        if isinstance(module, MLP):
            module.gelu_operator = gelu_operator
    if compile:
        targets = model.decoder.layers if compile_scope == "layers" else [model]
        for target in targets:
            target.compile(mode=compile_mode)  # in place: parameter names do not change
    return model


def _resolve_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.dtype]


class Trainer:
    """One rank of a run: its model part, optimizer and data."""

    def __init__(self, config: TrainConfig, groups: ParallelGroups, device: torch.device):
        self.config, self.groups, self.device = config, groups, device
        self.dtype = _resolve_dtype(config, device)
        self.fused = kernels.fused_available() and device.type == "cuda" if config.fused_kernels is None \
            else config.fused_kernels
        resume = None
        if config.load:
            resume = open_resume(config.load, layout=groups.layout, tp_rank=groups.tp_rank, pp_stage=groups.pp_stage,
                                 ep_rank=groups.ep_rank, announce=groups.rank == 0)
            self.spec = resume.spec
        else:
            self.spec = config.model or MODEL_PRESETS["gpt2"]
        try:
            self._build(config, groups, device, resume)
        finally:
            if resume:
                resume.close()
        samples = open_samples(config.data, seq_length=config.seq_length, vocab_size=self.spec.vocab_size,
                               seed=config.seed, tokenizer=config.tokenizer)
        self.batches = GlobalBatches(samples, config.batch_size, config.seed)
        self._loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        self._last_finished = 0.0
        self.step_graph = StepGraph(self) if config.step_graph else None

    def _build(self, config: TrainConfig, groups: ParallelGroups, device: torch.device, resume) -> None:
        """The model, from the checkpoint's weights or a fresh initialisation, and its optimizer,
        from the checkpoint's state where it has one."""
        config.check(self.spec)
        self.padded_vocab_size = padded_vocab_size(self.spec.vocab_size, config.make_vocab_size_divisible_by,
                                                   config.tp)
        note = optimizer_saving_note(self.spec, config, self.padded_vocab_size) if config.save else None
        if note and groups.rank == 0:
            warnings.warn(f"{config.save}: {note}", stacklevel=3)
        weights = resume.weights if resume else initial_weights(self.spec, config.seed)
        self.model = build_model(self.spec, groups, self.padded_vocab_size, weights, device=device, dtype=self.dtype,
                                 sequence_parallel=config.sequence_parallel, recompute=config.recompute,
                                 fused_kernels=self.fused, compile=config.compile,
                                 compile_scope=config.compile_scope, compile_mode=config.compile_mode,
                                 gelu_operator=config.gelu_operator)
        # On one tensor-parallel rank the last stage's output layer and loss run as one
        # (kernels.linear_cross_entropy: the logits buffer becomes their gradient).
        self.model.output_in_loss = self.fused and config.tp == 1 and self.model.output_layer is not None
        self.optimizer = DistributedAdam(self.model, groups, config.optimizer,
                                         distributed=config.distributed_optimizer,
                                         sequence_parallel=config.sequence_parallel, fused=self.fused,
                                         grad_accumulation=config.grad_accumulation)
        self.start_iteration = resume.iteration if resume else 0
        self.flops_so_far = resume.flops_so_far if resume else 0.0
        adam_state = resume.adam_state(self.model, groups.layout, groups.tp_rank, groups.pp_stage,
                                       groups.ep_rank) if resume else None
        if adam_state is not None:
            self.optimizer.load_state_dict(adam_state)
        if resume and resume.rng_state is not None:
            set_rng_state(resume.rng_state)

    # -- one step ---------------------------------------------------------------------

    def _activation_shape(self) -> tuple[int, int, int]:
        config = self.config
        seq = config.seq_length // config.tp if (config.sequence_parallel and config.tp > 1) else config.seq_length
        return config.micro_batch_size, seq, self.spec.hidden_size

    def forward_backward(self, step: int) -> float:
        """Forward and backward of step ``step``'s global batch (0-based); returns its mean loss.

        Gradients are left in the parameters' ``main_grad`` (not yet reduced over ranks).
        """
        return self._forward_backward(step).item()

    def to_device(self, batch: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            # From pageable memory CUDA drains the stream before copying (a host sync per
            # micro-batch); from pinned memory the copy is queued like a kernel.
            batch = batch.pin_memory()
        return batch.to(self.device, non_blocking=True)

    def host_microbatches(self, step: int) -> list[torch.Tensor]:
        """This DP rank's micro-batches of step ``step`` (0-based), ``[micro_batch, seq + 1]`` tokens on the host."""
        config = self.config
        return self.batches.microbatches(step, self.groups.dp_rank, config.dp, config.micro_batch_size)

    def _forward_backward(self, step: int) -> torch.Tensor:
        return self.forward_backward_on([self.to_device(batch) for batch in self.host_microbatches(step)])

    def forward_backward_on(self, microbatches: list[torch.Tensor]) -> torch.Tensor:
        """Forward and backward of these micro-batches (on the device); their mean loss (0-d tensor)."""
        config, groups = self.config, self.groups
        tokens_in_batch = config.batch_size * config.seq_length
        self._loss_sum.zero_()

        def forward_step(index: int, inputs):
            batch = microbatches[index]
            output = self.model(batch[:, :-1] if groups.is_first_stage else inputs)
            if not groups.is_last_stage:
                return output
            labels = batch[:, 1:]
            if self.model.output_in_loss:
                per_token = kernels.linear_cross_entropy(output, self.model.output_layer.weight, labels, fused=True)
            else:
                vocab_start = groups.tp_rank * output.shape[-1]
                per_token = kernels.cross_entropy(output, labels, vocab_start, groups.tp_group, fused=self.fused)
            loss = per_token.sum() / tokens_in_batch
            self._loss_sum += loss.detach()
            return loss

        self.model.train()
        one_forward_one_backward(forward_step, len(microbatches), groups, self._activation_shape(), self.dtype,
                                 self.device, after_backward=self.optimizer.accumulate_gradients)
        loss = self._loss_sum.clone()
        if not (groups.is_last_stage and groups.tp_rank == 0):
            loss.zero_()  # one contribution per DP rank: its last stage's TP rank 0
        if groups.world_group is not None:
            dist.all_reduce(loss, group=groups.world_group)
        return loss

    def launch_step(self, step: int) -> PendingStep:
        """Queue step ``step`` (0-based) on the device, weights update included, without waiting for it.

        Its loss and gradient norm stay device tensors until :meth:`finish_step` reads them,
        so the host can queue the next step while the device runs this one.
        """
        started = time.perf_counter()
        lr = learning_rate(step, self.config.optimizer, self.config.steps)
        if self.step_graph is not None:
            loss, grad_norm = self.step_graph.run(self.host_microbatches(step), lr)
        else:
            loss = self._forward_backward(step)
            grad_norm = self.optimizer.step(lr)
        tokens = self.config.batch_size * self.config.seq_length
        self.flops_so_far += tokens * model_flops_per_token(self.spec, self.config.seq_length, self.padded_vocab_size)
        return PendingStep(step, loss, grad_norm, lr, started)

    def finish_step(self, pending: PendingStep) -> StepRecord:
        """Wait for a launched step; its record. Tokens/s counts from the step's launch or
        the previous step's end, whichever came later (steps overlap when launched ahead)."""
        loss, grad_norm = pending.loss.item(), pending.grad_norm.item()  # the host waits here, and only here
        finished = time.perf_counter()
        elapsed = finished - max(pending.started, self._last_finished)
        self._last_finished = finished
        tokens = self.config.batch_size * self.config.seq_length
        return StepRecord(pending.step + 1, loss, grad_norm, pending.lr, tokens / elapsed)

    def train_step(self, step: int) -> StepRecord:
        """Run step ``step`` (0-based), update the weights and wait for it."""
        return self.finish_step(self.launch_step(step))

    # -- the run ----------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train up to ``config.steps``, saving as asked. Step ``k + 1`` is queued before step
        ``k``'s loss is read, so the device never waits for the host between steps; a step
        that is saved is finished first."""
        config, groups = self.config, self.groups
        result = TrainResult(start_iteration=self.start_iteration, iteration=self.start_iteration,
                             layout=str(groups.layout),
                             parameters=sum(p.numel() for p in self.model.parameters()))
        log = open(config.log_json, "w") if (config.log_json and groups.rank == 0) else None

        def finish(pending: PendingStep) -> None:
            record = self.finish_step(pending)
            result.records.append(record)
            result.iteration = record.step
            if log:
                log.write(json.dumps(asdict(record)) + "\n")
                log.flush()
            if config.log_interval and groups.rank == 0 and record.step % config.log_interval == 0:
                print(f"step {record.step:>6}/{config.steps}  loss {record.loss:.4f}  grad_norm "
                      f"{record.grad_norm:.3f}  lr {record.lr:.3e}  tokens/s {record.tokens_per_s:,.0f}",
                      flush=True)

        try:
            pending = None
            for step in range(self.start_iteration, config.steps):
                launched = self.launch_step(step)
                if pending is not None:
                    finish(pending)
                pending = launched
                interval = config.save_interval
                if config.save and interval and (step + 1) % interval == 0 and step + 1 != config.steps:
                    finish(pending)
                    pending = None
                    save_checkpoint(config.save, step + 1, trainer=self)
            if pending is not None:
                finish(pending)
        finally:
            if log:
                log.close()
        if config.save:
            save_checkpoint(config.save, result.iteration, trainer=self)
            result.checkpoint = str(config.save)
        return result


def run_training(config: TrainConfig, device: torch.device | str) -> TrainResult:
    """One rank's share of ``train`` (torch.distributed already initialised, or a single rank).

    ``device``: this rank's device, or the run's device type (``"cpu"``/``"cuda"``).
    """
    groups = build_groups(Layout(config.tp, config.pp, config.dp, config.ep))
    return Trainer(config, groups, rank_device(device) if isinstance(device, str) else device).run()


def train(config: TrainConfig) -> TrainResult:
    """Train as ``config`` says; returns rank 0's view (losses, grad norms, checkpoint path)."""
    config.check_layout()  # before any process starts
    if launched_by_torchrun():
        return run_training(config, init_from_environment(config.device))
    device = run_device(config.device, config.world_size)
    if config.world_size == 1:
        return run_training(config, device)
    return launch(run_training, config.world_size, config, device, device=device)[0]
