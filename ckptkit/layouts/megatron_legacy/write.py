"""Writing Megatron per-rank files: the plan (which rank file holds which canonical tensor
under which key, :func:`plan_files`), then a streaming write, one pipeline stage at a time
(:func:`write`). With expert parallelism a stage has a file per (TP rank, EP rank): each
holds the stage's other tensors (the same on every EP rank) and its EP rank's experts under
local indices. What both Megatron formats share (target, args, tracker) is in
:mod:`ckptkit.layouts.megatron_common`.
"""
from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from ... import pipeline
from ...errors import BadInput, InternalError, Unsupported
from ...plan import Plan, PlannedFile
from ...safe_load import safe_torch_load
from ...spec import ModelSpec, canonical_tensors, check_parallel_sizes, kept_dtypes, layer_suffix, rule_for
from ...torch_stream import StreamingTorchWriter
from ..base import CheckpointReader, compare_with_plan
from ..megatron_common import (WRITE_CHECKPOINT_VERSION, MegatronWriter, TargetLayout, check_tracker,
                               target_args, write_tracker)
from ..megatron_names import NAMINGS, attention_linears, key_copies
from ..tracker import TRACKER
from .discovery import NAME, RANK_FILE, rank_dir_name
from .files import _flatten


@dataclass
class PlannedTensor:
    file_key: str
    canonical: str
    rule: str
    copy_of: str | None = None  # the tied head is a copy of the word embeddings


@dataclass
class PlannedRankFile:
    relative_path: str
    tp_rank: int
    pp_stage: int
    chunks: list[list[PlannedTensor]]
    extra_state_keys: list[list[str]]
    ep_rank: int = 0


def stage_layers(spec: ModelSpec, pp: int, vpp: int, stack: str | None = None) -> dict[tuple[int, int], range]:
    """Global layers of ``stack`` (default: the one pipeline stages cut) of each (stage, chunk):
    virtual stage ``c x PP + p`` holds block ``c x PP + p``.

    8 layers, PP=2, VPP=2: (0,0)->0-1, (1,0)->2-3, (0,1)->4-5, (1,1)->6-7.
    """
    per_virtual = spec.stack_layers(stack or spec.kind.pipelined_stack) // (pp * vpp)
    return {(virtual % pp, virtual // pp): range(virtual * per_virtual, (virtual + 1) * per_virtual)
            for virtual in range(pp * vpp)}


def check_expert_target(spec: ModelSpec, target: TargetLayout) -> None:
    """Refuse expert layouts per-rank files cannot hold (one line each)."""
    check_parallel_sizes(spec, target.tp, target.pp, target.vpp, target.ep, target.etp)
    if spec.num_experts and target.expert_tp != target.tp:
        raise Unsupported(f"per-rank files with expert tensor parallel size ETP={target.expert_tp} other than "
                          f"TP={target.tp}: which rank file holds which piece of an expert is not confirmed on "
                          "real files; write torch_dist (--format torch_dist) or leave ETP at TP")


def plan_files(spec: ModelSpec, target: TargetLayout) -> list[PlannedRankFile]:
    """Every rank file to write and the canonical tensor behind each of its keys."""
    check_expert_target(spec, target)
    if target.naming not in NAMINGS:
        raise BadInput(f"unknown naming {target.naming!r} (choose from {', '.join(NAMINGS)})")
    naming = NAMINGS[target.naming]
    if naming.one_stack and len(spec.kind.stacks) > 1:
        raise Unsupported(f"the {naming.name} naming holds one layer stack; a {spec.model_kind} model has "
                          f"{len(spec.kind.stacks)}: write mcore-local")
    experts_per_rank = spec.num_experts // target.ep if spec.num_experts else 0
    layers_of = {stack: stage_layers(spec, target.pp, target.vpp, stack) for stack in spec.kind.stacks}
    canonical = canonical_tensors(spec)
    embedding = next(tensor for tensor in canonical if tensor.name == "embedding.word_embeddings.weight")
    last = (target.pp - 1, target.vpp - 1)
    plan = []
    for pp_stage in range(target.pp):
        for ep_rank, tp_rank in [(e, t) for e in range(target.ep) for t in range(target.tp)]:
            first_expert = ep_rank * experts_per_rank
            chunks, extra_states = [], []
            for chunk in range(target.vpp):
                place = (pp_stage, chunk)
                entries, extra = [], []
                for tensor in canonical:
                    if tensor.layer is not None:
                        layers = layers_of[tensor.stack][place]
                        if tensor.layer not in layers:
                            continue
                        if tensor.expert is not None and \
                                not first_expert <= tensor.expert < first_expert + experts_per_rank:
                            continue  # another EP rank's expert
                        key = naming.file_name(layer_suffix(tensor.name), tensor.layer - layers.start,
                                               moe_layer=spec.is_moe_layer(tensor.layer), expert_offset=first_expert,
                                               stack=tensor.stack)
                        entries.append(PlannedTensor(key, tensor.name, tensor.rule))
                        continue
                    first_stage_tensor = tensor.name.startswith("embedding.")
                    if first_stage_tensor and place != (0, 0):
                        continue
                    if not first_stage_tensor and place != last:
                        continue
                    entries.append(PlannedTensor(naming.file_name(tensor.name, None), tensor.name, tensor.rule))
                entries += [PlannedTensor(copy, planned.canonical, planned.rule, planned.copy_of)
                            for planned in list(entries) for copy in key_copies(spec.model_kind, planned.file_key)]
                if spec.tied_embeddings and place == last and target.pp * target.vpp > 1:
                    # Megatron keeps its own copy of the embeddings for the output head on the last stage.
                    entries.append(PlannedTensor(naming.tied_head[0], "output_layer.weight", embedding.rule,
                                                 copy_of=embedding.name))
                for stack in spec.kind.stacks:
                    layers = layers_of[stack][place]
                    for layer in layers:
                        extra += naming.extra_state_names(
                            layer - layers.start, moe_layer=spec.is_moe_layer(layer), local_experts=experts_per_rank,
                            shared_expert=bool(spec.moe_shared_expert_size), attention=attention_linears(spec),
                            stack=stack, cross_attention=stack == spec.kind.cross_attention_stack)
                # the output layer's module holds a weight, or a bias (BERT, tied T5)
                head_present = place == last and (not spec.tied_embeddings or target.pp * target.vpp > 1
                                                  or spec.output_layer_bias)
                if head_present and naming.head_extra_state:
                    extra += [naming.head_extra_state, *key_copies(spec.model_kind, naming.head_extra_state)]
                if place == last:  # Megatron builds the multi-token prediction layers on the last stage
                    extra += naming.mtp_extra_state_names(spec, experts_per_rank)
                chunks.append(entries)
                extra_states.append(extra)
            relative = f"{rank_dir_name(tp_rank, pp_stage, target.pp, ep_rank, target.ep)}/{RANK_FILE}"
            plan.append(PlannedRankFile(relative, tp_rank, pp_stage, chunks, extra_states, ep_rank))
    return plan


def _nest(flat: dict, naming: str) -> dict:
    """Pre-Core files nest ``language_model -> embedding/encoder`` dicts (as Megatron saved them)."""
    if naming != "legacy":
        return OrderedDict(flat)
    nested: dict = OrderedDict()
    for key, value in flat.items():
        if key.startswith("language_model.embedding."):
            rest = key[len("language_model.embedding."):]
            module, param = rest.rsplit(".", 1)
            nested.setdefault("language_model", OrderedDict()).setdefault("embedding", OrderedDict()) \
                .setdefault(module, OrderedDict())[param] = value
        elif key.startswith("language_model.encoder."):
            nested.setdefault("language_model", OrderedDict()).setdefault("encoder", OrderedDict())[
                key[len("language_model.encoder."):]] = value
        elif key.startswith("language_model."):
            # language_model.pooler.dense.weight -> ["language_model"]["pooler"]["dense.weight"]
            module, param = key[len("language_model."):].split(".", 1)
            nested.setdefault("language_model", OrderedDict()).setdefault(module, OrderedDict())[param] = value
        else:
            # lm_head.dense.weight -> ["lm_head"]["dense.weight"] (a module's own state dict)
            module, param = key.split(".", 1)
            nested.setdefault(module, OrderedDict())[param] = value
    return nested


def _shard_shapes(spec: ModelSpec, target: TargetLayout, entry: PlannedRankFile) -> list[dict[str, tuple]]:
    """Per chunk: file key -> the shape that rank stores."""
    shapes = {tensor.name: tensor.shape for tensor in canonical_tensors(spec)}
    padded = target.padded_vocab(spec)
    return [{planned.file_key: rule_for(spec, planned.rule, padded).shard_shape(
                shapes[planned.copy_of or planned.canonical], target.tp) for planned in chunk}
            for chunk in entry.chunks]


@dataclass
class _RankFilesPlan:
    spec: ModelSpec
    target: TargetLayout
    entries: list[PlannedRankFile]


@dataclass(frozen=True)
class RankFilesWriter(MegatronWriter):
    """Megatron per-rank files at ``target``'s sizes."""

    def plan(self, reader: CheckpointReader) -> Plan:
        spec, target = reader.spec, self.target_for(reader)
        entries = plan_files(spec, target)
        element = torch.empty((), dtype=target.dtype).element_size()
        files = [PlannedFile(f"{target.folder_name}/{entry.relative_path}",
                             sum(math.prod(shape) * element for chunk in _shard_shapes(spec, target, entry)
                                 for shape in chunk.values()),
                             tuple(planned.copy_of or planned.canonical for chunk in entry.chunks for planned in chunk))
                 for entry in entries]
        # The writer reads each tensor of a stage once for all its TP (and EP) ranks.
        reads = sum(len(_stage_reads([entry for entry in entries if entry.pp_stage == pp_stage], spec))
                    for pp_stage in range(target.pp))
        return Plan(target.summary(NAME), files, [TRACKER], reads=reads, detail=_RankFilesPlan(spec, target, entries))

    def write(self, reader, plan, out, files=None, progress=None) -> list[str]:
        return write(reader, Path(out), plan.detail.target, progress=progress, only=files, finish=False)

    def check(self, plan, out, label) -> None:
        """The tracker, and every rank file's pickle (no tensor data): exactly the planned keys,
        dtypes and shapes."""
        out, label = Path(out), Path(label)
        detail = plan.detail
        check_tracker(out, detail.target, label)
        kept = kept_dtypes(detail.spec)  # the expert bias stays float32, as Megatron keeps it
        for entry, planned_file in zip(detail.entries, plan.files):
            where = label / planned_file.path
            try:
                state = safe_torch_load(out / planned_file.path)
            except BadInput as error:
                raise InternalError(f"{where}: written rank file does not read back ({error})") from None
            chunk_keys = ["model"] if len(entry.chunks) == 1 else [f"model{chunk}" for chunk in range(len(entry.chunks))]
            shapes = _shard_shapes(detail.spec, detail.target, entry)
            for chunk_key, chunk_shapes, extra_keys in zip(chunk_keys, shapes, entry.extra_state_keys):
                stored = _flatten(state.get(chunk_key) or {})
                found = {key: (value.dtype, tuple(value.shape)) if isinstance(value, torch.Tensor) else value
                         for key, value in stored.items()}
                planned = dict.fromkeys(extra_keys)
                canonical_of = {planned_tensor.file_key: planned_tensor.canonical for chunk in entry.chunks
                                for planned_tensor in chunk}
                planned.update((key, (kept.get(canonical_of[key], detail.target.dtype), shape))
                               for key, shape in chunk_shapes.items())
                compare_with_plan(where, found, planned)


def _stage_reads(stage_files: list[PlannedRankFile], spec: ModelSpec) -> list[tuple[int, str, list]]:
    """The canonical tensors one stage's files need, each once, in canonical order:
    ``(chunk, canonical name, [(file, planned tensor), ...])``. Every file of the stage
    holds the same tensors except the experts, which only their EP rank's files hold."""
    position = {tensor.name: index for index, tensor in enumerate(canonical_tensors(spec))}
    reads: dict[tuple[int, str], list] = {}
    for entry in stage_files:
        for chunk_index, chunk in enumerate(entry.chunks):
            for planned in chunk:
                reads.setdefault((chunk_index, planned.canonical), []).append((entry, planned))
    order = sorted(reads, key=lambda read: (read[0], position.get(read[1], len(position))))
    return [(chunk_index, name, reads[(chunk_index, name)]) for chunk_index, name in order]


def _in_pickle_order(reads: list, naming: str) -> list:
    """``reads`` in the order the rank file's pickle meets their tensors.

    The stream writer puts each tensor's record in the file as it is cut, and torch's meta-device
    load finds records by that order (:mod:`ckptkit.torch_offsets`). Flat Megatron-Core keys keep
    the write order; nested pre-Core dicts regroup them: a pre-Core BERT's pooler
    (``language_model.pooler``) comes before ``lm_head`` and ``binary_head`` in the pickle,
    though canonical order builds it last."""
    if naming != "legacy":
        return reads
    first_file = reads[0][2][0][0] if reads else None
    order = {}
    for chunk_index, chunk in enumerate(first_file.chunks if first_file else []):
        nested = _flatten(_nest(OrderedDict((planned.file_key, None) for planned in chunk), naming))
        order.update({(chunk_index, key): position for position, key in enumerate(nested)})
    return sorted(reads, key=lambda read: (read[0], order.get((read[0], read[2][0][1].file_key), len(order))))


def _pieces(spec: ModelSpec, holders: list, padded: int, dtype: torch.dtype, tp: int):
    """The function making a canonical tensor's pieces for the TP ranks of ``holders``, each
    contiguous (on a :mod:`ckptkit.pipeline` thread). A piece that is one block of rows is a
    view of the full tensor, and a replicated tensor is one copy for every rank: both are
    written without a copy (:meth:`StreamingTorchWriter.add_tensor`)."""
    rule = rule_for(spec, holders[0][1].rule, padded)
    tp_ranks = sorted({entry.tp_rank for entry, _ in holders})

    def cut(full: torch.Tensor) -> dict[int, torch.Tensor]:
        full = rule.fit(full.to(dtype))  # no copy when the dtype is right
        return {tp_rank: rule.shard(full, tp, tp_rank).contiguous() for tp_rank in tp_ranks}

    return cut


def write(reader: CheckpointReader, out_dir: Path, target: TargetLayout, *, progress=None,
          only=None, finish: bool = True) -> list[str]:
    """Write ``reader``'s model as Megatron per-rank files under ``out_dir`` (a fresh folder).

    Streams: for each pipeline stage, each canonical tensor is read once, split over the
    TP ranks, and every piece goes straight to the rank files that hold it (an expert's
    EP rank's, every EP rank's for the other tensors) on disk. Returns the
    relative paths written. ``only`` (relative paths, as returned) restricts the files
    written, for one worker's share; ``finish=False`` leaves out the tracker file, which
    the process that writes it does once every share is done.
    """
    spec = reader.spec
    dtype = target.dtype or reader.meta.dtype
    kept = kept_dtypes(spec)  # the expert bias stays float32, as Megatron keeps it
    padded = target.padded_vocab(spec)
    plan = plan_files(spec, target)
    folder = out_dir / target.folder_name
    args = target_args(spec, target, dtype)
    if only is not None:
        only = set(only)
        plan = [entry for entry in plan if f"{folder.name}/{entry.relative_path}" in only]
    written = []
    for pp_stage in range(target.pp):
        stage_files = [entry for entry in plan if entry.pp_stage == pp_stage]
        if not stage_files:
            continue
        writers = {}
        refs = {entry.relative_path: [OrderedDict() for _ in entry.chunks] for entry in stage_files}
        try:
            for entry in stage_files:
                path = folder / entry.relative_path
                path.parent.mkdir(parents=True, exist_ok=True)
                writers[entry.relative_path] = StreamingTorchWriter(path)
            reads = _in_pickle_order(_stage_reads(stage_files, spec), target.naming)
            jobs = [(holders[0][1].copy_of or name, _pieces(spec, holders, padded, kept.get(name, dtype), target.tp))
                    for _, name, holders in reads]
            with contextlib.closing(pipeline.produced(reader, jobs)) as made:
                for (chunk_index, name, holders), (_, pieces) in zip(reads, made):
                    for entry, planned in holders:
                        refs[entry.relative_path][chunk_index][planned.file_key] = \
                            writers[entry.relative_path].add_tensor(pieces[entry.tp_rank])
                    del pieces
                    if progress:
                        progress(name)
            for entry in stage_files:
                models = []
                for chunk_index, chunk_refs in enumerate(refs[entry.relative_path]):
                    for key in entry.extra_state_keys[chunk_index]:
                        chunk_refs[key] = None
                    models.append(_nest(chunk_refs, target.naming))
                state = {"args": args, "checkpoint_version": WRITE_CHECKPOINT_VERSION,
                         "iteration": target.saved_iteration or 0}
                if len(models) == 1:
                    state["model"] = models[0]
                else:
                    for chunk_index, model in enumerate(models):
                        state[f"model{chunk_index}"] = model
                writers[entry.relative_path].finish(state)
                written.append(str(Path(folder.name) / entry.relative_path))
        finally:
            for writer in writers.values():
                writer.close()
    if finish:
        write_tracker(out_dir, target)
    return written
