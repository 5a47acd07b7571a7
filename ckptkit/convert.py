"""Conversions between layouts: ``source layout -> canonical tensors -> target layout``.

Every entry point opens the source lazily, validates it before anything is written,
writes into a hidden partial folder and renames it into place only when complete
(:mod:`ckptkit.atomic`).
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoConfig, GenerationConfig

from . import __version__
from .atomic import atomic_directory
from .errors import BadInput
from .families import FAMILIES
from .layouts import CheckpointReader, open_checkpoint
from .layouts import hf as hf_layout
from .layouts import megatron_legacy
from .spec import canonical_tensors, check_parallel_sizes

Progress = Callable[[str], None]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")


@dataclass
class ConvertResult:
    """What a conversion read and wrote."""

    source: str
    destination: str
    source_layout: dict
    target_layout: dict
    family: str
    num_parameters: int
    files: list[str]
    bytes_written: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _megatron_writers():
    writers = {"torch": megatron_legacy.write}
    try:
        from .layouts import torch_dist
        writers["torch_dist"] = torch_dist.write
    except ImportError:
        pass
    return writers


def parameter_count(reader: CheckpointReader) -> int:
    return sum(_numel(tensor.shape) for tensor in canonical_tensors(reader.spec))


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _bytes_in(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _tensor_steps(reader: CheckpointReader, megatron_pp: int | None = None) -> int:
    steps = len(canonical_tensors(reader.spec))
    if megatron_pp and reader.spec.tied_embeddings and megatron_pp > 1:
        steps += 1
    return steps


def _open_validated(source, *, strict, trust_remote_pickle, vocab_size=None, notes=None) -> CheckpointReader:
    options = {"strict": strict, "trust_remote_pickle": trust_remote_pickle}
    if vocab_size:
        options["vocab_size"] = vocab_size
    reader = open_checkpoint(source, **options)
    try:
        with _collect_warnings(notes):
            found = reader.validate()
        if notes is not None:
            notes.extend(found)
    except BaseException:
        reader.close()
        raise
    return reader


class _collect_warnings:
    """Route Python warnings raised while reading into the result's notes."""

    def __init__(self, notes):
        self.notes = notes

    def __enter__(self):
        import warnings
        self._catcher = warnings.catch_warnings(record=True)
        self.records = self._catcher.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self._catcher.__exit__(*exc)
        if self.notes is not None:
            for record in self.records:
                message = str(record.message)
                if message not in self.notes:
                    self.notes.append(message)


def write_hf_folder(reader: CheckpointReader, out: Path, *, dtype, max_shard_size, tokenizer=None,
                    progress: Progress | None = None) -> list[str]:
    """Config, generation config, shards (+ index) and tokenizer files into ``out``."""
    family = FAMILIES[reader.spec.family]
    config_fields = family.spec_to_config(reader.spec, dtype)
    config_fields.pop("architectures", None)
    model_type = config_fields.pop("model_type")
    dtype_name = config_fields.pop("torch_dtype")
    defaults = AutoConfig.for_model(model_type)
    for token in ("bos_token_id", "eos_token_id", "pad_token_id"):
        # GPT-2's defaults (50256) point past a smaller vocabulary: drop them.
        value = getattr(defaults, token, None)
        if isinstance(value, int) and value >= reader.spec.vocab_size:
            config_fields.setdefault(token, None)
    config = AutoConfig.for_model(model_type, **config_fields)
    config.architectures = [family.architecture]
    config.dtype = dtype_name
    written = hf_layout.write(reader, out, family, dtype=dtype, max_shard_size=max_shard_size, progress=progress)
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    written += ["config.json", "generation_config.json"]
    if tokenizer:
        written += copy_tokenizer(Path(tokenizer), out)
    return written


def copy_tokenizer(folder: Path, out: Path) -> list[str]:
    if not folder.is_dir():
        raise BadInput(f"{folder}: tokenizer folder not found")
    copied = []
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, out / name)
            copied.append(name)
    if not copied:
        raise BadInput(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...)")
    return copied


def megatron_to_hf(source, destination, *, dtype=None, max_shard_size="5GB", tokenizer=None,
                   overwrite=False, vocab_size=None, strict=False, trust_remote_pickle=False,
                   progress: Progress | None = None, on_start: Callable[[int], None] | None = None) -> ConvertResult:
    """Convert a Megatron checkpoint (any layout ckptkit reads) into a Hugging Face folder.

    >>> megatron_to_hf("ckpt/", "hf_out/", dtype="bf16").files
    ['model.safetensors', 'config.json', 'generation_config.json']
    """
    started = time.perf_counter()
    notes: list[str] = []
    reader = _open_validated(source, strict=strict, trust_remote_pickle=trust_remote_pickle,
                             vocab_size=vocab_size, notes=notes)
    with reader:
        target_dtype = hf_layout.parse_dtype(dtype) or reader.meta.dtype
        if on_start:
            on_start(_tensor_steps(reader))
        with atomic_directory(destination, overwrite) as out, _collect_warnings(notes):
            files = write_hf_folder(reader, out, dtype=target_dtype, max_shard_size=max_shard_size,
                                    tokenizer=tokenizer, progress=progress)
        _note_dropped_state(reader, notes, "Hugging Face has no place for them")
        return ConvertResult(str(source), str(destination), reader.meta.summary(),
                             {"layout": "hf-safetensors", "dtype": str(target_dtype).removeprefix("torch."),
                              "architecture": FAMILIES[reader.spec.family].architecture},
                             reader.spec.family, parameter_count(reader), files, _bytes_in(Path(destination)),
                             time.perf_counter() - started, notes)


def _note_dropped_state(reader: CheckpointReader, notes: list[str], why: str) -> None:
    if reader.meta.layout != megatron_legacy.NAME:
        return
    state = reader.rank_state(0, 0)
    dropped = [key for key in ("optimizer", "opt_param_scheduler", "rng_state") if key in state]
    folder = Path(reader.meta.files[0]).parent.parent if reader.meta.files else reader.meta.path
    if any(path.name == "distrib_optim.pt" for path in folder.glob("*/distrib_optim.pt")):
        dropped.append("distrib_optim.pt")
    if dropped:
        notes.append(f"dropped {', '.join(dropped)} of the source layout ({why})")


def hf_to_megatron(source, destination, *, tp=1, pp=1, vpp=1, dtype=None, make_vocab_size_divisible_by=128,
                   format="torch", naming="mcore-local", overwrite=False, strict=False,
                   trust_remote_pickle=False, progress: Progress | None = None,
                   on_start: Callable[[int], None] | None = None) -> ConvertResult:
    """Convert a Hugging Face folder into a Megatron checkpoint at TP/PP(/VPP).

    >>> hf_to_megatron("hf_model/", "megatron/", tp=2, pp=2).target_layout["tp"]
    2
    """
    return _to_megatron(source, destination, tp=tp, pp=pp, vpp=vpp, dtype=dtype,
                        make_vocab_size_divisible_by=make_vocab_size_divisible_by, format=format, naming=naming,
                        overwrite=overwrite, strict=strict, trust_remote_pickle=trust_remote_pickle,
                        progress=progress, on_start=on_start, keep_training_state=False)


def reshard(source, destination, *, tp, pp, vpp=1, dtype=None, format=None, naming=None,
            make_vocab_size_divisible_by=None, overwrite=False, strict=False, trust_remote_pickle=False,
            progress: Progress | None = None, on_start: Callable[[int], None] | None = None) -> ConvertResult:
    """Rewrite a Megatron checkpoint at other parallel sizes, keeping iteration and args.

    Optimizer and RNG state belong to the old layout and are dropped (with a note).

    >>> reshard("ckpt_tp2pp2/", "ckpt_tp1pp4/", tp=1, pp=4).notes[0]
    'dropped optimizer, opt_param_scheduler, rng_state of the source layout (...)'
    """
    return _to_megatron(source, destination, tp=tp, pp=pp, vpp=vpp, dtype=dtype,
                        make_vocab_size_divisible_by=make_vocab_size_divisible_by, format=format, naming=naming,
                        overwrite=overwrite, strict=strict, trust_remote_pickle=trust_remote_pickle,
                        progress=progress, on_start=on_start, keep_training_state=True)


def _to_megatron(source, destination, *, tp, pp, vpp, dtype, make_vocab_size_divisible_by, format, naming,
                 overwrite, strict, trust_remote_pickle, progress, on_start, keep_training_state) -> ConvertResult:
    started = time.perf_counter()
    notes: list[str] = []
    reader = _open_validated(source, strict=strict, trust_remote_pickle=trust_remote_pickle, notes=notes)
    with reader:
        meta = reader.meta
        is_megatron_source = meta.args is not None
        if keep_training_state and not is_megatron_source:
            raise BadInput(f"{source}: reshard takes a Megatron checkpoint; use hf-to-megatron for {meta.layout}")
        check_parallel_sizes(reader.spec, tp, pp, vpp)
        source_format = "torch_dist" if meta.layout == "torch_dist" else "torch"
        target_format = format or (source_format if keep_training_state else "torch")
        writers = _megatron_writers()
        if target_format not in writers:
            raise BadInput(f"unknown or unavailable format {target_format!r} (available: {', '.join(writers)})")
        target = megatron_legacy.TargetLayout(
            tp=tp, pp=pp, vpp=vpp,
            naming=naming or (meta.naming if keep_training_state and meta.naming in
                              ("mcore-local", "mcore-te", "legacy") else "mcore-local"),
            make_vocab_size_divisible_by=make_vocab_size_divisible_by or meta.make_vocab_size_divisible_by or 128,
            dtype=hf_layout.parse_dtype(dtype) or meta.dtype,
            iteration=meta.iteration if keep_training_state else None,
            release=(meta.release or meta.iteration is None) if keep_training_state else True,
            args_base=meta.args if keep_training_state else None,
        )
        if on_start:
            on_start(_tensor_steps(reader, pp * vpp))
        with atomic_directory(destination, overwrite) as out, _collect_warnings(notes):
            files = writers[target_format](reader, out, target, progress=progress)
        if keep_training_state:
            _note_dropped_state(reader, notes, "they belong to the old parallel layout; resume with "
                                "--no-load-optim --no-load-rng")
        target_summary = {"layout": "torch_dist" if target_format == "torch_dist" else megatron_legacy.NAME,
                          "tp": tp, "pp": pp, "vpp": vpp, "naming": target.naming,
                          "dtype": str(target.dtype).removeprefix("torch."),
                          "iteration": target.iteration, "release": target.release}
        return ConvertResult(str(source), str(destination), meta.summary(), target_summary, reader.spec.family,
                             parameter_count(reader), files, _bytes_in(Path(destination)),
                             time.perf_counter() - started, notes)
