"""Conversions between layouts: ``source layout -> canonical tensors -> target layout``.

Every entry point opens the source lazily, validates it before anything is written,
writes into a hidden partial folder and renames it into place only when complete
(:mod:`ckptkit.atomic`).
"""
from __future__ import annotations

import functools
import shutil
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from . import parallel
from .atomic import check_destination
from .errors import BadInput, InternalError
from .bridges import bridge_of, family_of
from .layouts import CheckpointReader, open_checkpoint
from .megatron_args import check_expressible, megatron_caveats
from .layouts import hf as hf_layout
from .layouts import megatron_legacy
from .safe_load import safe_torch_load
from .spec import canonical_tensors, check_parallel_sizes, padded_vocab_size, rule_for

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


def _write_torch_dist(*args, **kwargs) -> list[str]:
    from .layouts import torch_dist  # imports torch.distributed.checkpoint (0.6-0.9 s): only when used

    return torch_dist.write(*args, **kwargs)


MEGATRON_WRITERS = {"torch": megatron_legacy.write, "torch_dist": _write_torch_dist}


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


def _import_transformers_meanwhile() -> threading.Thread:
    """Import ``transformers`` on a thread while the shards are written.

    Only the config at the end needs it, and its import is about a second of Python on
    the benchmark machine (a fifth of copying a 1.3B checkpoint), while the conversion's
    own threads spend their time in torch and in system calls without the GIL.
    """
    def load() -> None:
        try:
            import transformers  # noqa: F401
        except Exception:  # noqa: BLE001 - the import in write_hf_folder reports it
            pass

    thread = threading.Thread(target=load, name="import transformers", daemon=True)
    thread.start()
    return thread


def write_hf_folder(reader: CheckpointReader, out: Path, *, dtype, max_shard_size, tokenizer=None,
                    progress: Progress | None = None, shards_written: list[str] | None = None) -> list[str]:
    """Config, generation config, shards (+ index) and tokenizer files into ``out``.

    With ``shards_written`` the shards are already there (written by worker processes):
    only the index, config and tokenizer files are added.
    """
    from transformers import AutoConfig, GenerationConfig  # here: a second of import other commands skip
    family = bridge_of(reader.spec, str(reader.meta.path))
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
    if shards_written is None:
        written = hf_layout.write(reader, out, family, dtype=dtype, max_shard_size=max_shard_size, progress=progress)
    else:
        written = shards_written + hf_layout.write_index(out, family, reader.spec, dtype=dtype,
                                                         max_shard_size=max_shard_size)
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
                   progress: Progress | None = None, on_start: Callable[[int], None] | None = None,
                   workers: int = 1, architecture: str | None = None,
                   extra_files: Callable[[Path, ConvertResult], list[str]] | None = None) -> ConvertResult:
    """Convert a Megatron checkpoint (any layout ckptkit reads) into a Hugging Face folder.

    ``architecture`` (``"Phi3ForCausalLM"`` or ``"phi3"``) names the Hugging Face class
    when the checkpoint does not record it, or overrides what it records; it is refused
    when the model does not fit it.

    ``workers`` processes write disjoint shards; under ``torchrun`` every rank takes its
    part of the shards (see :mod:`ckptkit.parallel`).

    ``extra_files(folder, result)`` adds files to the output before it is published, so that
    they appear with it or not at all (a model card, for one): it is called once the output
    is complete in its hidden partial ``folder``, with the result so far (``bytes_written``
    and ``seconds`` still 0), and returns the names it wrote there.

    >>> megatron_to_hf("checkpoints/gpt2", "gpt2-hf", dtype="bf16").files
    ['model.safetensors', 'config.json', 'generation_config.json']
    """
    started = time.perf_counter()
    notes: list[str] = []
    check_destination(Path(destination), overwrite)  # before reading a large source
    reader = _open_validated(source, strict=strict, trust_remote_pickle=trust_remote_pickle,
                             vocab_size=vocab_size, notes=notes)
    with reader:
        as_architecture(reader, architecture)
        target_dtype = hf_layout.parse_dtype(dtype) or reader.meta.dtype
        plan = _hf_plan(reader, target_dtype, max_shard_size)
        if on_start:
            on_start(_tensor_steps(reader))
        with parallel.SharedOutput(destination, overwrite) as shared, _collect_warnings(notes):
            out = shared.path
            share = _WriteShare(str(source), _reader_options(strict, trust_remote_pickle, vocab_size), str(out),
                                target_dtype, max_shard_size, architecture=architecture)
            family = bridge_of(reader.spec, str(reader.meta.path))
            importing = _import_transformers_meanwhile() if shared.leader else None
            files = _write_shares(reader, shared, share, workers, progress,
                                  hf_layout.output_files(family, reader.spec, target_dtype, max_shard_size))
            if shared.leader:
                importing.join()
                files = write_hf_folder(reader, out, dtype=target_dtype, max_shard_size=max_shard_size,
                                        tokenizer=tokenizer, shards_written=files)
                check_hf_output(out, plan, label=Path(destination))
            result = ConvertResult(str(source), str(destination), reader.meta.summary(),
                                   {"layout": "hf-safetensors", "dtype": str(target_dtype).removeprefix("torch."),
                                    "architecture": bridge_of(reader.spec, str(reader.meta.path)).architecture},
                                   reader.spec.family, parameter_count(reader), files, 0, 0.0, notes)
            if shared.leader and extra_files is not None:
                result.files = files + extra_files(out, result)
        _note_dropped_state(reader, notes, "Hugging Face has no place for them")
        result.bytes_written, result.seconds = _bytes_in(Path(destination)), time.perf_counter() - started
        return result


def as_architecture(reader: CheckpointReader, architecture: str | None) -> CheckpointReader:
    """Read ``reader``'s model as ``architecture`` (see :func:`megatron_to_hf`)."""
    if architecture:
        reader.spec = replace(reader.spec, family=family_of(reader.spec, architecture, str(reader.meta.path)))
    return reader


def _reader_options(strict, trust_remote_pickle, vocab_size=None) -> dict:
    options = {"strict": strict, "trust_remote_pickle": trust_remote_pickle}
    if vocab_size:
        options["vocab_size"] = vocab_size
    return options


@dataclass(frozen=True)
class _WriteShare:
    """Some of a conversion's output files, written from a reader of the source.

    Picklable, so a worker process can reopen the source and write its share. ``target``
    is the output dtype for Hugging Face shards, or a Megatron :class:`TargetLayout`
    (whose ``args_base``, with ``args_from_source``, comes from the reopened source).
    """

    source: str
    reader_options: dict
    out: str
    target: object
    max_shard_size: object = None
    args_from_source: bool = False
    architecture: str | None = None

    def __call__(self, names: list[str]) -> list[str]:
        with open_checkpoint(self.source, **self.reader_options) as reader:
            return self.write(as_architecture(reader, self.architecture), names)

    def write(self, reader: CheckpointReader, names: list[str], progress: Progress | None = None) -> list[str]:
        if isinstance(self.target, torch.dtype):
            return hf_layout.write(reader, Path(self.out), bridge_of(reader.spec, str(reader.meta.path)), dtype=self.target,
                                   max_shard_size=self.max_shard_size, progress=progress, only=names, finish=False)
        target = replace(self.target, args_base=reader.meta.args) if self.args_from_source else self.target
        return megatron_legacy.write(reader, Path(self.out), target, progress=progress, only=names, finish=False)


def _write_shares(reader: CheckpointReader, shared: parallel.SharedOutput, share: _WriteShare, workers: int,
                  progress: Progress | None, files: list[tuple[str, int]]) -> list[str]:
    """Write this process's share of ``files`` (in ``workers`` processes), then wait for every rank's."""
    if workers < 1:
        raise BadInput(f"--workers must be at least 1 (got {workers})")
    runs = parallel.my_share(files, workers=workers, rank=shared.group.rank, world=shared.group.world)
    written = parallel.run_parts(share, runs, in_process=functools.partial(share.write, reader, progress=progress))
    shared.parts_done()
    return written


def _hf_plan(reader: CheckpointReader, dtype, max_shard_size) -> hf_layout.HfPlan:
    if isinstance(max_shard_size, int) and max_shard_size <= 0:
        raise BadInput(f"--max-shard-size must be positive (got {max_shard_size})")
    try:
        return hf_layout.plan_output(bridge_of(reader.spec, str(reader.meta.path)), reader.spec, dtype, max_shard_size)
    except ValueError as error:  # huggingface_hub's size parser: "5GB", "500MB", ...
        raise BadInput(f"--max-shard-size {max_shard_size!r}: {str(error).splitlines()[0]}") from None


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
                   on_start: Callable[[int], None] | None = None, workers: int = 1) -> ConvertResult:
    """Convert a Hugging Face folder into a Megatron checkpoint at TP/PP(/VPP).

    ``workers`` processes write disjoint rank files; under ``torchrun`` every rank takes
    its part of them (see :mod:`ckptkit.parallel`).

    >>> hf_to_megatron("hf/llama", "llama-tp2pp2", tp=2, pp=2).target_layout["tp"]
    2
    """
    return _to_megatron(source, destination, tp=tp, pp=pp, vpp=vpp, dtype=dtype,
                        make_vocab_size_divisible_by=make_vocab_size_divisible_by, format=format, naming=naming,
                        overwrite=overwrite, strict=strict, trust_remote_pickle=trust_remote_pickle,
                        progress=progress, on_start=on_start, keep_training_state=False, workers=workers)


def reshard(source, destination, *, tp, pp, vpp=1, dtype=None, format=None, naming=None,
            make_vocab_size_divisible_by=None, overwrite=False, strict=False, trust_remote_pickle=False,
            progress: Progress | None = None, on_start: Callable[[int], None] | None = None,
            workers: int = 1) -> ConvertResult:
    """Rewrite a Megatron checkpoint at other parallel sizes, keeping iteration and args.

    Optimizer and RNG state belong to the old layout and are dropped (with a note).

    >>> reshard("checkpoints/gpt2", "gpt2-tp1pp3", tp=1, pp=3).notes[-1]
    'dropped optimizer, opt_param_scheduler, rng_state of the source layout (...)'
    """
    return _to_megatron(source, destination, tp=tp, pp=pp, vpp=vpp, dtype=dtype,
                        make_vocab_size_divisible_by=make_vocab_size_divisible_by, format=format, naming=naming,
                        overwrite=overwrite, strict=strict, trust_remote_pickle=trust_remote_pickle,
                        progress=progress, on_start=on_start, keep_training_state=True, workers=workers)


def _to_megatron(source, destination, *, tp, pp, vpp, dtype, make_vocab_size_divisible_by, format, naming,
                 overwrite, strict, trust_remote_pickle, progress, on_start, keep_training_state,
                 workers=1) -> ConvertResult:
    started = time.perf_counter()
    notes: list[str] = []
    if make_vocab_size_divisible_by is not None and make_vocab_size_divisible_by < 1:
        raise BadInput("--make-vocab-size-divisible-by must be a positive integer "
                       f"(got {make_vocab_size_divisible_by})")
    check_destination(Path(destination), overwrite)  # before reading a large source
    reader = _open_validated(source, strict=strict, trust_remote_pickle=trust_remote_pickle, notes=notes)
    with reader:
        meta = reader.meta
        is_megatron_source = meta.args is not None
        if keep_training_state and not is_megatron_source:
            raise BadInput(f"{source}: reshard takes a Megatron checkpoint; use hf-to-megatron for {meta.layout}")
        check_parallel_sizes(reader.spec, tp, pp, vpp)
        check_expressible(reader.spec)
        notes.extend(megatron_caveats(reader.spec))
        source_format = "torch_dist" if meta.layout == "torch_dist" else "torch"
        target_format = format or (source_format if keep_training_state else "torch")
        if target_format not in MEGATRON_WRITERS:
            raise BadInput(f"unknown format {target_format!r} (available: {', '.join(MEGATRON_WRITERS)})")
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
        with parallel.SharedOutput(destination, overwrite) as shared, _collect_warnings(notes):
            out = shared.path
            if target_format == "torch":
                share = _WriteShare(str(source), _reader_options(strict, trust_remote_pickle), str(out),
                                    replace(target, args_base=None), args_from_source=keep_training_state)
                files = _write_shares(reader, shared, share, workers, progress,
                                      megatron_legacy.output_files(reader.spec, target, target.dtype))
                if shared.leader:
                    megatron_legacy.write_tracker(out, target)
            elif workers > 1 or shared.group.world > 1:
                raise BadInput(f"--workers and torchrun split per-rank (torch) output only; write "
                               f"{target_format} with one process")
            else:
                files = MEGATRON_WRITERS[target_format](reader, out, target, progress=progress)
            if shared.leader:
                check_megatron_output(out, reader.spec, target, target_format, label=Path(destination))
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


# ---------------------------------------------------------------------------- checking what was written

def _compare_with_plan(where: Path, found: dict, planned: dict) -> None:
    """``found`` and ``planned`` map tensor names to (dtype, shape); any difference is our bug."""
    for name in planned:
        if name not in found:
            raise InternalError(f"{where}: tensor {name} is missing from the written file")
        if found[name] != planned[name]:
            raise InternalError(f"{where}: tensor {name} was written as {found[name]}; planned {planned[name]}")
    for name in found:
        if name not in planned:
            raise InternalError(f"{where}: tensor {name} was written but not planned")


def check_hf_output(out: Path, plan: hf_layout.HfPlan, *, label: Path) -> None:
    """Re-open the written shards (headers only) and compare names, dtypes and shapes with the plan."""
    from safetensors import safe_open

    from .safetensors_stream import DTYPE_NAMES

    for shard in plan.shards:
        try:
            with safe_open(str(out / shard.file_name), framework="pt") as handle:
                found = {name: (handle.get_slice(name).get_dtype(), tuple(handle.get_slice(name).get_shape()))
                         for name in handle.keys()}
        except Exception as error:
            raise InternalError(f"{label / shard.file_name}: written shard does not read back "
                                f"({str(error).splitlines()[0]})") from None
        planned = {name: (DTYPE_NAMES[dtype], tuple(shape)) for name, (dtype, shape) in shard.tensors.items()}
        _compare_with_plan(label / shard.file_name, found, planned)
    if len(plan.shards) > 1:
        index = hf_layout._read_index(out / hf_layout.SAFETENSORS_INDEX)
        if index != plan.weight_map:
            raise InternalError(f"{label / hf_layout.SAFETENSORS_INDEX}: does not list the planned shards")
    hf_layout.read_config(out)


def check_megatron_output(out: Path, spec, target: megatron_legacy.TargetLayout, target_format: str, *,
                          label: Path) -> None:
    """Re-open the written checkpoint (pickles and metadata, no tensor data) and compare it with the plan."""
    iteration = target.iteration if not target.release else None
    folder_name = megatron_legacy.iteration_dir_name(iteration, target.release)
    tracker = out / megatron_legacy.TRACKER
    expected_tracker = "release" if target.release or iteration is None else str(iteration)
    if not tracker.is_file() or tracker.read_text().strip() != expected_tracker:
        raise InternalError(f"{label / megatron_legacy.TRACKER}: missing or not naming {expected_tracker}")
    padded = padded_vocab_size(spec.vocab_size, target.make_vocab_size_divisible_by, target.tp)
    if target_format == "torch_dist":
        _check_torch_dist_output(out / folder_name, spec, target, padded, label=label / folder_name)
        return
    canonical = {tensor.name: tensor for tensor in canonical_tensors(spec)}
    for planned_file in megatron_legacy.plan_files(spec, target):
        where = label / folder_name / planned_file.relative_path
        try:
            state = safe_torch_load(out / folder_name / planned_file.relative_path)
        except BadInput as error:
            raise InternalError(f"{where}: written rank file does not read back ({error})") from None
        chunk_keys = ["model"] if len(planned_file.chunks) == 1 else \
            [f"model{chunk}" for chunk in range(len(planned_file.chunks))]
        for chunk_key, entries, extra_keys in zip(chunk_keys, planned_file.chunks, planned_file.extra_state_keys):
            stored = megatron_legacy._flatten(state.get(chunk_key) or {})
            found = {key: (value.dtype, tuple(value.shape)) if isinstance(value, torch.Tensor) else value
                     for key, value in stored.items()}
            planned = dict.fromkeys(extra_keys)
            for entry in entries:
                shape = canonical[entry.copy_of or entry.canonical].shape
                shard_shape = rule_for(spec, entry.rule, padded).shard_shape(shape, target.tp)
                planned[entry.file_key] = (target.dtype, shard_shape)
            _compare_with_plan(where, found, planned)


def _check_torch_dist_output(folder: Path, spec, target, padded: int, *, label: Path) -> None:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from .layouts import torch_dist

    try:
        metadata = torch_dist.read_dcp_metadata(folder)
        torch_dist.TorchDistReader._check_data_files(folder, metadata)
    except BadInput as error:
        raise InternalError(f"{label}: written checkpoint does not read back ({error})") from None
    items, _ = torch_dist.plan_items(spec, target.tp, padded, target.dtype)
    planned = {item.index.fqn: (target.dtype, tuple(item.tensor_data.size)) for item in items}
    stored = metadata.state_dict_metadata
    found = {key: (entry.properties.dtype, tuple(entry.size)) for key, entry in stored.items()
             if isinstance(entry, TensorStorageMetadata)}
    _compare_with_plan(label / torch_dist.DCP_METADATA, found, planned)
    if torch_dist.COMMON_STATE_KEY not in stored or not (folder / torch_dist.CONFIG_FILE).is_file():
        raise InternalError(f"{label}: common state or {torch_dist.CONFIG_FILE} was not written")
