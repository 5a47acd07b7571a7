"""Megatron-LM per-rank files (``--ckpt-format torch``), read and written as Megatron does.

Directory layout (TP=2, PP=2)::

    DIR/latest_checkpointed_iteration.txt      "10" (or "release")
    DIR/iter_0000010/mp_rank_00_000/model_optim_rng.pt   TP rank 0, PP stage 0
    DIR/iter_0000010/mp_rank_01_000/model_optim_rng.pt   TP rank 1, PP stage 0
    DIR/iter_0000010/mp_rank_00_001/model_optim_rng.pt   TP rank 0, PP stage 1
    DIR/iter_0000010/mp_rank_01_001/model_optim_rng.pt   TP rank 1, PP stage 1

With PP=1 the folders are ``mp_rank_00``, ``mp_rank_01``; with expert parallelism each
gains the EP rank, ``mp_rank_TT[_PPP]_EEE``, and holds the stage's tensors plus its EP
rank's experts under local indices (``mlp.experts.local_experts.0`` is global expert
``r x E/EP`` on EP rank ``r``). Each file holds ``args``,
``checkpoint_version``, ``iteration`` and ``model`` (or ``model0``, ``model1``, ...
with virtual pipeline stages: chunk ``c`` of stage ``p`` is virtual stage
``c x PP + p``). Layer indices are local to the chunk: with 6 layers at PP=2, stage 1
holds ``decoder.layers.0..2`` for global layers 3..5.

One module per job: :mod:`.discovery` (finding the files), :mod:`.files` (loading their
pickles, reading tensors by offset), :mod:`.read` (the reader), :mod:`.write` (plan and
writer). This package is the layout's public surface.
"""
from ...rules import qkv_to_current  # importable from here, as before the rules owned it
from ..megatron_common import WRITE_CHECKPOINT_VERSION, TargetLayout, write_tracker
from ..tracker import TRACKER, iteration_dir_name
from .discovery import NAME, RANK_FILE, detect, locate_iteration_dir, rank_dir_name
from .files import _flatten
from .read import MegatronLegacyReader, open_reader
from .write import PlannedRankFile, PlannedTensor, RankFilesWriter, plan_files, stage_layers, write

__all__ = [
    "NAME", "RANK_FILE", "TRACKER", "WRITE_CHECKPOINT_VERSION", "MegatronLegacyReader", "PlannedRankFile",
    "PlannedTensor", "RankFilesWriter", "TargetLayout", "detect", "iteration_dir_name", "locate_iteration_dir",
    "open_reader", "plan_files", "qkv_to_current", "rank_dir_name", "stage_layers", "write", "write_tracker",
    "_flatten",
]
