"""Are two checkpoints the same model? Compared tensor by tensor in the canonical namespace.

Any two layouts compare: a Megatron TP2 PP2 checkpoint against its Hugging Face
conversion, a reshard against its source. Vocabulary tensors are compared on the
real vocabulary rows (padding differs legitimately between TP sizes). With one
path, the checkpoint is checked alone: files, index coverage, headers, shapes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import BadInput
from .layouts import open_checkpoint
from .layouts import hf as hf_layout
from .layouts.megatron_legacy import TRACKER


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

    def to_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "equivalent": self.equivalent, "max_abs_diff": self.max_abs_diff,
                "problems": self.problems, "notes": self.notes,
                "tensors": [dict(t.__dict__) for t in self.tensors]}


_SPEC_FIELDS_THAT_MATTER = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                            "ffn_hidden_size", "vocab_size", "head_dim", "position_embedding", "normalization",
                            "activation", "tied_embeddings", "norm_epsilon", "rope_theta")


def verify(a, b=None, *, atol: float = 0.0, ignore_dtype: bool = False, **options) -> VerifyResult:
    """Compare checkpoints ``a`` and ``b`` (any layouts); ``b=None`` checks ``a`` alone.

    Equivalent means: same architecture, same tensor set, same shapes, same dtypes
    (unless ``ignore_dtype``) and every element within ``atol`` (0: bit-identical).

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
        result.equivalent = not result.problems and all(t.ok for t in result.tensors)
        return result


def _real_rows(name: str, tensor: torch.Tensor, vocab_size: int) -> torch.Tensor:
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return tensor[:vocab_size]
    return tensor


def _compare(name, reader_a, reader_b, atol, ignore_dtype) -> TensorComparison:
    tensor_a = _real_rows(name, reader_a.tensor(name), reader_a.spec.vocab_size)
    tensor_b = _real_rows(name, reader_b.tensor(name), reader_b.spec.vocab_size)
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


def check_alone(path, **options) -> VerifyResult:
    """Integrity of one checkpoint: every file present and readable, index coverage, shapes."""
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
