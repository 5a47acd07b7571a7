"""The trainer's Adam state <-> Megatron's optimizer state, through ckptkit's canonical form.

The trainer keeps, per parameter, an fp32 master copy and Adam's two moments, sliced over
DP with the distributed optimizer; Megatron keeps the same numbers in its own layout
(``distrib_optim.pt`` flat buffers, or Adam's state dict: see docs/optimizer.md). Both
sides meet in :mod:`ckptkit.optimizer`'s canonical form (full fp32 ``param``, ``exp_avg``,
``exp_avg_sq`` per canonical tensor), so a checkpoint is written by Megatron's writer and
read back at any layout by Megatron's reader.

Saving (:func:`write_megatron_optimizer_state`, after the weight files exist):

1. DP rank 0 of each model-parallel rank writes its rank's state, gathered over DP, to
   ``iter_N/.optimizer-pieces/mp_rank_TT[_PPP].pt`` (:func:`write_rank_pieces`);
2. rank 0 reads them as one canonical state (:class:`SavedPieces`: each canonical tensor
   merged from its TP pieces by its partition rule) and writes it with
   :func:`ckptkit.optimizer.write_optimizer_state` at the run's TP, PP and DP;
3. the piece folder is removed.

Loading (:func:`rank_adam_state`): each rank cuts its parameters' pieces out of the
canonical tensors of :func:`ckptkit.optimizer.read_optimizer_state`, whatever layout
wrote them.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..errors import InternalError, Unsupported
from ..layouts.megatron_legacy import iteration_dir_name, rank_dir_name
from ..optimizer import OptimizerInfo, OptimizerState, OptimizerTarget, write_optimizer_state
from ..optimizer.fresh import TrainingRun
from ..optimizer.parameters import ChunkPlace, chunk_parameters
from ..optimizer.state import STATE_KEYS, assemble
from ..safe_load import safe_torch_load
from ..spec import ModelSpec, canonical_tensors
from .model import GPT
from .optim import learning_rate
from .parallel.groups import Layout
from .weights import canonical_name, rank_parameters

PIECES_FOLDER = ".optimizer-pieces"
# the trainer's name for each canonical state key
TRAINER_KEYS = {"param": "master", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}


def megatron_format_refusal(spec: ModelSpec, tp: int, pp: int, padded_vocab_size: int) -> str | None:
    """Why ckptkit cannot write this model's optimizer state in Megatron's format, or None.

    Asked of :mod:`ckptkit.optimizer` itself (which places every parameter in Megatron's
    order). A mixture of experts is refused here: Megatron keeps its experts' state in an
    optimizer of its own per EP rank, and the trainer gathers its pieces per TP/PP rank only.
    """
    if spec.num_experts:
        return ("the trainer saves a mixture-of-experts model's optimizer state per TP/PP rank, not per EP rank as "
                "Megatron's chained expert optimizer needs")
    try:
        chunk_parameters(spec, ChunkPlace(tp, 0, pp, 0), padded_vocab_size)
    except Unsupported as error:
        return str(error)
    return None


def pieces_path(root: Path, iteration: int, tp_rank: int, pp_stage: int, pp: int) -> Path:
    return Path(root) / iteration_dir_name(iteration) / PIECES_FOLDER / f"{rank_dir_name(tp_rank, pp_stage, pp)}.pt"


def write_rank_pieces(path: Path, adam_state: dict, rng_state: list) -> None:
    """One model-parallel rank's state (:meth:`DistributedAdam.state_dict`, gathered over DP)
    and its RNG state, under the canonical state keys."""
    pieces = {name: {key: state[ours] for key, ours in TRAINER_KEYS.items()}
              for name, state in adam_state["params"].items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": adam_state["step"], "params": pieces, "rng_state": rng_state}, path)


class SavedPieces(OptimizerState):
    """The canonical state of a run's piece files (one per TP rank and stage), read memory-mapped:
    ``tensor(name)`` merges the TP pieces of the stage that holds ``name``."""

    def __init__(self, root: Path, iteration: int, spec: ModelSpec, padded_vocab_size: int, tp: int, pp: int,
                 info: OptimizerInfo):
        self.spec, self.padded_vocab_size, self.tp, self.info = spec, padded_vocab_size, tp, info
        self.files = {(tp_rank, pp_stage): safe_torch_load(pieces_path(root, iteration, tp_rank, pp_stage, pp))
                      for tp_rank in range(tp) for pp_stage in range(pp)}
        self._canonical = {tensor.name: tensor for tensor in canonical_tensors(spec)}
        self._where = {}
        for pp_stage in range(pp):
            for local_name in self.files[(0, pp_stage)]["params"]:
                if local_name == "output_layer.weight" and spec.tied_embeddings and pp > 1:
                    continue  # the last stage's copy of the embeddings: Megatron's writer takes the first stage's
                self._where[canonical_name(spec, local_name, pp_stage, pp)] = (pp_stage, local_name)
        missing = sorted(set(self._canonical) - set(self._where))
        if missing:
            raise InternalError(f"{pieces_path(root, iteration, 0, 0, pp).parent}: no optimizer state for "
                                f"{missing[0]} on any stage")

    def tensor(self, name: str, keys: tuple[str, ...] = STATE_KEYS) -> dict[str, torch.Tensor]:
        pp_stage, local_name = self._where[name]
        return assemble(self.spec, self._canonical[name], self.padded_vocab_size, self.tp,
                        lambda tp_rank: self.files[(tp_rank, pp_stage)]["params"][local_name], keys)

    def rank_extras(self, tp_rank: int, pp_stage: int, ep_rank: int = 0) -> dict:
        """The rank's RNG state: the writer keeps it since the layout is the run's own (EP 1:
        the trainer keeps a mixture of experts' optimizer state in its own entry)."""
        return {"rng_state": self.files[(tp_rank, pp_stage)]["rng_state"]}


def megatron_optimizer_info(config, *, step: int, iteration: int, dtype: torch.dtype, flops: float) -> OptimizerInfo:
    """What Megatron keeps besides the per-weight state, for a run of ``config`` saved at
    ``iteration``: its two default parameter groups and the LR schedule in samples
    (built from the Megatron flags the run corresponds to, as a fresh state is), at
    Adam step ``step`` and the learning rate of ``iteration``."""
    adam = config.optimizer
    run = TrainingRun.from_megatron_args([
        "--lr", adam.lr, "--min-lr", adam.min_lr, "--lr-decay-style", "cosine",
        "--lr-warmup-iters", adam.warmup_steps, "--lr-decay-iters", adam.decay_steps or config.steps,
        "--train-iters", config.steps, "--global-batch-size", config.batch_size,
        "--weight-decay", adam.weight_decay, "--adam-beta1", adam.beta1, "--adam-beta2", adam.beta2,
        "--adam-eps", adam.eps])
    lr = learning_rate(iteration, adam, config.steps)  # what Megatron's scheduler set after this iteration
    groups = [{**group, "lr": lr} for group in run.param_groups()]
    scheduler = {**run.scheduler_state(config.dp), "num_steps": iteration * config.batch_size}
    return OptimizerInfo(
        kind="distributed" if config.distributed_optimizer else "non-distributed", step=float(step),
        param_groups=groups, opt_param_scheduler=scheduler,
        training={"num_floating_point_operations_so_far": flops},
        source={"format": "torch", "tp": config.tp, "pp": config.pp, "vpp": 1, "dp": config.dp,
                "param_dtype": str(dtype).removeprefix("torch.")})


def write_megatron_optimizer_state(root: Path, iteration: int, *, config, spec: ModelSpec, padded_vocab_size: int,
                                   dtype: torch.dtype, info: OptimizerInfo) -> list[str]:
    """Rank 0's part of a save: the piece files of every model-parallel rank written as
    Megatron's optimizer state into the rank files of ``iteration`` (which hold the
    weights already), then removed. Returns the paths written, relative to ``root``."""
    target = OptimizerTarget(tp=config.tp, pp=config.pp, dp=config.dp, distributed=config.distributed_optimizer,
                             param_dtype=dtype, iteration=iteration,
                             make_vocab_size_divisible_by=config.make_vocab_size_divisible_by)
    folder = pieces_path(root, iteration, 0, 0, config.pp).parent
    try:
        with SavedPieces(root, iteration, spec, padded_vocab_size, config.tp, config.pp, info) as state:
            return write_optimizer_state(state, root, target)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def rank_adam_state(state: OptimizerState, model: GPT, layout: Layout, tp_rank: int, pp_stage: int,
                    ep_rank: int = 0) -> dict:
    """This rank's share of canonical optimizer state, as :meth:`DistributedAdam.load_state_dict`
    takes it: ``{"step", "params": {local name: {"master", "exp_avg", "exp_avg_sq"}}}``.

    Each parameter's piece is cut from the full tensors by the parameter's rule, as its
    weights are (:func:`~ckptkit.train.weights.load_weights`): vocabulary rows padded
    or cut to this run's padded size, the added rows with zero state.
    """
    params = {}
    for local_name, parameter, name, rule in rank_parameters(model, layout, tp_rank, pp_stage, ep_rank):
        full = state.tensor(name)
        params[local_name] = {TRAINER_KEYS[key]: rule.shard(value, layout.tp, tp_rank).clone()
                              for key, value in full.items()}
    step = state.info.step
    if float(step) != int(step):
        raise Unsupported(f"optimizer step {step} is not a whole number of updates")
    return {"step": int(step), "params": params}
