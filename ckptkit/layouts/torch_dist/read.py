"""Reading a Megatron ``torch_dist`` checkpoint as canonical tensors, one layer (and one
expert) at a time: each canonical tensor is one region read of its stored key, so an
expert is read alone, never its layer's stack of experts."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

from ... import safe_load
from ...errors import BadInput, Unsupported
from ...megatron_args import spec_from_args
from ...spec import CanonicalTensor, canonical_tensors
from ..base import CheckpointMeta, CheckpointReader
from ..megatron_common import naming_from_args, parallel_sizes, source_iteration
from ..megatron_names import copied_key, model_kind_of
from ..torch_dist_folders import CONFIG_FILE, DCP_METADATA, NAME, locate_checkpoint_dir
from .keys import (_EXTRA_STATE, _NON_WEIGHT_PREFIXES, COMMON_STATE_KEY, LEGACY_COMMON_FILE, StoredPlace,
                   is_known_key, is_optimizer_key, stored_places)
from .metadata import load_pickled_bytes, read_dcp_metadata
from .regions import _DistFiles, _read_regions, _Region


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
        self.spec = spec_from_args(args, vocab_size=vocab_size, source=f"{folder}/{COMMON_STATE_KEY}",
                                   model_kind=model_kind_of(self.metadata.state_dict_metadata))
        self._canonical = {tensor.name: tensor for tensor in canonical_tensors(self.spec)}
        self.skipped = self._check_keys()
        embedding = self.metadata.state_dict_metadata["embedding.word_embeddings.weight"]
        sizes = parallel_sizes(args)
        self.meta = CheckpointMeta(
            layout=NAME, path=self.source, dtype=embedding.properties.dtype,
            # TP/PP as the args record them: the tensors are global and load at any TP/PP.
            tp=sizes.tp, pp=sizes.pp, vpp=sizes.vpp, ep=sizes.ep, etp=sizes.etp,
            iteration=source_iteration(iteration, release, self.common_state), release=release,
            checkpoint_version=self.common_state.get("checkpoint_version"),
            # torch_dist stores TE-style norm names for both implementations, so the naming
            # reported is the implementation the model was built with, taken from args.
            naming=naming_from_args(args),
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
        self._places = {name: self._stored_place_present(canonical) for name, canonical in self._canonical.items()}
        expected = {}
        for name, place in self._places.items():
            expected[place.key] = place.global_shape(self._canonical[name].shape)
        skipped: dict[str, list[str]] = {"optimizer": [], "extra_state": [], "other state": [], "tied head": [],
                                         "module copies": []}
        for key, entry in stored.items():
            if key in expected:
                self._check_entry(key, entry, expected[key])
            elif copied_key(self.spec.model_kind, key) in expected:
                self._check_entry(key, entry, expected[copied_key(self.spec.model_kind, key)])
                skipped["module copies"].append(key)
            elif is_optimizer_key(key):
                skipped["optimizer"].append(key)
            elif _EXTRA_STATE.search(key):
                skipped["extra_state"].append(key)
            elif key.startswith(_NON_WEIGHT_PREFIXES) or isinstance(entry, BytesStorageMetadata):
                skipped["other state"].append(key)
            elif key == "output_layer.weight" and self.spec.tied_embeddings:
                skipped["tied head"].append(key)
            elif is_known_key(key, moe=bool(self.spec.num_experts)):
                raise BadInput(f"{self.folder}: unexpected tensor {key} for this {self.spec.family} model "
                               f"(args: add_bias_linear={self.spec.add_bias_linear}, "
                               f"normalization={self.spec.normalization}, "
                               f"tied embeddings={self.spec.tied_embeddings}{_moe_args(self.spec)})")
            else:
                raise Unsupported(f"{self.folder}: unknown tensor {key} (shape {tuple(entry.size)}); "
                                  "ckptkit would drop it")
        return skipped

    def _stored_place_present(self, canonical: CanonicalTensor) -> StoredPlace:
        candidates = stored_places(self.spec, canonical)
        for place in candidates:
            if place.key in self.metadata.state_dict_metadata:
                return place
        raise BadInput(f"{self.folder}: tensor {candidates[-1].key} missing from {DCP_METADATA} "
                       f"(needed for {canonical.name})")

    def _check_entry(self, key: str, entry, shape: tuple) -> None:
        if not isinstance(entry, TensorStorageMetadata):
            raise BadInput(f"{self.folder}: {key} is stored as bytes, not a tensor")
        found = tuple(entry.size)
        vocab = key in ("embedding.word_embeddings.weight", "output_layer.weight", "output_layer.bias") or \
            copied_key(self.spec.model_kind, key) in ("output_layer.weight", "output_layer.bias")
        if vocab and found[1:] == shape[1:] and found[0] >= shape[0]:
            return  # padded vocabulary rows
        if found != tuple(shape):
            axes = [what for what, present in (("layers", self._stacked(key)), ("experts", ".experts.experts." in key))
                    if present]
            why = f" (stacked over {' and '.join(axes)})" if axes else ""
            raise BadInput(f"{self.folder}: {key} has global shape {found}; expected {tuple(shape)}{why} "
                           "from the args")

    @staticmethod
    def _stacked(key: str) -> bool:
        return key.startswith(("decoder.layers.", "encoder.layers.")) and not key.split(".")[2].isdigit()

    # -- tensors

    def stored_key(self, name: str) -> str:
        """The key ``name`` is read from (the stacked key for per-layer tensors)."""
        return self.stored_place(name).key

    def stored_place(self, name: str) -> StoredPlace:
        """The key ``name`` is read from, and its indices on the key's layer/expert axes."""
        if name not in self._places:
            raise BadInput(f"{self.source}: no canonical tensor {name}")
        return self._places[name]

    def tensor(self, name: str) -> torch.Tensor:
        """Read one canonical tensor: one region of its stored key (one layer's, one expert's
        of one layer), or a whole global tensor."""
        place = self.stored_place(name)
        entry = self.metadata.state_dict_metadata[place.key]
        shape = tuple(entry.size)[len(place.index):]
        offsets, sizes = place.box((0,) * len(shape), shape)
        target = torch.empty(sizes, dtype=entry.properties.dtype)
        _read_regions(self.files, [_Region(place.key, offsets, sizes, target)])
        return target.view(shape)

    def validate(self) -> list[str]:
        """Check that the stored chunks of every weight tile its global shape; report what is skipped.

        Megatron never writes overlapping chunks (torch.distributed.checkpoint validates its
        save plan), so equal volume means full coverage. Each read checks its own region too.
        """
        stored = self.metadata.state_dict_metadata
        for key in sorted({place.key for place in self._places.values()}):
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


def _moe_args(spec) -> str:
    if not spec.num_experts:
        return ""
    pattern = list(spec.moe_layers) if spec.moe_layers is not None else 1
    return f", num_experts={spec.num_experts}, moe_layer_freq={pattern}"


def open_reader(path, **options) -> TorchDistReader:
    return TorchDistReader(path, **options)
