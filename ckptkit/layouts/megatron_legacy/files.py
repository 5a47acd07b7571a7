"""Megatron rank files: their pickles loaded once, their tensors read on demand by offset.

Only the pickle of a rank file is loaded (``map_location="meta"``): each tensor comes
back on the meta device with its storage's byte offset in the file, and is read into a
fresh tensor with explicit reads when needed (:mod:`ckptkit.torch_offsets`). Pre-Core
files nest their model dicts; :func:`_flatten` gives every chunk dotted keys.
"""
from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...errors import BadInput
from ...safe_load import safe_torch_load
from ...streaming_io import read_into
from ...torch_offsets import byte_offset, offsets_known, read_stored, tensors_in
from .discovery import RANK_FILE, rank_dir_name


def _flatten(state: dict, prefix: str = "") -> dict:
    """Nested pre-Core dicts -> dotted keys: model["language_model"]["encoder"]["layers.0.x"]
    becomes ``language_model.encoder.layers.0.x``."""
    flat = {}
    for key, value in state.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _model_chunks(state: dict, path: Path) -> list[dict]:
    if "model" in state:
        return [_flatten(state["model"])]
    chunk_keys = sorted((key for key in state if isinstance(key, str) and re.fullmatch(r"model\d+", key)),
                        key=lambda key: int(key[5:]))
    if not chunk_keys:
        raise BadInput(f"{path}: no 'model' entry (keys: {', '.join(map(str, list(state)[:8]))})")
    return [_flatten(state[key]) for key in chunk_keys]


@dataclass
class _RankFiles:
    """The rank files of one checkpoint: their pickles loaded, their tensors read on demand.

    Only the pickle is loaded up front (``map_location="meta"``): each tensor comes back
    on the meta device with its storage's byte offset in the file, and :meth:`read` fills
    a fresh tensor from the file with explicit reads. Files torch cannot give offsets for
    are memory-mapped instead. With expert parallelism (``ep`` > 1) these are the files of
    one EP rank, ``ep_rank``.
    """

    folder: Path
    tp: int
    pp: int
    trust_remote_pickle: bool = False
    loaded: dict = field(default_factory=dict)
    full_states: dict = field(default_factory=dict)
    descriptors: dict = field(default_factory=dict)
    ep: int = 1
    ep_rank: int = 0
    opening: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def path(self, tp_rank: int, pp_stage: int) -> Path:
        return self.folder / rank_dir_name(tp_rank, pp_stage, self.pp, self.ep_rank, self.ep) / RANK_FILE

    def _load(self, path: Path, map_location: str) -> dict:
        state = safe_torch_load(path, trust_remote_pickle=self.trust_remote_pickle, map_location=map_location)
        if not isinstance(state, dict):
            raise BadInput(f"{path}: expected a dict, found {type(state).__name__}")
        return state

    def chunks(self, tp_rank: int, pp_stage: int) -> list[dict]:
        key = (tp_rank, pp_stage)
        if key not in self.loaded:
            path = self.path(tp_rank, pp_stage)
            state = self._load(path, "meta")
            chunks = _model_chunks(state, path)
            if not offsets_known(chunks):
                state = self._load(path, "cpu")
                chunks = _model_chunks(state, path)
            self.loaded[key] = (state, chunks)
        return self.loaded[key][1]

    def state(self, tp_rank: int, pp_stage: int) -> dict:
        """The whole file with real (memory-mapped) tensors: optimizer state, RNG, ..."""
        key = (tp_rank, pp_stage)
        if key not in self.full_states:
            self.chunks(tp_rank, pp_stage)
            state = self.loaded[key][0]
            if _has_meta_tensors(state):
                state = self._load(self.path(tp_rank, pp_stage), "cpu")
            self.full_states[key] = state
        return self.full_states[key]

    def _descriptor(self, tp_rank: int, pp_stage: int) -> int:
        key = (tp_rank, pp_stage)
        with self.opening:  # the copies may be compared on another thread (compare_copies)
            if key not in self.descriptors:
                self.descriptors[key] = os.open(self.path(tp_rank, pp_stage), os.O_RDONLY)
            return self.descriptors[key]

    @staticmethod
    def can_read_rows(stored: torch.Tensor) -> bool:
        """Whether :meth:`read_rows_into` can read ``stored``'s rows: a contiguous tensor of
        at least one dimension whose bytes were not loaded (read by offset)."""
        return stored.device.type == "meta" and stored.is_contiguous() and stored.dim() > 0

    def read_rows_into(self, tp_rank: int, pp_stage: int, stored: torch.Tensor, rows: range,
                       out: torch.Tensor) -> bool:
        """Read rows ``rows`` of ``stored`` straight into ``out`` (contiguous, or a view whose
        rows are: :func:`ckptkit.streaming_io.read_into`); False when the stored tensor is not
        one that can be read that way (memory-mapped, or a strided view)."""
        if not self.can_read_rows(stored):
            return False
        row_bytes = stored[0].numel() * stored.element_size() if stored.dim() else stored.element_size()
        read_into(self._descriptor(tp_rank, pp_stage), out, byte_offset(stored) + rows.start * row_bytes)
        return True

    def read(self, tp_rank: int, pp_stage: int, stored: torch.Tensor) -> torch.Tensor:
        """The values of ``stored`` (a tensor of :meth:`chunks`), in a tensor of its own."""
        if stored.device.type != "meta":
            return stored
        return read_stored(self._descriptor(tp_rank, pp_stage), stored)

    def read_rows(self, tp_rank: int, pp_stage: int, stored: torch.Tensor, rows: range) -> torch.Tensor:
        """Rows ``rows`` (along dim 0) of ``stored``, read from the file into a tensor of their own."""
        return self.read(tp_rank, pp_stage, stored[rows.start: rows.stop] if stored.dim() else stored)

    def close(self) -> None:
        for descriptor in self.descriptors.values():
            os.close(descriptor)
        self.descriptors.clear()
        self.loaded.clear()
        self.full_states.clear()


def _has_meta_tensors(state: dict) -> bool:
    return any(tensor.device.type == "meta" for tensor in tensors_in(state))
