"""Carrying optimizer state through a conversion: a writer that wraps a per-rank weight writer.

The conversion engine plans, writes the weight files (in worker processes if asked),
finishes and checks through one :class:`ckptkit.layouts.base.CheckpointWriter`.
:class:`WithOptimizerState` is such a writer: it plans and writes what the weight
writer does, then in :meth:`~WithOptimizerState.finish` (once every rank file exists)
reads the source's optimizer state through the open source reader and writes it for
the target (:func:`.write_optimizer_state`); its check re-opens every ``distrib_optim.pt``
against the layout Megatron will expect. :func:`with_optimizer_state` decides whether a
conversion carries the state and says why not; ``reshard`` would use it as::

    weights = MEGATRON_WRITERS[target_format](target, keep_source_args=True)
    writer, notes = with_optimizer_state(weights, target, reader, dp=dp, distributed=distributed)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import BadInput, InternalError, Unsupported
from ..layouts.base import CheckpointReader, CheckpointWriter
from ..plan import Plan
from ..safe_load import safe_torch_load
from .distrib_optim import FILE_NAME, DistribOptimFile, rank_layout
from .parameters import ChunkPlace, chunk_parameters
from .write import OptimizerTarget, output_files, write_optimizer_state


def optimizer_state_absence(reader: CheckpointReader) -> str | None:
    """Why ``reader``'s checkpoint has no optimizer state to carry, or None when it has
    one ckptkit reads (a conversion then carries it by default)."""
    from . import read_optimizer_state

    try:
        with read_optimizer_state(reader):
            return None
    except (BadInput, Unsupported) as error:
        return str(error)


@dataclass
class WithOptimizerState(CheckpointWriter):
    """The weights as ``weights`` writes them, plus the source's optimizer state (or
    ``state_of(reader)``) at ``target``."""

    weights: CheckpointWriter
    target: OptimizerTarget
    spec: object = field(default=None, compare=False)  # the model, kept by plan() for check()
    # the state to write, from the open source reader: its own (None) or another, such as a
    # fresh optimizer's (:class:`.fresh.FreshStateOf`); picklable, as the writer goes to workers
    state_of: object = None

    def plan(self, reader: CheckpointReader) -> Plan:
        plan = self.weights.plan(reader)
        if plan.target.get("layout") == "torch_dist":
            raise Unsupported("optimizer state in torch_dist checkpoints is not written yet; write per-rank "
                              "files (--format torch) or drop the optimizer state")
        self.spec = reader.spec
        target = self.target  # refused before any file is written where Megatron's parameter order is not known
        chunk_parameters(reader.spec, ChunkPlace(target.tp, 0, target.pp, 0, target.vpp, 0),
                         target.padded_vocab(reader.spec), naming=target.naming)
        added = [path for path in _optimizer_files(self.target) if path not in {f.path for f in plan.files}]
        plan.finish_files = [*plan.finish_files, *added]
        plan.target = {**plan.target, "optimizer": {"distributed": self.target.distributed, "dp": self.target.dp}}
        return plan

    def write(self, reader, plan, out, files=None, progress=None) -> list[str]:
        return self.weights.write(reader, plan, out, files, progress)

    def finish(self, reader, plan, out) -> list[str]:
        from . import read_optimizer_state

        finished = self.weights.finish(reader, plan, out)
        with (self.state_of or read_optimizer_state)(reader) as state:
            written = write_optimizer_state(state, Path(out), self.target)
        data_files = {planned.path for planned in plan.files}
        return finished + [path for path in written if path not in data_files and path not in finished]

    def check(self, plan, out, label) -> None:
        """The weights' check, then every rank's optimizer files: ``distrib_optim.pt`` read back
        (pickle only) against the layout Megatron will build, and an ``optimizer`` entry in
        each ``model_optim_rng.pt``."""
        self.weights.check(plan, out, label)
        out, label, target = Path(out), Path(label), self.target
        padded = target.padded_vocab(self.spec)
        settings = target.settings_for(self.spec)
        for pp_stage in range(target.pp):
            for tp_rank in range(target.tp):
                for ep_rank in range(target.ep):
                    if target.distributed:
                        relative = target.rank_path(tp_rank, pp_stage, FILE_NAME, ep_rank)
                        layout = rank_layout(self.spec, tp=target.tp, tp_rank=tp_rank, pp=target.pp,
                                             pp_stage=pp_stage, vpp=target.vpp, padded_vocab_size=padded,
                                             settings=settings, naming=target.naming, ep=target.ep, ep_rank=ep_rank)
                        try:
                            DistribOptimFile(out / relative, layout, settings.buffer_key, ep_rank=ep_rank).close()
                        except BadInput as error:
                            raise InternalError(f"{label / relative}: written optimizer state does not read back "
                                                f"({error})") from None
                    relative = target.rank_path(tp_rank, pp_stage, "model_optim_rng.pt", ep_rank)
                    if "optimizer" not in safe_torch_load(out / relative, map_location="meta"):
                        raise InternalError(f"{label / relative}: no optimizer entry was written")


def _optimizer_files(target: OptimizerTarget) -> list[str]:
    return [path for path in output_files(target) if path.endswith(FILE_NAME)]


def with_optimizer_state(weights: CheckpointWriter, layout, reader: CheckpointReader, *, dp: int | None = None,
                         distributed: bool | None = None,
                         sharding: str | None = None) -> tuple[CheckpointWriter, list[str]]:
    """``weights`` (the weight writer of a conversion to ``layout``, a ``TargetLayout``) made to
    carry ``reader``'s optimizer state, and notes on what was not carried.

    ``dp`` and ``distributed`` default to the source's (its args' DP size, its optimizer
    kind). A torch_dist target holds the distributed optimizer's state as ``sharding``
    (``dp_reshardable``, Megatron's default, or ``fully_reshardable``; default: the
    source's where it is a torch_dist one of these, else ``dp_reshardable``) or the plain
    optimizer's (fp32 models; :class:`TorchDistWithOptimizerState`). The state is left out,
    with a note, where the source has none, where a torch_dist target cannot hold it (the
    plain optimizer of an fp16 model, experts), or at a release target (Megatron loads
    no optimizer from one).
    """
    from ..layouts.torch_dist_writer import TorchDistWriter
    from . import read_optimizer_state

    if sharding is not None:
        from .torch_dist import SHARDING_TYPES  # imports torch.distributed.checkpoint (0.8 s): only when needed

        if sharding not in SHARDING_TYPES:
            raise BadInput(f"unknown optimizer sharding {sharding!r} (choose {' or '.join(SHARDING_TYPES)})")
    absent = optimizer_state_absence(reader)
    if absent is not None:
        return weights, [f"no optimizer state carried: {absent}"]
    if layout.release or layout.iteration is None:
        return weights, ["optimizer state dropped: Megatron loads none from a release checkpoint"]
    with read_optimizer_state(reader) as state:
        source = state.info
    dp = dp or int(getattr(reader.meta.args, "data_parallel_size", None) or source.source.get("dp") or 1)
    if distributed is None:
        distributed = source.kind == "distributed"
    if reader.spec.num_experts:
        _check_expert_data_parallel(dp, layout)
    if isinstance(weights, TorchDistWriter):
        from .torch_dist import PLAIN, SHARDING_TYPES

        if reader.spec.num_experts and (not distributed or sharding == "fully_reshardable"
                                        or layout.expert_tp != layout.tp):
            return weights, ["optimizer state dropped: torch_dist output carries the optimizer state of a mixture "
                             "of experts as the distributed optimizer's dp_reshardable type, with experts cut over "
                             "TP (write --format torch for the plain optimizer)"]
        if not distributed:
            dtype = layout.dtype or reader.meta.dtype
            if dtype == torch.float16:
                return weights, ["optimizer state dropped: torch_dist output carries the plain optimizer's state of "
                                 "fp32 and bf16 models only (this one is float16; write --format torch, or "
                                 "--distributed-optimizer)"]
            return TorchDistWithOptimizerState(weights, dp=dp, sharding=PLAIN), []
        if sharding is None:
            sharding = source.source.get("sharding") if source.source.get("sharding") in SHARDING_TYPES \
                else "dp_reshardable"
        return TorchDistWithOptimizerState(weights, dp=dp, sharding=sharding), []
    if sharding is not None:
        raise BadInput("--optimizer-sharding is a torch_dist sharding type; per-rank files (--format torch) "
                       "hold the distributed optimizer in distrib_optim.pt")
    target = OptimizerTarget.from_layout(layout, dp=dp, distributed=distributed, args=reader.meta.args)
    return WithOptimizerState(weights, target), []


def _check_expert_data_parallel(dp: int, layout) -> None:
    """Refuse, before anything is written, a DP size whose ranks cannot hold the target's
    expert-parallel groups (the run could not start)."""
    from .buffers import BufferSettings

    try:
        BufferSettings(dp=dp).with_experts(tp=layout.tp, ep=layout.ep, etp=layout.expert_tp)
    except BadInput as error:
        step = layout.ep * layout.expert_tp // math.gcd(layout.ep * layout.expert_tp, layout.tp)
        raise BadInput(f"{error}: the resuming run needs a DP size that is a multiple of {step} "
                       f"(pass --dp, or --no-optimizer)") from None


@dataclass
class TorchDistWithOptimizerState(CheckpointWriter):
    """A ``torch_dist`` checkpoint as ``weights`` writes it, with the source's optimizer state
    in the same save, as Megatron keeps it: the distributed optimizer's ``dp_reshardable``
    (:class:`.torch_dist.DpReshardableEntries`) or ``fully_reshardable`` type, or the plain
    optimizer (``plain``; both :class:`.torch_dist.ModelSpaceEntries`)."""

    weights: CheckpointWriter
    dp: int = 1
    sharding: str = "dp_reshardable"
    state_of: object = None  # the state to write from the source reader: its own (None), or a fresh one

    def plan(self, reader: CheckpointReader) -> Plan:
        plan = self.weights.plan(reader)
        plan.target = {**plan.target, "optimizer": {"distributed": self.sharding != "plain", "dp": self.dp,
                                                    "sharding": self.sharding}}
        return plan

    def write(self, reader, plan, out, files=None, progress=None) -> list[str]:
        from ..layouts import torch_dist
        from . import read_optimizer_state
        from .torch_dist_entries import DpReshardableEntries, ModelSpaceEntries

        target = plan.detail.target
        padded = target.padded_vocab(reader.spec)
        with (self.state_of or read_optimizer_state)(reader) as state:
            if self.sharding == "dp_reshardable":
                entries = DpReshardableEntries(state, reader.spec, padded_vocab_size=padded, dp=self.dp,
                                               args=reader.meta.args, param_dtype=target.dtype,
                                               naming=target.naming, tp=target.tp, pp=target.pp, vpp=target.vpp,
                                               ep=target.ep)
            else:
                entries = ModelSpaceEntries(state, reader.spec, sharding=self.sharding, padded_vocab_size=padded,
                                            dp=self.dp, tp=target.tp, etp=target.etp, naming=target.naming,
                                            param_dtype=target.dtype or reader.meta.dtype)
            return torch_dist.write(reader, Path(out), target, progress=progress, finish=False, optimizer=entries)

    def finish(self, reader, plan, out) -> list[str]:
        return self.weights.finish(reader, plan, out)

    def check(self, plan, out, label) -> None:
        """As the weights' check (tracker, data files, every model tensor's dtype and global
        shape against the plan), then the optimizer state read back."""
        from ..layouts import torch_dist
        from .torch_dist import TorchDistOptimizerState

        self.weights.check(plan, out, label, other_keys=("optimizer.", "chained_"))
        try:
            with torch_dist.open_reader(Path(out)) as written:
                TorchDistOptimizerState(written).close()
        except (BadInput, Unsupported) as error:
            raise InternalError(f"{label}: written optimizer state does not read back ({error})") from None
