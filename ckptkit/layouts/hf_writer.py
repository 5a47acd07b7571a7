"""Writing a Hugging Face folder: shards (split between processes), then the index,
``config.json``, ``generation_config.json`` and tokenizer files, then a check of the
written headers against the plan.

The architecture and the config come from the model's bridge (:mod:`ckptkit.bridges`).
"""
from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ..bridges import bridge_of
from ..errors import BadInput, InternalError
from ..plan import Plan, PlannedFile
from . import hf
from .base import CheckpointReader, CheckpointWriter, compare_with_plan

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")
CONFIG_FILES = ["config.json", "generation_config.json"]


@dataclass(frozen=True)
class HfWriter(CheckpointWriter):
    """``config.json`` + sharded safetensors (+ index) in ``dtype``, shards of at most
    ``max_shard_size`` (huggingface_hub's splitter), tokenizer files copied from ``tokenizer``."""

    dtype: torch.dtype
    max_shard_size: object = "5GB"
    tokenizer: str | None = None

    def plan(self, reader: CheckpointReader) -> Plan:
        if isinstance(self.max_shard_size, int) and self.max_shard_size <= 0:
            raise BadInput(f"--max-shard-size must be positive (got {self.max_shard_size})")
        bridge = bridge_of(reader.spec, str(reader.meta.path))
        try:
            detail = hf.plan_output(bridge, reader.spec, self.dtype, self.max_shard_size)
        except ValueError as error:  # huggingface_hub's size parser: "5GB", "500MB", ...
            raise BadInput(f"--max-shard-size {self.max_shard_size!r}: {str(error).splitlines()[0]}") from None
        element = torch.empty((), dtype=self.dtype).element_size()
        files = [PlannedFile(shard.file_name,
                             sum(torch.Size(shape).numel() * element for _, shape in shard.tensors.values()),
                             tuple(dict.fromkeys(detail.source_of[name] for name in shard.tensors)))
                 for shard in detail.shards]
        index = [hf.SAFETENSORS_INDEX] if len(detail.shards) > 1 else []
        tokenizer = _tokenizer_files(Path(self.tokenizer)) if self.tokenizer else []
        target = {"layout": "hf-safetensors", "dtype": str(self.dtype).removeprefix("torch."),
                  "architecture": bridge.architecture}
        return Plan(target, files, index + CONFIG_FILES + tokenizer, reads=len(set(detail.source_of.values())),
                    detail=detail)

    def write(self, reader, plan, out, files=None, progress=None) -> list[str]:
        _import_transformers_meanwhile()
        return hf.write(reader, Path(out), bridge_of(reader.spec, str(reader.meta.path)), dtype=self.dtype,
                        max_shard_size=self.max_shard_size, progress=progress, only=files, finish=False,
                        plan=plan.detail)

    def finish(self, reader, plan, out) -> list[str]:
        _wait_for_transformers()
        from transformers import AutoConfig, GenerationConfig  # a second of import other commands skip

        out = Path(out)
        bridge = bridge_of(reader.spec, str(reader.meta.path))
        written = hf.write_index(out, bridge, reader.spec, dtype=self.dtype, max_shard_size=self.max_shard_size)
        fields = bridge.spec_to_config(reader.spec, self.dtype)
        fields.pop("architectures", None)
        model_type = fields.pop("model_type")
        dtype_name = fields.pop("torch_dtype")
        defaults = AutoConfig.for_model(model_type)
        for token in ("bos_token_id", "eos_token_id", "pad_token_id"):
            # GPT-2's defaults (50256) point past a smaller vocabulary: drop them.
            value = getattr(defaults, token, None)
            if isinstance(value, int) and value >= reader.spec.vocab_size:
                fields.setdefault(token, None)
        config = AutoConfig.for_model(model_type, **fields)
        config.architectures = [bridge.architecture]
        config.dtype = dtype_name
        config.save_pretrained(out)
        GenerationConfig.from_model_config(config).save_pretrained(out)
        written += CONFIG_FILES
        if self.tokenizer:
            written += copy_tokenizer(Path(self.tokenizer), out)
        return written

    def check(self, plan, out, label) -> None:
        """Shard headers (names, dtypes, shapes), the index and config.json against the plan."""
        from safetensors import safe_open

        from ..safetensors_stream import DTYPE_NAMES

        out, label = Path(out), Path(label)
        for shard in plan.detail.shards:
            try:
                with safe_open(str(out / shard.file_name), framework="pt") as handle:
                    found = {name: (handle.get_slice(name).get_dtype(), tuple(handle.get_slice(name).get_shape()))
                             for name in handle.keys()}
            except Exception as error:
                raise InternalError(f"{label / shard.file_name}: written shard does not read back "
                                    f"({str(error).splitlines()[0]})") from None
            planned = {name: (DTYPE_NAMES[dtype], tuple(shape)) for name, (dtype, shape) in shard.tensors.items()}
            compare_with_plan(label / shard.file_name, found, planned)
        if len(plan.detail.shards) > 1 and hf.read_index(out / hf.SAFETENSORS_INDEX) != plan.detail.weight_map:
            raise InternalError(f"{label / hf.SAFETENSORS_INDEX}: does not list the planned shards")
        hf.read_config(out)


def _tokenizer_files(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise BadInput(f"{folder}: tokenizer folder not found")
    names = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if not names:
        raise BadInput(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...)")
    return names


def copy_tokenizer(folder: Path, out: Path) -> list[str]:
    names = _tokenizer_files(folder)
    for name in names:
        shutil.copy2(folder / name, out / name)
    return names


_importing: list[threading.Thread] = []


def _import_transformers_meanwhile() -> None:
    """Import ``transformers`` on a thread while the shards are written.

    Only the config at the end needs it, and its import is about a second of Python on
    the benchmark machine (a fifth of copying a 1.3B checkpoint), while the conversion's
    own threads spend their time in torch and in system calls without the GIL. The names
    ``finish`` uses are imported too: ``transformers`` loads its submodules on first use,
    and ``AutoConfig``'s (``transformers.models``) are most of that second.
    """
    def load() -> None:
        try:
            from transformers import AutoConfig, GenerationConfig  # noqa: F401
        except Exception:  # noqa: BLE001 - the import in finish() reports it
            pass

    thread = threading.Thread(target=load, name="import transformers", daemon=True)
    thread.start()
    _importing.append(thread)


def _wait_for_transformers() -> None:
    """Joined before use: a second import while the first runs can see a half-made module."""
    while _importing:
        _importing.pop().join()


def write_hf_folder(reader: CheckpointReader, out: Path, *, dtype, max_shard_size="5GB", tokenizer=None) -> list[str]:
    """The whole Hugging Face folder of ``reader``'s model into an existing ``out``, in this
    process (no partial folder: for tests and benchmarks that make inputs)."""
    writer = HfWriter(dtype, max_shard_size, tokenizer)
    plan = writer.plan(reader)
    return writer.write(reader, plan, out) + writer.finish(reader, plan, out)
