"""Optimizer state in Megatron's ``torch_dist`` checkpoints (distributed optimizer).

The sharding type is the common state's ``content_metadata["distrib_optim_sharding_type"]``
(also ``optimizer["param_state_sharding_type"]``). Every type Megatron writes by default
or on request is read, checked on real Megatron-LM checkpoints:

* ``dp_reshardable`` (the default): the distributed optimizer's buckets, one global 1-D tensor
  per bucket and state key, named by model-parallel domain (:mod:`.dp_reshardable`); the
  param groups with the step and the bucket sizes, checked against the layout computed from
  the args, in bytes entries per domain. Checked on real TP1 DP2 and TP2 PP2 checkpoints,
  and on a mixture of experts at EP2 (two chained optimizers, the experts' apart).
* ``fully_reshardable`` (``--dist-ckpt-optim-fully-reshardable``): model space,
  ``optimizer.state.{param,exp_avg,exp_avg_sq}.MODEL_KEY`` with the model key's global
  shape and chunks (stacked over layers); the param groups are in the common state's
  ``optimizer["optimizer"]``.
* ``plain``, the non-distributed optimizer (no ``--use-distributed-optimizer``; no sharding
  type is stored): model space too, ``optimizer.state.{exp_avg,exp_avg_sq}.MODEL_KEY``;
  an fp32 model's weights are its masters, a bf16 model's are
  ``optimizer.state.fp32_param.MODEL_KEY`` (Megatron's ``Float16OptimizerWithFloat16Params``).
  The common state's ``optimizer`` holds the param groups (without ``step``) and
  ``state: {"common_step": tensor(step)}``, one level down (``optimizer["optimizer"]``) for
  bf16. Checked on real fp32 and bf16 checkpoints; fp16 (a grad scaler besides) is refused.

Every canonical tensor is read alone, as region reads of the entries above.
"""
from __future__ import annotations

import torch

from ..errors import BadInput, Unsupported
from ..layouts.torch_dist.keys import is_optimizer_key
from ..spec import canonical_tensors
from .buffers import BufferSettings
from .dp_reshardable import PER_DOMAIN_OBJECTS, domains
from .state import RESUME_CHECKED_ARGS, STATE_KEYS, OptimizerInfo, OptimizerState, assemble

SHARDING_TYPES = ("dp_reshardable", "fully_reshardable")
PLAIN = "plain"  # the non-distributed optimizer
# Model-space state keys of each type, and where the fp32 masters are
MODEL_SPACE_KEYS = {"fully_reshardable": STATE_KEYS, PLAIN: ("exp_avg", "exp_avg_sq")}
# How each state key is spelled in model space: masters are "fp32_param" in the plain
# optimizer of a bf16 model (its fp32 model's weights are the masters)
MIXED_PLAIN_KEYS = {"param": "fp32_param", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}
# A parameter whose module the model saves under two names has its model-space state under one:
# the name Megatron's model sharded state dict meets last (get_param_id_to_sharded_param_map,
# megatron/core/dist_checkpointing/optimizer.py, keeps the last key per parameter). T5Model's
# children come as embedding, position_embeddings, ..., lm_head, output_layer, so its position
# embeddings' state is under position_embeddings., its output bias's under output_layer.: Megatron-LM
# loading a T5 fully_reshardable checkpoint with both asked for these and reported the others
# as keys it does not load. model kind -> {a model key's prefix: the prefix of its state's key}
MODEL_SPACE_NAMES = {"encoder_decoder": {"embedding.position_embeddings.": "position_embeddings.",
                                         "lm_head.output_layer.": "output_layer."}}


def model_space_key(model_kind: str, model_key: str) -> str:
    """The model key under which Megatron keeps ``model_key``'s model-space optimizer state.

    >>> model_space_key("encoder_decoder", "lm_head.output_layer.bias")
    'output_layer.bias'
    """
    for prefix, used in MODEL_SPACE_NAMES.get(model_kind, {}).items():
        if model_key.startswith(prefix):
            return used + model_key[len(prefix):]
    return model_key


def sharding_type(common_state: dict) -> str | None:
    content = common_state.get("content_metadata") or {}
    kind = content.get("distrib_optim_sharding_type") if isinstance(content, dict) else None
    optimizer = common_state.get("optimizer")
    if kind is None and isinstance(optimizer, dict):
        kind = optimizer.get("param_state_sharding_type")
    return kind


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
            if meta.dtype == torch.float16:
                raise Unsupported(f"{self.folder}: the non-distributed optimizer of an fp16 torch_dist checkpoint "
                                  "is not read: no real checkpoint of that kind has been checked")
        self.mixed_plain = self.sharding == PLAIN and meta.dtype != torch.float32
        if self.sharding not in (*SHARDING_TYPES, PLAIN):
            raise Unsupported(f"{self.folder}: distributed optimizer sharding type {self.sharding!r}; ckptkit reads "
                              f"{' and '.join(SHARDING_TYPES)}")
        if self.spec.num_experts and self.sharding != "dp_reshardable":
            raise Unsupported(f"{self.folder}: {self.sharding} optimizer state of a mixture of experts is not read "
                              "(no real checkpoint of that kind has been checked; dp_reshardable is)")
        if self.spec.num_experts and meta.etp != meta.tp:
            raise Unsupported(f"{self.folder}: optimizer state of experts cut over an expert TP ({meta.etp}) other "
                              f"than TP ({meta.tp}) is not read")
        self.settings = BufferSettings.from_args(meta.args, param_dtype=meta.dtype)
        where = f"{self.folder}: {self.sharding} optimizer state"
        common_step = None
        if self.sharding == "dp_reshardable":
            groups = self._read_dp_reshardable(meta, where)
        elif self.sharding == PLAIN:
            entry = common.get("optimizer")
            if self.mixed_plain and isinstance(entry, dict):
                entry = entry.get("optimizer")  # Float16OptimizerWithFloat16Params wraps torch's state dict
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
                    "ep": meta.ep,
                    "dp": self.settings.dp, "param_dtype": str(self.settings.param_dtype).removeprefix("torch.")},
            resume_args={name: getattr(meta.args, name) for name in RESUME_CHECKED_ARGS
                         if getattr(meta.args, name, None) is not None})

    def _bytes_key(self, key: str) -> str:
        found = [stored for stored in self.stored if stored.split("/shard_")[0] == key]
        if len(found) != 1:
            raise BadInput(f"{self.folder}: expected one bytes entry {key}/shard_*, found {len(found)}")
        return found[0]

    def _read_dp_reshardable(self, meta, where: str) -> list:
        """Every domain's layout checked against its stored buckets; the param groups of each
        chained optimizer's first domain (its other domains hold the same groups and step)."""
        from ..layouts.torch_dist import load_pickled_bytes

        self.tp = meta.tp
        self._domains = {(domain.part, domain.tp_rank, domain.pp_stage, domain.ep_rank): domain
                         for domain in domains(self.spec, tp=meta.tp, pp=meta.pp, vpp=meta.vpp, ep=meta.ep,
                                               padded_vocab_size=self.padded_vocab_size, settings=self.settings,
                                               naming=meta.naming)}
        self._where, groups, first_groups = {}, [], {}
        for domain in self._domains.values():
            byte_keys = {name: self._bytes_key(domain.object_key(name).split("/shard_")[0])
                         for name in PER_DOMAIN_OBJECTS}
            raw = self._read_regions(self.weights.files, [], list(byte_keys.values()))
            loaded = {name: _unwrap(load_pickled_bytes(raw[key], f"{self.folder}: {key}",
                                                       trust_remote_pickle=self.trust_remote_pickle))
                      for name, key in byte_keys.items()}
            rank_where = (f"{where} of TP rank {domain.tp_rank}, PP stage {domain.pp_stage}"
                          f"{f', EP rank {domain.ep_rank}' if domain.part else ''} ({domain.prefix})")
            self._check_buckets(domain, loaded["per_bucket_numel"], loaded["per_bucket_numel_unpadded"], rank_where)
            rank_groups = loaded["optimizer"].get("param_groups") if isinstance(loaded["optimizer"], dict) else None
            if domain.part not in first_groups:
                first_groups[domain.part] = rank_groups
                groups += rank_groups if isinstance(rank_groups, list) else []
            elif _steps(rank_groups) != _steps(first_groups[domain.part]):
                raise BadInput(f"{rank_where}: optimizer steps {_steps(rank_groups)}; the first domain has "
                               f"{_steps(first_groups[domain.part])}")
            if domain.tp_rank == 0:
                for chunk, buffer in enumerate(domain.buffers):
                    for slot in buffer.slots:
                        if not slot.parameter.tied_copy:
                            self._where[slot.parameter.canonical] = (domain, chunk, slot.parameter.name)
        return groups

    def _check_buckets(self, domain, numel, unpadded, where: str) -> None:
        key = self.settings.buffer_key
        for chunk, buffer in enumerate(domain.buffers):
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
                    name = f"{domain.bucket_key(chunk, key, bucket.index)}.{state_key}"
                    entry = self.stored.get(name)
                    if entry is None or tuple(getattr(entry, "size", ())) != (bucket.numel_unpadded,):
                        found = "missing" if entry is None else f"of shape {tuple(getattr(entry, 'size', ()))}"
                        raise BadInput(f"{where}: {name} {found}; expected ({bucket.numel_unpadded},)")

    def _bucket_pieces(self, domain, chunk: int, parameter_name: str, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """One rank's piece of a parameter's state, read from its domain's bucket tensors."""
        from ..layouts.torch_dist.regions import _Region

        bucket, slot = domain.slot(chunk, parameter_name)
        regions, out = [], {}
        for key in keys:
            target = torch.empty(slot.parameter.numel, dtype=torch.float32)
            regions.append(_Region(f"{domain.bucket_key(chunk, self.settings.buffer_key, bucket.index)}.{key}",
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
            first, chunk, parameter_name = self._where[name]

            def piece(tp_rank: int) -> dict[str, torch.Tensor]:
                domain = self._domains[(first.part, tp_rank, first.pp_stage, first.ep_rank)]
                return self._bucket_pieces(domain, chunk, parameter_name, keys)

            return assemble(self.spec, self._canonical[name], self.padded_vocab_size, self.tp, piece, keys)
        regions, out = [], {}
        place = self.weights.stored_place(name)
        stored_keys = MIXED_PLAIN_KEYS if self.mixed_plain else {key: key for key in MODEL_SPACE_KEYS[self.sharding]}
        if self.sharding == PLAIN and not self.mixed_plain and "param" in keys:  # fp32: the weights are masters
            out["param"] = self.weights.tensor(name).to(torch.float32)
        for key in (key for key in keys if key in stored_keys):
            stored_key = f"optimizer.state.{stored_keys[key]}.{model_space_key(self.spec.model_kind, place.key)}"
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
