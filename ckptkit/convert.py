"""Conversions between layouts: ``source layout -> canonical tensors -> target layout``.

Every entry point opens the source lazily and validates it, asks the target layout's
writer for its plan (:mod:`ckptkit.plan`) before anything is written, writes the plan's
data files into a hidden partial folder (split between ``--workers`` processes or
``torchrun`` ranks where the layout allows), finishes, checks the output against the plan
and renames it into place only when complete (:mod:`ckptkit.atomic`). ``dry_run=True``
stops after the plan.
"""
from __future__ import annotations

import concurrent.futures
import functools
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from . import parallel
from .atomic import check_destination
from .bridges import family_of
from .errors import BadInput
from .layouts import CheckpointReader, open_checkpoint
from .layouts import hf as hf_layout
from .layouts import megatron_legacy
from .layouts.base import CheckpointWriter
from .layouts.hf_writer import HfWriter, copy_tokenizer, write_hf_folder  # noqa: F401 - library API
from .layouts.megatron_common import TargetLayout
from .layouts.megatron_legacy import RankFilesWriter
from .layouts.torch_dist_writer import TorchDistWriter
from .megatron_args import check_expressible, megatron_caveats
from .spec import canonical_tensors, check_parallel_sizes

Progress = Callable[[str], None]

# Megatron output formats -> their writers
MEGATRON_WRITERS: dict[str, type] = {"torch": RankFilesWriter, "torch_dist": TorchDistWriter}


@dataclass
class ConvertResult:
    """What a conversion read and wrote (with ``dry_run``, what it would write: ``plan``)."""

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
    plan: dict | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def parameter_count(reader: CheckpointReader) -> int:
    return sum(math.prod(tensor.shape) for tensor in canonical_tensors(reader.spec))


def _bytes_in(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _reader_options(strict, trust_remote_pickle, vocab_size=None) -> dict:
    options = {"strict": strict, "trust_remote_pickle": trust_remote_pickle}
    if vocab_size:
        options["vocab_size"] = vocab_size
    return options


def _open_validated(source, options: dict, notes: list[str], validate: bool = True) -> CheckpointReader:
    """The source, opened and (unless ``validate`` is off, for a plan) checked throughout,
    but for the comparison of copies of a reader that :attr:`compares_copies_apart`
    (:class:`_CopiesCompared` runs it while the data files are written)."""
    reader = open_checkpoint(source, **options)
    if not validate:
        return reader
    try:
        with _collect_warnings(notes):
            notes.extend(reader.validate(compare_copies=False) if reader.compares_copies_apart else reader.validate())
    except BaseException:
        reader.close()
        raise
    return reader


class _CopiesCompared:
    """``reader.compare_copies()`` on a thread of its own, started now: the copies Megatron
    keeps of some tensors are compared while the conversion reads and writes (on a 1.3B GPT
    0.35-0.8 s of reads and comparisons, the tied head's included, that came before the
    first write).

    ``notes()`` waits for it and returns its notes, or raises its error (a copy that differs,
    in strict mode: the output is then not published). ``wait()`` only waits, so that the
    reader is not closed under it.
    """

    def __init__(self, reader: CheckpointReader):
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compare copies")
        self._future = self._pool.submit(reader.compare_copies)

    def notes(self) -> list[str]:
        try:
            return self._future.result()
        finally:
            self._pool.shutdown()

    def wait(self) -> None:
        concurrent.futures.wait([self._future])
        self._pool.shutdown()


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
        for record in self.records:
            message = str(record.message)
            if message not in self.notes:
                self.notes.append(message)


def as_architecture(reader: CheckpointReader, architecture: str | None) -> CheckpointReader:
    """Read ``reader``'s model as ``architecture`` (see :func:`megatron_to_hf`)."""
    if architecture:
        reader.spec = replace(reader.spec, family=family_of(reader.spec, architecture, str(reader.meta.path)))
    return reader


@dataclass(frozen=True)
class _WriteShare:
    """Some of a plan's data files, written from a reader of the source.

    Picklable, so a worker process can reopen the source, make the same plan with the same
    writer, and write its share.
    """

    source: str
    reader_options: dict
    out: str
    writer: CheckpointWriter
    architecture: str | None = None

    def __call__(self, names: list[str]) -> list[str]:
        with open_checkpoint(self.source, **self.reader_options) as reader:
            as_architecture(reader, self.architecture)
            return self.writer.write(reader, self.writer.plan(reader), Path(self.out), names)


def _convert(source, destination, writer_for: Callable[[CheckpointReader, list[str]], CheckpointWriter], *,
             options: dict,
             overwrite: bool, workers: int, progress, on_start, architecture=None, dry_run=False,
             checks: Callable[[CheckpointReader, list[str]], None] | None = None,
             after: Callable[[CheckpointReader, list[str]], None] | None = None,
             extra_files=None) -> ConvertResult:
    """The one conversion engine: open, plan, write the shares, finish, check, publish."""
    started = time.perf_counter()
    notes: list[str] = []
    if workers < 1:
        raise BadInput(f"--workers must be at least 1 (got {workers})")
    if not dry_run:
        check_destination(Path(destination), overwrite)  # before reading a large source
    with _open_validated(source, options, notes, validate=not dry_run) as reader:
        as_architecture(reader, architecture)
        if checks:
            checks(reader, notes)
        writer = writer_for(reader, notes)
        plan = writer.plan(reader)
        result = ConvertResult(str(source), str(destination), reader.meta.summary(), plan.target, reader.spec.family,
                               parameter_count(reader), [], 0, 0.0, notes, plan.to_dict())
        if dry_run:
            result.seconds = time.perf_counter() - started
            return result
        if on_start:
            on_start(plan.reads)
        with parallel.SharedOutput(destination, overwrite) as shared, _collect_warnings(notes):
            out = shared.path
            if not plan.splittable and (workers > 1 or shared.group.world > 1):
                raise BadInput(f"--workers and torchrun split {plan.target['layout']} output in one process only: "
                               "write it with one process")
            share = _WriteShare(str(source), options, str(out), writer, architecture)
            runs = parallel.my_share(plan.sizes(), workers=workers, rank=shared.group.rank, world=shared.group.world)
            in_process = functools.partial(writer.write, reader, plan, out, progress=progress)
            comparing = _CopiesCompared(reader) if reader.compares_copies_apart else None
            try:
                files = parallel.run_parts(share, runs, in_process=in_process)
            except BaseException:
                if comparing:
                    comparing.wait()
                raise
            if comparing:
                notes.extend(comparing.notes())
            shared.parts_done()
            if shared.leader:
                files += writer.finish(reader, plan, out)
                writer.check(plan, out, Path(destination))
                result.files = files
                if extra_files is not None:
                    result.files = files + extra_files(out, result)
        if after:
            after(reader, notes)
        result.bytes_written, result.seconds = _bytes_in(Path(destination)), time.perf_counter() - started
        return result


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


def megatron_to_hf(source, destination, *, dtype=None, max_shard_size="5GB", tokenizer=None,
                   overwrite=False, vocab_size=None, strict=False, trust_remote_pickle=False,
                   progress: Progress | None = None, on_start: Callable[[int], None] | None = None,
                   workers: int = 1, architecture: str | None = None, dry_run: bool = False,
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
    >>> [entry["path"] for entry in megatron_to_hf("checkpoints/gpt2", "x", dry_run=True).plan["files"]]
    ['model.safetensors']
    """
    def writer_for(reader: CheckpointReader, notes: list[str]) -> CheckpointWriter:
        return HfWriter(hf_layout.parse_dtype(dtype) or reader.meta.dtype, max_shard_size, tokenizer)

    def after(reader: CheckpointReader, notes: list[str]) -> None:
        _note_dropped_state(reader, notes, "Hugging Face has no place for them")

    return _convert(source, destination, writer_for, options=_reader_options(strict, trust_remote_pickle, vocab_size),
                    overwrite=overwrite, workers=workers, progress=progress, on_start=on_start,
                    architecture=architecture, dry_run=dry_run, after=after, extra_files=extra_files)


def hf_to_megatron(source, destination, *, tp=1, pp=1, vpp=1, ep=1, etp=None, dtype=None,
                   make_vocab_size_divisible_by=128, format="torch", naming="mcore-local", overwrite=False,
                   strict=False, trust_remote_pickle=False, progress: Progress | None = None,
                   on_start: Callable[[int], None] | None = None, workers: int = 1,
                   dry_run: bool = False, optimizer: str | None = None, dp: int | None = None,
                   distributed_optimizer: bool | None = None, megatron_args=None) -> ConvertResult:
    """Convert a Hugging Face folder into a Megatron checkpoint at TP/PP(/VPP).

    A mixture of experts places ``num_experts / ep`` experts on each of ``ep``
    expert-parallel ranks, each expert cut over ``etp`` ranks (None: TP, Megatron's
    default; per-rank files need ETP = TP).

    ``optimizer="fresh"`` adds a fresh optimizer state (fp32 master copies of the Hugging
    Face weights at their full precision, zero moments, step 0) for a run at data-parallel
    size ``dp`` (default 1), with Megatron's distributed optimizer or not
    (``distributed_optimizer``, default: as ``megatron_args`` say), and writes iteration 0
    instead of a release, so that Megatron starts training with its optimizer loaded.
    ``megatron_args`` are the training run's Megatron flags (a string or a list; ``--lr`` at
    least): the state's parameter groups and LR schedule must be the run's. See
    :mod:`ckptkit.optimizer.fresh`.

    ``workers`` processes write disjoint rank files; under ``torchrun`` every rank takes
    its part of them (see :mod:`ckptkit.parallel`).

    >>> hf_to_megatron("hf/llama", "llama-tp2pp2", tp=2, pp=2).target_layout["tp"]
    2
    >>> hf_to_megatron("hf/llama", "llama-dp4", tp=2, pp=1, dtype="bf16", optimizer="fresh", dp=4,
    ...                distributed_optimizer=True,
    ...                megatron_args="--lr 3e-4 --train-iters 1000 --global-batch-size 64").files[-1]
    'iter_0000000/mp_rank_01/distrib_optim.pt'
    """
    if optimizer not in (None, "none", "fresh"):
        raise BadInput(f"unknown optimizer state {optimizer!r} for hf-to-megatron (available: fresh)")
    fresh = optimizer == "fresh"
    if not fresh and (dp is not None or distributed_optimizer is not None or megatron_args is not None):
        raise BadInput("--dp, --distributed-optimizer and --megatron-args describe a fresh optimizer state: "
                       "add --optimizer fresh")
    training_run = None
    if fresh:
        from .optimizer.fresh import TrainingRun

        training_run = TrainingRun.from_megatron_args(megatron_args)
    return _to_megatron(source, destination, tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp, dtype=dtype,
                        make_vocab_size_divisible_by=make_vocab_size_divisible_by, format=format, naming=naming,
                        overwrite=overwrite, strict=strict, trust_remote_pickle=trust_remote_pickle,
                        progress=progress, on_start=on_start, keep_training_state=False, workers=workers,
                        dry_run=dry_run, dp=dp, distributed_optimizer=distributed_optimizer,
                        fresh_optimizer=training_run)


def reshard(source, destination, *, tp, pp, vpp=1, ep=None, etp=None, dtype=None, format=None, naming=None,
            make_vocab_size_divisible_by=None, overwrite=False, strict=False, trust_remote_pickle=False,
            progress: Progress | None = None, on_start: Callable[[int], None] | None = None,
            workers: int = 1, dry_run: bool = False, optimizer: bool = True, dp: int | None = None,
            distributed_optimizer: bool | None = None, optimizer_sharding: str | None = None) -> ConvertResult:
    """Rewrite a Megatron checkpoint at other parallel sizes, keeping iteration and args.

    ``ep`` (expert-parallel size) defaults to the source's; ``etp`` (expert tensor-parallel
    size) to the source's where it differed from its TP, else to the target TP.

    The optimizer state (per-rank files, distributed or not) is carried to the new layout
    at data-parallel size ``dp`` (default: the source's), distributed or not
    (``distributed_optimizer``, default: as the source; a torch_dist target keeps the
    distributed optimizer as ``optimizer_sharding``, ``dp_reshardable`` or
    ``fully_reshardable``, default the source's or ``dp_reshardable``), unless ``optimizer=False``; see
    :mod:`ckptkit.optimizer`. RNG states that depend on the rank are dropped when the
    layout changes, with a note, as is whatever cannot be carried.

    >>> reshard("checkpoints/gpt2", "gpt2-tp1pp3", tp=1, pp=3).notes[-1]
    'dropped optimizer, opt_param_scheduler, rng_state of the source layout (...)'
    """
    return _to_megatron(source, destination, tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp, dtype=dtype,
                        make_vocab_size_divisible_by=make_vocab_size_divisible_by, format=format, naming=naming,
                        overwrite=overwrite, strict=strict, trust_remote_pickle=trust_remote_pickle,
                        progress=progress, on_start=on_start, keep_training_state=True, workers=workers,
                        dry_run=dry_run, optimizer=optimizer, dp=dp, distributed_optimizer=distributed_optimizer,
                        optimizer_sharding=optimizer_sharding)


def _expert_sizes(meta, ep: int | None, etp: int | None) -> tuple[int, int | None]:
    """The target's EP and ETP: as given, else the source's EP, and its ETP where it was not
    its TP (None: the target TP)."""
    if ep is None:
        ep = meta.ep if meta.args is not None else 1
    if etp is None and meta.args is not None and meta.etp != meta.tp:
        etp = meta.etp
    return ep, etp


def _to_megatron(source, destination, *, tp, pp, vpp, dtype, make_vocab_size_divisible_by, format, naming,
                 overwrite, strict, trust_remote_pickle, progress, on_start, keep_training_state,
                 workers=1, dry_run=False, ep=None, etp=None, optimizer=False, dp=None,
                 distributed_optimizer=None, fresh_optimizer=None, optimizer_sharding=None) -> ConvertResult:
    if make_vocab_size_divisible_by is not None and make_vocab_size_divisible_by < 1:
        raise BadInput("--make-vocab-size-divisible-by must be a positive integer "
                       f"(got {make_vocab_size_divisible_by})")
    if format is not None and format not in MEGATRON_WRITERS:
        raise BadInput(f"unknown format {format!r} (available: {', '.join(MEGATRON_WRITERS)})")

    def checks(reader: CheckpointReader, notes: list[str]) -> None:
        if keep_training_state and reader.meta.args is None:
            raise BadInput(f"{source}: reshard takes a Megatron checkpoint; use hf-to-megatron for "
                           f"{reader.meta.layout}")
        check_parallel_sizes(reader.spec, tp, pp, vpp, *_expert_sizes(reader.meta, ep, etp))
        check_expressible(reader.spec)
        notes.extend(megatron_caveats(reader.spec))

    carried = []

    def writer_for(reader: CheckpointReader, notes: list[str]) -> CheckpointWriter:
        meta = reader.meta
        source_format = "torch_dist" if meta.layout == "torch_dist" else "torch"
        target_format = format or (source_format if keep_training_state else "torch")
        kept_naming = meta.naming if keep_training_state and meta.naming in ("mcore-local", "mcore-te", "legacy") \
            else "mcore-local"
        target_ep, target_etp = _expert_sizes(meta, ep, etp)
        target = TargetLayout(
            tp=tp, pp=pp, vpp=vpp, ep=target_ep, etp=target_etp, naming=naming or kept_naming,
            make_vocab_size_divisible_by=make_vocab_size_divisible_by or meta.make_vocab_size_divisible_by or 128,
            dtype=hf_layout.parse_dtype(dtype) or meta.dtype,
            iteration=meta.iteration if keep_training_state else None,
            release=(meta.release or meta.iteration is None) if keep_training_state else True,
        )
        if fresh_optimizer is not None:  # Megatron loads no optimizer from a release: iteration 0
            target = replace(target, iteration=0, release=False)
        weights = MEGATRON_WRITERS[target_format](target, keep_source_args=keep_training_state)
        if fresh_optimizer is not None:
            from .optimizer.fresh import refuse_fresh_state_of_encoder_models, with_fresh_optimizer_state

            refuse_fresh_state_of_encoder_models(reader.spec, "--optimizer fresh", "--optimizer none")

            writer, fresh_notes = with_fresh_optimizer_state(weights, target, fresh_optimizer, dp=dp,
                                                             distributed=distributed_optimizer)
            notes.extend(fresh_notes)
            return writer
        if not (keep_training_state and optimizer):
            return weights
        from .optimizer.carry import with_optimizer_state

        writer, why_not = with_optimizer_state(weights, target, reader, dp=dp, distributed=distributed_optimizer,
                                               sharding=optimizer_sharding)
        notes.extend(why_not)
        carried.append(writer is not weights)
        return writer

    def after(reader: CheckpointReader, notes: list[str]) -> None:
        if keep_training_state and not any(carried):
            _note_dropped_state(reader, notes, "they belong to the old parallel layout; resume with "
                                "--no-load-optim --no-load-rng")

    return _convert(source, destination, writer_for, options=_reader_options(strict, trust_remote_pickle),
                    overwrite=overwrite, workers=workers, progress=progress, on_start=on_start, dry_run=dry_run,
                    checks=checks, after=after)
