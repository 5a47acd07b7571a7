"""Writing canonical optimizer state as Megatron's per-rank files, at any TP/PP/VPP/DP.

The weights come first (the per-rank writer makes ``model_optim_rng.pt``); then, one
pipeline stage at a time, every canonical tensor's state is read once, cut for each TP
rank by its rule (the vocabulary re-padded: added rows get zero state) and streamed:

* distributed optimizer: into each rank's ``distrib_optim.pt`` in buffer order
  (:class:`.distrib_optim.DistribOptimWriter`), and ``optimizer`` (param groups with the
  step, grad scaler) and ``opt_param_scheduler`` into ``model_optim_rng.pt``;
* non-distributed: Adam's state dict (and the fp32 masters of a bf16/fp16 model) as the
  ``optimizer`` entry of ``model_optim_rng.pt``.

``model_optim_rng.pt`` is rewritten with the new entries, its tensors copied one at a time.
``rng_state`` is carried only where the TP/PP/VPP/EP layout is unchanged (it is per rank).

A mixture of experts gets Megatron's two chained optimizers: the non-expert parameters'
state in every EP rank's files (``distrib_optim.pt``: in EP rank 0's only, None elsewhere),
each expert's in its EP rank's files, each with its own param groups
(``is_expert_parallel``).
"""
from __future__ import annotations

import argparse
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BadInput, InternalError, Unsupported
from ..layouts.megatron_legacy import RANK_FILE, iteration_dir_name, rank_dir_name
from ..safe_load import without_stand_ins
from ..spec import ModelSpec, check_parallel_sizes, padded_vocab_size, rule_for
from ..torch_stream import StreamingTorchWriter
from .buffers import BufferSettings
from .distrib_optim import FILE_NAME, DistribOptimWriter, rank_layout
from .files import MetaFile
from .parameters import ChunkPlace, chunk_parameters
from .per_rank import group_index
from .state import RESUME_CHECKED_ARGS, STATE_KEYS, OptimizerState, chained_param_groups

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class OptimizerTarget:
    """The optimizer Megatron will resume with, and the layout it runs at.

    ``param_dtype`` is the weights' dtype at the target (bf16/fp16 runs keep fp32 masters
    apart from the weights). ``bucket_size`` is the first stage's DDP bucket size (None,
    one bucket per buffer, unless the run uses ``--overlap-grad-reduce``: see
    :meth:`BufferSettings.from_args`). ``iteration`` names the iteration folder: Megatron
    loads no optimizer state from a ``release`` checkpoint.
    """

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    dp: int = 1
    distributed: bool = True
    ep: int = 1
    param_dtype: torch.dtype = torch.float32
    iteration: int = 0
    make_vocab_size_divisible_by: int = 128
    naming: str = "mcore-local"
    bucket_size: int | None = None
    pad_for_high_nccl_busbw: bool = False
    grad_reduce_in_fp32: bool | None = None  # None: as Megatron decides (fp32 for bf16)

    @property
    def settings(self) -> BufferSettings:
        grad_fp32 = self.grad_reduce_in_fp32
        if grad_fp32 is None:
            grad_fp32 = self.param_dtype in (torch.bfloat16, torch.float32)
        return BufferSettings(dp=self.dp, bucket_size=self.bucket_size,
                              pad_for_high_nccl_busbw=self.pad_for_high_nccl_busbw, param_dtype=self.param_dtype,
                              grad_dtype=torch.float32 if grad_fp32 else self.param_dtype)

    @property
    def folder_name(self) -> str:
        return iteration_dir_name(self.iteration)

    def padded_vocab(self, spec: ModelSpec) -> int:
        return padded_vocab_size(spec.vocab_size, self.make_vocab_size_divisible_by, self.tp)

    def rank_path(self, tp_rank: int, pp_stage: int, name: str, ep_rank: int = 0) -> str:
        return f"{self.folder_name}/{rank_dir_name(tp_rank, pp_stage, self.pp, ep_rank, self.ep)}/{name}"

    def settings_for(self, spec: ModelSpec) -> BufferSettings:
        """The buffer settings, with the experts' DP size for a mixture of experts."""
        return self.settings.with_experts(tp=self.tp, ep=self.ep) if spec.num_experts else self.settings

    @classmethod
    def from_layout(cls, layout, *, dp: int = 1, distributed: bool = True, args=None, **fields) -> "OptimizerTarget":
        """The target of a weight write (a ``TargetLayout``: tp, pp, vpp, naming, padding,
        dtype, iteration), run at ``dp`` with or without the distributed optimizer.

        ``args`` (the Megatron args the run resumes with, such as the source's) give the
        bucket settings: with ``--overlap-grad-reduce`` Megatron cuts buffers into buckets
        of ``--ddp-bucket-size`` (default ``max(4e7, 1e6 x DP)``), which moves parameters in
        ``distrib_optim.pt``; the resuming run must use the same settings.
        """
        if layout.release or layout.iteration is None:
            raise BadInput("Megatron loads no optimizer state from a release checkpoint: write it at an iteration")
        if layout.etp not in (None, layout.tp):
            raise Unsupported(f"optimizer state of experts cut over an expert TP ({layout.etp}) other than TP "
                              f"({layout.tp}) in per-rank files")
        param_dtype = layout.dtype or torch.float32
        if args is not None:
            settings = BufferSettings.from_args(args, dp=dp, param_dtype=param_dtype)
            fields = {"bucket_size": settings.bucket_size, "pad_for_high_nccl_busbw": settings.pad_for_high_nccl_busbw,
                      "grad_reduce_in_fp32": settings.grad_dtype == torch.float32, **fields}
        return cls(tp=layout.tp, pp=layout.pp, vpp=layout.vpp, dp=dp, distributed=distributed, ep=layout.ep,
                   param_dtype=param_dtype, iteration=layout.iteration,
                   make_vocab_size_divisible_by=layout.make_vocab_size_divisible_by, naming=layout.naming, **fields)


def output_files(target: OptimizerTarget) -> list[str]:
    """The files :func:`write_optimizer_state` writes or rewrites, relative to the output folder."""
    names = [FILE_NAME, RANK_FILE] if target.distributed else [RANK_FILE]
    return [target.rank_path(tp_rank, pp_stage, name, ep_rank) for pp_stage in range(target.pp)
            for tp_rank in range(target.tp) for ep_rank in range(target.ep) for name in names]


def write_optimizer_state(state: OptimizerState, out_dir, target: OptimizerTarget, *, progress=None) -> list[str]:
    """Write ``state`` for ``target`` into ``out_dir``, where the per-rank weight files of
    the same target are already written; returns the paths written, relative to ``out_dir``.

    >>> from ckptkit.convert import reshard
    >>> from ckptkit.optimizer import read_optimizer_state
    >>> _ = reshard("checkpoints/gpt2do", "gpt2do-tp1", tp=1, pp=1)
    >>> with read_optimizer_state("checkpoints/gpt2do") as state:
    ...     write_optimizer_state(state, "gpt2do-tp1", OptimizerTarget(tp=1, dp=1, iteration=10))
    ['iter_0000010/mp_rank_00/distrib_optim.pt', 'iter_0000010/mp_rank_00/model_optim_rng.pt']
    """
    out_dir = Path(out_dir)
    spec = state.spec
    check_parallel_sizes(spec, target.tp, target.pp, target.vpp, target.ep)
    if target.param_dtype == torch.float32 and state.info.source.get("param_dtype") not in (None, "float32"):
        warnings.warn(f"the fp32 target's weights are its master copies; the source's fp32 masters of its "
                      f"{state.info.source['param_dtype']} weights are written as optimizer state only "
                      "(Megatron resumes from the weights)", stacklevel=2)
    for relative in output_files(target):
        if relative.endswith(RANK_FILE) and not (out_dir / relative).is_file():
            raise BadInput(f"{out_dir / relative}: missing; the weights are written first, then the optimizer state")
    same_layout = tuple(state.info.source.get(key, 1) for key in ("tp", "pp", "vpp", "ep")) == \
        (target.tp, target.pp, target.vpp, target.ep)
    if not same_layout and hasattr(state, "rank_extras"):
        warnings.warn("rng_state is not carried: it belongs to each TP/PP/EP rank of the source layout "
                      "(resume with --no-load-rng)", stacklevel=2)
    written = []
    for pp_stage in range(target.pp):
        stage = _StageWriter(state, out_dir, target, pp_stage, same_layout, progress)
        written += stage.write()
    return written


class _StageWriter:
    """The optimizer files of one pipeline stage, every TP (and EP) rank at once."""

    def __init__(self, state: OptimizerState, out_dir: Path, target: OptimizerTarget, pp_stage: int,
                 carry_rng: bool, progress):
        self.state, self.out_dir, self.target, self.pp_stage = state, out_dir, target, pp_stage
        self.carry_rng, self.progress = carry_rng, progress
        self.padded = target.padded_vocab(state.spec)
        self.tp_ranks = range(target.tp)
        self.ranks = [(tp_rank, ep_rank) for tp_rank in range(target.tp) for ep_rank in range(target.ep)]
        self.settings = target.settings_for(state.spec)
        self.chained = bool(state.spec.num_experts) and target.ep > 1  # the experts' optimizer apart

    def _rank_file(self, tp_rank: int, ep_rank: int = 0) -> Path:
        path = self.out_dir / self.target.rank_path(tp_rank, self.pp_stage, RANK_FILE, ep_rank)
        if not path.is_file():
            raise BadInput(f"{path}: missing; the weights are written first, then the optimizer state")
        return path

    def _pieces(self, canonical: str, rule_name: str, keys=STATE_KEYS) -> dict[int, dict[str, torch.Tensor]]:
        """Each TP rank's piece of ``canonical``'s state (``keys`` of it), flat."""
        full = self.state.tensor(canonical, keys)
        rule = rule_for(self.state.spec, rule_name, self.padded)
        fitted = {key: rule.fit(values) for key, values in full.items()}
        del full
        if self.progress and keys[0] == STATE_KEYS[0]:
            self.progress(canonical)
        return {tp_rank: {key: rule.shard(values, self.target.tp, tp_rank).reshape(-1) for key, values in fitted.items()}
                for tp_rank in self.tp_ranks}

    def _part_groups(self) -> list[list[dict]]:
        """The param groups of each chained optimizer (one list without expert parallelism)."""
        return chained_param_groups(self.state.info.param_groups, self.chained)

    def _part_parameters(self, part: int, ep_rank: int) -> list[tuple[int, object]]:
        """(chunk, parameter) of chained optimizer ``part`` on EP rank ``ep_rank``, in order."""
        target = self.target
        return [(chunk, parameter) for chunk in range(target.vpp) for parameter in chunk_parameters(
            self.state.spec, ChunkPlace(target.tp, 0, target.pp, self.pp_stage, target.vpp, chunk, target.ep, ep_rank),
            self.padded, naming=target.naming) if parameter.expert == bool(part)]

    def _common_entries(self, tp_rank: int, ep_rank: int = 0) -> dict:
        info = self.state.info
        entries = {}
        if info.opt_param_scheduler is not None:
            entries["opt_param_scheduler"] = info.opt_param_scheduler
        entries.update(info.training)
        if self.carry_rng and hasattr(self.state, "rank_extras"):
            entries.update(self.state.rank_extras(tp_rank, self.pp_stage, ep_rank))
        return entries

    # entries of the rank files this writer replaces
    _entry_keys = ("optimizer", "opt_param_scheduler", "rng_state", "num_floating_point_operations_so_far")

    def _args_fields(self) -> dict:
        """What the args say about the optimizer and the data-parallel size, made true of the
        target, and the args Megatron compares on resuming as the source run had them."""
        target = self.target
        return {**RESUME_CHECKED_ARGS, **self.state.info.resume_args,
                "use_distributed_optimizer": target.distributed, "data_parallel_size": target.dp,
                "accumulate_allreduce_grads_in_fp32": self.settings.grad_dtype == torch.float32}

    def write(self) -> list[str]:
        return self._write_distributed() if self.target.distributed else self._write_adam()

    def _write_distributed(self) -> list[str]:
        target, info = self.target, self.state.info
        layouts = {(tp_rank, ep_rank): rank_layout(
            self.state.spec, tp=target.tp, tp_rank=tp_rank, pp=target.pp, pp_stage=self.pp_stage, vpp=target.vpp,
            padded_vocab_size=self.padded, settings=self.settings, naming=target.naming, ep=target.ep, ep_rank=ep_rank)
            for tp_rank, ep_rank in self.ranks}
        rank_files = {rank: self._rank_file(*rank) for rank in self.ranks}
        writers = {}
        try:
            for tp_rank, ep_rank in self.ranks:
                path = self.out_dir / target.rank_path(tp_rank, self.pp_stage, FILE_NAME, ep_rank)
                writers[(tp_rank, ep_rank)] = DistribOptimWriter(path, layouts[(tp_rank, ep_rank)],
                                                                 self.settings.buffer_key, ep_rank=ep_rank)
            for chunk in range(target.vpp):
                for part in range(len(layouts[(0, 0)].parts)):
                    # the non-expert part is the same on every EP rank; each EP rank has its own experts
                    for ep_rank in (range(target.ep) if part else [0]):
                        receivers = [rank for rank in self.ranks if not part or rank[1] == ep_rank]
                        self._fill(layouts, writers, receivers, chunk, part, ep_rank)
            for writer in writers.values():
                writer.finish()
        finally:
            for writer in writers.values():
                writer.close()
        entries = []
        for groups in self._part_groups():
            entry = {"optimizer": {"param_groups": [{**group, "step": info.step} for group in groups]}}
            if info.grad_scaler is not None:
                entry["grad_scaler"] = info.grad_scaler
            entries.append(entry)
        written = []
        for tp_rank, ep_rank in self.ranks:
            with RankFileRewrite(rank_files[(tp_rank, ep_rank)], replacing=self._entry_keys) as rewrite:
                rewrite.finish({"optimizer": entries if self.chained else entries[0],
                                **self._common_entries(tp_rank, ep_rank)}, self._args_fields())
            written += [target.rank_path(tp_rank, self.pp_stage, FILE_NAME, ep_rank),
                        target.rank_path(tp_rank, self.pp_stage, RANK_FILE, ep_rank)]
        return written

    def _fill(self, layouts, writers, receivers, chunk: int, part: int, ep_rank: int) -> None:
        """Every parameter of buffer ``chunk`` of chained optimizer ``part`` into the writers of
        ``receivers`` (TP, EP ranks), one state tensor in memory at a time."""
        slots = layouts[(0, ep_rank)].parts[part][chunk].slots
        for position, slot in enumerate(slots):
            for rank in receivers:
                if layouts[rank].parts[part][chunk].slots[position].parameter.name != slot.parameter.name:
                    raise InternalError(f"ranks of stage {self.pp_stage} order their buffers differently")
            for key in STATE_KEYS:
                pieces = self._pieces(slot.parameter.canonical, slot.parameter.rule, (key,))
                for tp_rank, receiver_ep in receivers:
                    writers[(tp_rank, receiver_ep)].add(chunk, pieces[tp_rank], part)

    def _write_adam(self) -> list[str]:
        """Non-distributed: Adam's state dict, parameters numbered over the groups (per chained
        optimizer)."""
        target, info = self.target, self.state.info
        mixed = target.param_dtype != torch.float32
        rewrites = {}
        try:
            for rank in self.ranks:
                rewrites[rank] = RankFileRewrite(self._rank_file(*rank), replacing=self._entry_keys)
            # Records go in the order the pickle will name them (RankFileRewrite): per chained
            # optimizer, each parameter's step and moments, then (bf16/fp16) every master copy.
            entries = {rank: [] for rank in self.ranks}
            for part, part_groups in enumerate(self._part_groups()):
                for ep_rank in (range(target.ep) if part else [0]):
                    receivers = [rank for rank in self.ranks if not part or rank[1] == ep_rank]
                    numbered, groups = self._numbered(part, part_groups, ep_rank)
                    adam = {rank: {} for rank in receivers}
                    for index, parameter in enumerate(numbered):
                        for rank in receivers:
                            adam[rank][index] = {"step": rewrites[rank].add_tensor(torch.tensor(float(info.step)))}
                        for key in MOMENTS:  # one state tensor in memory at a time
                            pieces = self._pieces(parameter.canonical, parameter.rule, (key,))
                            for rank in receivers:
                                adam[rank][index][key] = rewrites[rank].add_tensor(
                                    pieces[rank[0]][key].view(parameter.shape))
                    masters = {rank: [[] for _ in groups] for rank in receivers}
                    if mixed:
                        for group, listed in enumerate(groups):
                            for parameter in listed["members"]:
                                pieces = self._pieces(parameter.canonical, parameter.rule, ("param",))
                                for rank in receivers:
                                    masters[rank][group].append(
                                        rewrites[rank].add_tensor(pieces[rank[0]]["param"].view(parameter.shape)))
                    for rank in receivers:
                        inner = {"state": adam[rank], "param_groups": [group["saved"] for group in groups]}
                        if mixed:
                            entry = {"optimizer": inner, "fp32_from_fp16_params": masters[rank]}
                            if info.grad_scaler is not None:
                                entry["grad_scaler"] = info.grad_scaler
                        else:
                            entry = inner
                        entries[rank].append(entry)
            written = []
            for tp_rank, ep_rank in self.ranks:
                rank_entries = entries[(tp_rank, ep_rank)]
                rewrites[(tp_rank, ep_rank)].finish(
                    {"optimizer": rank_entries if self.chained else rank_entries[0],
                     **self._common_entries(tp_rank, ep_rank)}, self._args_fields())
                written.append(target.rank_path(tp_rank, self.pp_stage, RANK_FILE, ep_rank))
            return written
        finally:
            for rewrite in rewrites.values():
                rewrite.close()

    def _numbered(self, part: int, part_groups: list[dict], ep_rank: int) -> tuple[list, list[dict]]:
        """Adam's numbering of chained optimizer ``part``'s parameters on EP rank ``ep_rank``
        (group by group, each in ``named_parameters()`` order), and each group as saved
        (``params``: its numbers) with its members."""
        members = [[] for _ in part_groups]
        for _, parameter in self._part_parameters(part, ep_rank):
            members[group_index(parameter, part_groups, "optimizer state")].append(parameter)
        groups, first = [], 0
        for group, listed in zip(part_groups, members):
            groups.append({"saved": {**group, "params": list(range(first, first + len(listed)))}, "members": listed})
            first += len(listed)
        return [parameter for listed in members for parameter in listed], groups


class RankFileRewrite:
    """``model_optim_rng.pt`` rewritten with more entries: its tensors are copied one at a
    time into a new file beside it, which replaces it on :meth:`finish`.

    Entries being replaced (``replacing``) are not copied, and new entries come last.
    Tensors must be added (:meth:`add_tensor`) in the order the final object names them,
    plain tensors in entries being added as the pickle meets them: the file says
    ``.format_version`` 1, and torch then locates each record of a file loaded on the meta
    device (as ckptkit reads) by assuming the records follow the pickle's order.
    """

    def __init__(self, path: Path, *, replacing=()):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self._source = MetaFile(self.path)
        self._writer = StreamingTorchWriter(self.partial)
        try:
            self.state = {key: self._copy(value) for key, value in self._source.state.items() if key not in replacing}
        except BaseException:
            self.close()
            raise

    def _copy(self, value):
        if isinstance(value, torch.Tensor):
            return self._writer.add_tensor(self._source.read(value))
        if isinstance(value, OrderedDict):
            return OrderedDict((key, self._copy(item)) for key, item in value.items())
        if type(value) is dict:
            return {key: self._copy(item) for key, item in value.items()}
        if type(value) in (list, tuple):
            return type(value)(self._copy(item) for item in value)
        return value

    def add_tensor(self, tensor: torch.Tensor):
        """Write one tensor now; returns the reference to place in an entry."""
        return self._writer.add_tensor(tensor)

    def finish(self, entries: dict, args_fields: dict | None = None) -> None:
        """Add (or replace) ``entries``, set ``args_fields`` in ``args``, and put the new file in place."""
        state = {**{key: value for key, value in self.state.items() if key not in entries}, **entries}
        if args_fields and state.get("args") is not None:
            state["args"] = argparse.Namespace(**{**vars(without_stand_ins(state["args"])), **args_fields})
        self._writer.finish({key: without_stand_ins(value) for key, value in state.items()})
        self._source.close()
        os.replace(self.partial, self.path)

    def close(self) -> None:
        self._writer.close()
        self._source.close()
        if self.partial.exists():
            self.partial.unlink()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
