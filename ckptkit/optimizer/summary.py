"""What optimizer state a checkpoint holds, from its metadata (no state tensor is read).

Kinds: ``distributed`` (``--use-distributed-optimizer``: flat buffers in
``distrib_optim.pt``), ``non-distributed`` (Adam's state dict in ``model_optim_rng.pt``),
``fresh-empty`` (an ``optimizer`` entry written before any step, with no per-parameter
state: Megatron saving a freshly built optimizer, as ``--ckpt-convert-format`` does),
``none`` (no optimizer entry: ``--no-save-optim``, a release, a Hugging Face folder) and
``unread`` (state ckptkit does not read: torch_dist optimizer entries, chained optimizers).

>>> from ckptkit.layouts import open_checkpoint
>>> with open_checkpoint("checkpoints/gpt2do") as reader:
...     summary = describe_optimizer_state(reader)
>>> summary.kind, summary.step, summary.dp, summary.sharding
('distributed', 10.0, 2, 'distrib_optim.pt per TP/PP rank (every DP shard)')
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import BadInput, Unsupported
from ..layouts import megatron_legacy
from ..layouts.base import CheckpointReader


@dataclass
class OptimizerSummary:
    kind: str  # "distributed", "non-distributed", "fresh-empty", "none", "unread"
    sharding: str | None = None  # where the state lives and how it is cut
    step: float | None = None
    dp: int | None = None  # the data-parallel size the state is laid out for
    dtypes: dict = field(default_factory=dict)  # weights, master params, moments (and grad buffers)
    note: str | None = None  # why there is none, or why it is not read

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """One line: ``distributed, step 10, DP=2, distrib_optim.pt per TP/PP rank (...)``."""
        parts = [self.kind]
        if self.step is not None:
            parts.append(f"step {self.step:g}")
        if self.dp is not None:
            parts.append(f"DP={self.dp}")
        if self.sharding:
            parts.append(self.sharding)
        if self.dtypes:
            parts.append(", ".join(f"{key} {value}" for key, value in self.dtypes.items()))
        if self.note:
            parts.append(self.note)
        return "; ".join(parts)


def describe_optimizer_state(reader: CheckpointReader) -> OptimizerSummary:
    """The optimizer state ``reader``'s checkpoint holds (kind, sharding, step, DP size, dtypes)."""
    layout = reader.meta.layout
    if layout == megatron_legacy.NAME:
        return _per_rank(reader)
    if layout == "torch_dist":
        return _torch_dist(reader)
    return OptimizerSummary("none", note=f"a {layout} checkpoint holds no optimizer state")


def _data_parallel_size(args) -> int | None:
    value = getattr(args, "data_parallel_size", None)
    return int(value) if value else None


def _per_rank(reader: CheckpointReader) -> OptimizerSummary:
    from . import read_optimizer_state

    args = reader.meta.args
    weights = str(reader.meta.dtype).removeprefix("torch.")
    entry = reader.rank_state(0, 0).get("optimizer")
    if reader.meta.release and entry is None:
        return OptimizerSummary("none", note="a release checkpoint (Megatron loads no optimizer state from one)")
    if entry is None:
        return OptimizerSummary("none", note="no optimizer entry (saved with --no-save-optim)")
    first = entry[0] if isinstance(entry, list) and entry else entry  # chained: the experts' apart
    inner = first.get("optimizer", first) if isinstance(first, dict) else None
    if isinstance(inner, dict) and "state" in inner and not inner["state"]:
        return OptimizerSummary("fresh-empty", "model_optim_rng.pt per TP/PP rank", dp=_data_parallel_size(args),
                                dtypes={"weights": weights},
                                note="written before any step: no master copies or moments")
    try:
        with read_optimizer_state(reader) as state:
            info, settings = state.info, getattr(state, "settings", None)
    except (BadInput, Unsupported) as error:
        return OptimizerSummary("unread", dp=_data_parallel_size(args), dtypes={"weights": weights}, note=str(error))
    distributed = info.kind == "distributed"
    mixed = weights != "float32"
    dtypes = {"weights": weights, "master params": "float32" if distributed or mixed else "float32 (the weights)",
              "moments": "float32"}
    if distributed and settings is not None:
        dtypes["grad buffers"] = str(settings.grad_dtype).removeprefix("torch.")
    sharding = ("distrib_optim.pt per TP/PP rank (every DP shard)" if distributed
                else "model_optim_rng.pt per TP/PP rank" + (" (masters in fp32_from_fp16_params)" if mixed else ""))
    if reader.spec.num_experts and info.source.get("ep", 1) > 1:
        sharding += f"; the experts' own optimizer, per EP rank (EP={info.source['ep']})"
    return OptimizerSummary(info.kind, sharding, info.step, info.source.get("dp") or _data_parallel_size(args), dtypes)


def _torch_dist(reader) -> OptimizerSummary:
    from ..layouts.torch_dist.keys import is_optimizer_key

    keys = [key for key in getattr(reader.metadata, "state_dict_metadata", {}) if is_optimizer_key(key)]
    args = reader.meta.args
    if not keys:
        return OptimizerSummary("none", note="no optimizer entries (saved with --no-save-optim)")
    content = (getattr(reader, "common_state", None) or {}).get("content_metadata") or {}
    distributed = bool(getattr(args, "use_distributed_optimizer", False))
    sharding = f"torch_dist {content.get('distrib_optim_sharding_type') or ('distributed' if distributed else '')}"
    from . import read_optimizer_state

    weights = str(reader.meta.dtype).removeprefix("torch.")
    try:
        with read_optimizer_state(reader) as state:
            info, settings, stored_as = state.info, state.settings, state.sharding
    except (BadInput, Unsupported) as error:
        return OptimizerSummary("unread", sharding.strip(), dp=_data_parallel_size(args), dtypes={"weights": weights},
                                note=f"{len(keys)} optimizer entries: {error}")
    dtypes = {"weights": weights, "master params": "float32", "moments": "float32",
              "grad buffers": str(settings.grad_dtype).removeprefix("torch.")}
    if reader.spec.num_experts and info.source.get("ep", 1) > 1:
        sharding += f"; the experts' own optimizer (chained_1), per EP rank (EP={info.source['ep']})"
    if info.kind == "non-distributed":  # model space; an fp32 model's weights are the masters
        sharding = f"torch_dist {stored_as} (model space)"
        dtypes = {"weights": weights, "master params": "float32 (the weights)", "moments": "float32"}
    return OptimizerSummary(info.kind, sharding.strip(), info.step, info.source.get("dp") or _data_parallel_size(args),
                            dtypes)
