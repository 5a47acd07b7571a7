"""Reading Megatron per-rank files as canonical tensors.

Every canonical tensor is found in the files of its pipeline stage (layer indices made
global) and merged from its TP ranks' pieces into the boxes its partition rule gives
each rank. With expert parallelism each stage has a file per (TP rank, EP rank): an
expert's pieces come from its EP rank's files (local expert indices made global), every
other tensor from EP rank 0's, the other EP ranks holding copies.
:meth:`MegatronLegacyReader.validate` checks the files against each other and compares
the copies Megatron keeps of some tensors (:mod:`ckptkit.layouts.copies`).
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ...errors import BadInput, Unsupported
from ...megatron_args import spec_from_args
from ...rules import box_slices
from ...safe_load import safe_torch_load
from ...spec import CanonicalTensor, rule_for
from ...torch_offsets import offsets_known
from .. import copies
from ..base import CheckpointMeta, CheckpointReader
from ..megatron_common import parallel_sizes, source_iteration
from ..megatron_names import Naming, copied_key, detect_naming, model_kind_of
from .discovery import NAME, RANK_FILE, _extract_zip, check_rank_set, locate_iteration_dir, scan_ranks
from .files import _model_chunks, _RankFiles


@dataclass
class _Location:
    pp_stage: int
    chunk: int
    file_key: str
    ep_rank: int = 0  # the expert-parallel rank whose files hold it (any, for a non-expert tensor)


def _worst(differences: list[float], first_rank: int) -> tuple[float, int]:
    """The largest of per-rank differences (NaN counts as largest) and its TP rank."""
    index = max(range(len(differences)), key=lambda i: (math.isnan(differences[i]), differences[i]))
    return differences[index], first_rank + index


class MegatronLegacyReader(CheckpointReader):
    """Canonical tensors merged from Megatron per-rank files, each read on demand."""

    def __init__(self, path, **options):
        self._temporary = None
        try:
            self._open(path, **options)
        except BaseException:
            self.close()  # a .zip source was unpacked into a temporary folder: remove it
            raise

    def _open(self, path, *, vocab_size: int | None = None, strict: bool = False,
              trust_remote_pickle: bool = False):
        self.source = Path(path)
        self.strict = strict
        root = self.source
        if root.suffix == ".zip" and root.is_file():
            self._temporary = _extract_zip(root)
            root = self._temporary
        if not root.exists():
            raise BadInput(f"{root}: no such file or folder")
        folder, iteration, release = locate_iteration_dir(root)
        ranks = scan_ranks(folder)
        first_file = folder / sorted(ranks)[0] / RANK_FILE
        first = safe_torch_load(first_file, trust_remote_pickle=trust_remote_pickle, map_location="meta")
        args = first.get("args") if isinstance(first, dict) else None
        if args is None:
            raise BadInput(f"{first_file}: no 'args' entry; cannot tell the architecture")
        sizes = parallel_sizes(args)
        tp, pp, ep = sizes.tp, sizes.pp, sizes.ep
        check_rank_set(folder, ranks, tp, pp, ep)
        # One set of files per EP rank; ``files`` is EP rank 0's (all of them without experts).
        self.ep_files = [_RankFiles(folder, tp, pp, trust_remote_pickle, ep=ep, ep_rank=ep_rank)
                         for ep_rank in range(ep)]
        self.files = self.ep_files[0]
        first_chunks = _model_chunks(first, first_file)
        if offsets_known(first_chunks):
            self.files.loaded[(0, 0)] = (first, first_chunks)
        chunks = self.files.chunks(0, 0)
        # the first and the last stage's keys tell which Megatron model this is (see model_kind_of)
        stage_keys = [key for pp_stage in {0, pp - 1} for chunk in self.files.chunks(0, pp_stage) for key in chunk]
        self.spec = spec_from_args(args, vocab_size=vocab_size, source=str(first_file),
                                   model_kind=model_kind_of(stage_keys))
        _check_expert_sizes(self.spec, sizes, first_file)
        version = float(first.get("checkpoint_version", 0) or 0)
        iteration = source_iteration(iteration, release, first)
        naming = detect_naming(chunks[0].keys())
        if naming is None:
            raise BadInput(f"{first_file}: no parameter names of a known Megatron naming "
                           f"(first keys: {', '.join(list(chunks[0])[:4])})")
        self.naming: Naming = naming
        self.index, self.tied_head_location, layer_counts = self._build_index(len(chunks))
        embedding = self._shard("embedding.word_embeddings.weight", 0)
        self.meta = CheckpointMeta(
            layout=NAME, path=self.source, dtype=embedding.dtype, tp=tp, pp=pp, vpp=len(chunks), ep=ep, etp=sizes.etp,
            iteration=iteration, release=release, checkpoint_version=version, naming=naming.name,
            padded_vocab_size=embedding.shape[0] * tp,
            make_vocab_size_divisible_by=getattr(args, "make_vocab_size_divisible_by", None),
            args=args, files=[str(files.path(t, p)) for p in range(pp) for files in self.ep_files for t in range(tp)],
        )
        self.layer_counts = layer_counts
        for stack in self.spec.kind.stacks:
            total_layers = sum(count for (_, _, counted), count in layer_counts.items() if counted == stack)
            if total_layers != self.spec.stack_layers(stack):
                layers = f"{stack} layers" if len(self.spec.kind.stacks) > 1 else "layers"
                raise BadInput(f"{folder}: files hold {total_layers} {layers}; args say "
                               f"{self.spec.kind.count_field(stack)}={self.spec.stack_layers(stack)}")
        for canonical in self.canonical():
            if canonical.name not in self.index:
                raise BadInput(f"{folder}: tensor {canonical.name} is missing from every rank file")

    # -- the index

    def _build_index(self, num_chunks: int):
        """Map canonical names to (stage, chunk, key, EP rank), making layer and expert indices
        global. Non-expert tensors are indexed in EP rank 0's files (the other EP ranks' copies
        are compared by :meth:`validate`), each expert in its EP rank's. Each layer stack is
        numbered on its own (a T5 has two, and one stage)."""
        pp, ep = self.files.pp, len(self.ep_files)
        self.module_copies: list[tuple[_Location, str]] = []  # (where, the key it copies)
        per_rank = self.spec.num_experts // ep if self.spec.num_experts else 0
        per_chunk = {}
        for pp_stage in range(pp):
            for ep_rank in range(ep):
                files = self.ep_files[ep_rank]
                chunks = files.chunks(0, pp_stage)
                if len(chunks) != num_chunks:
                    raise BadInput(f"{files.path(0, pp_stage)}: {len(chunks)} model chunks; "
                                   f"stage 0 has {num_chunks}")
                for chunk, state in enumerate(chunks):
                    parsed = per_chunk.setdefault((pp_stage, chunk), {})
                    for key in state:
                        if key.endswith("._extra_state"):
                            continue
                        if copied_key(self.spec.model_kind, key) is not None:
                            self.module_copies.append((_Location(pp_stage, chunk, key, ep_rank),
                                                       copied_key(self.spec.model_kind, key)))
                            continue
                        found = self.naming.parse(key, self.spec.kind.pipelined_stack)
                        if found is None:
                            raise BadInput(f"{files.path(0, pp_stage)}: unknown tensor {key!r} "
                                           f"for naming {self.naming.name}")
                        if found[2] is not None and not 0 <= found[2] < per_rank:
                            raise BadInput(f"{files.path(0, pp_stage)}: {key} names local expert "
                                           f"{found[2]}; EP={ep} ranks of {self.spec.num_experts} experts hold "
                                           f"{per_rank} each")
                        if found[2] is not None or ep_rank == 0:
                            parsed[(ep_rank, key)] = found
        layer_counts = {}
        for place, parsed in per_chunk.items():
            for stack in self.spec.kind.stacks:
                layers = [layer for _, layer, _, in_stack in parsed.values() if layer is not None and in_stack == stack]
                layer_counts[(*place, stack)] = max(layers) + 1 if layers else 0
        # virtual stage s = chunk x PP + stage holds the next contiguous block of each stack's layers
        offsets, running = {}, dict.fromkeys(self.spec.kind.stacks, 0)
        for virtual in range(num_chunks * pp):
            for stack in self.spec.kind.stacks:
                place = (virtual % pp, virtual // pp, stack)
                offsets[place] = running[stack]
                running[stack] += layer_counts[place]
        index, tied_head = {}, None
        last_place = (pp - 1, num_chunks - 1)
        for place, parsed in per_chunk.items():
            for (ep_rank, key), (suffix, layer, local_expert, stack) in parsed.items():
                location = _Location(place[0], place[1], key, ep_rank)
                if layer is None:
                    name = suffix
                    if name == "output_layer.weight" and self.spec.tied_embeddings:
                        tied_head = location  # the last stage's copy of the embeddings
                        continue
                else:
                    if local_expert is not None:
                        suffix = suffix.format(expert=ep_rank * per_rank + local_expert)
                    name = f"{stack}.layers.{offsets[(*place, stack)] + layer}.{suffix}"
                if name in index:
                    raise BadInput(f"{self.ep_files[ep_rank].path(0, place[0])}: tensor {name} appears twice")
                index[name] = location
        if self.spec.tied_embeddings and pp * num_chunks > 1 and tied_head is None and \
                "output_layer.weight" not in index:
            self.warn(f"{self.files.path(0, last_place[0])}: tied embeddings but the last stage "
                      "holds no output-layer copy")
        return index, tied_head, {place: count for place, count in layer_counts.items()}

    # -- reading

    def _shard(self, name: str, tp_rank: int) -> torch.Tensor:
        location = self.index[name]
        return self._shard_at(location, tp_rank, name)

    def _shard_at(self, location: _Location, tp_rank: int, name: str) -> torch.Tensor:
        files = self.ep_files[location.ep_rank]
        chunks = files.chunks(tp_rank, location.pp_stage)
        path = files.path(tp_rank, location.pp_stage)
        if location.chunk >= len(chunks) or location.file_key not in chunks[location.chunk]:
            raise BadInput(f"{path}: tensor {location.file_key} missing (present on TP rank 0)")
        value = chunks[location.chunk][location.file_key]
        if not isinstance(value, torch.Tensor):
            raise BadInput(f"{path}: {location.file_key} is a {type(value).__name__}, not a tensor")
        return value

    def _rule(self, canonical: CanonicalTensor):
        padded = self.meta.padded_vocab_size if hasattr(self, "meta") else None
        return rule_for(self.spec, canonical.rule, padded)

    def _canonical_entry(self, name: str) -> CanonicalTensor:
        for canonical in self._canonical_by_name().get(name, []):
            return canonical
        raise BadInput(f"{self.source}: no canonical tensor {name}")

    def _canonical_by_name(self):
        if not hasattr(self, "_by_name"):
            self._by_name = {}
            for canonical in self.canonical():
                self._by_name.setdefault(canonical.name, []).append(canonical)
        return self._by_name

    def _stored_shards(self, name: str) -> list[torch.Tensor]:
        """Every TP rank's piece of ``name`` as loaded: shapes and dtypes, values not read yet."""
        return [self._shard(name, tp_rank) for tp_rank in range(self.files.tp)]

    def tensor(self, name: str) -> torch.Tensor:
        """The full tensor ``name``, each rank's piece read into the boxes its rule gives it.

        A rank whose boxes an earlier rank already filled holds a copy (a replicated
        tensor): it is not read here; :meth:`validate` compares the copies.
        """
        canonical = self._canonical_entry(name)
        rule = self._rule(canonical)
        stored = self._stored_shards(name)
        self._check_shard_shapes(canonical, stored)
        location = self.index[name]
        shape = rule.full_shape(canonical.shape)
        merged = torch.empty(shape, dtype=stored[0].dtype)
        filled = set()
        for tp_rank, shard in enumerate(stored):
            boxes = rule.boxes(shape, self.files.tp, tp_rank)
            if filled.issuperset(boxes):
                continue
            filled.update(boxes)
            self._place(tp_rank, location, shard, rule, boxes, merged)
        return merged

    def _place(self, tp_rank: int, location: _Location, stored: torch.Tensor, rule, boxes,
               merged: torch.Tensor) -> None:
        """Put one rank's stored piece (its boxes, concatenated along dim 0) into ``merged``.

        Where each row of every box is contiguous in ``merged`` (a block of whole rows, or a
        row-parallel block of columns), the rows are read from the file straight into place:
        one pass, no staging buffer, no ``cat``. Otherwise (memory-mapped or strided stored
        tensors, an old ``checkpoint_version`` whose rows the rule reorders) the piece is
        read, then copied into its boxes.
        """
        targets = [merged[box_slices(box)] for box in boxes]
        files = self.ep_files[location.ep_rank]
        straight = self.meta.checkpoint_version >= 2.0 and files.can_read_rows(stored) and \
            all(target.is_contiguous() or (target.dim() > 1 and target[0].is_contiguous()) for target in targets)
        if straight:
            row = 0
            for target in targets:
                files.read_rows_into(tp_rank, location.pp_stage, stored, range(row, row + target.shape[0]), target)
                row += target.shape[0]
            return
        piece = rule.from_checkpoint_version(files.read(tp_rank, location.pp_stage, stored),
                                             self.meta.checkpoint_version)
        row = 0
        for target in targets:
            if target.dim() == 0:
                target.copy_(piece)
                continue
            target.copy_(piece[row: row + target.shape[0]])
            row += target.shape[0]

    def _expected_shard_shape(self, canonical: CanonicalTensor) -> tuple:
        return self._rule(canonical).shard_shape(canonical.shape, self.files.tp)

    def _check_shard_shapes(self, canonical: CanonicalTensor, shards, location: _Location | None = None) -> None:
        expected = self._expected_shard_shape(canonical)
        location = location or self.index[canonical.name]
        for tp_rank, shard in enumerate(shards):
            if tuple(shard.shape) != expected:
                path = self.ep_files[location.ep_rank].path(tp_rank, location.pp_stage)
                raise BadInput(f"{path}: {location.file_key} has shape {tuple(shard.shape)}; expected "
                               f"{expected} for TP={self.files.tp}")
            if shard.dtype != shards[0].dtype:
                path = self.ep_files[location.ep_rank].path(tp_rank, location.pp_stage)
                raise BadInput(f"{path}: {location.file_key} has dtype {shard.dtype}; TP rank 0 has "
                               f"{shards[0].dtype}")

    def _row_reader(self, tp_rank: int, pp_stage: int, stored: torch.Tensor, ep_rank: int = 0) -> copies.ReadRows:
        files = self.ep_files[ep_rank]
        return lambda rows: files.read_rows(tp_rank, pp_stage, stored, rows)

    def _copy_locations(self, canonical: CanonicalTensor) -> list[_Location]:
        """Where the copies of a tensor are, one location per EP rank holding it: an expert's
        EP rank, or every EP rank for any other tensor (replicated over expert parallelism)."""
        location = self.index[canonical.name]
        if canonical.expert is not None:
            return [location]
        return [replace(location, ep_rank=ep_rank) for ep_rank in range(len(self.ep_files))]

    def _compare_copies(self, canonical: CanonicalTensor, report: copies.CopyReport) -> None:
        """Ranks whose rule gives them the same boxes hold copies (every TP rank, for a
        replicated tensor; every EP rank, for a tensor that is not an expert's): compare each
        with the first rank's, a chunk at a time."""
        rule = self._rule(canonical)
        shape = rule.full_shape(canonical.shape)
        holders: dict[tuple, list[tuple[int, _Location]]] = {}
        for location in self._copy_locations(canonical):
            stored = [self._shard_at(location, tp_rank, canonical.name) for tp_rank in range(self.files.tp)]
            self._check_shard_shapes(canonical, stored, location)
            for tp_rank in range(self.files.tp):
                holders.setdefault(tuple(rule.boxes(shape, self.files.tp, tp_rank)), []).append((tp_rank, location))
        groups = [ranks for ranks in holders.values() if len(ranks) > 1]
        if not groups:
            return
        worst = (0.0, groups[0][1], groups[0][0])
        for first, *others in groups:
            readers = [self._row_reader(tp_rank, location.pp_stage, self._shard_at(location, tp_rank, canonical.name),
                                        location.ep_rank) for tp_rank, location in (first, *others)]
            reference = self._shard_at(first[1], first[0], canonical.name)
            differences = copies.largest_differences(readers[0], readers[1:], tuple(reference.shape),
                                                     reference.element_size())
            difference, index = _worst(differences, first_rank=0)
            if not difference <= worst[0]:  # NaN counts as the worst
                worst = (difference, others[index], first)
        difference, (tp_rank, location), (reference_tp, reference_location) = worst
        across = f"TP ranks (max abs diff {difference:.3g} against TP rank {reference_tp}'s copy)" \
            if location.ep_rank == reference_location.ep_rank else \
            f"EP ranks (max abs diff {difference:.3g} against EP rank {reference_location.ep_rank}'s copy)"
        report.record(difference, f"{self.ep_files[location.ep_rank].path(tp_rank, location.pp_stage)}: replicated "
                                  f"tensor {location.file_key} differs across {across}")

    def _compare_tied_head(self, report: copies.CopyReport) -> None:
        """The last stage's output-head copy against the first stage's word embeddings, rank by rank."""
        head_location = self.tied_head_location
        embedding_location = self.index["embedding.word_embeddings.weight"]
        differences = []
        for tp_rank in range(self.files.tp):
            head = self._shard_at(head_location, tp_rank, "output_layer.weight")
            embedding = self._shard("embedding.word_embeddings.weight", tp_rank)
            if head.shape != embedding.shape:
                differences.append(float("inf"))
                continue
            differences += copies.largest_differences(
                self._row_reader(tp_rank, embedding_location.pp_stage, embedding),
                [self._row_reader(tp_rank, head_location.pp_stage, head)], tuple(head.shape), head.element_size())
        difference, tp_rank = _worst(differences, first_rank=0)
        report.record(difference, f"{self.files.path(tp_rank, head_location.pp_stage)}: {head_location.file_key} "
                                  f"(tied output head) differs from the first stage's word embeddings (max abs "
                                  f"diff {difference:.3g})")

    def _compare_module_copy(self, location: _Location, original: str, report: copies.CopyReport) -> None:
        """A module's entry saved under its second name (T5's ``lm_head.output_layer``) against
        the same file's entry under its first name, rank by rank."""
        files = self.ep_files[location.ep_rank]
        differences = []
        for tp_rank in range(self.files.tp):
            entries = files.chunks(tp_rank, location.pp_stage)[location.chunk]
            if original not in entries or location.file_key not in entries:
                raise BadInput(f"{files.path(tp_rank, location.pp_stage)}: {location.file_key} without {original}")
            first, second = entries[original], entries[location.file_key]
            if first.shape != second.shape:
                differences.append(float("inf"))
                continue
            differences += copies.largest_differences(
                self._row_reader(tp_rank, location.pp_stage, first, location.ep_rank),
                [self._row_reader(tp_rank, location.pp_stage, second, location.ep_rank)], tuple(first.shape),
                first.element_size())
        difference, tp_rank = _worst(differences, first_rank=0)
        report.record(difference, f"{files.path(tp_rank, location.pp_stage)}: {location.file_key} differs from "
                                  f"{original}, the same module's entry (max abs diff {difference:.3g})")

    compares_copies_apart = True

    def validate(self, compare_copies: bool = True) -> list[str]:
        """Load every rank file and compare key sets and shapes; compare the copies that should
        be identical (replicated tensors across TP ranks, the tied head with the embeddings) a
        chunk of rows at a time, unless ``compare_copies`` is off (:meth:`compare_copies`
        then does). Returns one note for all copies that differ (an error naming the first
        one in strict mode)."""
        for pp_stage in range(self.files.pp):
            reference = self.files.chunks(0, pp_stage)
            for tp_rank, ep_rank in [(t, e) for e in range(len(self.ep_files)) for t in range(self.files.tp)][1:]:
                chunks = self.ep_files[ep_rank].chunks(tp_rank, pp_stage)
                path = self.ep_files[ep_rank].path(tp_rank, pp_stage)
                first = "TP rank 0" if ep_rank == 0 else "TP rank 0 of EP rank 0"
                if len(chunks) != len(reference):
                    raise BadInput(f"{path}: {len(chunks)} model chunks; {first} has {len(reference)}")
                for chunk, (mine, theirs) in enumerate(zip(reference, chunks)):
                    missing = sorted(set(mine) - set(theirs))
                    if missing:
                        raise BadInput(f"{path}: tensor {missing[0]} missing (present on {first})")
                    extra = sorted(set(theirs) - set(mine))
                    if extra:
                        raise BadInput(f"{path}: unexpected tensor {extra[0]}")
        for canonical in self.canonical():
            for location in self._copy_locations(canonical):
                self._check_shard_shapes(canonical, [self._shard_at(location, tp_rank, canonical.name)
                                                     for tp_rank in range(self.files.tp)], location)
        return self.compare_copies() if compare_copies else []

    def compare_copies(self) -> list[str]:
        """Compare every replicated tensor's copies and the tied head with the embeddings (see
        :meth:`validate`); reads only, so it may run while tensors are fetched."""
        report = copies.CopyReport(self.strict)
        for canonical in self.canonical():
            self._compare_copies(canonical, report)
        if self.tied_head_location is not None:
            self._compare_tied_head(report)
        for location, original in self.module_copies:
            self._compare_module_copy(location, original, report)
        summary = report.summary(self.files.folder, used="TP rank 0's copies of replicated tensors (EP rank 0's "
                                                         "of tensors that are not experts') and the first stage's "
                                                         "word embeddings are used" if len(self.ep_files) > 1 else
                                 "TP rank 0's copies of replicated tensors and the first stage's word embeddings "
                                 "are used")
        return [summary] if summary else []

    def rank_state(self, tp_rank: int, pp_stage: int, ep_rank: int = 0) -> dict:
        """The whole loaded dict of one rank file (args, optimizer, rng_state, ...)."""
        return self.ep_files[ep_rank].state(tp_rank, pp_stage)

    def close(self) -> None:
        for files in getattr(self, "ep_files", []):
            files.close()
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)
            self._temporary = None


def _check_expert_sizes(spec, sizes, where: Path) -> None:
    """Per-rank files of a mixture of experts are read where the experts are cut over the TP
    ranks (ETP = TP, Megatron's default) and EP divides the experts."""
    if not spec.num_experts:
        return
    if sizes.etp != sizes.tp:
        raise Unsupported(f"{where}: expert tensor parallel size ETP={sizes.etp} differs from TP={sizes.tp}: "
                          "which per-rank file holds which piece of an expert is not confirmed on real files "
                          "(per-rank files with ETP = TP, and torch_dist at any ETP, are read)")
    if spec.num_experts % sizes.ep:
        raise BadInput(f"{where}: EP={sizes.ep} does not divide {spec.num_experts} experts (args)")


def open_reader(path, **options) -> MegatronLegacyReader:
    return MegatronLegacyReader(path, **options)
