"""Megatron-Core distributed checkpoints (``--ckpt-format torch_dist``), read and written as Megatron does.

Directory layout (any TP/PP: the tensors are global)::

    DIR/latest_checkpointed_iteration.txt   "10" (or "release")
    DIR/iter_0000010/metadata.json          {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
    DIR/iter_0000010/.metadata              torch.distributed.checkpoint metadata (pickled)
    DIR/iter_0000010/__0_0.distcp ...       data: one file per writing rank (Megatron) or per
                                            size-bounded group of tensors (ckptkit)

What the files hold, checked on checkpoints Megatron-LM wrote (``tests/fixtures/*/dist``):

* Per-layer tensors are stacked over the *global* layers: ``decoder.layers.self_attention.
  linear_qkv.weight`` is ``[num_layers, qkv_rows, hidden]``, stored as one chunk per
  (layer, TP shard). The rows are in canonical order (QKV grouped per query group; SwiGLU
  ``linear_fc1`` is ``[all gate; all up]``, two chunks per TP shard).
* When dense and MoE layers mix, every layer is keyed on its own with its global index and
  no layer axis (``decoder.layers.1.mlp.router.weight``). All experts of a layer share one
  key with an expert axis after the layer axis (``decoder.layers.mlp.experts.experts.
  linear_fc1.weight`` ``[layers, experts, rows, hidden]``), chunked per (layer, expert, TP
  box); a canonical expert is read as its own region, never as the whole stack.
* The norms carry Transformer Engine names (``self_attention.linear_qkv.layer_norm_weight``,
  ``mlp.linear_fc1.layer_norm_weight``) for the local implementation too: Megatron's local
  layer spec maps them in ``sharded_state_dict_keys_map`` (megatron/core/models/gpt/
  gpt_layer_specs.py), so one checkpoint loads into either implementation.
* Embeddings and the untied output layer keep the padded vocabulary; with tied embeddings
  there is no ``output_layer.weight`` at all.
* Non-tensor entries are pickled bytes ("ShardedObjects", ``torch.save([data])``) under
  ``KEY/shard_OFFSET_SHAPE``: ``common_state/shard_0_1`` holds ``args``, ``iteration``,
  ``checkpoint_version``, ``content_metadata`` (megatron/core/dist_checkpointing/
  serialization.py, ``load_common_state_dict``); ``LINEAR._extra_state/shard_L_N`` one
  per layer (``None`` with the local implementation); ``rerun_state_machine_state/*``.
  Older Megatron versions keep the common state in ``common.pt`` instead.

Reading never unpickles more than ``.metadata`` (with an allow-list) and the common state
(with :mod:`ckptkit.safe_load`'s allow-list); ``_extra_state``, RNG, rerun and optimizer
entries are left unread, and weights come only from the model keys.

One module per job: :mod:`.keys` (what the entries are called), :mod:`.metadata`
(unpickling ``.metadata`` and bytes entries safely), :mod:`.regions` (reading boxes of
stored tensors), :mod:`.read` (the reader), :mod:`.write` (plan and writer); detection is
in :mod:`ckptkit.layouts.torch_dist_folders`, which does not import
torch.distributed.checkpoint. This package is the layout's public surface.
"""
from ..megatron_common import WRITE_CHECKPOINT_VERSION, TargetLayout
from ..torch_dist_folders import CONFIG_FILE, DCP_METADATA, NAME
from .keys import (COMMON_STATE_KEY, LEGACY_COMMON_FILE, StoredPlace, extra_state_key, extra_state_keys,
                   keys_per_layer, stored_key, stored_place)
from .metadata import load_pickled_bytes, read_dcp_metadata
from .read import TorchDistReader, open_reader
from .regions import _DistFiles, _read_regions, _Region
from .write import (BACKEND_CONFIG, CONTENT_METADATA, FILE_BUDGET_BYTES, _BoundedFileSystemWriter, plan_items,
                    write)

__all__ = [
    "BACKEND_CONFIG", "COMMON_STATE_KEY", "CONFIG_FILE", "CONTENT_METADATA", "DCP_METADATA", "FILE_BUDGET_BYTES",
    "LEGACY_COMMON_FILE", "NAME", "WRITE_CHECKPOINT_VERSION", "StoredPlace", "TargetLayout", "TorchDistReader",
    "extra_state_key", "extra_state_keys", "keys_per_layer", "load_pickled_bytes", "open_reader", "plan_items",
    "read_dcp_metadata", "stored_key", "stored_place", "write",
    # used by tests to watch reads and writes
    "_BoundedFileSystemWriter", "_DistFiles", "_Region", "_read_regions",
]
