"""Optimizer state in Megatron's ``torch_dist`` checkpoints (distributed optimizer).

The sharding type is the common state's ``content_metadata["distrib_optim_sharding_type"]``
(also ``optimizer["param_state_sharding_type"]``). Both types Megatron writes by default
or on request are read, checked on real Megatron-LM checkpoints
(``tests/fixtures/gpt2do_dist_tp1dp2``):

* ``dp_reshardable`` (the default, ``sharded_param_state_dp_reshardable``): per model-parallel
  domain ``G`` (the rank in Megatron's TP x PP group, ``tp_rank + TP x pp_stage``, see
  :func:`model_parallel_domain`), model chunk ``i`` (``gbuf_idx``: one buffer per virtual
  chunk) and bucket ``b``, one global 1-D tensor per state key::

      optimizer.distributed.dp_group_idx_G.gbuf_idx_i.dtype_(PARAM, GRAD).bucket_idx_b.{param,exp_avg,exp_avg_sq}

  of the bucket's ``numel_unpadded`` elements, each parameter at its place in the bucket
  (:mod:`.buffers`: 64-element aligned starts, reverse order; the gaps hold no data worth
  keeping), chunked per parameter and per DP shard. Bytes entries
  ``optimizer.distributed.dp_group_idx_G.{optimizer,per_bucket_numel,per_bucket_numel_unpadded}``
  hold the param groups (with the step) and the bucket sizes, which are checked against
  the layout computed from the args.
* ``fully_reshardable`` (``--dist-ckpt-optim-fully-reshardable``): model space,
  ``optimizer.state.{param,exp_avg,exp_avg_sq}.MODEL_KEY`` with the model key's global
  shape and chunks (stacked over layers); the param groups are in the common state's
  ``optimizer["optimizer"]``.
* ``plain``, the non-distributed optimizer (no ``--use-distributed-optimizer``; no sharding
  type is stored): model space too, ``optimizer.state.{exp_avg,exp_avg_sq}.MODEL_KEY``;
  an fp32 model's weights are its masters; the common state's ``optimizer`` holds the
  param groups (without ``step``) and ``state: {"common_step": tensor(step)}``. Checked on a
  real fp32 checkpoint (``gpt2o_dist_plain_tp2``); bf16/fp16 models keep their masters as
  ``optimizer.state.fp32_param.MODEL_KEY`` (Megatron's ``Float16OptimizerWithFloat16Params``),
  which no real checkpoint here shows, so they are refused.

Every canonical tensor is read alone, as region reads of the entries above.
"""
from __future__ import annotations

import torch

from ..errors import BadInput, Unsupported
from ..layouts.torch_dist.keys import is_optimizer_key
from ..spec import canonical_tensors
from .buffers import BufferSettings
from .distrib_optim import rank_layout
from .state import RESUME_CHECKED_ARGS, STATE_KEYS, OptimizerInfo, OptimizerState, assemble

SHARDING_TYPES = ("dp_reshardable", "fully_reshardable")
PLAIN = "plain"  # the non-distributed optimizer
# Model-space state keys of each type, and where the fp32 masters are
MODEL_SPACE_KEYS = {"fully_reshardable": STATE_KEYS, PLAIN: ("exp_avg", "exp_avg_sq")}
DP_PREFIX = "optimizer.distributed.dp_group_idx_{group}"


def sharding_type(common_state: dict) -> str | None:
    content = common_state.get("content_metadata") or {}
    kind = content.get("distrib_optim_sharding_type") if isinstance(content, dict) else None
    optimizer = common_state.get("optimizer")
    if kind is None and isinstance(optimizer, dict):
        kind = optimizer.get("param_state_sharding_type")
    return kind


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype)


def bucket_key(group: int, chunk: int, buffer_key, bucket: int) -> str:
    """The stored key (without ``.{state key}``) of one bucket in ``dp_reshardable``."""
    param_dtype, grad_dtype = buffer_key
    return (f"{DP_PREFIX.format(group=group)}.gbuf_idx_{chunk}.dtype_({_dtype_name(param_dtype)}, "
            f"{_dtype_name(grad_dtype)}).bucket_idx_{bucket}")


def model_parallel_domain(tp: int, tp_rank: int, pp_stage: int) -> int:
    """``G`` of rank (``tp_rank``, ``pp_stage``): its rank in Megatron's model-parallel group
    (``get_pg_rank(mp_group)`` in megatron/core/optimizer/__init__.py). The group's ranks are
    ordered TP fastest, then PP (``RankGenerator`` with the default order tp-cp-ep-dp-pp).

    TP=2 PP=2: ``(tp_rank, pp_stage)`` (0, 0) -> 0, (1, 0) -> 1, (0, 1) -> 2, (1, 1) -> 3.
    """
    return tp_rank + tp * pp_stage


class TorchDistOptimizerState(OptimizerState):
    """The canonical optimizer state of a Megatron ``torch_dist`` checkpoint, read through its
    weight reader (a :class:`ckptkit.layouts.torch_dist.TorchDistReader`)."""

    owns_weights = False

    def __init__(self, weights, *, trust_remote_pickle: bool = False):
        from ..layouts.torch_dist.regions import _read_regions

        self._read_regions = _read_regions
        meta = weights.meta
        self.weights, self.spec, self.padded_vocab_size = weights, weights.spec, meta.padded_vocab_size
        self.folder = weights.folder
        self.trust_remote_pickle = trust_remote_pickle
        self.stored = weights.metadata.state_dict_metadata
        self._canonical = {tensor.name: tensor for tensor in canonical_tensors(self.spec)}
        common = weights.common_state
        optimizer_keys = [key for key in self.stored if is_optimizer_key(key)]
        if not optimizer_keys:
            raise BadInput(f"{self.folder}: no optimizer state (saved with --no-save-optim)")
        self.sharding = sharding_type(common)
        if self.sharding is None and not getattr(meta.args, "use_distributed_optimizer", False):
            self.sharding = PLAIN
            if meta.dtype != torch.float32:
                raise Unsupported(f"{self.folder}: the non-distributed optimizer of a {meta.dtype} torch_dist "
                                  "checkpoint (masters as optimizer.state.fp32_param.*) is not read: no real "
                                  "checkpoint of that kind has been checked")
        if self.sharding not in (*SHARDING_TYPES, PLAIN):
            raise Unsupported(f"{self.folder}: distributed optimizer sharding type {self.sharding!r}; ckptkit reads "
                              f"{' and '.join(SHARDING_TYPES)}")
        if self.spec.num_experts:
            raise Unsupported(f"{self.folder}: optimizer state of mixtures of experts is not supported")
        self.settings = BufferSettings.from_args(meta.args, param_dtype=meta.dtype)
        where = f"{self.folder}: {self.sharding} optimizer state"
        common_step = None
        if self.sharding == "dp_reshardable":
            groups = self._read_dp_reshardable(meta, where)
        elif self.sharding == PLAIN:
            entry = common.get("optimizer")
            groups = entry.get("param_groups") if isinstance(entry, dict) else None
            state = entry.get("state") if isinstance(entry, dict) else None
            common_step = state.get("common_step") if isinstance(state, dict) else None
            if common_step is None:
                raise BadInput(f"{where}: no common_step in the common state's optimizer entry")
            common_step = float(common_step)
        else:
            entry = common.get("optimizer")
            inner = entry.get("optimizer") if isinstance(entry, dict) else None
            groups = inner.get("param_groups") if isinstance(inner, dict) else None
        if not isinstance(groups, list) or not groups:
            raise BadInput(f"{where}: no param_groups")
        groups = [dict(group) for group in groups]
        steps = {group.pop("step", None) for group in groups} | {common_step}
        for group in groups:
            group.pop("params", None)
        steps.discard(None)
        if len(steps) != 1:
            raise BadInput(f"{where}: optimizer steps {sorted(steps)}; expected one common step")
        self.info = OptimizerInfo(
            kind="non-distributed" if self.sharding == PLAIN else "distributed", step=steps.pop(),
            param_groups=groups, grad_scaler=None,
            opt_param_scheduler=common.get("opt_param_scheduler"),
            training={key: common[key] for key in ("num_floating_point_operations_so_far",) if key in common},
            source={"format": "torch_dist", "sharding": self.sharding, "tp": meta.tp, "pp": meta.pp, "vpp": meta.vpp,
                    "dp": self.settings.dp, "param_dtype": str(self.settings.param_dtype).removeprefix("torch.")},
            resume_args={name: getattr(meta.args, name) for name in RESUME_CHECKED_ARGS
                         if getattr(meta.args, name, None) is not None})

    def _bytes_key(self, key: str) -> str:
        found = [stored for stored in self.stored if stored.split("/shard_")[0] == key]
        if len(found) != 1:
            raise BadInput(f"{self.folder}: expected one bytes entry {key}/shard_*, found {len(found)}")
        return found[0]

    def _read_dp_reshardable(self, meta, where: str) -> list:
        """Every model-parallel domain's layout checked against its stored buckets; the
        param groups of domain 0 (every domain holds the same groups and step)."""
        from ..layouts.torch_dist import load_pickled_bytes

        self.tp, self.pp, self.vpp = meta.tp, meta.pp, meta.vpp
        self._layouts, self._where, groups = {}, {}, None
        for pp_stage in range(meta.pp):
            for tp_rank in range(meta.tp):
                domain = model_parallel_domain(meta.tp, tp_rank, pp_stage)
                layout = rank_layout(self.spec, tp=meta.tp, tp_rank=tp_rank, pp=meta.pp, pp_stage=pp_stage,
                                     vpp=meta.vpp, padded_vocab_size=self.padded_vocab_size, settings=self.settings,
                                     naming=meta.naming)
                self._layouts[(tp_rank, pp_stage)] = layout
                prefix = DP_PREFIX.format(group=domain)
                byte_keys = {name: self._bytes_key(f"{prefix}.{name}")
                             for name in ("optimizer", "per_bucket_numel", "per_bucket_numel_unpadded")}
                raw = self._read_regions(self.weights.files, [], list(byte_keys.values()))
                loaded = {name: _unwrap(load_pickled_bytes(raw[key], f"{self.folder}: {key}",
                                                           trust_remote_pickle=self.trust_remote_pickle))
                          for name, key in byte_keys.items()}
                rank_where = f"{where} of TP rank {tp_rank}, PP stage {pp_stage} ({prefix})"
                self._check_buckets(domain, layout, loaded["per_bucket_numel"], loaded["per_bucket_numel_unpadded"],
                                    rank_where)
                rank_groups = loaded["optimizer"].get("param_groups") if isinstance(loaded["optimizer"], dict) else None
                if groups is None:
                    groups = rank_groups
                elif _steps(rank_groups) != _steps(groups):
                    raise BadInput(f"{rank_where}: optimizer steps {_steps(rank_groups)}; domain 0 has {_steps(groups)}")
                if tp_rank == 0:
                    for chunk, buffer in enumerate(layout.buffers):
                        for slot in buffer.slots:
                            if not slot.parameter.tied_copy:
                                self._where[slot.parameter.canonical] = (pp_stage, chunk, slot.parameter.name)
        return groups

    def _check_buckets(self, domain: int, layout, numel, unpadded, where: str) -> None:
        key = self.settings.buffer_key
        for chunk, buffer in enumerate(layout.buffers):
            expected_unpadded = [bucket.numel_unpadded for bucket in buffer.buckets]
            expected_numel = [bucket.numel for bucket in buffer.buckets]
            try:
                found_unpadded = list(unpadded[chunk][key])
                found_numel = list(numel[chunk][key])
            except (KeyError, IndexError, TypeError):
                raise BadInput(f"{where}: per_bucket_numel has no buffer {key} of model chunk {chunk} "
                               f"(found {unpadded!r:.200})") from None
            if found_unpadded != expected_unpadded or found_numel != expected_numel:
                raise BadInput(f"{where}: model chunk {chunk} has buckets of {found_numel} elements ({found_unpadded} "
                               f"unpadded); the args give {expected_numel} ({expected_unpadded})")
            for bucket in buffer.buckets:
                for state_key in STATE_KEYS:
                    name = f"{bucket_key(domain, chunk, key, bucket.index)}.{state_key}"
                    entry = self.stored.get(name)
                    if entry is None or tuple(getattr(entry, "size", ())) != (bucket.numel_unpadded,):
                        found = "missing" if entry is None else f"of shape {tuple(getattr(entry, 'size', ()))}"
                        raise BadInput(f"{where}: {name} {found}; expected ({bucket.numel_unpadded},)")

    def _bucket_pieces(self, tp_rank: int, pp_stage: int, chunk: int, parameter_name: str,
                       keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """One TP rank's piece of a parameter's state, read from its domain's bucket tensors."""
        from ..layouts.torch_dist.regions import _Region

        buffer = self._layouts[(tp_rank, pp_stage)].buffers[chunk]
        slot = next(slot for slot in buffer.slots if slot.parameter.name == parameter_name)
        bucket = buffer.buckets[slot.bucket]
        domain = model_parallel_domain(self.tp, tp_rank, pp_stage)
        regions, out = [], {}
        for key in keys:
            target = torch.empty(slot.parameter.numel, dtype=torch.float32)
            regions.append(_Region(f"{bucket_key(domain, chunk, self.settings.buffer_key, bucket.index)}.{key}",
                                   (slot.start - bucket.start,), (slot.parameter.numel,), target))
            out[key] = target.view(slot.parameter.shape)
        self._check_float32(regions)
        self._read_regions(self.weights.files, regions)
        return out

    def _check_float32(self, regions) -> None:
        for region in regions:
            dtype = self.stored[region.key].properties.dtype
            if dtype != torch.float32:
                raise Unsupported(f"{self.folder}: {region.key} is {dtype}; fp32 optimizer state is expected")

    def tensor(self, name: str, keys: tuple[str, ...] = STATE_KEYS) -> dict[str, torch.Tensor]:
        from ..layouts.torch_dist.regions import _Region

        if name not in self._canonical:
            raise BadInput(f"{self.folder}: no canonical tensor {name}")
        if self.sharding == "dp_reshardable":
            if name not in self._where:
                raise BadInput(f"{self.folder}: {name} is not in the optimizer's buffers")
            pp_stage, chunk, parameter_name = self._where[name]
            return assemble(self.spec, self._canonical[name], self.padded_vocab_size, self.tp,
                            lambda tp_rank: self._bucket_pieces(tp_rank, pp_stage, chunk, parameter_name, keys), keys)
        regions, out = [], {}
        place = self.weights.stored_place(name)
        if self.sharding == PLAIN and "param" in keys:  # an fp32 model's weights are its masters
            out["param"] = self.weights.tensor(name).to(torch.float32)
        for key in (key for key in keys if key in MODEL_SPACE_KEYS[self.sharding]):
            stored_key = f"optimizer.state.{key}.{place.key}"
            entry = self.stored.get(stored_key)
            if entry is None:
                raise BadInput(f"{self.folder}: {stored_key} missing (needed for {name})")
            model_entry = self.stored[place.key]
            if tuple(entry.size) != tuple(model_entry.size):
                raise BadInput(f"{self.folder}: {stored_key} has global shape {tuple(entry.size)}; the weight "
                               f"{place.key} has {tuple(model_entry.size)}")
            shape = tuple(entry.size)[len(place.index):]
            offsets, sizes = place.box((0,) * len(shape), shape)
            target = torch.empty(sizes, dtype=torch.float32)
            regions.append(_Region(stored_key, offsets, sizes, target))
            out[key] = target.view(shape)
        self._check_float32(regions)
        self._read_regions(self.weights.files, regions)
        return {key: out[key] for key in keys}

    def close(self) -> None:
        if self.owns_weights:
            self.weights.close()


def _steps(groups) -> set:
    return {group.get("step") for group in groups or [] if isinstance(group, dict)}


def _unwrap(loaded):
    """ShardedObjects are stored as ``torch.save([data])``."""
    return loaded[0] if isinstance(loaded, list) and len(loaded) == 1 else loaded


class DpReshardableEntries:
    """What a ``torch_dist`` checkpoint written by :func:`ckptkit.layouts.torch_dist.write`
    needs to hold ``state`` as Megatron's ``dp_reshardable`` distributed optimizer at TP
    ``tp``, PP ``pp``, VPP ``vpp`` and DP ``dp``: for every model-parallel domain, the bucket
    tensors chunked as Megatron chunks them (one chunk per parameter piece of each DP shard
    and per gap, gaps written as zeros), its bytes entries; the common state's optimizer
    entries and the args.

    Data is produced per write item. The items go parameter by parameter, each parameter's
    TP pieces side by side, so one canonical tensor's state is kept at a time.
    """

    def __init__(self, state: OptimizerState, spec, *, padded_vocab_size: int, dp: int, args=None,
                 param_dtype: torch.dtype = torch.float32, naming: str = "mcore-local", tp: int = 1, pp: int = 1,
                 vpp: int = 1):
        from ..layouts.torch_dist.write import _pickled, _tensor_item

        if spec.num_experts:
            raise Unsupported("optimizer state of mixtures of experts is not supported")
        self.state, self.spec, self.padded, self.tp = state, spec, padded_vocab_size, tp
        settings = BufferSettings.from_args(args, dp=dp, param_dtype=param_dtype) if args is not None \
            else BufferSettings(dp=dp, param_dtype=param_dtype)
        self.settings = settings
        buffer_key = settings.buffer_key
        info = state.info
        groups = [{**group, "step": info.step} for group in info.param_groups]
        self.items, self._chunks, self.payloads = [], {}, {}
        for pp_stage in range(pp):
            layouts = [rank_layout(spec, tp=tp, tp_rank=tp_rank, pp=pp, pp_stage=pp_stage, vpp=vpp,
                                   padded_vocab_size=padded_vocab_size, settings=settings, naming=naming)
                       for tp_rank in range(tp)]
            for tp_rank, layout in enumerate(layouts):
                prefix = DP_PREFIX.format(group=model_parallel_domain(tp, tp_rank, pp_stage))
                per_bucket = [{buffer_key: [bucket.numel for bucket in buffer.buckets]} for buffer in layout.buffers]
                unpadded = [{buffer_key: [bucket.numel_unpadded for bucket in buffer.buckets]}
                            for buffer in layout.buffers]
                self.payloads.update({f"{prefix}.optimizer/shard_0_1": _pickled([{"param_groups": groups}]),
                                      f"{prefix}.per_bucket_numel/shard_0_1": _pickled([per_bucket]),
                                      f"{prefix}.per_bucket_numel_unpadded/shard_0_1": _pickled([unpadded])})
            # TP ranks of a stage hold pieces of the same shapes in the same order: one set of cuts
            for chunk, buffer in enumerate(layouts[0].buffers):
                for bucket in buffer.buckets:
                    for low, high, owner in _bucket_chunks(buffer, bucket, dp):
                        for key in STATE_KEYS:
                            for tp_rank in range(tp):
                                domain = model_parallel_domain(tp, tp_rank, pp_stage)
                                name = bucket_key(domain, chunk, buffer_key, bucket.index)
                                item = _tensor_item(f"{name}.{key}", (bucket.numel_unpadded,), (low,), (high - low,),
                                                    torch.float32)
                                self.items.append(item)
                                start = None if owner is None else low - (owner.start - bucket.start)
                                self._chunks[item.index] = (owner, tp_rank, key, start, high - low)
        self.common = {"optimizer": {"param_state_sharding_type": "dp_reshardable"}}
        if info.opt_param_scheduler is not None:
            self.common["opt_param_scheduler"] = info.opt_param_scheduler
        self.common.update(info.training)
        self.content_metadata = {"distrib_optim_sharding_type": "dp_reshardable"}
        self.args_fields = {"use_distributed_optimizer": True, "data_parallel_size": dp, "no_save_optim": None,
                            **info.resume_args}
        self._current: tuple[str | None, dict | None] = (None, None)

    def _values(self, canonical: str, rule_name: str) -> dict[str, torch.Tensor]:
        """The full state tensors of ``canonical``, fitted to the target's vocabulary padding."""
        from ..spec import rule_for

        if self._current[0] != canonical:
            self._current = (None, None)
            rule = rule_for(self.spec, rule_name, self.padded)
            values = {key: rule.fit(value) for key, value in self.state.tensor(canonical).items()}
            self._current = (canonical, values)
        return self._current[1]

    def resolve(self, write_item) -> torch.Tensor:
        from ..spec import rule_for

        owner, tp_rank, key, start, size = self._chunks[write_item.index]
        if owner is None:
            return torch.zeros(size, dtype=torch.float32)
        parameter = owner.parameter
        full = self._values(parameter.canonical, parameter.rule)[key]
        piece = rule_for(self.spec, parameter.rule, self.padded).shard(full, self.tp, tp_rank).reshape(-1)
        if piece.numel() != parameter.numel:
            raise BadInput(f"{parameter.canonical}: TP rank {tp_rank} gets {piece.numel()} state elements; the "
                           f"target's parameter {parameter.name} has {parameter.numel}")
        return piece[start: start + size].clone()


def _bucket_chunks(buffer, bucket, dp: int) -> list[tuple[int, int, object]]:
    """The chunks Megatron stores of one bucket tensor, as (start, end, slot or None for a
    gap) in the bucket: cut at every parameter's ends and every DP shard's start, up to the
    bucket's unpadded end.

    Parameters ``b`` [0, 3) and ``w`` [64, 70), DP 2 (shards of 64): (0, 3, b), (3, 64, gap),
    (64, 70, w).
    """
    slots = [slot for slot in buffer.slots if slot.bucket == bucket.index]
    local = bucket.numel // dp
    cuts = {0, bucket.numel_unpadded}
    cuts |= {rank * local for rank in range(dp) if rank * local < bucket.numel_unpadded}
    for slot in slots:
        cuts |= {slot.start - bucket.start, slot.end - bucket.start}
    cuts = sorted(cut for cut in cuts if cut <= bucket.numel_unpadded)
    chunks = []
    for low, high in zip(cuts, cuts[1:]):
        owner = next((slot for slot in slots if slot.start - bucket.start <= low < slot.end - bucket.start), None)
        chunks.append((low, high, owner))
    return chunks


class ModelSpaceEntries:
    """What a ``torch_dist`` checkpoint written by :func:`ckptkit.layouts.torch_dist.write`
    needs to hold ``state`` in model space: the distributed optimizer's
    ``fully_reshardable`` type, or the non-distributed optimizer (``plain``, fp32 models:
    the weights are the masters). Each state key gets the chunks of the model key it
    belongs to::

        decoder.layers.self_attention.linear_qkv.weight          [L, 3h, h], a chunk per layer and TP rank
        optimizer.state.exp_avg.decoder.layers.self_attention.linear_qkv.weight   the same chunks, fp32

    Data is produced per write item, one canonical tensor's state kept at a time.
    """

    def __init__(self, state: OptimizerState, spec, *, sharding: str, padded_vocab_size: int, dp: int, tp: int,
                 etp: int | None = None, naming: str = "mcore-local", param_dtype: torch.dtype = torch.float32):
        from ..layouts.torch_dist.write import _tensor_item, plan_items

        if spec.num_experts:
            raise Unsupported("optimizer state of mixtures of experts is not supported")
        if sharding == PLAIN and param_dtype != torch.float32:
            raise Unsupported(f"the non-distributed optimizer of a {param_dtype} torch_dist checkpoint is not "
                              "written: its layout (optimizer.state.fp32_param.*) is not checked on a real "
                              "checkpoint (write --format torch, or --distributed-optimizer)")
        self.state, self.spec, self.padded = state, spec, padded_vocab_size
        self.keys = MODEL_SPACE_KEYS[sharding]
        self._canonical = {tensor.name: tensor for tensor in state.canonical()}
        model_items, model_sources = plan_items(spec, tp, padded_vocab_size, torch.float32, etp=etp, naming=naming)
        self.items, self._sources = [], {}
        for model_item in model_items:
            data = model_item.tensor_data
            for key in self.keys:
                item = _tensor_item(f"optimizer.state.{key}.{model_item.index.fqn}", tuple(data.size),
                                    tuple(data.chunk.offsets), tuple(data.chunk.sizes), torch.float32)
                self.items.append(item)
                self._sources[item.index] = (model_sources[model_item.index], key, len(data.size))
        info = state.info
        self.payloads = {}
        if sharding == PLAIN:
            self.common = {"optimizer": {"param_groups": [dict(group) for group in info.param_groups],
                                         "state": {"common_step": torch.tensor(float(info.step))}}}
            self.content_metadata = {}
            self.args_fields = {"use_distributed_optimizer": False, "data_parallel_size": dp, "no_save_optim": None,
                                "dist_ckpt_optim_fully_reshardable": False, **info.resume_args}
        else:
            groups = [{**group, "step": info.step} for group in info.param_groups]
            self.common = {"optimizer": {"optimizer": {"param_groups": groups},
                                         "param_state_sharding_type": "fully_reshardable"}}
            self.content_metadata = {"distrib_optim_sharding_type": "fully_reshardable",
                                     "distrib_optim_fully_reshardable_mem_efficient": False}
            self.args_fields = {"use_distributed_optimizer": True, "data_parallel_size": dp, "no_save_optim": None,
                                "dist_ckpt_optim_fully_reshardable": True, **info.resume_args}
        if info.opt_param_scheduler is not None:
            self.common["opt_param_scheduler"] = info.opt_param_scheduler
        self.common.update(info.training)
        self._current: tuple[str | None, dict | None] = (None, None)

    def resolve(self, write_item) -> torch.Tensor:
        from ..spec import rule_for

        chunk, key, dims = self._sources[write_item.index]
        if self._current[0] != chunk.canonical:
            self._current = (None, None)
            rule = rule_for(self.spec, self._canonical[chunk.canonical].rule, self.padded)
            values = {name: rule.fit(value) for name, value in self.state.tensor(chunk.canonical, self.keys).items()}
            self._current = (chunk.canonical, values)
        piece = self._current[1][key]
        for dim, (offset, size) in enumerate(zip(chunk.offsets, chunk.sizes)):
            piece = piece.narrow(dim, offset, size)
        piece = piece.clone()
        for _ in range(dims - len(chunk.sizes)):
            piece = piece.unsqueeze(0)  # the layer and expert axes of a stacked key
        return piece
