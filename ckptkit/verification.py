"""Are two checkpoints the same model? Compared tensor by tensor in the canonical namespace.

Any two layouts compare: a Megatron TP2 PP2 checkpoint against its Hugging Face
conversion, a reshard against its source. Vocabulary tensors are compared on the
real vocabulary rows (padding differs legitimately between TP sizes). With
``optimizer=True`` the optimizer states are compared too, per canonical tensor (its
fp32 master copy, ``exp_avg`` and ``exp_avg_sq``), whatever their layouts and kinds.
With one path, the checkpoint is checked alone: files, index coverage, headers, shapes,
and that every fp32 master copy of its optimizer state rounds to its stored weight.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import BadInput, Unsupported
from .layouts import open_checkpoint
from .layouts import hf as hf_layout
from .layouts.megatron_legacy import TRACKER
from .optimizer.verify import master_copy_problems


@dataclass
class TensorComparison:
    name: str
    status: str  # "equal", "close", "different", "missing-in-a", "missing-in-b", "shape", "dtype"
    shape_a: tuple | None = None
    shape_b: tuple | None = None
    dtype_a: str | None = None
    dtype_b: str | None = None
    max_abs_diff: float | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("equal", "close")


@dataclass
class VerifyResult:
    a: str
    b: str | None
    equivalent: bool
    tensors: list[TensorComparison] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    max_abs_diff: float = 0.0
    # with optimizer=True: one row per canonical tensor and state key, named "NAME [exp_avg]"
    optimizer: list[TensorComparison] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "equivalent": self.equivalent, "max_abs_diff": self.max_abs_diff,
                "problems": self.problems, "notes": self.notes,
                "tensors": [dict(t.__dict__) for t in self.tensors],
                "optimizer": [dict(t.__dict__) for t in self.optimizer]}


_SPEC_FIELDS_THAT_MATTER = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                            "ffn_hidden_size", "vocab_size", "head_dim", "position_embedding", "normalization",
                            "activation", "tied_embeddings", "norm_epsilon", "rope_theta")


def verify(a, b=None, *, atol: float = 0.0, ignore_dtype: bool = False, optimizer: bool = False,
           **options) -> VerifyResult:
    """Compare checkpoints ``a`` and ``b`` (any layouts); ``b=None`` checks ``a`` alone.

    Equivalent means: same architecture, same tensor set, same shapes, same dtypes
    (unless ``ignore_dtype``) and every element within ``atol`` (0: bit-identical); with
    ``optimizer``, also the same optimizer state (step, parameter groups, LR schedule, and
    per canonical tensor its master copy and moments within ``atol``) in any layout.

    >>> from ckptkit.convert import megatron_to_hf
    >>> _ = megatron_to_hf("checkpoints/gpt2", "gpt2-hf")
    >>> verify("checkpoints/gpt2", "gpt2-hf").equivalent
    True
    """
    if b is None:
        return check_alone(a, **options)
    with open_checkpoint(a, **options) as reader_a, open_checkpoint(b, **options) as reader_b:
        result = VerifyResult(str(a), str(b), True)
        spec_a, spec_b = reader_a.spec.to_dict(), reader_b.spec.to_dict()
        for key in _SPEC_FIELDS_THAT_MATTER:
            if spec_a[key] != spec_b[key]:
                result.problems.append(f"architecture differs: {key} is {spec_a[key]!r} in A, {spec_b[key]!r} in B")
        names_a = [t.name for t in reader_a.canonical()]
        names_b = {t.name for t in reader_b.canonical()}
        ordered = names_a + sorted(names_b - set(names_a))
        for name in ordered:
            if name not in names_b:
                result.tensors.append(TensorComparison(name, "missing-in-b"))
                continue
            if name not in names_a:
                result.tensors.append(TensorComparison(name, "missing-in-a"))
                continue
            result.tensors.append(_compare(name, reader_a, reader_b, atol, ignore_dtype))
        result.max_abs_diff = max((t.max_abs_diff or 0.0 for t in result.tensors), default=0.0)
        if optimizer:
            _compare_optimizer_states(reader_a, reader_b, atol, result)
        result.equivalent = not result.problems and all(t.ok for t in result.tensors + result.optimizer)
        return result


def _real_rows(name: str, tensor: torch.Tensor, vocab_size: int) -> torch.Tensor:
    if name in ("embedding.word_embeddings.weight", "output_layer.weight", "output_layer.bias"):
        return tensor[:vocab_size]
    return tensor


def _compare(name, reader_a, reader_b, atol, ignore_dtype) -> TensorComparison:
    tensor_a = _real_rows(name, reader_a.tensor(name), reader_a.spec.vocab_size)
    tensor_b = _real_rows(name, reader_b.tensor(name), reader_b.spec.vocab_size)
    return _compare_tensors(name, tensor_a, tensor_b, atol, ignore_dtype)


def _compare_tensors(name, tensor_a, tensor_b, atol, ignore_dtype) -> TensorComparison:
    row = TensorComparison(name, "equal", tuple(tensor_a.shape), tuple(tensor_b.shape),
                           str(tensor_a.dtype).removeprefix("torch."), str(tensor_b.dtype).removeprefix("torch."))
    if tensor_a.shape != tensor_b.shape:
        row.status = "shape"
        return row
    if tensor_a.dtype == tensor_b.dtype and torch.equal(tensor_a, tensor_b):
        row.max_abs_diff = 0.0
        return row
    difference = (tensor_a.double() - tensor_b.double()).abs()
    row.max_abs_diff = difference.max().item() if difference.numel() else 0.0
    if tensor_a.dtype != tensor_b.dtype and not ignore_dtype:
        row.status = "dtype"
    elif row.max_abs_diff == 0.0:
        row.status = "equal"
    elif row.max_abs_diff <= atol:
        row.status = "close"
    else:
        row.status = "different"
    return row


def _compare_optimizer_states(reader_a, reader_b, atol: float, result: VerifyResult) -> None:
    """The two checkpoints' optimizer states, one canonical tensor at a time (vocabulary
    tensors on their real rows: added padding rows get zero state)."""
    from .optimizer import STATE_KEYS, read_optimizer_state

    states = {}
    try:
        for label, reader in (("A", reader_a), ("B", reader_b)):
            try:
                states[label] = read_optimizer_state(reader)
            except (BadInput, Unsupported) as error:
                result.problems.append(f"optimizer state of {label} not read: {error}")
        if len(states) < 2:
            return
        info_a, info_b = states["A"].info, states["B"].info
        for what, value_a, value_b in [("step", float(info_a.step), float(info_b.step)),
                                       ("parameter groups", info_a.param_groups, info_b.param_groups),
                                       ("LR schedule (opt_param_scheduler)", info_a.opt_param_scheduler,
                                        info_b.opt_param_scheduler),
                                       ("grad scaler", info_a.grad_scaler, info_b.grad_scaler)]:
            if value_a != value_b:
                result.problems.append(f"optimizer {what} differs: {value_a!r} in A, {value_b!r} in B")
        names_b = {tensor.name for tensor in states["B"].canonical()}
        for canonical in states["A"].canonical():
            if canonical.name not in names_b:
                continue  # the weights' comparison reports the tensor missing
            values_a, values_b = states["A"].tensor(canonical.name), states["B"].tensor(canonical.name)
            for key in STATE_KEYS:
                result.optimizer.append(_compare_tensors(
                    f"{canonical.name} [{key}]", _real_rows(canonical.name, values_a[key], reader_a.spec.vocab_size),
                    _real_rows(canonical.name, values_b[key], reader_b.spec.vocab_size), atol, False))
            del values_a, values_b
    finally:
        for state in states.values():
            state.close()


def check_alone(path, **options) -> VerifyResult:
    """Integrity of one checkpoint: every file present and readable, index coverage, shapes,
    and the optimizer state's master copies against the weights."""
    result = VerifyResult(str(path), None, True)
    folder = Path(path)
    try:
        if folder.is_dir() and (folder / hf_layout.SAFETENSORS_INDEX).is_file():
            result.problems += _index_problems(folder)
        result.problems += _tracker_problems(folder)
        with open_checkpoint(path, **options) as reader:
            result.notes += reader.validate()
            for canonical in reader.canonical():
                tensor = reader.tensor(canonical.name)
                result.tensors.append(TensorComparison(canonical.name, "equal", tuple(tensor.shape), None,
                                                       str(tensor.dtype).removeprefix("torch.")))
            try:
                result.problems += master_copy_problems(reader)
            except Unsupported as error:
                result.notes.append(f"optimizer state not checked: {error}")
    except BadInput as error:
        result.problems.append(str(error))
    result.equivalent = not result.problems
    return result


def _tracker_problems(folder: Path) -> list[str]:
    """A Megatron checkpoint root needs its tracker: without it Megatron starts from scratch
    (and ckptkit writes it last, so its absence marks an unfinished copy)."""
    if not folder.is_dir() or (folder / TRACKER).is_file():
        return []
    if any(child.name.startswith("mp_rank_") or child.name == ".metadata" for child in folder.iterdir()):
        return []  # an iteration folder itself
    iterations = [child for child in folder.iterdir()
                  if child.is_dir() and (re.fullmatch(r"iter_\d+", child.name) or child.name == "release")]
    if iterations:
        return [f"{folder / TRACKER}: missing (Megatron-LM would not load {iterations[0].name} from {folder})"]
    return []


def _index_problems(folder: Path) -> list[str]:
    """Index entries must point at files that hold them, and files must hold nothing unlisted."""
    from safetensors import safe_open

    index_path = folder / hf_layout.SAFETENSORS_INDEX
    try:
        weight_map = hf_layout.read_index(index_path)
    except BadInput as error:
        return [str(error)]
    problems = []
    listed: dict[str, set] = {}
    for tensor_name, file_name in weight_map.items():
        listed.setdefault(file_name, set()).add(tensor_name)
    for file_name, names in sorted(listed.items()):
        path = folder / file_name
        if not path.is_file():
            problems.append(f"{path}: shard named in the index is missing")
            continue
        try:
            with safe_open(str(path), framework="pt") as handle:
                present = set(handle.keys())
        except Exception as error:
            problems.append(f"{path}: unreadable safetensors header ({str(error).splitlines()[0]})")
            continue
        for name in sorted(names - present):
            problems.append(f"{path}: tensor {name} listed in the index is not in the file")
        for name in sorted(present - names):
            problems.append(f"{path}: tensor {name} is in the file but not in the index")
    for path in sorted(folder.glob("*.safetensors")):
        if path.name not in listed:
            problems.append(f"{path}: shard not listed in the index")
    return problems
