"""Megatron-LM per-rank files (``--ckpt-format torch``), read and written as Megatron does.

Directory layout (TP=2, PP=2)::

    DIR/latest_checkpointed_iteration.txt      "10" (or "release")
    DIR/iter_0000010/mp_rank_00_000/model_optim_rng.pt   TP rank 0, PP stage 0
    DIR/iter_0000010/mp_rank_01_000/model_optim_rng.pt   TP rank 1, PP stage 0
    DIR/iter_0000010/mp_rank_00_001/model_optim_rng.pt   TP rank 0, PP stage 1
    DIR/iter_0000010/mp_rank_01_001/model_optim_rng.pt   TP rank 1, PP stage 1

With PP=1 the folders are ``mp_rank_00``, ``mp_rank_01``. Each file holds ``args``,
``checkpoint_version``, ``iteration`` and ``model`` (or ``model0``, ``model1``, ...
with virtual pipeline stages: chunk ``c`` of stage ``p`` is virtual stage
``c x PP + p``). Layer indices are local to the chunk: with 6 layers at PP=2, stage 1
holds ``decoder.layers.0..2`` for global layers 3..5.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import tempfile
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import BadInput, Unsupported
from ..rules import box_slices, qkv_to_current  # noqa: F401 (qkv_to_current: still importable from here)
from ..megatron_args import megatron_args, spec_from_args
from ..spec import CanonicalTensor, ModelSpec, canonical_tensors, check_parallel_sizes, padded_vocab_size, rule_for
from ..safe_load import safe_torch_load, without_stand_ins
from ..streaming_io import read_into, read_tensor
from ..torch_stream import StreamingTorchWriter
from . import copies
from .base import CheckpointMeta, CheckpointReader
from .tracker import TRACKER, iteration_dir_name, locate_iteration_folder
from .megatron_names import NAMINGS, Naming, detect_naming

NAME = "megatron-legacy"
RANK_FILE = "model_optim_rng.pt"
WRITE_CHECKPOINT_VERSION = 3.0
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


def rank_dir_name(tp_rank: int, pp_stage: int, pp_size: int) -> str:
    """``mp_rank_TT`` with PP=1, ``mp_rank_TT_PPP`` otherwise (Megatron's spelling)."""
    if pp_size == 1:
        return f"mp_rank_{tp_rank:02d}"
    return f"mp_rank_{tp_rank:02d}_{pp_stage:03d}"


# ---------------------------------------------------------------------------- finding files

def _has_rank_dirs(path: Path) -> bool:
    return path.is_dir() and any(_RANK_DIR.match(child.name) for child in path.iterdir())


def locate_iteration_dir(root: Path) -> tuple[Path, int | None, bool]:
    """``(iteration folder, iteration, is_release)`` for a checkpoint root or iteration folder."""
    return locate_iteration_folder(
        root, _has_rank_dirs, tracked_mismatch="no mp_rank_* folders", unwrap_single_child=True,
        not_found=f"not a Megatron checkpoint ({TRACKER} missing and no single iter_* folder)")


def detect(path: Path) -> bool:
    path = Path(path)
    if path.suffix == ".zip" and path.is_file():
        return True
    if not path.is_dir():
        return False
    if _has_rank_dirs(path):
        return any((child / RANK_FILE).exists() for child in path.iterdir() if _RANK_DIR.match(child.name))
    tracker = path / TRACKER
    if tracker.is_file():
        try:
            folder, _, _ = locate_iteration_dir(path)
        except BadInput:
            return not any(path.glob("iter_*/.metadata"))
        return any((child / RANK_FILE).exists() for child in folder.iterdir())
    return False


def _extract_zip(archive: Path) -> Path:
    """Unpack an NGC-style ``.zip`` into a private temporary folder (refusing unsafe paths)."""
    target = Path(tempfile.mkdtemp(prefix="ckptkit-zip-"))
    try:
        with zipfile.ZipFile(archive) as opened:
            for member in opened.namelist():
                resolved = (target / member).resolve()
                if not str(resolved).startswith(str(target.resolve()) + os.sep) and resolved != target.resolve():
                    raise BadInput(f"{archive}: member {member!r} would unpack outside the folder")
            opened.extractall(target)
    except zipfile.BadZipFile as error:
        shutil.rmtree(target, ignore_errors=True)
        raise BadInput(f"{archive}: not a readable zip ({error})") from None
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return target


def _flatten(state: dict, prefix: str = "") -> dict:
    """Nested pre-Core dicts -> dotted keys: model["language_model"]["encoder"]["layers.0.x"]
    becomes ``language_model.encoder.layers.0.x``."""
    flat = {}
    for key, value in state.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _model_chunks(state: dict, path: Path) -> list[dict]:
    if "model" in state:
        return [_flatten(state["model"])]
    chunk_keys = sorted((key for key in state if isinstance(key, str) and re.fullmatch(r"model\d+", key)),
                        key=lambda key: int(key[5:]))
    if not chunk_keys:
        raise BadInput(f"{path}: no 'model' entry (keys: {', '.join(map(str, list(state)[:8]))})")
    return [_flatten(state[key]) for key in chunk_keys]


# ---------------------------------------------------------------------------- reading

@dataclass
class _Location:
    pp_stage: int
    chunk: int
    file_key: str


@dataclass
class _RankFiles:
    """The rank files of one checkpoint: their pickles loaded, their tensors read on demand.

    Only the pickle is loaded up front (``map_location="meta"``): each tensor comes back
    on the meta device with its storage's byte offset in the file, and :meth:`read` fills
    a fresh tensor from the file with explicit reads. Files torch cannot give offsets for
    are memory-mapped instead.
    """

    folder: Path
    tp: int
    pp: int
    trust_remote_pickle: bool = False
    loaded: dict = field(default_factory=dict)
    full_states: dict = field(default_factory=dict)
    descriptors: dict = field(default_factory=dict)

    def path(self, tp_rank: int, pp_stage: int) -> Path:
        return self.folder / rank_dir_name(tp_rank, pp_stage, self.pp) / RANK_FILE

    def _load(self, path: Path, map_location: str) -> dict:
        state = safe_torch_load(path, trust_remote_pickle=self.trust_remote_pickle, map_location=map_location)
        if not isinstance(state, dict):
            raise BadInput(f"{path}: expected a dict, found {type(state).__name__}")
        return state

    def chunks(self, tp_rank: int, pp_stage: int) -> list[dict]:
        key = (tp_rank, pp_stage)
        if key not in self.loaded:
            path = self.path(tp_rank, pp_stage)
            state = self._load(path, "meta")
            chunks = _model_chunks(state, path)
            if not _offsets_known(chunks):
                state = self._load(path, "cpu")
                chunks = _model_chunks(state, path)
            self.loaded[key] = (state, chunks)
        return self.loaded[key][1]

    def state(self, tp_rank: int, pp_stage: int) -> dict:
        """The whole file with real (memory-mapped) tensors: optimizer state, RNG, ..."""
        key = (tp_rank, pp_stage)
        if key not in self.full_states:
            self.chunks(tp_rank, pp_stage)
            state = self.loaded[key][0]
            if _has_meta_tensors(state):
                state = self._load(self.path(tp_rank, pp_stage), "cpu")
            self.full_states[key] = state
        return self.full_states[key]

    def _descriptor(self, tp_rank: int, pp_stage: int) -> int:
        key = (tp_rank, pp_stage)
        if key not in self.descriptors:
            self.descriptors[key] = os.open(self.path(tp_rank, pp_stage), os.O_RDONLY)
        return self.descriptors[key]

    @staticmethod
    def can_read_rows(stored: torch.Tensor) -> bool:
        """Whether :meth:`read_rows_into` can read ``stored``'s rows: a contiguous tensor of
        at least one dimension whose bytes were not loaded (read by offset)."""
        return stored.device.type == "meta" and stored.is_contiguous() and stored.dim() > 0

    def read_rows_into(self, tp_rank: int, pp_stage: int, stored: torch.Tensor, rows: range,
                       out: torch.Tensor) -> bool:
        """Read rows ``rows`` of ``stored`` straight into contiguous ``out``; False when the
        tensor is not one that can be read that way (memory-mapped, or a strided view)."""
        if not self.can_read_rows(stored):
            return False
        row_bytes = stored[0].numel() * stored.element_size() if stored.dim() else stored.element_size()
        offset = stored.untyped_storage()._checkpoint_offset + stored.storage_offset() * stored.element_size()
        read_into(self._descriptor(tp_rank, pp_stage), out, offset + rows.start * row_bytes)
        return True

    def read(self, tp_rank: int, pp_stage: int, stored: torch.Tensor) -> torch.Tensor:
        """The values of ``stored`` (a tensor of :meth:`chunks`), in a tensor of its own."""
        if stored.device.type != "meta":
            return stored
        key = (tp_rank, pp_stage)
        self._descriptor(tp_rank, pp_stage)
        element = stored.element_size()
        offset = stored.untyped_storage()._checkpoint_offset + stored.storage_offset() * element
        if stored.is_contiguous():
            return read_tensor(self.descriptors[key], offset, stored.shape, stored.dtype)
        # A view saved as such (rare): read the span it covers, then take the same view.
        span = 1 + sum((size - 1) * stride for size, stride in zip(stored.shape, stored.stride())) \
            if stored.numel() else 0
        flat = read_tensor(self.descriptors[key], offset, (span,), stored.dtype)
        return flat.as_strided(stored.shape, stored.stride()).contiguous()

    def read_rows(self, tp_rank: int, pp_stage: int, stored: torch.Tensor, rows: range) -> torch.Tensor:
        """Rows ``rows`` (along dim 0) of ``stored``, read from the file into a tensor of their own."""
        return self.read(tp_rank, pp_stage, stored[rows.start: rows.stop] if stored.dim() else stored)

    def close(self) -> None:
        for descriptor in self.descriptors.values():
            os.close(descriptor)
        self.descriptors.clear()
        self.loaded.clear()
        self.full_states.clear()


def _tensors_in(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item)


def _offsets_known(chunks: list[dict]) -> bool:
    """Whether torch gave every meta tensor its byte offset (torch>=2.5 and zip files do)."""
    return all(tensor.device.type != "meta" or hasattr(tensor.untyped_storage(), "_checkpoint_offset")
               for tensor in _tensors_in(chunks))


def _has_meta_tensors(state: dict) -> bool:
    return any(tensor.device.type == "meta" for tensor in _tensors_in(state))


def _worst(differences: list[float], first_rank: int) -> tuple[float, int]:
    """The largest of per-rank differences (NaN counts as largest) and its TP rank."""
    index = max(range(len(differences)), key=lambda i: (math.isnan(differences[i]), differences[i]))
    return differences[index], first_rank + index


class MegatronLegacyReader(CheckpointReader):
    """Canonical tensors merged from Megatron per-rank files (mmap'd, read on demand)."""

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
        ranks = self._scan_ranks(folder)
        first_file = folder / sorted(ranks)[0] / RANK_FILE
        first = safe_torch_load(first_file, trust_remote_pickle=trust_remote_pickle, map_location="meta")
        args = first.get("args") if isinstance(first, dict) else None
        if args is None:
            raise BadInput(f"{first_file}: no 'args' entry; cannot tell the architecture")
        tp = int(getattr(args, "tensor_model_parallel_size", 1) or 1)
        pp = int(getattr(args, "pipeline_model_parallel_size", 1) or 1)
        ep = int(getattr(args, "expert_model_parallel_size", 1) or 1)
        if getattr(args, "num_experts", None):
            raise Unsupported(f"{first_file}: mixture-of-experts checkpoints (num_experts="
                              f"{args.num_experts}) are not supported yet")
        self._check_rank_set(folder, ranks, tp, pp)
        self.files = _RankFiles(folder, tp, pp, trust_remote_pickle)
        first_chunks = _model_chunks(first, first_file)
        if _offsets_known(first_chunks):
            self.files.loaded[(0, 0)] = (first, first_chunks)
        self.spec = spec_from_args(args, vocab_size=vocab_size, source=str(first_file))
        version = float(first.get("checkpoint_version", 0) or 0)
        if iteration is None and not release:
            iteration = first.get("iteration")
        chunks = self.files.chunks(0, 0)
        naming = detect_naming(chunks[0].keys())
        if naming is None:
            raise BadInput(f"{first_file}: no parameter names of a known Megatron naming "
                           f"(first keys: {', '.join(list(chunks[0])[:4])})")
        self.naming: Naming = naming
        self.index, self.tied_head_location, layer_counts = self._build_index(len(chunks))
        embedding = self._shard("embedding.word_embeddings.weight", 0)
        self.meta = CheckpointMeta(
            layout=NAME, path=self.source, dtype=embedding.dtype, tp=tp, pp=pp, vpp=len(chunks), ep=ep,
            iteration=iteration, release=release, checkpoint_version=version, naming=naming.name,
            padded_vocab_size=embedding.shape[0] * tp,
            make_vocab_size_divisible_by=getattr(args, "make_vocab_size_divisible_by", None),
            args=args, files=[str(self.files.path(t, p)) for p in range(pp) for t in range(tp)],
        )
        self.layer_counts = layer_counts
        total_layers = sum(layer_counts.values())
        if total_layers != self.spec.num_layers:
            raise BadInput(f"{folder}: files hold {total_layers} layers; args say num_layers="
                           f"{self.spec.num_layers}")
        for canonical in self.canonical():
            if canonical.name not in self.index:
                raise BadInput(f"{folder}: tensor {canonical.name} is missing from every rank file")

    # -- discovery

    @staticmethod
    def _scan_ranks(folder: Path) -> dict:
        ranks = {}
        for child in folder.iterdir():
            match = _RANK_DIR.match(child.name)
            if match and child.is_dir():
                ranks[child.name] = match
        if not ranks:
            raise BadInput(f"{folder}: no mp_rank_* folders")
        return ranks

    @staticmethod
    def _check_rank_set(folder: Path, ranks: dict, tp: int, pp: int) -> None:
        expected = {rank_dir_name(t, p, pp) for t in range(tp) for p in range(pp)}
        missing = sorted(expected - set(ranks))
        if missing:
            raise BadInput(f"{folder / missing[0]}: rank folder missing (args say TP={tp}, PP={pp})")
        extra = sorted(set(ranks) - expected)
        if extra:
            raise Unsupported(f"{folder / extra[0]}: unexpected rank folder for TP={tp}, PP={pp} "
                              "(expert-parallel layouts are not supported yet)")
        for name in sorted(expected):
            path = folder / name / RANK_FILE
            if not path.is_file():
                raise BadInput(f"{path}: rank file missing")

    def _build_index(self, num_chunks: int):
        """Map canonical names to (stage, chunk, key), making layer indices global."""
        pp = self.files.pp
        per_chunk = {}
        for pp_stage in range(pp):
            chunks = self.files.chunks(0, pp_stage)
            if len(chunks) != num_chunks:
                raise BadInput(f"{self.files.path(0, pp_stage)}: {len(chunks)} model chunks; "
                               f"stage 0 has {num_chunks}")
            for chunk, state in enumerate(chunks):
                parsed = {}
                for key in state:
                    if key.endswith("._extra_state"):
                        continue
                    found = self.naming.parse(key)
                    if found is None:
                        raise BadInput(f"{self.files.path(0, pp_stage)}: unknown tensor {key!r} "
                                       f"for naming {self.naming.name}")
                    parsed[key] = found
                per_chunk[(pp_stage, chunk)] = parsed
        layer_counts = {}
        for place, parsed in per_chunk.items():
            layers = [layer for _, layer in parsed.values() if layer is not None]
            layer_counts[place] = max(layers) + 1 if layers else 0
        # virtual stage s = chunk x PP + stage holds the next contiguous block of layers
        offsets, running = {}, 0
        for virtual in range(num_chunks * pp):
            place = (virtual % pp, virtual // pp)
            offsets[place] = running
            running += layer_counts[place]
        index, tied_head = {}, None
        last_place = (pp - 1, num_chunks - 1)
        for place, parsed in per_chunk.items():
            for key, (suffix, layer) in parsed.items():
                location = _Location(place[0], place[1], key)
                if layer is None:
                    name = suffix
                    if name == "output_layer.weight" and self.spec.tied_embeddings:
                        tied_head = location  # the last stage's copy of the embeddings
                        continue
                else:
                    name = f"decoder.layers.{offsets[place] + layer}.{suffix}"
                if name in index:
                    raise BadInput(f"{self.files.path(0, place[0])}: tensor {name} appears twice")
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
        chunks = self.files.chunks(tp_rank, location.pp_stage)
        path = self.files.path(tp_rank, location.pp_stage)
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
        pp_stage = self.index[name].pp_stage
        shape = rule.full_shape(canonical.shape)
        merged = torch.empty(shape, dtype=stored[0].dtype)
        filled = set()
        for tp_rank, shard in enumerate(stored):
            boxes = rule.boxes(shape, self.files.tp, tp_rank)
            if filled.issuperset(boxes):
                continue
            filled.update(boxes)
            self._place(tp_rank, pp_stage, shard, rule, boxes, merged)
        return merged

    def _place(self, tp_rank: int, pp_stage: int, stored: torch.Tensor, rule, boxes, merged: torch.Tensor) -> None:
        """Put one rank's stored piece (its boxes, concatenated along dim 0) into ``merged``.

        Where every box is a block of whole rows, its rows are read from the file straight
        into place: one pass, no ``cat``. Otherwise (row-parallel column blocks, memory-mapped
        or strided stored tensors, an old ``checkpoint_version`` whose rows the rule reorders)
        the piece is read, then copied into its boxes.
        """
        targets = [merged[box_slices(box)] for box in boxes]
        straight = self.meta.checkpoint_version >= 2.0 and self.files.can_read_rows(stored) and \
            all(target.is_contiguous() for target in targets)
        if straight:
            row = 0
            for target in targets:
                self.files.read_rows_into(tp_rank, pp_stage, stored, range(row, row + target.shape[0]), target)
                row += target.shape[0]
            return
        piece = rule.from_checkpoint_version(self.files.read(tp_rank, pp_stage, stored), self.meta.checkpoint_version)
        row = 0
        for target in targets:
            if target.dim() == 0:
                target.copy_(piece)
                continue
            target.copy_(piece[row: row + target.shape[0]])
            row += target.shape[0]

    def _expected_shard_shape(self, canonical: CanonicalTensor) -> tuple:
        return self._rule(canonical).shard_shape(canonical.shape, self.files.tp)

    def _check_shard_shapes(self, canonical: CanonicalTensor, shards) -> None:
        expected = self._expected_shard_shape(canonical)
        location = self.index[canonical.name]
        for tp_rank, shard in enumerate(shards):
            if tuple(shard.shape) != expected:
                path = self.files.path(tp_rank, location.pp_stage)
                raise BadInput(f"{path}: {location.file_key} has shape {tuple(shard.shape)}; expected "
                               f"{expected} for TP={self.files.tp}")
            if shard.dtype != shards[0].dtype:
                path = self.files.path(tp_rank, location.pp_stage)
                raise BadInput(f"{path}: {location.file_key} has dtype {shard.dtype}; TP rank 0 has "
                               f"{shards[0].dtype}")

    def _row_reader(self, tp_rank: int, pp_stage: int, stored: torch.Tensor) -> copies.ReadRows:
        return lambda rows: self.files.read_rows(tp_rank, pp_stage, stored, rows)

    def _compare_copies(self, canonical: CanonicalTensor, stored: list[torch.Tensor],
                        report: copies.CopyReport) -> None:
        """Ranks whose rule gives them the same boxes hold copies (every rank, for a replicated
        tensor): compare each with the first rank's, a chunk at a time."""
        rule = self._rule(canonical)
        shape = rule.full_shape(canonical.shape)
        holders: dict[tuple, list[int]] = {}
        for tp_rank in range(self.files.tp):
            holders.setdefault(tuple(rule.boxes(shape, self.files.tp, tp_rank)), []).append(tp_rank)
        groups = [ranks for ranks in holders.values() if len(ranks) > 1]
        if not groups:
            return
        location = self.index[canonical.name]
        worst = (0.0, groups[0][1], groups[0][0])
        for first, *others in groups:
            readers = [self._row_reader(tp_rank, location.pp_stage, stored[tp_rank]) for tp_rank in (first, *others)]
            differences = copies.largest_differences(readers[0], readers[1:], tuple(stored[first].shape),
                                                     stored[first].element_size())
            difference, index = _worst(differences, first_rank=0)
            if not difference <= worst[0]:  # NaN counts as the worst
                worst = (difference, others[index], first)
        difference, tp_rank, reference = worst
        report.record(difference, f"{self.files.path(tp_rank, location.pp_stage)}: replicated tensor "
                                  f"{location.file_key} differs across TP ranks (max abs diff {difference:.3g} "
                                  f"against TP rank {reference}'s copy)")

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

    def validate(self) -> list[str]:
        """Load every rank file and compare key sets and shapes; compare the copies that should
        be identical (replicated tensors across TP ranks, the tied head with the embeddings) a
        chunk of rows at a time. Returns one note for all copies that differ (an error naming
        the first one in strict mode)."""
        for pp_stage in range(self.files.pp):
            reference = self.files.chunks(0, pp_stage)
            for tp_rank in range(1, self.files.tp):
                chunks = self.files.chunks(tp_rank, pp_stage)
                for chunk, (mine, theirs) in enumerate(zip(reference, chunks)):
                    missing = sorted(set(mine) - set(theirs))
                    if missing:
                        raise BadInput(f"{self.files.path(tp_rank, pp_stage)}: tensor {missing[0]} missing "
                                       "(present on TP rank 0)")
                    extra = sorted(set(theirs) - set(mine))
                    if extra:
                        raise BadInput(f"{self.files.path(tp_rank, pp_stage)}: unexpected tensor {extra[0]}")
        report = copies.CopyReport(self.strict)
        for canonical in self.canonical():
            stored = self._stored_shards(canonical.name)
            self._check_shard_shapes(canonical, stored)
            self._compare_copies(canonical, stored, report)
        if self.tied_head_location is not None:
            self._compare_tied_head(report)
        summary = report.summary(self.files.folder, used="TP rank 0's copies of replicated tensors and the "
                                                         "first stage's word embeddings are used")
        return [summary] if summary else []

    def rank_state(self, tp_rank: int, pp_stage: int) -> dict:
        """The whole loaded dict of one rank file (args, optimizer, rng_state, ...)."""
        return self.files.state(tp_rank, pp_stage)

    def close(self) -> None:
        if hasattr(self, "files"):
            self.files.close()
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)
            self._temporary = None


def open_reader(path, **options) -> MegatronLegacyReader:
    return MegatronLegacyReader(path, **options)


# ---------------------------------------------------------------------------- writing

@dataclass
class TargetLayout:
    """Where a Megatron checkpoint is going: sizes, naming, padding, dtype."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    naming: str = "mcore-local"
    make_vocab_size_divisible_by: int = 128
    dtype: torch.dtype | None = None
    iteration: int | None = None
    release: bool = False
    args_base: argparse.Namespace | None = None


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


def stage_layers(spec: ModelSpec, pp: int, vpp: int) -> dict[tuple[int, int], range]:
    """Global layers of each (stage, chunk): virtual stage ``c x PP + p`` holds block ``c x PP + p``.

    8 layers, PP=2, VPP=2: (0,0)->0-1, (1,0)->2-3, (0,1)->4-5, (1,1)->6-7.
    """
    per_virtual = spec.num_layers // (pp * vpp)
    return {(virtual % pp, virtual // pp): range(virtual * per_virtual, (virtual + 1) * per_virtual)
            for virtual in range(pp * vpp)}


def plan_files(spec: ModelSpec, target: TargetLayout) -> list[PlannedRankFile]:
    """Every rank file to write and the canonical tensor behind each of its keys."""
    check_parallel_sizes(spec, target.tp, target.pp, target.vpp)
    if target.naming not in NAMINGS:
        raise BadInput(f"unknown naming {target.naming!r} (choose from {', '.join(NAMINGS)})")
    naming = NAMINGS[target.naming]
    layers_of = stage_layers(spec, target.pp, target.vpp)
    canonical = canonical_tensors(spec)
    embedding = next(tensor for tensor in canonical if tensor.name == "embedding.word_embeddings.weight")
    last = (target.pp - 1, target.vpp - 1)
    plan = []
    for pp_stage in range(target.pp):
        for tp_rank in range(target.tp):
            chunks, extra_states = [], []
            for chunk in range(target.vpp):
                place = (pp_stage, chunk)
                layers = layers_of[place]
                entries, extra = [], []
                for tensor in canonical:
                    if tensor.layer is not None:
                        if tensor.layer not in layers:
                            continue
                        suffix = tensor.name.split(".", 3)[3]
                        key = naming.file_name(suffix, tensor.layer - layers.start)
                        entries.append(PlannedTensor(key, tensor.name, tensor.rule))
                        continue
                    first_stage_tensor = tensor.name.startswith("embedding.")
                    if first_stage_tensor and place != (0, 0):
                        continue
                    if not first_stage_tensor and place != last:
                        continue
                    entries.append(PlannedTensor(naming.file_name(tensor.name, None), tensor.name, tensor.rule))
                if spec.tied_embeddings and place == last and target.pp * target.vpp > 1:
                    # Megatron keeps its own copy of the embeddings for the output head on the last stage.
                    entries.append(PlannedTensor(naming.tied_head[0], "output_layer.weight", embedding.rule,
                                                 copy_of=embedding.name))
                for layer in layers:
                    extra += naming.extra_state_names(layer - layers.start)
                head_present = place == last and (not spec.tied_embeddings or target.pp * target.vpp > 1)
                if head_present and naming.head_extra_state:
                    extra.append(naming.head_extra_state)
                chunks.append(entries)
                extra_states.append(extra)
            relative = f"{rank_dir_name(tp_rank, pp_stage, target.pp)}/{RANK_FILE}"
            plan.append(PlannedRankFile(relative, tp_rank, pp_stage, chunks, extra_states))
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
            module, param = key[len("language_model."):].rsplit(".", 1)
            nested.setdefault("language_model", OrderedDict()).setdefault(module, OrderedDict())[param] = value
        else:
            module, param = key.rsplit(".", 1)
            nested.setdefault(module, OrderedDict())[param] = value
    return nested


def output_files(spec: ModelSpec, target: TargetLayout, dtype: torch.dtype) -> list[tuple[str, int]]:
    """``(relative path, approximate bytes)`` of every rank file :func:`write` makes, in order."""
    shapes = {tensor.name: tensor.shape for tensor in canonical_tensors(spec)}
    shapes["output_layer.weight"] = shapes["embedding.word_embeddings.weight"]
    element = torch.empty((), dtype=dtype).element_size()
    padded = padded_vocab_size(spec.vocab_size, target.make_vocab_size_divisible_by, target.tp)
    folder = iteration_dir_name(target.iteration if not target.release else None, target.release)
    files = []
    for entry in plan_files(spec, target):
        size = 0
        for chunk in entry.chunks:
            for planned in chunk:
                shard_shape = rule_for(spec, planned.rule, padded).shard_shape(shapes[planned.canonical], target.tp)
                size += math.prod(shard_shape) * element
        files.append((f"{folder}/{entry.relative_path}", size))
    return files


def write(reader: CheckpointReader, out_dir: Path, target: TargetLayout, *, progress=None,
          only=None, finish: bool = True) -> list[str]:
    """Write ``reader``'s model as Megatron per-rank files under ``out_dir`` (a fresh folder).

    Streams: for each pipeline stage, each canonical tensor is read once, split over the
    TP ranks, and every piece goes straight to its rank file on disk. Returns the
    relative paths written. ``only`` (relative paths, as returned) restricts the files
    written, for one worker's share; ``finish=False`` leaves out the tracker file, which
    the process that writes it does once every share is done.
    """
    spec = reader.spec
    dtype = target.dtype or reader.meta.dtype
    padded = padded_vocab_size(spec.vocab_size, target.make_vocab_size_divisible_by, target.tp)
    plan = plan_files(spec, target)
    iteration = target.iteration if not target.release else None
    folder = out_dir / iteration_dir_name(iteration, target.release)
    args = megatron_args(spec, tp=target.tp, pp=target.pp, vpp=target.vpp, dtype=dtype, padded_vocab=padded,
                         make_vocab_size_divisible_by=target.make_vocab_size_divisible_by,
                         iteration=iteration or 0,
                         transformer_impl="transformer_engine" if target.naming == "mcore-te" else "local",
                         base=target.args_base)
    if target.naming == "legacy":
        args.use_legacy_models = True
    args = without_stand_ins(args)
    if only is not None:
        only = set(only)
        plan = [entry for entry in plan if f"{folder.name}/{entry.relative_path}" in only]
    written = []
    for pp_stage in range(target.pp):
        stage_files = [entry for entry in plan if entry.pp_stage == pp_stage]
        if not stage_files:
            continue
        writers = {}
        refs = {entry.tp_rank: [OrderedDict() for _ in entry.chunks] for entry in stage_files}
        try:
            for entry in stage_files:
                path = folder / entry.relative_path
                path.parent.mkdir(parents=True, exist_ok=True)
                writers[entry.tp_rank] = StreamingTorchWriter(path)
            template = stage_files[0]
            for chunk_index, chunk in enumerate(template.chunks):
                for position, planned in enumerate(chunk):
                    source_name = planned.copy_of or planned.canonical
                    rule = rule_for(spec, planned.rule, padded)
                    full = rule.fit(reader.tensor(source_name).to(dtype))  # no copy when the dtype is already right
                    # Views of ``full`` where a rank holds one box: a replicated tensor is written from one copy.
                    pieces = {entry.tp_rank: rule.shard(full, target.tp, entry.tp_rank) for entry in stage_files}
                    del full
                    for entry in stage_files:
                        key = entry.chunks[chunk_index][position].file_key
                        refs[entry.tp_rank][chunk_index][key] = writers[entry.tp_rank].add_tensor(pieces[entry.tp_rank])
                    del pieces
                    if progress:
                        progress(planned.canonical)
            for entry in stage_files:
                models = []
                for chunk_index, chunk_refs in enumerate(refs[entry.tp_rank]):
                    for key in entry.extra_state_keys[chunk_index]:
                        chunk_refs[key] = None
                    models.append(_nest(chunk_refs, target.naming))
                state = {"args": args, "checkpoint_version": WRITE_CHECKPOINT_VERSION,
                         "iteration": iteration or 0}
                if len(models) == 1:
                    state["model"] = models[0]
                else:
                    for chunk_index, model in enumerate(models):
                        state[f"model{chunk_index}"] = model
                writers[entry.tp_rank].finish(state)
                written.append(str(Path(folder.name) / entry.relative_path))
        finally:
            for writer in writers.values():
                writer.close()
    if finish:
        write_tracker(out_dir, target)
    return written


def write_tracker(out_dir: Path, target: TargetLayout) -> None:
    """``latest_checkpointed_iteration.txt``: the iteration, or ``release``."""
    iteration = target.iteration if not target.release else None
    (out_dir / TRACKER).write_text("release" if target.release or iteration is None else str(iteration))
