"""The optimizer entries of a ``torch_dist`` checkpoint ckptkit writes, in the same save as the
weights (:func:`ckptkit.layouts.torch_dist.write`'s ``optimizer``): tensor ``items`` whose data
comes from ``resolve``, bytes ``payloads``, ``common`` state entries, ``content_metadata`` and
``args_fields``. Each keeps one canonical tensor's state at a time.

* :class:`DpReshardableEntries`: the distributed optimizer as ``dp_reshardable`` (Megatron's
  default; :mod:`.dp_reshardable` says where each bucket goes), mixtures of experts included;
* :class:`ModelSpaceEntries`: ``fully_reshardable``, or the plain optimizer of an fp32 model.
"""
from __future__ import annotations

import torch

from ..errors import BadInput, Unsupported
from ..spec import rule_for
from .buffers import BufferSettings
from .dp_reshardable import bucket_chunks, domains
from .state import STATE_KEYS, OptimizerState, chained_param_groups
from .torch_dist import MIXED_PLAIN_KEYS, MODEL_SPACE_KEYS, PLAIN, model_space_key


class _CanonicalCache:
    """The full state tensors (``keys``) of the canonical tensor being written, fitted to the
    target's vocabulary padding: read once for its consecutive items."""

    def __init__(self, state: OptimizerState, spec, padded_vocab_size: int, keys=STATE_KEYS):
        self.state, self.spec, self.padded, self.keys = state, spec, padded_vocab_size, keys
        self._rules = {tensor.name: tensor.rule for tensor in state.canonical()}
        self._current: tuple[str | None, dict | None] = (None, None)

    def values(self, canonical: str) -> dict[str, torch.Tensor]:
        if self._current[0] != canonical:
            self._current = (None, None)  # free the previous tensor before reading the next
            rule = rule_for(self.spec, self._rules[canonical], self.padded)
            fitted = {key: rule.fit(value) for key, value in self.state.tensor(canonical, self.keys).items()}
            self._current = (canonical, fitted)
        return self._current[1]


class DpReshardableEntries:
    """``state`` as Megatron's ``dp_reshardable`` distributed optimizer at TP ``tp``, PP ``pp``,
    VPP ``vpp``, EP ``ep`` and DP ``dp``: for every domain, the bucket tensors chunked as
    Megatron chunks them (one chunk per parameter piece of each DP shard and per gap, gaps
    written as zeros) and its bytes entries; the common state's optimizer entries and the args.

    The items go parameter by parameter, each parameter's pieces (TP ranks) side by side.
    """

    def __init__(self, state: OptimizerState, spec, *, padded_vocab_size: int, dp: int, args=None,
                 param_dtype: torch.dtype = torch.float32, naming: str = "mcore-local", tp: int = 1, pp: int = 1,
                 vpp: int = 1, ep: int = 1):
        from ..layouts.torch_dist.write import _pickled, _tensor_item

        self.spec, self.padded, self.tp = spec, padded_vocab_size, tp
        self._cache = _CanonicalCache(state, spec, padded_vocab_size)
        settings = BufferSettings.from_args(args, dp=dp, param_dtype=param_dtype) if args is not None \
            else BufferSettings(dp=dp, param_dtype=param_dtype)
        if spec.num_experts:
            settings = settings.with_experts(tp=tp, ep=ep)
        self.settings = settings
        buffer_key = settings.buffer_key
        info = state.info
        chained = bool(spec.num_experts) and ep > 1
        part_groups = [[{**group, "step": info.step} for group in groups]
                       for groups in chained_param_groups(info.param_groups, chained)]
        layout_domains = domains(spec, tp=tp, pp=pp, vpp=vpp, ep=ep, padded_vocab_size=padded_vocab_size,
                                 settings=settings, naming=naming)
        self.items, self._chunks, self.payloads = [], {}, {}
        for domain in layout_domains:
            per_bucket = [{buffer_key: [bucket.numel for bucket in buffer.buckets]} for buffer in domain.buffers]
            unpadded = [{buffer_key: [bucket.numel_unpadded for bucket in buffer.buckets]} for buffer in domain.buffers]
            self.payloads.update({domain.object_key("optimizer"): _pickled([{"param_groups": part_groups[domain.part]}]),
                                  domain.object_key("per_bucket_numel"): _pickled([per_bucket]),
                                  domain.object_key("per_bucket_numel_unpadded"): _pickled([unpadded])})
        # The domains of one stage (and EP rank) differ only in TP rank: their buffers hold pieces of
        # the same shapes in the same order, so one set of cuts serves them all.
        by_place = {}
        for domain in layout_domains:
            by_place.setdefault((domain.part, domain.pp_stage, domain.ep_rank), []).append(domain)
        for (part, _, _), siblings in by_place.items():
            first = siblings[0]
            for chunk, buffer in enumerate(first.buffers):
                for bucket in buffer.buckets:
                    for low, high, owner in bucket_chunks(buffer, bucket, buffer.dp):
                        for key in STATE_KEYS:
                            for domain in siblings:
                                name = domain.bucket_key(chunk, buffer_key, bucket.index)
                                item = _tensor_item(f"{name}.{key}", (bucket.numel_unpadded,), (low,), (high - low,),
                                                    torch.float32)
                                self.items.append(item)
                                start = None if owner is None else low - (owner.start - bucket.start)
                                self._chunks[item.index] = (owner, domain.tp_rank, key, start, high - low)
        sharding = {"param_state_sharding_type": "dp_reshardable"}
        self.common = {"optimizer": {0: dict(sharding), 1: dict(sharding)} if chained else sharding}
        if info.opt_param_scheduler is not None:
            self.common["opt_param_scheduler"] = info.opt_param_scheduler
        self.common.update(info.training)
        self.content_metadata = {"distrib_optim_sharding_type": "dp_reshardable"}
        self.args_fields = {"use_distributed_optimizer": True, "data_parallel_size": dp, "no_save_optim": None,
                            **info.resume_args}

    def resolve(self, write_item) -> torch.Tensor:
        owner, tp_rank, key, start, size = self._chunks[write_item.index]
        if owner is None:
            return torch.zeros(size, dtype=torch.float32)
        parameter = owner.parameter
        full = self._cache.values(parameter.canonical)[key]
        piece = rule_for(self.spec, parameter.rule, self.padded).shard(full, self.tp, tp_rank).reshape(-1)
        if piece.numel() != parameter.numel:
            raise BadInput(f"{parameter.canonical}: TP rank {tp_rank} gets {piece.numel()} state elements; the "
                           f"target's parameter {parameter.name} has {parameter.numel}")
        return piece[start: start + size].clone()


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
            raise Unsupported(f"{sharding} optimizer state of a mixture of experts is not written (no real "
                              "checkpoint of that kind has been checked; dp_reshardable is)")
        if sharding == PLAIN and param_dtype == torch.float16:
            raise Unsupported("the non-distributed optimizer of an fp16 torch_dist checkpoint is not written: its "
                              "layout is not checked on a real checkpoint (write --format torch, or "
                              "--distributed-optimizer)")
        mixed = sharding == PLAIN and param_dtype != torch.float32
        self.keys = STATE_KEYS if mixed else MODEL_SPACE_KEYS[sharding]
        stored = MIXED_PLAIN_KEYS if mixed else {key: key for key in self.keys}
        self._cache = _CanonicalCache(state, spec, padded_vocab_size, self.keys)
        model_items, model_sources = plan_items(spec, tp, padded_vocab_size, torch.float32, etp=etp, naming=naming)
        self.items, self._sources = [], {}
        for model_item in model_items:
            data = model_item.tensor_data
            if model_space_key(spec.model_kind, model_item.index.fqn) != model_item.index.fqn:
                continue  # a second name of a parameter: its state goes under the other (MODEL_SPACE_NAMES)
            for key in self.keys:
                item = _tensor_item(f"optimizer.state.{stored[key]}.{model_item.index.fqn}", tuple(data.size),
                                    tuple(data.chunk.offsets), tuple(data.chunk.sizes), torch.float32)
                self.items.append(item)
                self._sources[item.index] = (model_sources[model_item.index], key, len(data.size))
        info = state.info
        self.payloads = {}
        if sharding == PLAIN:
            inner = {"param_groups": [dict(group) for group in info.param_groups],
                     "state": {"common_step": torch.tensor(float(info.step))}}
            # a bf16 model's optimizer (Float16OptimizerWithFloat16Params) wraps torch's state dict
            self.common = {"optimizer": {"optimizer": inner} if mixed else inner}
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

    def resolve(self, write_item) -> torch.Tensor:
        chunk, key, dims = self._sources[write_item.index]
        piece = self._cache.values(chunk.canonical)[key]
        for dim, (offset, size) in enumerate(zip(chunk.offsets, chunk.sizes)):
            piece = piece.narrow(dim, offset, size)
        piece = piece.clone()
        for _ in range(dims - len(chunk.sizes)):
            piece = piece.unsqueeze(0)  # the layer and expert axes of a stacked key
        return piece
