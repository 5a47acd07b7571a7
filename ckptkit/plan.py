"""A conversion's plan: every file it will write, with sizes and the canonical tensors each
one reads, decided from metadata before any tensor data is read.

Every writer (:class:`ckptkit.layouts.base.CheckpointWriter`) makes one; the conversion
then writes its data files (split between ``--workers`` processes or ``torchrun`` ranks
when the layout allows), finishes (index, config, tracker) and checks the output against
it. ``--dry-run`` prints it. A GPT-2 at TP1 PP1 as per-rank files::

    files:        iter_0000010/mp_rank_00/model_optim_rng.pt   3.1 MB   16 tensors
    finish_files: latest_checkpointed_iteration.txt
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PlannedFile:
    """One data file: its path in the output folder, its size, what it reads.

    ``tensors`` are canonical names in the order the file needs them; a torch_dist
    checkpoint, whose data files the saver names as it goes, is one entry for the folder.
    """

    path: str
    bytes: int
    tensors: tuple[str, ...]


@dataclass
class Plan:
    """What a conversion writes. ``detail`` is the writer's own form of the same plan."""

    target: dict  # the target layout, as ConvertResult.target_layout reports it
    files: list[PlannedFile]
    finish_files: list[str]  # written once every data file is: index, config, tracker
    splittable: bool = True  # whether processes may write disjoint data files
    reads: int = 0  # canonical tensors the writer reads (and reports to progress)
    detail: object = field(default=None, repr=False, compare=False)

    @property
    def total_bytes(self) -> int:
        return sum(planned.bytes for planned in self.files)

    def sizes(self) -> list[tuple[str, int]]:
        """``(path, bytes)`` of each data file, what :mod:`ckptkit.parallel` splits."""
        return [(planned.path, planned.bytes) for planned in self.files]

    def to_dict(self) -> dict:
        return {"target": self.target, "splittable": self.splittable, "total_bytes": self.total_bytes,
                "files": [{"path": planned.path, "bytes": planned.bytes, "tensors": list(planned.tensors)}
                          for planned in self.files],
                "finish_files": list(self.finish_files)}
