"""Hugging Face model folders: ``config.json`` plus safetensors (sharded, with index) or ``.bin``.

Folder written for a 2-shard model::

    config.json  generation_config.json
    model-00001-of-00002.safetensors  model-00002-of-00002.safetensors
    model.safetensors.index.json      {"metadata": {"total_size": N}, "weight_map": {name: file}}

Reading is lazy: ``safe_open`` per shard (only the requested tensor's bytes are read),
``.bin`` files through the allow-listed ``torch.load(mmap=True, weights_only=True)``.
"""
from __future__ import annotations

import contextlib
import json
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import split_state_dict_into_shards_factory
from safetensors import safe_open

from ..errors import BadInput, Unsupported
from ..bridges import Bridge, HfMapping, bridge_for_config
from ..safe_load import safe_torch_load
from .. import pipeline
from ..safetensors_stream import DTYPE_NAMES, StreamingSafetensorsWriter, storage_order
from ..streaming_io import read_tensor
from ..spec import ModelSpec, canonical_tensors
from .base import CheckpointMeta, CheckpointReader

SAFETENSORS_INDEX = hub_constants.SAFETENSORS_INDEX_FILE  # model.safetensors.index.json
SAFETENSORS_SINGLE = hub_constants.SAFETENSORS_SINGLE_FILE  # model.safetensors
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in _DTYPES:
        raise BadInput(f"unknown dtype {name!r} (choose bf16, fp16 or fp32)")
    return _DTYPES[key]


def detect_safetensors(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and \
        ((path / SAFETENSORS_INDEX).is_file() or (path / SAFETENSORS_SINGLE).is_file())


def detect_bin(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and \
        ((path / BIN_INDEX).is_file() or (path / BIN_SINGLE).is_file())


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise BadInput(f"{path}: cannot read ({error})") from None
    except json.JSONDecodeError as error:
        raise BadInput(f"{path}: malformed JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(config, dict):
        raise BadInput(f"{path}: expected a JSON object")
    return config


# Sizes transformers configs give as positive integers (the names of every supported family);
# null or absent means the family's default (GPT-2's n_inner: 4 x hidden).
_SIZE_FIELDS = ("n_layer", "n_embd", "n_head", "n_inner", "n_positions", "vocab_size", "num_hidden_layers",
                "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                "max_position_embeddings", "head_dim")


def spec_from_config(bridge: Bridge, config: dict, path: Path) -> ModelSpec:
    """The family's spec of ``config``, refusing missing fields and sizes that are not positive integers."""
    for name in _SIZE_FIELDS:
        value = config.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise BadInput(f"{path}: {name} is {value!r}; expected a positive integer")
    try:
        return bridge.config_to_spec(config)
    except KeyError as error:
        raise BadInput(f"{path}: missing field {error.args[0]!r}") from None
    except BadInput as error:
        raise BadInput(f"{path}: {error}") from None
    except (TypeError, ValueError, ZeroDivisionError) as error:
        raise BadInput(f"{path}: invalid value ({str(error).splitlines()[0]})") from None


# Hub FP8 checkpoints (DeepSeek-V3/R1): a float8_e4m3fn weight W of [rows, cols] comes with
# W_scale_inv, float32 [ceil(rows / bh), ceil(cols / bw)] for quantization_config's
# weight_block_size [bh, bw]; the weight the model computes with is fp8 -> float32, times the
# scale of its block (DeepSeek-V3's inference/kernel.py, weight_dequant; fp8_cast_bf16.py).
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_SCALE_SUFFIX = "_scale_inv"


def fp8_block_size(config: dict, path: Path) -> tuple[int, int] | None:
    """``quantization_config.weight_block_size`` of an FP8 checkpoint; None when not quantized."""
    quantization = config.get("quantization_config")
    if not quantization:
        return None
    method = quantization.get("quant_method")
    if method != "fp8":
        raise Unsupported(f"{path}: quantization {method!r} is not supported (block-scaled fp8 is)")
    block = quantization.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2
            and all(isinstance(size, int) and size > 0 for size in block)):
        raise Unsupported(f"{path}: fp8 weight_block_size {block!r}: only block-scaled fp8 ([rows, cols]) is "
                          "supported")
    return int(block[0]), int(block[1])


def dequantize_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                      what: str = "fp8 weight") -> torch.Tensor:
    """``weight`` (fp8, [rows, cols]) times its block scales -> float32, exactly: each fp8 value
    is exact in float32, and each product is one float32 rounding.

    Block (i, j) is rows ``i*bh ..`` and columns ``j*bw ..`` (the last ones may be partial). A
    [3, 3] weight in [2, 2] blocks has scales [2, 2]: rows 0-1 cols 0-1 scaled by s[0, 0],
    rows 0-1 col 2 by s[0, 1], row 2 cols 0-1 by s[1, 0], row 2 col 2 by s[1, 1].

    >>> w = torch.ones(3, 3).to(torch.float8_e4m3fn)
    >>> dequantize_blocks(w, torch.tensor([[1.0, 2.0], [3.0, 4.0]]), (2, 2)).tolist()
    [[1.0, 1.0, 2.0], [1.0, 1.0, 2.0], [3.0, 3.0, 4.0]]
    """
    if weight.dim() != 2:
        raise BadInput(f"{what}: fp8 tensor of shape {tuple(weight.shape)}; block scales need a matrix")
    rows, cols = weight.shape
    block_rows, block_cols = block
    expected = (-(-rows // block_rows), -(-cols // block_cols))
    if tuple(scale_inv.shape) != expected:
        raise BadInput(f"{what}: block scales of shape {tuple(scale_inv.shape)}; expected {expected} for "
                       f"[{rows}, {cols}] in blocks of {block_rows} x {block_cols}")
    full = weight.to(torch.float32)
    scale = scale_inv.to(torch.float32)
    for block_row in range(expected[0]):  # one band of rows at a time: no full-size scale tensor
        band = full[block_row * block_rows:(block_row + 1) * block_rows]
        band.mul_(scale[block_row].repeat_interleave(block_cols)[:cols])
    return full


def read_index(path: Path) -> dict:
    try:
        index = json.loads(path.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except json.JSONDecodeError as error:
        raise BadInput(f"{path}: malformed JSON ({error.msg} at line {error.lineno})") from None
    except (KeyError, TypeError) as error:
        raise BadInput(f"{path}: not a shard index ({error})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise BadInput(f"{path}: cannot read ({error})") from None
    for tensor_name, file_name in weight_map.items():
        # Shards live beside the index: a path would point the reader at other files.
        if not isinstance(file_name, str) or Path(file_name).name != file_name or file_name in (".", ".."):
            raise BadInput(f"{path}: tensor {tensor_name} maps to {file_name!r}, not a file name in this folder")
    return weight_map


def expand(mapping: HfMapping, **indices) -> tuple[str, list[str]]:
    """The mapping's names with ``{layer}``/``{expert}`` filled in."""
    return mapping.canonical.format(**indices), [name.format(**indices) for name in mapping.hf_names]


def hf_table(bridge: Bridge, spec: ModelSpec) -> dict[str, tuple[HfMapping, list[str]]]:
    """canonical name -> (mapping, concrete HF names), for the tensors this model has."""
    wanted = {tensor.name for tensor in canonical_tensors(spec)}
    table = {}
    for mapping in bridge.mappings(spec):
        layers = range(spec.num_layers) if "{layer}" in mapping.canonical else [None]
        experts = range(spec.num_experts) if "{expert}" in mapping.canonical else [None]
        for layer in layers:
            for expert in experts:
                canonical, names = expand(mapping, layer=layer, expert=expert)
                if canonical in wanted:
                    table[canonical] = (mapping, names)
    missing = sorted(set(wanted) - set(table))
    if missing:
        raise BadInput(f"{bridge.architecture} has no Hugging Face name for {missing[0]}")
    return table


_DTYPES_BY_CODE = {code: dtype for dtype, code in DTYPE_NAMES.items()}


class _SafetensorsData:
    """Where each tensor's bytes are in a ``.safetensors`` file (header already checked by
    ``safe_open``), read with explicit reads: the file is not mapped, so its pages never
    count against this process."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        try:
            (length,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
            self.header = json.loads(os.pread(self.fd, length, 8))
        except (struct.error, ValueError) as error:
            os.close(self.fd)
            raise BadInput(f"{path}: unreadable safetensors header ({error})") from None
        self.data_start = 8 + length

    def read(self, name: str) -> torch.Tensor:
        entry = self.header[name]
        if entry["dtype"] not in _DTYPES_BY_CODE:
            raise BadInput(f"{self.path}: tensor {name} has unsupported dtype {entry['dtype']}")
        start, _ = entry["data_offsets"]
        return read_tensor(self.fd, self.data_start + start, entry["shape"], _DTYPES_BY_CODE[entry["dtype"]])

    def close(self) -> None:
        os.close(self.fd)


class HfReader(CheckpointReader):
    """Canonical tensors rebuilt from a Hugging Face folder."""

    def __init__(self, path, *, strict: bool = False, trust_remote_pickle: bool = False, **_ignored):
        self.folder = Path(path)
        self.strict = strict
        self.trust_remote_pickle = trust_remote_pickle
        config = read_config(self.folder)
        self.bridge = bridge_for_config(config, str(self.folder / "config.json"))
        self.spec = spec_from_config(self.bridge, config, self.folder / "config.json")
        self.table = hf_table(self.bridge, self.spec)
        self._open: dict = {}
        self._data: dict[str, _SafetensorsData] = {}
        self.location = self._locate_tensors()
        self.read_notes = self._drop_absent_mtp_layers()
        self.fp8_block = fp8_block_size(config, self.folder / "config.json")
        self.config_dtype = config.get("torch_dtype") or config.get("dtype")
        first_name = self.table["embedding.word_embeddings.weight"][1][0]
        self.meta = CheckpointMeta(
            layout=self.layout_name, path=self.folder, dtype=self._dtype_of(first_name),
            hf_config=config, files=sorted(set(self.location.values())),
        )

    layout_name = "hf-safetensors"

    def _drop_absent_mtp_layers(self) -> list[str]:
        """A config may declare multi-token prediction layers whose weights the folder lacks
        (transformers neither loads nor saves them): the model is read without them."""
        if not self.spec.mtp_num_layers:
            return []
        names = [hf_names[0] for canonical, (_, hf_names) in self.table.items() if canonical.startswith("mtp.")]
        if any(name in self.location for name in names):
            return []  # present: read (a partial set fails as missing tensors)
        declared = self.spec.mtp_num_layers
        self.spec = replace(self.spec, mtp_num_layers=0)
        self.table = hf_table(self.bridge, self.spec)
        return [f"{self.folder}: config.json declares {declared} multi-token prediction layer(s) whose weights "
                f"are not in the folder (transformers saves none); converted without them"]

    def _locate_tensors(self) -> dict[str, str]:
        if (self.folder / SAFETENSORS_INDEX).is_file():
            weight_map = read_index(self.folder / SAFETENSORS_INDEX)
        else:
            path = self.folder / SAFETENSORS_SINGLE
            weight_map = {name: SAFETENSORS_SINGLE for name in self._safetensors_keys(path)}
        for file_name in sorted(set(weight_map.values())):
            if not (self.folder / file_name).is_file():
                raise BadInput(f"{self.folder / file_name}: shard named in the index is missing")
        return weight_map

    def _safetensors_keys(self, path: Path) -> list[str]:
        return list(self._handle(path.name).keys())

    def _handle(self, file_name: str):
        if file_name not in self._open:
            path = self.folder / file_name
            try:
                self._open[file_name] = safe_open(str(path), framework="pt")
            except Exception as error:  # safetensors raises its own SafetensorError
                raise BadInput(f"{path}: unreadable safetensors header ({str(error).splitlines()[0]})") from None
        return self._open[file_name]

    def _dtype_of(self, hf_name: str) -> torch.dtype:
        """The model's dtype, from one of its tensors; an FP8 checkpoint's is its config's
        (what its weights are dequantized to by default)."""
        dtype = self._stored_dtype(hf_name)
        if dtype in FP8_DTYPES:
            return parse_dtype(self.config_dtype or "bfloat16")
        return dtype

    def hf_tensor(self, hf_name: str) -> torch.Tensor:
        """The tensor as the model computes with it: an FP8 weight dequantized (float32)."""
        stored = self._stored(hf_name)
        if stored.dtype not in FP8_DTYPES:
            return stored
        if self.fp8_block is None:
            raise BadInput(f"{self.folder}: {hf_name} is {stored.dtype} but config.json has no FP8 "
                           "quantization_config with a weight_block_size")
        scale_name = hf_name + FP8_SCALE_SUFFIX
        if scale_name not in self.location:
            raise BadInput(f"{self.folder}: FP8 tensor {hf_name} has no {scale_name}")
        return dequantize_blocks(stored, self._stored(scale_name), self.fp8_block, f"{self.folder}: {hf_name}")

    def _stored_dtype(self, hf_name: str) -> torch.dtype:
        """A tensor's stored dtype, from the shard's header (no data read)."""
        file_name = self.location.get(hf_name)
        if file_name is None or Path(file_name).suffix != ".safetensors":
            return self._stored(hf_name).dtype
        try:
            code = self._handle(file_name).get_slice(hf_name).get_dtype()
        except Exception as error:  # safetensors raises its own SafetensorError
            raise BadInput(f"{self.folder / file_name}: cannot read tensor {hf_name} "
                           f"({str(error).splitlines()[0]})") from None
        if code not in _DTYPES_BY_CODE:
            raise BadInput(f"{self.folder / file_name}: tensor {hf_name} has unsupported dtype {code}")
        return _DTYPES_BY_CODE[code]

    def _stored(self, hf_name: str) -> torch.Tensor:
        file_name = self.location.get(hf_name)
        if file_name is None:
            raise BadInput(f"{self.folder}: tensor {hf_name} missing from the checkpoint")
        self._handle(file_name)
        if file_name not in self._data:
            self._data[file_name] = _SafetensorsData(self.folder / file_name)
        try:
            return self._data[file_name].read(hf_name)
        except BadInput:
            raise
        except Exception as error:
            raise BadInput(f"{self.folder / file_name}: cannot read tensor {hf_name} "
                           f"({str(error).splitlines()[0]})") from None

    def tensor(self, name: str) -> torch.Tensor:
        return self.assemble(name, self.fetch(name))

    def fetch(self, name: str) -> list[torch.Tensor]:
        """The Hugging Face tensors ``name`` is made from, read from their shards."""
        if name not in self.table:
            raise BadInput(f"{self.folder}: no canonical tensor {name}")
        return [self.hf_tensor(hf_name) for hf_name in self.table[name][1]]

    def assemble(self, name: str, parts: list[torch.Tensor]) -> torch.Tensor:
        """``name`` from its Hugging Face tensors: the bridge's transform (transposes, fusing)."""
        mapping, hf_names = self.table[name]
        try:
            return mapping.from_hf(parts, self.spec)
        except RuntimeError as error:
            shapes = ", ".join(f"{n} {tuple(p.shape)}" for n, p in zip(hf_names, parts))
            raise BadInput(f"{self.folder}: {shapes} do not fit config.json ({str(error).splitlines()[0]})") from None

    def validate(self) -> list[str]:
        """Every expected tensor present with the shape config.json implies; none unexplained."""
        expected_names = set()
        for canonical in self.canonical():
            mapping, hf_names = self.table[canonical.name]
            expected_names.update(hf_names)
            shapes = [tuple(t.shape) for t in mapping.to_hf(torch.empty(canonical.shape, device="meta"), self.spec)]
            for hf_name, shape in zip(hf_names, shapes):
                actual = self._shape_of(hf_name)
                if actual != shape:
                    raise BadInput(f"{self.folder / self.location[hf_name]}: {hf_name} has shape {actual}; "
                                   f"expected {shape} from config.json")
        notes = list(self.read_notes)
        if self.fp8_block is not None:  # each FP8 weight's block scales
            expected_names.update(name + FP8_SCALE_SUFFIX for name in list(expected_names)
                                  if name + FP8_SCALE_SUFFIX in self.location)
        for hf_name in sorted(set(self.location) - expected_names):
            if any(hf_name.endswith(pattern) or hf_name == pattern for pattern in self.bridge.ignorable):
                continue
            message = f"{self.folder}: tensor {hf_name} is not part of a {self.bridge.architecture} model; ignored"
            if self.strict:
                raise BadInput(message)
            notes.append(message)
        return notes

    def _shape_of(self, hf_name: str) -> tuple:
        file_name = self.location.get(hf_name)
        if file_name is None:
            raise BadInput(f"{self.folder}: tensor {hf_name} missing from the checkpoint")
        return tuple(self._handle(file_name).get_slice(hf_name).get_shape())

    def close(self) -> None:
        self._open.clear()
        for data in self._data.values():
            data.close()
        self._data.clear()


class HfBinReader(HfReader):
    """Same as :class:`HfReader` for ``pytorch_model*.bin`` shards (read through the allow-list)."""

    layout_name = "hf-bin"

    def _locate_tensors(self) -> dict[str, str]:
        if (self.folder / BIN_INDEX).is_file():
            weight_map = read_index(self.folder / BIN_INDEX)
        else:
            weight_map = {name: BIN_SINGLE for name in self._bin(BIN_SINGLE)}
        for file_name in sorted(set(weight_map.values())):
            if not (self.folder / file_name).is_file():
                raise BadInput(f"{self.folder / file_name}: shard named in the index is missing")
        return weight_map

    def _bin(self, file_name: str) -> dict:
        if file_name not in self._open:
            state = safe_torch_load(self.folder / file_name, trust_remote_pickle=self.trust_remote_pickle)
            if not isinstance(state, dict):
                raise BadInput(f"{self.folder / file_name}: expected a state dict")
            self._open[file_name] = state
        return self._open[file_name]

    def _stored(self, hf_name: str) -> torch.Tensor:
        file_name = self.location.get(hf_name)
        if file_name is None:
            raise BadInput(f"{self.folder}: tensor {hf_name} missing from the checkpoint")
        value = self._bin(file_name).get(hf_name)
        if not isinstance(value, torch.Tensor):
            raise BadInput(f"{self.folder / file_name}: tensor {hf_name} missing")
        return value

    def _shape_of(self, hf_name: str) -> tuple:
        return tuple(self._stored(hf_name).shape)


# ---------------------------------------------------------------------------- writing

@dataclass
class HfShardPlan:
    file_name: str
    tensors: dict  # hf name -> (dtype, shape)


@dataclass
class HfPlan:
    shards: list[HfShardPlan]
    source_of: dict  # hf name -> canonical name
    total_size: int

    @property
    def weight_map(self) -> dict:
        return {name: shard.file_name for shard in self.shards for name in shard.tensors}


def plan_output(bridge: Bridge, spec: ModelSpec, dtype: torch.dtype, max_shard_size) -> HfPlan:
    """Shard assignment from shapes alone (huggingface_hub's splitter, on meta tensors)."""
    table = hf_table(bridge, spec)
    planned, source_of = {}, {}
    for canonical in canonical_tensors(spec):
        mapping, hf_names = table[canonical.name]
        meta_full = torch.empty(canonical.shape, device="meta", dtype=mapping.hf_dtype or dtype)
        for hf_name, meta in zip(hf_names, mapping.to_hf(meta_full, spec)):
            planned[hf_name] = meta
            source_of[hf_name] = canonical.name
    split = split_state_dict_into_shards_factory(
        planned, get_storage_size=lambda meta: meta.numel() * meta.element_size(),
        filename_pattern=hub_constants.SAFETENSORS_WEIGHTS_FILE_PATTERN, max_shard_size=max_shard_size)
    shards = [HfShardPlan(file_name, {name: (planned[name].dtype, tuple(planned[name].shape)) for name in names})
              for file_name, names in split.filename_to_tensors.items()]
    return HfPlan(shards, source_of, sum(meta.numel() * meta.element_size() for meta in planned.values()))


def write(reader: CheckpointReader, out_dir: Path, bridge: Bridge, *, dtype: torch.dtype,
          max_shard_size="5GB", progress=None, only=None, finish: bool = True, plan: HfPlan | None = None) -> list[str]:
    """Write the shards and (for several shards) the index into ``out_dir``.

    Each canonical tensor is read once; the HF tensors it yields wait in ``pending``
    only until their shard reaches them (q/k/v of one layer, typically). ``only`` (shard
    file names) restricts the shards written, for one worker's share; ``finish=False``
    leaves out the index, which the process that writes it does once every share is done.
    """
    spec = reader.spec
    plan = plan or plan_output(bridge, spec, dtype, max_shard_size)
    table = hf_table(bridge, spec)
    shards = [shard for shard in plan.shards if only is None or shard.file_name in only]
    mine = {name for shard in shards for name in shard.tensors}

    def to_hf(canonical: str):  # on the pipeline's threads; no copy when the dtype is already right
        mapping, hf_names = table[canonical]
        hf_dtype = mapping.hf_dtype or dtype
        return lambda full: [(name, tensor) for name, tensor in zip(hf_names, mapping.to_hf(full.to(hf_dtype), spec))
                             if name in mine]

    # Canonical tensors in the order the shards first need them, made ahead (ckptkit.pipeline).
    needed = dict.fromkeys(plan.source_of[name] for shard in shards for name in storage_order(shard.tensors))
    made = pipeline.produced(reader, [(canonical, to_hf(canonical)) for canonical in needed])
    pending: dict[str, torch.Tensor] = {}
    written = []
    with contextlib.closing(made):
        for shard in shards:
            with StreamingSafetensorsWriter(out_dir / shard.file_name, shard.tensors) as out:
                for hf_name in out.order:
                    if hf_name not in pending:
                        canonical, tensors = next(made)
                        pending.update(tensors)
                        if progress:
                            progress(canonical)
                    out.write(hf_name, pending.pop(hf_name))
            written.append(shard.file_name)
    if finish:
        written += write_index(out_dir, bridge, spec, dtype=dtype, max_shard_size=max_shard_size)
    return written


def write_index(out_dir: Path, bridge: Bridge, spec: ModelSpec, *, dtype: torch.dtype, max_shard_size) -> list[str]:
    """``model.safetensors.index.json`` when the model has several shards; returns what it wrote."""
    plan = plan_output(bridge, spec, dtype, max_shard_size)
    if len(plan.shards) <= 1:
        return []
    index = {"metadata": {"total_size": plan.total_size}, "weight_map": dict(sorted(plan.weight_map.items()))}
    (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [SAFETENSORS_INDEX]
