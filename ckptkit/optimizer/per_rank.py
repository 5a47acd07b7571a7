"""Optimizer state in Megatron's per-rank files (``--ckpt-format torch``), both kinds.

Distributed optimizer (``--use-distributed-optimizer``): the master copies and moments
of every DP rank are in ``mp_rank_TT[_PPP]/distrib_optim.pt`` (:mod:`.distrib_optim`);
``model_optim_rng.pt["optimizer"]`` holds what is not per weight::

    {"optimizer": {"param_groups": [{..., "step": 10.0}, ...]}, "grad_scaler": {...}}

Non-distributed optimizer: ``model_optim_rng.pt["optimizer"]`` is the PyTorch Adam state
dict, parameters numbered across Megatron's groups (decay first, then no decay), each
group's parameters in ``named_parameters()`` order over the rank's model chunks::

    fp32:        {"state": {0: {"step", "exp_avg", "exp_avg_sq"}, ...},
                  "param_groups": [{..., "params": [0, 1, ...]}, {..., "params": [...]}]}
    bf16, fp16:  {"optimizer": <the same>, "grad_scaler": {...},
                  "fp32_from_fp16_params": [[master of each param of group 0], [... group 1]]}

In fp32 the model's weights are the master copies.

A mixture of experts chains two optimizers (the experts' apart): ``optimizer`` is then a
list of two such entries and ``distrib_optim.pt`` a list of two states, the non-expert
optimizer's first; each EP rank's files (``mp_rank_TT[_PPP]_EEE``) hold the non-expert
state (the same on every EP rank) and the state of its own experts.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import BadInput, Unsupported
from ..layouts.megatron_legacy import RANK_FILE, rank_dir_name
from ..spec import canonical_tensors
from .buffers import BufferSettings
from .distrib_optim import FILE_NAME, DistribOptimFile, rank_layout
from .files import MetaFile
from .parameters import ChunkPlace, ModelParameter, chunk_parameters
from .state import RESUME_CHECKED_ARGS, STATE_KEYS, OptimizerInfo, OptimizerState, assemble


# The entry ckptkit's trainer saves instead of Megatron's where it cannot write those
# (ckptkit/train/checkpoint.py: a mixture of experts)
TRAINER_ENTRY = "ckptkit_adam"


def _model_chunks(state: dict, vpp: int) -> list[dict]:
    return [state["model"]] if vpp == 1 and "model" in state else [state[f"model{chunk}"] for chunk in range(vpp)]


def group_index(parameter: ModelParameter, param_groups: list[dict], where) -> int:
    """The group of ``param_groups`` (Megatron's defaults: ``wd_mult`` 1.0 and 0.0, the experts'
    apart, ``is_expert_parallel``) ``parameter`` is in."""
    no_decay = not parameter.weight_decay
    matches = [index for index, group in enumerate(param_groups)
               if (group.get("wd_mult", 1.0) == 0.0) == no_decay
               and bool(group.get("is_expert_parallel", False)) == parameter.expert]
    if len(matches) != 1:
        found = [{key: group.get(key) for key in ("wd_mult", "lr_mult", "max_lr", "is_decoupled_lr")}
                 for group in param_groups]
        raise Unsupported(f"{where}: parameter groups {found} are not Megatron's default pair (weight decay / "
                          "none for biases and 1-D tensors); other groupings are not supported yet")
    return matches[0]


class PerRankOptimizerState(OptimizerState):
    """The canonical optimizer state of a Megatron per-rank checkpoint, read through its
    weight reader (a :class:`ckptkit.layouts.megatron_legacy.MegatronLegacyReader`)."""

    owns_weights = False  # close() closes the weight reader too

    def __init__(self, weights, *, trust_remote_pickle: bool = False):
        meta = weights.meta
        self.weights, self.spec, self.padded_vocab_size = weights, weights.spec, meta.padded_vocab_size
        self.tp, self.pp, self.vpp, self.ep = meta.tp, meta.pp, meta.vpp, meta.ep if meta.args is not None else 1
        self.trust_remote_pickle = trust_remote_pickle
        self.folder = Path(meta.files[0]).parent.parent
        self.settings = BufferSettings.from_args(meta.args, param_dtype=meta.dtype)
        self._rank_files: dict[tuple[int, int], MetaFile] = {}
        self._buffer_files: dict[tuple[int, int], DistribOptimFile] = {}
        self._canonical = {tensor.name: tensor for tensor in canonical_tensors(self.spec)}
        self._parameters = {}
        self._where = {}
        if self.spec.num_experts and meta.etp != meta.tp:
            raise Unsupported(f"{self.folder}: optimizer state of experts cut over an expert TP ({meta.etp}) other "
                              f"than TP ({meta.tp})")
        self.ranks = [(tp_rank, pp_stage, ep_rank) for pp_stage in range(self.pp) for tp_rank in range(self.tp)
                      for ep_rank in range(self.ep)]
        for tp_rank, pp_stage, ep_rank in self.ranks:
            for chunk in range(self.vpp):
                place = ChunkPlace(self.tp, tp_rank, self.pp, pp_stage, self.vpp, chunk, self.ep, ep_rank)
                parameters = chunk_parameters(self.spec, place, self.padded_vocab_size, naming=meta.naming)
                self._parameters[(tp_rank, pp_stage, ep_rank, chunk)] = parameters
                for position, parameter in enumerate(parameters):
                    # an expert from its own EP rank, the rest from EP rank 0 (every EP rank holds it)
                    if tp_rank == 0 and not parameter.tied_copy and (parameter.expert or ep_rank == 0):
                        self._where[parameter.canonical] = (pp_stage, chunk, position, ep_rank)
        first = self._rank_file(0, 0)
        entry = first.state.get("optimizer")
        # one optimizer for the experts, one for the rest, with expert parallelism (see .parameters)
        self.chained = bool(self.spec.num_experts) and self.ep > 1
        entries = self._entries(first, entry)
        # The distributed optimizer's entry holds no per-parameter "state" (that is in distrib_optim.pt).
        inner = entries[0].get("optimizer", entries[0]) if isinstance(entries[0], dict) else None
        self.distributed = isinstance(inner, dict) and "state" not in inner
        self.info = self._read_info(first, entries)
        if self.distributed:
            self._layouts = {(tp_rank, pp_stage, ep_rank): rank_layout(
                self.spec, tp=self.tp, tp_rank=tp_rank, pp=self.pp, pp_stage=pp_stage, vpp=self.vpp,
                padded_vocab_size=self.padded_vocab_size, settings=self.settings, naming=meta.naming, ep=self.ep,
                ep_rank=ep_rank) for tp_rank, pp_stage, ep_rank in self.ranks}
        else:
            self._indices = {rank: self._state_indices(*rank) for rank in self.ranks}

    def _entries(self, file: MetaFile, entry) -> list:
        """The optimizer entry of a rank file as a list: one per chained optimizer."""
        if entry is None:
            raise BadInput(f"{file.path}: no optimizer state (saved with --no-save-optim)")
        if isinstance(entry, dict) and TRAINER_ENTRY in entry:
            raise Unsupported(f"{file.path}: the optimizer entry is ckptkit's trainer's own "
                              f"(optimizer.{TRAINER_ENTRY}), which that trainer alone resumes")
        expected = 2 if self.chained else 1
        entries = entry if isinstance(entry, list) else [entry]
        if len(entries) != expected:
            what = "the experts' and the others'" if self.chained else "one"
            raise Unsupported(f"{file.path}: {len(entries)} chained optimizers; expected {expected} ({what})")
        return entries

    # -- files

    def _rank_path(self, tp_rank: int, pp_stage: int, name: str, ep_rank: int = 0) -> Path:
        return self.folder / rank_dir_name(tp_rank, pp_stage, self.pp, ep_rank, self.ep) / name

    def _rank_file(self, tp_rank: int, pp_stage: int, ep_rank: int = 0) -> MetaFile:
        key = (tp_rank, pp_stage, ep_rank)
        if key not in self._rank_files:
            self._rank_files[key] = MetaFile(self._rank_path(tp_rank, pp_stage, RANK_FILE, ep_rank),
                                             trust_remote_pickle=self.trust_remote_pickle)
        return self._rank_files[key]

    def _buffer_file(self, tp_rank: int, pp_stage: int, ep_rank: int = 0) -> DistribOptimFile:
        key = (tp_rank, pp_stage, ep_rank)
        if key not in self._buffer_files:
            path = self._rank_path(tp_rank, pp_stage, FILE_NAME, ep_rank)
            if not path.is_file():
                raise BadInput(f"{path}: missing; the optimizer entry of {RANK_FILE} is the distributed "
                               "optimizer's, whose state is there")
            self._buffer_files[key] = DistribOptimFile(path, self._layouts[key], self.settings.buffer_key,
                                                       trust_remote_pickle=self.trust_remote_pickle, ep_rank=ep_rank)
        return self._buffer_files[key]

    # -- what is not per weight

    def _read_info(self, first: MetaFile, entries: list) -> OptimizerInfo:
        where = first.path
        groups, steps = [], set()
        for entry in entries:
            mixed = isinstance(entry, dict) and "optimizer" in entry
            inner = entry["optimizer"] if mixed else entry
            if not isinstance(inner, dict) or not isinstance(inner.get("param_groups"), list):
                raise BadInput(f"{where}: 'optimizer' entry has no param_groups (found {type(inner).__name__})")
            part_groups = [dict(group) for group in inner["param_groups"]]
            if self.distributed:
                steps |= {group.pop("step", None) for group in part_groups}
            else:
                state = inner.get("state") or {}
                if not state:
                    raise BadInput(f"{where}: the optimizer entry holds no state (a fresh optimizer: the files were "
                                   "written without the optimizer, e.g. by --ckpt-convert-format)")
                steps |= {float(first.read(value["step"]).item()) if isinstance(value.get("step"), torch.Tensor)
                          else value.get("step") for value in state.values()}
                steps |= {group.pop("step") for group in part_groups if "step" in group}
            groups += part_groups
        entry = entries[0]
        mixed = isinstance(entry, dict) and "optimizer" in entry
        for group in groups:
            group.pop("params", None)
        steps.discard(None)
        if len(steps) != 1:
            raise BadInput(f"{where}: optimizer steps {sorted(steps)}; expected one common step")
        scheduler = first.state.get("opt_param_scheduler")
        training = {key: first.state[key] for key in ("num_floating_point_operations_so_far",) if key in first.state}
        return OptimizerInfo(
            kind="distributed" if self.distributed else "non-distributed", step=steps.pop(), param_groups=groups,
            grad_scaler=first.materialize(entry.get("grad_scaler")) if mixed else None,
            opt_param_scheduler=first.materialize(scheduler) if scheduler is not None else None, training=training,
            source={"format": "torch", "tp": self.tp, "pp": self.pp, "vpp": self.vpp, "ep": self.ep,
                    "dp": self.settings.dp, "param_dtype": str(self.settings.param_dtype).removeprefix("torch.")},
            resume_args={name: getattr(self.weights.meta.args, name) for name in RESUME_CHECKED_ARGS
                         if getattr(self.weights.meta.args, name, None) is not None})

    def _state_indices(self, tp_rank: int, pp_stage: int,
                       ep_rank: int) -> dict[tuple[int, str], tuple[int, int, int, int]]:
        """(chunk, parameter name) -> (chained optimizer, Adam state index, group, position in
        group), checked against the ``params`` lists the file's groups hold. Each chained
        optimizer numbers its own parameters."""
        file = self._rank_file(tp_rank, pp_stage, ep_rank)
        indices = {}
        for part, entry in enumerate(self._entries(file, file.state.get("optimizer"))):
            inner = entry["optimizer"] if "optimizer" in entry else entry
            groups = inner["param_groups"]
            members = [[] for _ in groups]
            for chunk in range(self.vpp):
                for parameter in self._parameters[(tp_rank, pp_stage, ep_rank, chunk)]:
                    if parameter.expert == bool(part):
                        members[group_index(parameter, groups, file.path)].append((chunk, parameter))
            first_index = 0
            for group, (saved, listed) in enumerate(zip(groups, members)):
                expected = list(range(first_index, first_index + len(listed)))
                if list(saved.get("params", [])) != expected:
                    raise BadInput(f"{file.path}: optimizer group {group} lists parameters "
                                   f"{_short(saved.get('params'))}; this rank's {len(listed)} parameters of that "
                                   f"group would be {_short(expected)}")
                for position, (chunk, parameter) in enumerate(listed):
                    indices[(chunk, parameter.name)] = (part, first_index + position, group, position)
                first_index += len(listed)
        return indices

    # -- per weight

    def _pieces(self, tp_rank: int, pp_stage: int, chunk: int, position: int,
                keys: tuple[str, ...] = STATE_KEYS, ep_rank: int = 0) -> dict[str, torch.Tensor]:
        rank = (tp_rank, pp_stage, ep_rank)
        parameter = self._parameters[(*rank, chunk)][position]
        if self.distributed:
            part, buffer, slot = self._layouts[rank].slot(chunk, parameter.name)
            stored = self._buffer_file(*rank)
            start = buffer.stored_offset(slot)
            return {key: stored.read(chunk, key, start, parameter.numel, part).view(parameter.shape) for key in keys}
        file = self._rank_file(*rank)
        part, index, group, group_position = self._indices[rank][(chunk, parameter.name)]
        entry = self._entries(file, file.state["optimizer"])[part]
        inner = entry["optimizer"] if "optimizer" in entry else entry
        adam = inner["state"].get(index)
        if adam is None:
            raise BadInput(f"{file.path}: no optimizer state for parameter {index} ({parameter.name})")
        if "fp32_from_fp16_params" in entry:
            master = entry["fp32_from_fp16_params"][group][group_position]
        else:
            master = _model_chunks(file.state, self.vpp)[chunk][parameter.name]
        pieces = {key: master if key == "param" else adam.get(key) for key in keys}
        for key, stored in pieces.items():
            if not isinstance(stored, torch.Tensor) or tuple(stored.shape) != parameter.shape:
                found = tuple(stored.shape) if isinstance(stored, torch.Tensor) else type(stored).__name__
                raise BadInput(f"{file.path}: {key} of {parameter.name} (optimizer parameter {index}) is {found}; "
                               f"expected {parameter.shape}")
        return {key: file.read(stored).to(torch.float32) for key, stored in pieces.items()}

    def rank_extras(self, tp_rank: int, pp_stage: int, ep_rank: int = 0) -> dict:
        """What else rank (``tp_rank``, ``pp_stage``, ``ep_rank``) saved for resuming that
        belongs to that rank: ``rng_state``; carried only to the same rank of the same layout."""
        file = self._rank_file(tp_rank, pp_stage, ep_rank)
        return {key: file.materialize(file.state[key]) for key in ("rng_state",) if key in file.state}

    def tensor(self, name: str, keys: tuple[str, ...] = STATE_KEYS) -> dict[str, torch.Tensor]:
        if name not in self._where:
            raise BadInput(f"{self.folder}: no canonical tensor {name}")
        pp_stage, chunk, position, ep_rank = self._where[name]
        return assemble(self.spec, self._canonical[name], self.padded_vocab_size, self.tp,
                        lambda tp_rank: self._pieces(tp_rank, pp_stage, chunk, position, keys, ep_rank), keys)

    def close(self) -> None:
        for file in [*self._rank_files.values(), *self._buffer_files.values()]:
            file.close()
        self._rank_files.clear()
        self._buffer_files.clear()
        if self.owns_weights:
            self.weights.close()


def _short(values) -> str:
    values = list(values or [])
    return str(values) if len(values) <= 6 else f"[{values[0]}, {values[1]}, ..., {values[-1]}] ({len(values)})"
