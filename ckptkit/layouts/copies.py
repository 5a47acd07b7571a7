"""Copies of one tensor that should be identical, compared a few MB at a time.

Megatron stores some tensors more than once: every TP rank holds the whole of a
replicated tensor (norms, biases of row-parallel layers), and with PP > 1 the last stage
keeps its own copy of tied word embeddings for the output head. They should be
bit-identical; when they are not (a bug in training, a hand-edited file), a reader uses
one copy and reports the others in one summary (:class:`CopyReport`), or refuses the
checkpoint in strict mode.

Nothing here holds more than one chunk of rows of two copies: comparing the copies of
a 1.3B model's tied head (100 MB per TP rank) costs 2 x :data:`CHUNK_BYTES`.

>>> row_ranges((10, 4), element_size=2, chunk_bytes=24)   # 8 bytes a row, 3 rows a chunk
[range(0, 3), range(3, 6), range(6, 9), range(9, 10)]
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .. import rules
from ..errors import BadInput

# Rows read per chunk: large enough that a read is one long request, small next to the
# RSS budget (a float32 difference of a float16 chunk is twice this).
CHUNK_BYTES = 8 << 20

ReadRows = Callable[[range], torch.Tensor]


def row_ranges(shape, element_size: int, chunk_bytes: int | None = None) -> list[range]:
    """Ranges of rows (dim 0) of at most ``chunk_bytes`` (default :data:`CHUNK_BYTES`) each,
    at least one row each."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    if not shape:
        return [range(0, 1)]
    row_bytes = math.prod(shape[1:]) * element_size
    step = max(1, chunk_bytes // row_bytes) if row_bytes else max(1, shape[0])
    return [range(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]


def largest_differences(reference: ReadRows, copies: list[ReadRows], shape, element_size: int,
                        chunk_bytes: int | None = None) -> list[float]:
    """``max |copy - reference|`` for each of ``copies``, all read one chunk of rows at a time.

    ``reference`` and every copy are functions ``rows -> tensor`` of the same ``shape``;
    each chunk of the reference is read once and compared with every copy's chunk.
    """
    worst = [0.0] * len(copies)
    for rows in row_ranges(shape, element_size, chunk_bytes):
        expected = reference(rows)
        for index, read in enumerate(copies):
            difference = rules.max_abs_difference(expected, read(rows))
            if difference > worst[index] or math.isnan(difference):
                worst[index] = difference
    return worst


@dataclass(frozen=True)
class Divergence:
    """One copy that differs from the copy used; ``description`` names its file and key."""

    description: str
    difference: float


class CopyReport:
    """Tally of the tensors whose copies were compared, for one summary line.

    ``record`` each tensor's largest difference; in ``strict`` mode the first that
    differs raises :class:`BadInput` with its description instead.

    >>> report = CopyReport(strict=False)
    >>> report.record(0.0, "a.pt: x differs")
    >>> report.record(0.25, "b.pt: y differs (max abs diff 0.25)")
    >>> report.summary("ckpt", used="the first copy is used")
    'ckpt: copies that should be identical differ for 1 of 2 tensors; the first copy is used (--strict \
refuses such a checkpoint); the largest difference: b.pt: y differs (max abs diff 0.25)'
    """

    def __init__(self, strict: bool):
        self.strict = strict
        self.checked = 0
        self.diverged = 0
        self.worst: Divergence | None = None

    def record(self, difference: float, description: str) -> None:
        self.checked += 1
        if difference == 0.0:
            return
        if self.strict:
            raise BadInput(description)
        self.diverged += 1
        if self.worst is None or not difference <= self.worst.difference:  # NaN counts as the worst
            self.worst = Divergence(description, difference)

    def summary(self, where, used: str) -> str | None:
        """One note for everything recorded (``used`` says which copies are), None when every
        copy matched."""
        if not self.diverged:
            return None
        return (f"{where}: copies that should be identical differ for {self.diverged} of {self.checked} "
                f"tensors; {used} (--strict refuses such a checkpoint); the largest difference: "
                f"{self.worst.description}")
