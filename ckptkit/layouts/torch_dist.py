"""Megatron-Core distributed checkpoints (``--ckpt-format torch_dist``), read and written as Megatron does.

Directory layout (any TP/PP: the tensors are global)::

    DIR/latest_checkpointed_iteration.txt   "10" (or "release")
    DIR/iter_0000010/metadata.json          {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
    DIR/iter_0000010/.metadata              torch.distributed.checkpoint metadata (pickled)
    DIR/iter_0000010/__0_0.distcp ...       data: one file per writing rank (Megatron) or per
                                            size-bounded group of tensors (ckptkit)

What the files hold, checked on checkpoints Megatron-LM wrote (``tests/fixtures/*/dist``):

* Per-layer tensors are stacked over the *global* layers: ``decoder.layers.self_attention.
  linear_qkv.weight`` is ``[num_layers, qkv_rows, hidden]``, stored as one chunk per
  (layer, TP shard). The rows are in canonical order (QKV grouped per query group; SwiGLU
  ``linear_fc1`` is ``[all gate; all up]``, two chunks per TP shard).
* The norms carry Transformer Engine names (``self_attention.linear_qkv.layer_norm_weight``,
  ``mlp.linear_fc1.layer_norm_weight``) for the local implementation too: Megatron's local
  layer spec maps them in ``sharded_state_dict_keys_map`` (megatron/core/models/gpt/
  gpt_layer_specs.py), so one checkpoint loads into either implementation.
* Embeddings and the untied output layer keep the padded vocabulary; with tied embeddings
  there is no ``output_layer.weight`` at all.
* Non-tensor entries are pickled bytes ("ShardedObjects", ``torch.save([data])``) under
  ``KEY/shard_OFFSET_SHAPE``: ``common_state/shard_0_1`` holds ``args``, ``iteration``,
  ``checkpoint_version``, ``content_metadata`` (megatron/core/dist_checkpointing/
  serialization.py, ``load_common_state_dict``); ``LINEAR._extra_state/shard_L_N`` one
  per layer (``None`` with the local implementation); ``rerun_state_machine_state/*``.
  Older Megatron versions keep the common state in ``common.pt`` instead.

Reading never unpickles more than ``.metadata`` (with an allow-list) and the common state
(with :mod:`ckptkit.safe_load`'s allow-list); ``_extra_state``, RNG, rerun and optimizer
entries are left unread, and weights come only from the model keys.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import pickle
import re
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.futures import Future

from .. import safe_load
from ..errors import BadInput, CkptError, InternalError, Unsupported
from ..megatron_args import megatron_args, spec_from_args
from ..streaming_io import DirectWriteFile
from ..spec import CanonicalTensor, canonical_tensors, check_parallel_sizes, padded_vocab_size, rule_for
from .base import CheckpointMeta, CheckpointReader
from .megatron_legacy import TargetLayout
from .tracker import TRACKER, iteration_dir_name
from .torch_dist_folders import CONFIG_FILE, DCP_METADATA, NAME, locate_checkpoint_dir
from .megatron_names import NAMINGS

LEGACY_COMMON_FILE = "common.pt"
COMMON_STATE_KEY = "common_state/shard_0_1"  # ShardedObject("common_state", shape (1,), offset (0,))
BACKEND_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
WRITE_CHECKPOINT_VERSION = 3.0
# What current Megatron stores as content_metadata when it saves the model without a
# distributed optimizer (megatron/training/checkpointing.py, _build_sharded_state_dict_metadata).
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
FILE_BUDGET_BYTES = 1 << 30  # tensors the writer may hold before a .distcp file is closed

# Entries that are not model weights: never read for weights.
_NON_WEIGHT_PREFIXES = ("optimizer.", "rng_state", "rerun_state_machine_state", "common_state")
_EXTRA_STATE = re.compile(r"\._extra_state/shard_[\d_]+$")


# ---------------------------------------------------------------------------- stored names

_TE = NAMINGS["mcore-te"]
_LOCAL = NAMINGS["mcore-local"]
_LAYER_PREFIX = "decoder.layers."


def stored_key(canonical: CanonicalTensor) -> str:
    """The torch_dist key of a canonical tensor (per-layer tensors share one stacked key).

    ``decoder.layers.3.input_layernorm.weight`` -> ``decoder.layers.self_attention.
    linear_qkv.layer_norm_weight``; ``embedding.word_embeddings.weight`` is itself.
    """
    if canonical.layer is None:
        return _TE.global_names[canonical.name][0]
    suffix = canonical.name.split(".", 3)[3]
    return _LAYER_PREFIX + _TE.layer_names[suffix][0]


def _stored_spellings() -> dict[str, list[str]]:
    """Canonical name (per-layer tensors: their suffix) -> stored keys accepted on read.

    Megatron writes the Transformer Engine names; the local names are accepted too, for
    versions whose local layer spec did not map them yet.
    """
    spellings: dict[str, list[str]] = {}
    for naming in (_TE, _LOCAL):
        for suffix, names in naming.layer_names.items():
            spellings.setdefault(suffix, []).extend(_LAYER_PREFIX + name for name in names)
        for canonical, names in naming.global_names.items():
            spellings.setdefault(canonical, []).extend(names)
    return {target: list(dict.fromkeys(names)) for target, names in spellings.items()}


_STORED_SPELLINGS = _stored_spellings()
_KNOWN_KEYS = {key for keys in _STORED_SPELLINGS.values() for key in keys}


def extra_state_key(linear: str, layer: int, num_layers: int) -> str:
    """Megatron's key for one layer's ``_extra_state`` of a linear module (replicated over TP)."""
    return f"{_LAYER_PREFIX}{linear}._extra_state/shard_{layer}_{num_layers}"


# ---------------------------------------------------------------------------- safe unpickling

_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    # StorageMeta.checkpoint_id is a path object when the writer was given one
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles ``.metadata`` allowing only torch.distributed.checkpoint's own record types.

    ``FileSystemReader.read_metadata`` uses plain ``pickle.load``, which would run whatever
    a hostile ``.metadata`` names. Megatron's own ``MCoreMetadata`` (mcore 0.15, a subclass
    of ``Metadata``) loads as ``Metadata``; other ``megatron.*`` records as inert stand-ins.
    """

    def __init__(self, file, where: Path):
        super().__init__(file)
        self.where = where

    def find_class(self, module, name):
        if (module, name) in _METADATA_CLASSES or \
                (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        if (module, name) == ("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"):
            return Metadata
        if module.startswith("megatron."):
            return safe_load._stand_in_for(f"{module}.{name}")
        raise BadInput(f"{self.where}: refuses to unpickle disallowed global '{module}.{name}' "
                       "(it could run code; pass --trust-remote-pickle only for files you trust)")


def read_dcp_metadata(folder: Path, *, trust_remote_pickle: bool = False) -> Metadata:
    """The torch.distributed.checkpoint ``Metadata`` of ``folder``, unpickled with an allow-list."""
    path = folder / DCP_METADATA
    if not path.is_file():
        raise BadInput(f"{path}: file not found (every torch_dist checkpoint has one)")
    if trust_remote_pickle:
        warnings.warn(f"{path}: loading with full unpickling (--trust-remote-pickle): "
                      "code inside this file can run", stacklevel=2)
    try:
        with open(path, "rb") as opened:
            metadata = pickle.load(opened) if trust_remote_pickle else _MetadataUnpickler(opened, path).load()
    except BadInput:
        raise
    except Exception as error:  # truncated or foreign pickles raise many kinds of errors
        raise BadInput(f"{path}: cannot read torch.distributed.checkpoint metadata "
                       f"({safe_load._first_line(error)})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise BadInput(f"{path}: expected torch.distributed.checkpoint Metadata, found {type(metadata).__name__}")
    return metadata


def load_pickled_bytes(data: bytes, where: str, *, trust_remote_pickle: bool = False):
    """``torch.load`` bytes from a ShardedObject with :mod:`ckptkit.safe_load`'s allow-list:
    harmless standard types, Megatron's enums as inert stand-ins, anything else refused."""
    if trust_remote_pickle:
        warnings.warn(f"{where}: loading with full unpickling (--trust-remote-pickle): "
                      "code inside this entry can run", stacklevel=2)
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    try:
        unknown = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
    except Exception as error:
        raise BadInput(f"{where}: not a readable torch.save payload ({safe_load._first_line(error)})") from None
    harmless = {safe_load._dotted(entry) for entry in safe_load.HARMLESS_GLOBALS}
    refused = [name for name in unknown if name not in harmless and not name.startswith("megatron.")]
    if refused:
        raise BadInput(f"{where}: refuses to unpickle disallowed global {refused[0]!r} "
                       "(it could run code; pass --trust-remote-pickle only for files you trust)")
    stand_ins = [(safe_load._stand_in_for(name), name) for name in unknown if name.startswith("megatron.")]
    try:
        with torch.serialization.safe_globals(safe_load.HARMLESS_GLOBALS + stand_ins):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:
        raise BadInput(f"{where}: cannot load ({safe_load._first_line(error)})") from None


# ---------------------------------------------------------------------------- reading regions

class _DistFiles(FileSystemReader):
    """``FileSystemReader`` whose metadata was read once, with the allow-listed unpickler."""

    def __init__(self, folder: Path, metadata: Metadata):
        super().__init__(folder)
        self.cached_metadata = metadata

    def read_metadata(self, *args, **kwargs) -> Metadata:
        return self.cached_metadata


@dataclasses.dataclass
class _Region:
    """A box of one stored tensor, to be copied into ``target`` (which has the box's shape)."""

    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    target: torch.Tensor


class _RegionLoadPlanner(LoadPlanner):
    """Reads boxes of stored tensors and raw bytes entries, nothing else.

    The default planner reads whole tensors into a state dict and ``torch.load``s bytes
    entries without an allow-list; here a box (one layer of a stacked tensor) is read
    from the stored chunks it overlaps, and bytes entries come back unparsed.
    """

    def __init__(self, regions: list[_Region], byte_keys: list[str]):
        self.regions = {region.key: region for region in regions}
        self.byte_keys = byte_keys
        self.raw_bytes: dict[str, bytes] = {}
        self.elements_read: dict[str, int] = {key: 0 for key in self.regions}

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, region in self.regions.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(region.offsets), sizes=torch.Size(region.sizes))
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
        for key in self.byte_keys:
            index = MetadataIndex(key)
            zero = torch.Size((0,))
            items.append(ReadItem(type=LoadItemType.BYTE_IO, dest_index=index, dest_offsets=zero,
                                  storage_index=index, storage_offsets=zero, lengths=zero))
        return LoadPlan(items)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value):
        self.raw_bytes[read_item.dest_index.fqn] = value.getvalue()

    def resolve_tensor(self, read_item):
        target = self.regions[read_item.dest_index.fqn].target
        for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            target = target.narrow(dim, offset, length)
        return target

    def commit_tensor(self, read_item, tensor):
        self.elements_read[read_item.dest_index.fqn] += math.prod(read_item.lengths)


def _read_regions(files: _DistFiles, regions: list[_Region], byte_keys: list[str] = ()) -> dict[str, bytes]:
    """Fill every region's target from the files; return the raw bytes of ``byte_keys``."""
    planner = _RegionLoadPlanner(regions, list(byte_keys))
    try:
        with warnings.catch_warnings():
            # "torch.distributed is disabled ... assuming single process": intended here.
            warnings.simplefilter("ignore")
            dcp.load({}, storage_reader=files, planner=planner, no_dist=True)
    except (Exception, dcp.CheckpointException) as error:
        inner = _inner_error(error)
        if isinstance(inner, CkptError):
            raise inner from None
        keys = ", ".join([region.key for region in regions] + list(byte_keys))
        raise BadInput(f"{files.path}: cannot read {keys} ({safe_load._first_line(inner)})") from None
    for region in regions:
        if planner.elements_read[region.key] != region.target.numel():
            raise BadInput(f"{files.path}: {region.key}: stored chunks cover "
                           f"{planner.elements_read[region.key]} of the {region.target.numel()} elements "
                           f"at offset {region.offsets} (chunks missing from {DCP_METADATA})")
    return planner.raw_bytes


def _inner_error(error: BaseException) -> BaseException:
    """The exception behind a ``CheckpointException`` (which wraps each rank's failure, with
    its traceback, and derives from BaseException)."""
    failures = getattr(error, "failures", None)
    if isinstance(error, dcp.CheckpointException) and isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        return first[0] if isinstance(first, tuple) else first
    return error


# ---------------------------------------------------------------------------- the reader

class TorchDistReader(CheckpointReader):
    """Canonical tensors of a Megatron ``torch_dist`` checkpoint, read one layer at a time.

    >>> with TorchDistReader("tests/fixtures/llama_tp2pp2/dist") as reader:
    ...     reader.tensor("decoder.layers.3.mlp.linear_fc1.weight").shape
    torch.Size([640, 128])
    """

    def __init__(self, path, *, vocab_size: int | None = None, strict: bool = False,
                 trust_remote_pickle: bool = False):
        self.source = Path(path)
        self.strict = strict
        self.trust_remote_pickle = trust_remote_pickle
        if not self.source.exists():
            raise BadInput(f"{self.source}: no such file or folder")
        folder, iteration, release = locate_checkpoint_dir(self.source)
        self.folder = folder
        self._check_backend_config(folder)
        self.metadata = read_dcp_metadata(folder, trust_remote_pickle=trust_remote_pickle)
        self.data_files = self._check_data_files(folder, self.metadata)
        self.files = _DistFiles(folder, self.metadata)
        self.common_state = self._read_common_state()
        args = self.common_state.get("args")
        if args is None:
            raise BadInput(f"{folder}: the common state has no 'args' entry; cannot tell the architecture")
        if getattr(args, "num_experts", None):
            raise Unsupported(f"{folder}: mixture-of-experts checkpoints (num_experts={args.num_experts}) "
                              "are not supported yet")
        self.spec = spec_from_args(args, vocab_size=vocab_size, source=f"{folder}/{COMMON_STATE_KEY}")
        self._canonical = {tensor.name: tensor for tensor in canonical_tensors(self.spec)}
        self.skipped = self._check_keys()
        embedding = self.metadata.state_dict_metadata["embedding.word_embeddings.weight"]
        if iteration is None and not release:
            iteration = self.common_state.get("iteration")
        vpp = getattr(args, "virtual_pipeline_model_parallel_size", None) or 1
        self.meta = CheckpointMeta(
            layout=NAME, path=self.source, dtype=embedding.properties.dtype,
            # TP/PP as the args record them: the tensors are global and load at any TP/PP.
            tp=int(getattr(args, "tensor_model_parallel_size", 1) or 1),
            pp=int(getattr(args, "pipeline_model_parallel_size", 1) or 1), vpp=int(vpp),
            ep=int(getattr(args, "expert_model_parallel_size", 1) or 1),
            iteration=iteration, release=release,
            checkpoint_version=self.common_state.get("checkpoint_version"),
            # torch_dist stores TE-style norm names for both implementations, so the naming
            # reported is the implementation the model was built with (what a per-rank
            # writer must reproduce), taken from args.
            naming="mcore-te" if getattr(args, "transformer_impl", "local") == "transformer_engine"
            else "mcore-local",
            padded_vocab_size=int(embedding.size[0]),
            make_vocab_size_divisible_by=getattr(args, "make_vocab_size_divisible_by", None),
            args=args, files=[str(folder / name) for name in self.data_files],
        )

    # -- opening

    @staticmethod
    def _check_backend_config(folder: Path) -> None:
        path = folder / CONFIG_FILE
        if not path.is_file():
            raise BadInput(f"{path}: file not found: not a Megatron torch_dist checkpoint "
                           "(a plain torch.distributed.checkpoint folder has no common state ckptkit can read)")
        try:
            config = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BadInput(f"{path}: not valid JSON ({error})") from None
        backend = config.get("sharded_backend") if isinstance(config, dict) else None
        if backend != "torch_dist":
            raise Unsupported(f"{path}: sharded_backend {backend!r}; ckptkit reads 'torch_dist' only")

    @staticmethod
    def _check_data_files(folder: Path, metadata: Metadata) -> list[str]:
        """Every data file the metadata names exists and is long enough; return their names."""
        needed: dict[str, int] = {}
        for info in (metadata.storage_data or {}).values():
            end = int(info.offset) + int(info.length)
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
        if not needed:
            raise BadInput(f"{folder / DCP_METADATA}: lists no stored data")
        for name in sorted(needed):
            if Path(name).name != name or name in (".", ".."):
                raise BadInput(f"{folder / DCP_METADATA}: data file {name!r} lies outside the checkpoint folder")
            path = folder / name
            if not path.is_file():
                raise BadInput(f"{path}: data file missing (named in {DCP_METADATA})")
            size = path.stat().st_size
            if size < needed[name]:
                raise BadInput(f"{path}: truncated: {size} bytes, {DCP_METADATA} records data up to byte "
                               f"{needed[name]}")
        return sorted(needed)

    def _read_common_state(self) -> dict:
        """``args``, ``iteration``, ... from ``common_state`` (or an older ``common.pt``)."""
        legacy = self.folder / LEGACY_COMMON_FILE
        if COMMON_STATE_KEY not in self.metadata.state_dict_metadata and legacy.is_file():
            state = safe_load.safe_torch_load(legacy, trust_remote_pickle=self.trust_remote_pickle)
        else:
            if COMMON_STATE_KEY not in self.metadata.state_dict_metadata:
                raise BadInput(f"{self.folder}: neither {COMMON_STATE_KEY} nor {LEGACY_COMMON_FILE}: "
                               "no args to tell the architecture")
            raw = _read_regions(self.files, [], [COMMON_STATE_KEY])[COMMON_STATE_KEY]
            loaded = load_pickled_bytes(raw, f"{self.folder}: {COMMON_STATE_KEY}",
                                        trust_remote_pickle=self.trust_remote_pickle)
            # ShardedObjects are stored as torch.save([data]) (strategies/torch.py).
            state = loaded[0] if isinstance(loaded, list) and len(loaded) == 1 else loaded
        if not isinstance(state, dict):
            raise BadInput(f"{self.folder}: common state is a {type(state).__name__}, expected a dict")
        return state

    def _check_keys(self) -> dict[str, list[str]]:
        """Map canonical tensors to stored keys, check shapes; return what is skipped, by kind."""
        stored = self.metadata.state_dict_metadata
        self._keys = {name: self._stored_key_present(canonical) for name, canonical in self._canonical.items()}
        expected = {}
        for name, key in self._keys.items():
            canonical = self._canonical[name]
            expected[key] = canonical.shape if canonical.layer is None else (self.spec.num_layers, *canonical.shape)
        skipped: dict[str, list[str]] = {"optimizer": [], "extra_state": [], "other state": [], "tied head": []}
        for key, entry in stored.items():
            if key in expected:
                self._check_entry(key, entry, expected[key])
            elif key.startswith("optimizer."):
                skipped["optimizer"].append(key)
            elif _EXTRA_STATE.search(key):
                skipped["extra_state"].append(key)
            elif key.startswith(_NON_WEIGHT_PREFIXES) or isinstance(entry, BytesStorageMetadata):
                skipped["other state"].append(key)
            elif key == "output_layer.weight" and self.spec.tied_embeddings:
                skipped["tied head"].append(key)
            elif key in _KNOWN_KEYS:
                raise BadInput(f"{self.folder}: unexpected tensor {key} for this {self.spec.family} model "
                               f"(args: add_bias_linear={self.spec.add_bias_linear}, "
                               f"normalization={self.spec.normalization}, "
                               f"tied embeddings={self.spec.tied_embeddings})")
            else:
                raise Unsupported(f"{self.folder}: unknown tensor {key} (shape {tuple(entry.size)}); "
                                  "ckptkit would drop it")
        return skipped

    def _stored_key_present(self, canonical: CanonicalTensor) -> str:
        target = canonical.name if canonical.layer is None else canonical.name.split(".", 3)[3]
        candidates = _STORED_SPELLINGS[target]
        for key in candidates:
            if key in self.metadata.state_dict_metadata:
                return key
        raise BadInput(f"{self.folder}: tensor {candidates[0]} missing from {DCP_METADATA} "
                       f"(needed for {canonical.name})")

    def _check_entry(self, key: str, entry, shape: tuple) -> None:
        if not isinstance(entry, TensorStorageMetadata):
            raise BadInput(f"{self.folder}: {key} is stored as bytes, not a tensor")
        found = tuple(entry.size)
        vocab = key in ("embedding.word_embeddings.weight", "output_layer.weight")
        if vocab and found[1:] == shape[1:] and found[0] >= shape[0]:
            return  # padded vocabulary rows
        if found != tuple(shape):
            why = " (stacked over layers)" if key.startswith(_LAYER_PREFIX) else ""
            raise BadInput(f"{self.folder}: {key} has global shape {found}; expected {tuple(shape)}{why} "
                           "from the args")

    # -- tensors

    def stored_key(self, name: str) -> str:
        """The key ``name`` is read from (the stacked key for per-layer tensors)."""
        if name not in self._keys:
            raise BadInput(f"{self.source}: no canonical tensor {name}")
        return self._keys[name]

    def tensor(self, name: str) -> torch.Tensor:
        """Read one canonical tensor: one layer's slice of a stacked key, or a whole global tensor."""
        key = self.stored_key(name)
        canonical = self._canonical[name]
        entry = self.metadata.state_dict_metadata[key]
        shape = tuple(entry.size)
        if canonical.layer is None:
            offsets, sizes = (0,) * len(shape), shape
        else:
            offsets, sizes = (canonical.layer, *(0,) * (len(shape) - 1)), (1, *shape[1:])
        target = torch.empty(sizes, dtype=entry.properties.dtype)
        _read_regions(self.files, [_Region(key, offsets, sizes, target)])
        return target[0] if canonical.layer is not None else target

    def validate(self) -> list[str]:
        """Check that the stored chunks of every weight tile its global shape; report what is skipped.

        Megatron never writes overlapping chunks (torch.distributed.checkpoint validates its
        save plan), so equal volume means full coverage. Each read checks its own region too.
        """
        stored = self.metadata.state_dict_metadata
        for key in sorted(set(self._keys.values())):
            entry = stored[key]
            total = sum(math.prod(chunk.sizes) for chunk in entry.chunks)
            for chunk in entry.chunks:
                if any(offset + size > bound for offset, size, bound in zip(chunk.offsets, chunk.sizes, entry.size)):
                    raise BadInput(f"{self.folder}: {key} has a chunk at {tuple(chunk.offsets)} of size "
                                   f"{tuple(chunk.sizes)} outside its global shape {tuple(entry.size)}")
            if total != math.prod(entry.size):
                raise BadInput(f"{self.folder}: {key}: stored chunks hold {total} of "
                               f"{math.prod(entry.size)} elements")
        notes = []
        if self.skipped["optimizer"]:
            notes.append(f"{self.folder}: {len(self.skipped['optimizer'])} optimizer entries not read "
                         "(weights come from the model keys only)")
        if self.skipped["tied head"]:
            notes.append(f"{self.folder}: output_layer.weight ignored: the embeddings are tied")
        return notes


def open_reader(path, **options) -> TorchDistReader:
    return TorchDistReader(path, **options)


# ---------------------------------------------------------------------------- writing

@dataclasses.dataclass
class _PlannedChunk:
    canonical: str
    offsets: tuple[int, ...]  # inside the canonical tensor
    sizes: tuple[int, ...]


def _tensor_item(key: str, global_shape: tuple, offsets: tuple, sizes: tuple, dtype) -> WriteItem:
    return WriteItem(
        index=MetadataIndex(key, torch.Size(offsets)),
        type=WriteItemType.SHARD,
        tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)),
            properties=TensorProperties(dtype=dtype),
            size=torch.Size(global_shape),
        ),
    )


def plan_items(spec, tp: int, padded_vocab: int, dtype) -> tuple[list[WriteItem], dict]:
    """Every tensor chunk Megatron would store for this model at TP=``tp``, in canonical order,
    and what each is cut from. Bytes entries (extra state, common state) are added by
    :func:`write`."""
    items, sources = [], {}
    for canonical in canonical_tensors(spec):
        rule = rule_for(spec, canonical.rule, padded_vocab)
        shape = rule.full_shape(canonical.shape)
        key = stored_key(canonical)
        # One chunk per distinct box of a TP rank (a replicated tensor is one chunk, a SwiGLU
        # linear_fc1 two per rank), in the order of the rows (columns) they hold.
        boxes = sorted({box for tp_rank in range(tp) for box in rule.boxes(shape, tp, tp_rank)})
        for offsets, sizes in boxes:
            if canonical.layer is None:
                item = _tensor_item(key, shape, offsets, sizes, dtype)
            else:
                item = _tensor_item(key, (spec.num_layers, *shape), (canonical.layer, *offsets), (1, *sizes), dtype)
            items.append(item)
            sources[item.index] = _PlannedChunk(canonical.name, offsets, sizes)
    return items, sources


class _StreamingSavePlanner(DefaultSavePlanner):
    """Saves planned items whose data is produced on demand, one canonical tensor at a time.

    ``dcp.save`` asks the planner for each item's data only when the storage writer gets
    to it (``resolve_data``); the canonical tensor behind consecutive chunks is read once
    and kept until the next one is needed.
    """

    def __init__(self, items: list[WriteItem], sources: dict, byte_payloads: dict[str, bytes],
                 read_tensor, progress=None):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.items = items
        self.sources = sources
        self.byte_payloads = byte_payloads
        self.read_tensor = read_tensor
        self.progress = progress
        self.current_name: str | None = None
        self.current: torch.Tensor | None = None

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False):
        self.state_dict = {}
        self.is_coordinator = is_coordinator

    def create_local_plan(self):
        self.plan = dcp.SavePlan(list(self.items))
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(self.byte_payloads[write_item.index.fqn])
        source = self.sources[write_item.index]
        if source.canonical != self.current_name:
            self.current = None  # free the previous tensor before reading the next
            self.current = self.read_tensor(source.canonical)
            self.current_name = source.canonical
            if self.progress:
                self.progress(source.canonical)
        piece = self.current
        for dim, (offset, size) in enumerate(zip(source.offsets, source.sizes)):
            piece = piece.narrow(dim, offset, size)
        piece = piece.clone()  # its own storage: torch.save writes a view's whole storage
        return piece.unsqueeze(0) if len(write_item.tensor_data.size) > len(source.sizes) else piece


def _item_bytes(item: WriteItem, payloads: dict[str, bytes]) -> int:
    if item.type == WriteItemType.BYTE_IO:
        return len(payloads[item.index.fqn])
    data = item.tensor_data
    return math.prod(data.chunk.sizes) * data.properties.dtype.itemsize


class _UnbufferedFileSystem(FileSystem):
    """torch.distributed.checkpoint's local file system, with files it creates written
    around the page cache (:class:`~ckptkit.streaming_io.DirectWriteFile`): about 4x
    faster to disk on the benchmark machine, as for the per-rank files."""

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        if mode != "wb":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        stream = DirectWriteFile(path)
        try:
            yield stream
        except BaseException:
            stream.close(durable=False)
            raise
        stream.close()  # durable: torch's fsync before this does not cover the staged tail


class _BoundedFileSystemWriter(FileSystemWriter):
    """``FileSystemWriter`` that closes a ``.distcp`` file every ``max_file_bytes``.

    torch's writer keeps every tensor of a data file referenced until the file is done,
    so one file per rank would hold the whole model. Items go to ``__0_0.distcp``,
    ``__1_0.distcp``, ... in plan order, each file at most ``max_file_bytes`` (or one
    chunk, if a chunk is larger): that bounds what the writer holds.
    """

    def __init__(self, path, max_file_bytes: int, payloads: dict[str, bytes]):
        super().__init__(str(path), single_file_per_rank=True, thread_count=1)
        self.fs = _UnbufferedFileSystem()
        self.max_file_bytes = max_file_bytes
        self.payloads = payloads

    def write_data(self, plan, planner):
        groups, current, current_bytes = [], [], 0
        for item in plan.items:
            size = _item_bytes(item, self.payloads)
            if current and current_bytes + size > self.max_file_bytes:
                groups.append(current)
                current, current_bytes = [], 0
            current.append(item)
            current_bytes += size
        if current:
            groups.append(current)
        results = []
        for index, group in enumerate(groups):
            # plan.storage_data is the writer's file-name prefix ("__0_"): one prefix per file.
            storage = dataclasses.replace(plan.storage_data, prefix=f"__{index}_")
            part = dataclasses.replace(plan, items=group, storage_data=storage)
            results += super().write_data(part, planner).wait()
        done: Future = Future()
        done.set_result(results)
        return done


def _pickled(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _source_flops(reader: CheckpointReader) -> float:
    """Training progress the source recorded (kept on reshard), 0 when unknown."""
    common = getattr(reader, "common_state", None)
    if isinstance(common, dict):
        return float(common.get("num_floating_point_operations_so_far", 0) or 0)
    if hasattr(reader, "rank_state"):
        return float(reader.rank_state(0, 0).get("num_floating_point_operations_so_far", 0) or 0)
    return 0.0


def write(reader: CheckpointReader, out_dir: Path, target: TargetLayout, *, progress=None,
          max_file_bytes: int = FILE_BUDGET_BYTES) -> list[str]:
    """Write ``reader``'s model as a Megatron ``torch_dist`` checkpoint under ``out_dir``.

    Same keys, global shapes, dtypes and chunking (per layer and TP shard at ``target.tp``)
    as Megatron-LM writes; ``common_state`` carries args (updated to the target TP/PP/VPP,
    ``ckpt_format="torch_dist"``, ``no_save_optim``/``no_save_rng``: there is neither) and
    the iteration. Streams: each canonical tensor is read once, when the writer reaches its
    first chunk; a data file is closed every ``max_file_bytes``. Returns the relative paths
    written.
    """
    spec = reader.spec
    if target.naming == "legacy":
        raise Unsupported("torch_dist output needs Megatron-Core names: choose naming mcore-local or mcore-te")
    check_parallel_sizes(spec, target.tp, target.pp, target.vpp)
    dtype = target.dtype or reader.meta.dtype
    padded = padded_vocab_size(spec.vocab_size, target.make_vocab_size_divisible_by, target.tp)
    iteration = target.iteration if not target.release else None
    folder = out_dir / iteration_dir_name(iteration, target.release)
    folder.mkdir(parents=True, exist_ok=True)
    args = megatron_args(
        spec, tp=target.tp, pp=target.pp, vpp=target.vpp, dtype=dtype, padded_vocab=padded,
        make_vocab_size_divisible_by=target.make_vocab_size_divisible_by, iteration=iteration or 0,
        transformer_impl="transformer_engine" if target.naming == "mcore-te" else "local",
        base=target.args_base,
        extra_fields={"ckpt_format": "torch_dist", "use_dist_ckpt": True,
                      "no_save_optim": True, "no_save_rng": True},
    )
    common = {"args": safe_load.without_stand_ins(args), "checkpoint_version": WRITE_CHECKPOINT_VERSION,
              "iteration": iteration or 0,
              "num_floating_point_operations_so_far": _source_flops(reader) if target.args_base else 0.0,
              "content_metadata": dict(CONTENT_METADATA)}
    payloads = {COMMON_STATE_KEY: _pickled([common])}
    empty_extra_state = _pickled([None])  # what the local implementation stores per layer
    for layer in range(spec.num_layers):
        for linear in _TE.extra_state_linears:
            payloads[extra_state_key(linear, layer, spec.num_layers)] = empty_extra_state
    items, sources = plan_items(spec, target.tp, padded, dtype)
    items += [WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO) for key in payloads]

    by_name = {tensor.name: tensor for tensor in canonical_tensors(spec)}

    def read_tensor(name: str) -> torch.Tensor:
        canonical = by_name[name]
        rule = rule_for(spec, canonical.rule, padded)
        full = rule.fit(reader.tensor(name).to(dtype))  # the vocabulary re-padded to the target's rows
        expected = rule.full_shape(canonical.shape)
        if tuple(full.shape) != tuple(expected):
            raise BadInput(f"{reader.meta.path}: {name} has shape {tuple(full.shape)}; expected {tuple(expected)}")
        return full

    planner = _StreamingSavePlanner(items, sources, payloads, read_tensor, progress)
    storage = _BoundedFileSystemWriter(folder, max_file_bytes, payloads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # single-process save is intended
            dcp.save({}, storage_writer=storage, planner=planner, no_dist=True)
    except dcp.CheckpointException as error:
        # Our own errors (a source tensor of the wrong shape), OSErrors (disk full) and
        # Ctrl-C keep their type for the caller; anything else is a bug of ours.
        inner = _inner_error(error)
        if isinstance(inner, (CkptError, OSError, KeyboardInterrupt)):
            raise inner from None
        raise InternalError(f"{folder}: torch.distributed.checkpoint.save failed "
                            f"({safe_load._first_line(inner)})") from None
    # Written last, as Megatron does: its presence marks a complete checkpoint.
    (folder / CONFIG_FILE).write_text(json.dumps(BACKEND_CONFIG))
    (out_dir / TRACKER).write_text("release" if target.release or iteration is None else str(iteration))
    names = sorted(path.name for path in folder.iterdir() if path.is_file())
    return [str(Path(folder.name) / name) for name in names]

