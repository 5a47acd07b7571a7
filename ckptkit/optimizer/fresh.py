"""A fresh optimizer state: Adam before its first step, for weights that have not trained in Megatron.

``hf-to-megatron --optimizer fresh`` writes it beside the weights, so that Megatron-LM starts
training from the converted model without ``--no-load-optim``/``--finetune``, and the fp32
master copies hold the Hugging Face weights at their full precision (an fp32 model
converted to bf16 keeps fp32 masters; without this state Megatron would make its masters
from the bf16 weights). Per canonical tensor: ``param`` is the source tensor in fp32,
``exp_avg`` and ``exp_avg_sq`` are zeros; the step is 0.

What is not per weight has to agree with the run that loads it, so it is built from that
run's command-line flags (:meth:`TrainingRun.from_megatron_args`, Megatron's names and
defaults):

* the parameter groups: Megatron matches each saved group to its own by ``max_lr`` and
  ``min_lr`` (with ``wd_mult``, ``lr_mult``, ``is_expert_parallel``, ``is_decoupled_lr``:
  ``param_group_identifier_keys`` in megatron/core/optimizer/optimizer.py) and fails to
  load when none matches, so ``--lr`` and ``--min-lr`` must be the run's; torch's
  ``load_state_dict`` then keeps the saved ``betas`` and ``eps`` (``--adam-beta1/2``,
  ``--adam-eps``), while ``lr`` and ``weight_decay`` are reset by the scheduler at load;
* ``opt_param_scheduler`` at step 0: Megatron needs it (a missing entry is a ``KeyError``
  that stops the load) and compares its values with the run's unless the run passes
  ``--override-opt-param-scheduler`` (``OptimizerParamScheduler._check_and_set``); they are
  computed as ``get_optimizer_param_scheduler`` (megatron/training/training.py) does when the
  flags give the run's length, and left None otherwise;
* the bucket settings of the distributed optimizer (``--overlap-grad-reduce``,
  ``--ddp-bucket-size``, ...), which place parameters in ``distrib_optim.pt``.

>>> run = TrainingRun.from_megatron_args("--lr 3e-4 --min-lr 3e-5 --train-iters 1000 --global-batch-size 8")
>>> run.scheduler_state()["lr_decay_steps"], [group["wd_mult"] for group in run.param_groups()]
(8000, [1.0, 0.0])
"""
from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field

import torch

from ..errors import BadInput, Unsupported
from ..layouts.base import CheckpointReader, CheckpointWriter
from ..spec import rule_for
from .state import STATE_KEYS, OptimizerInfo, OptimizerState


def _megatron_flags() -> argparse.ArgumentParser:
    """The flags of Megatron-LM's training command line that a fresh optimizer state depends
    on, with Megatron's defaults (megatron/training/arguments.py, training_config.py,
    core/optimizer/optimizer_config.py, core/distributed/distributed_data_parallel_config.py)."""
    parser = argparse.ArgumentParser(prog="--megatron-args", add_help=False, allow_abbrev=False)
    add = parser.add_argument
    add("--lr", type=float)
    add("--min-lr", type=float, default=0.0)
    add("--lr-warmup-init", type=float, default=0.0)
    add("--lr-decay-style", default="linear")
    add("--lr-warmup-iters", type=int, default=0)
    add("--lr-warmup-samples", type=int, default=0)
    add("--lr-warmup-fraction", type=float)
    add("--lr-decay-iters", type=int)
    add("--lr-decay-samples", type=int)
    add("--train-iters", type=int)
    add("--train-samples", type=int)
    add("--global-batch-size", type=int)
    add("--micro-batch-size", type=int)
    add("--weight-decay", type=float, default=0.01)
    add("--start-weight-decay", type=float)
    add("--end-weight-decay", type=float)
    add("--weight-decay-incr-style", default="constant")
    add("--adam-beta1", type=float, default=0.9)
    add("--adam-beta2", type=float, default=0.999)
    add("--adam-eps", type=float, default=1e-8)
    add("--decoupled-lr", type=float)
    add("--apply-wd-to-qk-layernorm", action="store_true")
    add("--use-distributed-optimizer", action="store_true")
    add("--overlap-grad-reduce", action="store_true")
    add("--ddp-bucket-size", type=int)
    add("--ddp-num-buckets", type=int)
    add("--ddp-pad-buckets-for-high-nccl-busbw", action="store_true")
    add("--grad-reduce-in-bf16", action="store_true")
    add("--context-parallel-size", type=int, default=1)
    add("--num-distributed-optimizer-instances", type=int, default=1)
    add("--optimizer", default="adam")
    return parser


@dataclass(frozen=True)
class TrainingRun:
    """The Megatron run that will load a fresh optimizer state: the flags it depends on
    (Megatron's names, as an ``argparse.Namespace`` of :func:`_megatron_flags`)."""

    flags: argparse.Namespace = field(default_factory=lambda: _megatron_flags().parse_args([]))

    @classmethod
    def from_megatron_args(cls, args) -> "TrainingRun":
        """From Megatron's command-line flags (a string or a list): the run's whole command
        line may be given, flags that do not matter here are ignored.

        A fresh state needs ``--lr`` (Megatron matches saved parameter groups by it); the
        optimizer must be Adam with Megatron's default parameter groups."""
        words = shlex.split(args) if isinstance(args, str) else [str(word) for word in args or []]
        try:
            flags, _ = _megatron_flags().parse_known_args(words)
        except SystemExit:  # argparse reports a bad value and exits
            raise BadInput(f"--megatron-args: cannot read {' '.join(words)!r} as Megatron flags") from None
        if flags.lr is None:
            raise BadInput("a fresh optimizer state needs the training run's --lr (in --megatron-args): Megatron finds "
                           "each saved parameter group by its max_lr and min_lr, the run's --lr and --min-lr")
        if flags.optimizer != "adam":
            raise Unsupported(f"a fresh optimizer state for --optimizer {flags.optimizer}: only Adam is written")
        if flags.decoupled_lr is not None or flags.apply_wd_to_qk_layernorm:
            raise Unsupported("a fresh optimizer state with --decoupled-lr or --apply-wd-to-qk-layernorm: only "
                              "Megatron's default parameter groups (weight decay / none for biases and 1-D tensors) "
                              "are written")
        return cls(flags)

    # -- what the state holds besides the tensors

    def _weight_decay_range(self) -> tuple[float, float]:
        flags = self.flags
        if flags.weight_decay_incr_style == "constant":  # arguments.py: both set to --weight-decay
            return flags.weight_decay, flags.weight_decay
        if flags.start_weight_decay is None or flags.end_weight_decay is None:
            raise BadInput(f"--weight-decay-incr-style {flags.weight_decay_incr_style} needs --start-weight-decay "
                           "and --end-weight-decay (Megatron asserts both)")
        return flags.start_weight_decay, flags.end_weight_decay

    def _schedule_steps(self, dp: int) -> tuple[float | None, int | None, int | None]:
        """(warmup, decay, weight-decay increment) steps in samples, as
        ``get_optimizer_param_scheduler`` computes them; None where the flags do not say."""
        flags = self.flags
        if flags.train_iters:
            batch = flags.global_batch_size or (flags.micro_batch_size * dp if flags.micro_batch_size else None)
            if batch is None:
                return None, None, None
            decay = (flags.lr_decay_iters or flags.train_iters) * batch
            warmup = flags.lr_warmup_fraction * decay if flags.lr_warmup_fraction is not None \
                else flags.lr_warmup_iters * batch
            return warmup, decay, flags.train_iters * batch
        if flags.train_samples:
            decay = flags.lr_decay_samples or flags.train_samples
            warmup = flags.lr_warmup_fraction * decay if flags.lr_warmup_fraction is not None \
                else flags.lr_warmup_samples
            return warmup, decay, flags.train_samples
        return None, None, None

    def knows_schedule(self, dp: int = 1) -> bool:
        """Whether the flags give the run's length (``--train-iters`` with the global batch
        size, or ``--train-samples``): the scheduler entry then equals the run's."""
        return self._schedule_steps(dp)[1] is not None

    def scheduler_state(self, dp: int = 1) -> dict:
        """``opt_param_scheduler`` at step 0 (``OptimizerParamScheduler.state_dict``)."""
        flags = self.flags
        warmup, decay, increments = self._schedule_steps(dp)
        start_wd, end_wd = self._weight_decay_range()
        return {"max_lr": flags.lr, "lr_warmup_steps": warmup, "num_steps": 0, "lr_decay_style": flags.lr_decay_style,
                "lr_decay_steps": decay, "min_lr": flags.min_lr, "start_wd": start_wd, "end_wd": end_wd,
                "wd_incr_style": flags.weight_decay_incr_style, "wd_incr_steps": increments}

    def param_groups(self, experts: bool = False) -> list[dict]:
        """Megatron's two default groups as torch's AdamW saves them before the first step
        (the real fixtures' fresh ``optimizer`` entries have these keys), without ``params``;
        with ``experts``, the experts' group after them (``is_expert_parallel``; their weights
        all decay: expert biases are not supported).

        ``lr`` and ``weight_decay`` are the scheduler's at step 0 (it sets them again when it
        loads). ``bias_correction`` is not torch's: Apex's and Transformer Engine's FusedAdam
        read it from each group in ``step`` and keep the saved groups, torch ignores it."""
        flags = self.flags
        start_wd, _ = self._weight_decay_range()
        warmup = self._schedule_steps(1)[0]
        warming_up = warmup > 0 if warmup is not None else bool(
            flags.lr_warmup_iters or flags.lr_warmup_samples or flags.lr_warmup_fraction)
        lr = flags.lr_warmup_init if warming_up else flags.lr  # OptimizerParamScheduler.get_lr at step 0
        groups = []
        # _get_param_groups: the default group first, then the no-decay override, then the experts'
        for wd_mult, expert in [(1.0, False), (0.0, False), *([(1.0, True)] if experts else [])]:
            groups.append({
                "is_expert_parallel": expert, "default_config": True, "wd_mult": wd_mult, "lr_mult": 1.0,
                "is_decoupled_lr": False, "max_lr": flags.lr, "min_lr": flags.min_lr, "lr": lr,
                "betas": (flags.adam_beta1, flags.adam_beta2), "eps": flags.adam_eps, "weight_decay": start_wd * wd_mult,
                "amsgrad": False, "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
                "fused": None, "decoupled_weight_decay": True, "bias_correction": True})
        return groups


class FreshOptimizerState(OptimizerState):
    """Adam before its first step for the weights ``weights`` reads: master copies are the
    weights in fp32 (exact for any source dtype), moments are zeros, the step is 0.

    >>> from ckptkit.layouts import open_checkpoint
    >>> with open_checkpoint("llama-hf") as weights:
    ...     state = FreshOptimizerState(weights, TrainingRun.from_megatron_args("--lr 1e-4"), distributed=True)
    ...     state.tensor("decoder.final_layernorm.weight")["exp_avg"].abs().max().item()
    0.0
    """

    def __init__(self, weights: CheckpointReader, run: TrainingRun, *, distributed: bool, dp: int = 1):
        self.weights, self.spec = weights, weights.spec
        self.padded_vocab_size = weights.meta.padded_vocab_size or weights.spec.vocab_size
        self._canonical = {tensor.name: tensor for tensor in self.canonical()}
        self.info = OptimizerInfo(
            kind="distributed" if distributed else "non-distributed", step=0,
            param_groups=run.param_groups(experts=bool(self.spec.num_experts)),
            opt_param_scheduler=run.scheduler_state(dp), training={"num_floating_point_operations_so_far": 0},
            source={"layout": weights.meta.layout, "fresh": True})

    def tensor(self, name: str, keys: tuple[str, ...] = STATE_KEYS) -> dict[str, torch.Tensor]:
        if name not in self._canonical:
            raise BadInput(f"{self.weights.meta.path}: no canonical tensor {name}")
        canonical = self._canonical[name]
        shape = rule_for(self.spec, canonical.rule, self.padded_vocab_size).full_shape(canonical.shape)
        return {key: self.weights.tensor(name).to(torch.float32) if key == "param"
                else torch.zeros(shape, dtype=torch.float32) for key in keys}


@dataclass(frozen=True)
class FreshStateOf:
    """The fresh state for a source reader (picklable, for conversion worker processes)."""

    run: TrainingRun
    distributed: bool
    dp: int

    def __call__(self, reader: CheckpointReader) -> FreshOptimizerState:
        return FreshOptimizerState(reader, self.run, distributed=self.distributed, dp=self.dp)


def refuse_fresh_state_of_encoder_models(spec, what: str, instead: str) -> None:
    """A fresh optimizer state of BERT or T5 is refused in one line: Megatron has
    resumed carried BERT and T5 state (tools/megatron_encoder_optimizer.sh), not yet a fresh one."""
    if spec.model_kind != "decoder":
        raise Unsupported(f"{what}: a fresh optimizer state of a Megatron {spec.model_kind} model "
                          f"({spec.family or 'unknown'}) is not supported (Megatron has not been seen to start "
                          f"from one): use {instead}")


def with_fresh_optimizer_state(weights: CheckpointWriter, layout, run: TrainingRun, *, dp: int | None = None,
                               distributed: bool | None = None) -> tuple[CheckpointWriter, list[str]]:
    """``weights`` (the weight writer of a conversion to ``layout``, a ``TargetLayout`` at an
    iteration) made to write a fresh optimizer state for ``run`` at DP size ``dp`` (default 1),
    distributed or not (default: ``--use-distributed-optimizer`` among the run's flags), and
    notes on what the run must pass to Megatron."""
    from ..layouts.torch_dist_writer import TorchDistWriter
    from .carry import TorchDistWithOptimizerState, WithOptimizerState
    from .torch_dist import PLAIN
    from .write import OptimizerTarget

    dp = dp or 1
    if distributed is None:
        distributed = run.flags.use_distributed_optimizer
    target = OptimizerTarget.from_layout(layout, dp=dp, distributed=distributed, args=run.flags)
    notes = ["fresh optimizer state at iteration 0: start Megatron with --no-load-rng (no RNG state is written; "
             "Megatron seeds from --seed as for a new run)"]
    if not run.knows_schedule(dp):
        notes.append("opt_param_scheduler: the run's length is not in --megatron-args (--train-iters with "
                     "--global-batch-size, or --train-samples): start Megatron with --override-opt-param-scheduler")
    state_of = FreshStateOf(run, distributed, dp)
    if isinstance(weights, TorchDistWriter):  # in the same save as the weights, as reshard writes it
        if not distributed and target.param_dtype == torch.float16:
            raise Unsupported("a fresh plain optimizer in an fp16 torch_dist checkpoint is not written (its "
                              "layout is not checked on a real checkpoint): use --distributed-optimizer or --format "
                              "torch")
        return TorchDistWithOptimizerState(weights, dp=dp, sharding="dp_reshardable" if distributed else PLAIN,
                                           state_of=state_of), notes
    return WithOptimizerState(weights, target, state_of=state_of), notes
