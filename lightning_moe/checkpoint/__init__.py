"""Checkpoints of expert-parallel runs, keyed by logical expert id so that any layout can resume them.

- :mod:`~lightning_moe.checkpoint.layout`: the directory's files and the atomic commit of a save;
- :mod:`~lightning_moe.checkpoint.source`: reading any saved checkpoint, with clear errors;
- :mod:`~lightning_moe.checkpoint.sharded`: save and local load, used by :class:`~lightning_moe.MoEStrategy`;
- :mod:`~lightning_moe.checkpoint.consolidate`: one full single-process checkpoint, and
  :func:`load_from_checkpoint` for any LightningModule.

See docs/parallelism.md ("Checkpoints").
"""

from lightning_moe.checkpoint.consolidate import (
    consolidate_checkpoint,
    consolidate_main,
    load_from_checkpoint,
    read_full_checkpoint,
)
from lightning_moe.checkpoint.layout import (
    FORMAT_VERSION,
    MANIFEST_KEY,
    META_FILE,
    CheckpointError,
    committed_directory,
    expert_file_name,
    expert_key,
    is_sharded_checkpoint,
)
from lightning_moe.checkpoint.sharded import load_local_checkpoint, optimizer_param_names, save_sharded_checkpoint
from lightning_moe.checkpoint.source import SavedCheckpoint

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_KEY",
    "META_FILE",
    "CheckpointError",
    "SavedCheckpoint",
    "committed_directory",
    "consolidate_checkpoint",
    "consolidate_main",
    "expert_file_name",
    "expert_key",
    "is_sharded_checkpoint",
    "load_from_checkpoint",
    "load_local_checkpoint",
    "optimizer_param_names",
    "read_full_checkpoint",
    "save_sharded_checkpoint",
]
