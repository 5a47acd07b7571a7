"""Writing a Megatron ``torch_dist`` checkpoint as Megatron-LM writes it, one tensor at a time.

The chunks are planned first (:func:`plan_items`: one per distinct box of a TP rank, from
the partition rules); ``dcp.save`` then asks for each chunk's data when it reaches it, and
a data file is closed every ``max_file_bytes``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from torch.futures import Future

from ... import safe_load
from ...errors import BadInput, CkptError, InternalError, Unsupported
from ...spec import canonical_tensors, check_parallel_sizes, rule_for, stored_dtype
from ...streaming_io import DirectWriteFile
from ..base import CheckpointReader
from ..megatron_common import WRITE_CHECKPOINT_VERSION, TargetLayout, target_args, write_tracker
from ..megatron_names import key_copies
from ..torch_dist_folders import CONFIG_FILE
from .keys import COMMON_STATE_KEY, extra_state_keys, is_optimizer_key, stored_place
from .regions import _inner_error

BACKEND_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
# What current Megatron stores as content_metadata when it saves the model without a
# distributed optimizer (megatron/training/checkpointing.py, _build_sharded_state_dict_metadata).
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
FILE_BUDGET_BYTES = 1 << 30  # tensors the writer may hold before a .distcp file is closed


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


def plan_items(spec, tp: int, padded_vocab: int, dtype, *, etp: int | None = None,
               naming: str = "mcore-local") -> tuple[list[WriteItem], dict]:
    """Every tensor chunk Megatron would store for this model at TP=``tp`` (experts cut over
    ``etp``, default TP), in canonical order, and what each is cut from. Bytes entries (extra
    state, common state) are added by :func:`write`.

    One chunk per distinct box of a TP rank, within one layer and one expert: an expert is
    written from itself alone, never from its layer's stack of experts."""
    items, sources = [], {}
    for canonical in canonical_tensors(spec):
        rule = rule_for(spec, canonical.rule, padded_vocab)
        shape = rule.full_shape(canonical.shape)
        place = stored_place(spec, canonical, naming)
        ranks = tp if canonical.expert is None or etp is None else etp
        # One chunk per distinct box of a TP rank (a replicated tensor is one chunk, a SwiGLU
        # linear_fc1 two per rank), in the order of the rows (columns) they hold.
        boxes = sorted({box for rank in range(ranks) for box in rule.boxes(shape, ranks, rank)})
        # a module saved under two names is saved twice (T5's output layer: see key_copies)
        for key in (place.key, *key_copies(spec.model_kind, place.key)):
            for offsets, sizes in boxes:
                item = _tensor_item(key, place.global_shape(shape), *place.box(offsets, sizes),
                                    stored_dtype(canonical, dtype))
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
                 read_tensor, progress=None, optimizer=None):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.optimizer = optimizer  # resolves its own tensor items (see write's ``optimizer``)
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
        if self.optimizer is not None and is_optimizer_key(write_item.index.fqn):
            return self.optimizer.resolve(write_item)
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
        for _ in range(len(write_item.tensor_data.size) - len(source.sizes)):
            piece = piece.unsqueeze(0)  # the layer and expert axes of a stacked key
        return piece


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
          max_file_bytes: int = FILE_BUDGET_BYTES, finish: bool = True, optimizer=None) -> list[str]:
    """Write ``reader``'s model as a Megatron ``torch_dist`` checkpoint under ``out_dir``.

    Same keys, global shapes, dtypes and chunking (per layer, expert and TP shard at
    ``target.tp``, experts' at ``target.expert_tp``) as Megatron-LM writes, keyed per layer
    when dense and MoE layers mix; ``common_state`` carries args (updated to the target TP/PP/VPP,
    ``ckpt_format="torch_dist"``, ``no_save_optim``/``no_save_rng``: there is neither) and
    the iteration. Streams: each canonical tensor is read once, when the writer reaches its
    first chunk; a data file is closed every ``max_file_bytes``. Returns the relative paths
    written. ``finish=False`` leaves the tracker file to the caller.

    ``optimizer`` (:class:`ckptkit.optimizer.torch_dist.DpReshardableEntries`) adds optimizer
    state: its tensor ``items`` (keys under ``optimizer.``, data from its ``resolve``), bytes
    ``payloads``, ``common`` state entries and ``args_fields``.
    """
    spec = reader.spec
    if target.naming == "legacy":
        raise Unsupported("torch_dist output needs Megatron-Core names: choose naming mcore-local or mcore-te")
    check_parallel_sizes(spec, target.tp, target.pp, target.vpp, target.ep, target.etp)
    dtype = target.dtype or reader.meta.dtype
    padded = target.padded_vocab(spec)
    folder = out_dir / target.folder_name
    folder.mkdir(parents=True, exist_ok=True)
    fields = {"ckpt_format": "torch_dist", "use_dist_ckpt": True, "no_save_optim": True, "no_save_rng": True}
    if optimizer is not None:
        fields.update(optimizer.args_fields)
    args = target_args(spec, target, dtype, extra_fields=fields)
    common = {"args": args, "checkpoint_version": WRITE_CHECKPOINT_VERSION,
              "iteration": target.saved_iteration or 0,
              "num_floating_point_operations_so_far": _source_flops(reader) if target.args_base else 0.0,
              "content_metadata": dict(CONTENT_METADATA)}
    if optimizer is not None:
        common.update(optimizer.common)
        common["content_metadata"] = {**common["content_metadata"], **optimizer.content_metadata}
    payloads = {COMMON_STATE_KEY: _pickled([common])}
    if optimizer is not None:
        payloads.update(optimizer.payloads)
    empty_extra_state = _pickled([None])  # what the local implementation stores per linear
    for key in extra_state_keys(spec):
        payloads[key] = empty_extra_state
    items, sources = plan_items(spec, target.tp, padded, dtype, etp=target.etp, naming=target.naming)
    if optimizer is not None:
        items += optimizer.items
    items += [WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO) for key in payloads]

    by_name = {tensor.name: tensor for tensor in canonical_tensors(spec)}

    def read_tensor(name: str) -> torch.Tensor:
        canonical = by_name[name]
        rule = rule_for(spec, canonical.rule, padded)
        # the vocabulary re-padded to the target's rows; the expert bias kept in float32
        full = rule.fit(reader.tensor(name).to(stored_dtype(canonical, dtype)))
        expected = rule.full_shape(canonical.shape)
        if tuple(full.shape) != tuple(expected):
            raise BadInput(f"{reader.meta.path}: {name} has shape {tuple(full.shape)}; expected {tuple(expected)}")
        return full

    planner = _StreamingSavePlanner(items, sources, payloads, read_tensor, progress, optimizer)
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
    if finish:
        write_tracker(out_dir, target)
    names = sorted(path.name for path in folder.iterdir() if path.is_file())
    return [str(Path(folder.name) / name) for name in names]
