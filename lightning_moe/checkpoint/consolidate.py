"""Turn an expert-parallel checkpoint directory into what a single process would have saved: full
``[E, ...]`` expert tensors in logical order and full optimizer states.

- :func:`read_full_checkpoint` returns that dict in memory (used by export and loading);
- :func:`consolidate_checkpoint` (``lightning-moe consolidate CKPT OUT``) writes it as one file that
  loads with no process group and resumes under any strategy;
- :func:`load_from_checkpoint` is ``Module.load_from_checkpoint`` for any LightningModule, directory
  or file.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH

from lightning_moe.checkpoint.layout import CheckpointError, is_sharded_checkpoint
from lightning_moe.checkpoint.source import SavedCheckpoint
from lightning_moe.parallel.expert_state import join_expert_states

ModuleT = TypeVar("ModuleT")


def read_full_checkpoint(path: _PATH, *, weights_only: bool = True) -> dict[str, Any]:
    """The checkpoint at ``path`` (directory or single file) as a single process would have saved it.

    Args:
        path: a checkpoint directory written by :class:`~lightning_moe.MoEStrategy`, or a single file.
        weights_only: load with ``torch.load(weights_only=...)``.
    """
    source = SavedCheckpoint(path, weights_only=weights_only)
    checkpoint = source.meta
    if source.manifest is None:
        return checkpoint
    manifest = source.manifest
    state_dict = dict(checkpoint["state_dict"])
    for name, num_experts in manifest["expert_params"].items():
        state_dict[name] = torch.stack([source.expert(name, e) for e in range(num_experts)])
    checkpoint["state_dict"] = state_dict
    if "optimizer_states" in checkpoint:
        full_states = []
        for optimizer_index, saved in enumerate(checkpoint["optimizer_states"]):
            state = dict(saved["state"])
            for param_index, name in manifest["optimizer_expert_params"][optimizer_index].items():
                parts = [
                    source.expert_optimizer_state(optimizer_index, param_index, name, e)
                    for e in range(manifest["expert_params"][name])
                ]
                if all(part is not None for part in parts):
                    state[param_index] = join_expert_states(parts)  # type: ignore[arg-type]
            full_states.append({**saved, "state": dict(sorted(state.items()))})
        checkpoint["optimizer_states"] = full_states
    return checkpoint


def consolidate_checkpoint(checkpoint_dir: _PATH, output_file: _PATH) -> Path:
    """Write one single-file checkpoint with full ``[E, ...]`` expert tensors (logical order) and full
    optimizer states, as a run without expert parallelism would have saved it.

    It loads with no process group: ``MyModule.load_from_checkpoint(output_file)``, or
    ``module.load_state_dict(torch.load(output_file, weights_only=True)["state_dict"])`` into the
    unsharded module, and ``Trainer(...).fit(model, ckpt_path=output_file)`` resumes from it with
    any strategy.

    Args:
        checkpoint_dir: a checkpoint directory saved by :class:`~lightning_moe.MoEStrategy`.
        output_file: the file to write (local path or fsspec URL).
    """
    if not is_sharded_checkpoint(checkpoint_dir):
        raise CheckpointError(
            f"`{checkpoint_dir}` is not a checkpoint directory written by MoEStrategy. Pass the `.ckpt` "
            f"directory that ModelCheckpoint or `trainer.save_checkpoint` wrote."
        )
    _check_output_file(checkpoint_dir, output_file)
    TorchCheckpointIO().save_checkpoint(read_full_checkpoint(checkpoint_dir), output_file)
    return Path(str(output_file))


def _check_output_file(checkpoint_dir: _PATH, output_file: _PATH) -> None:
    """Refuse an output that is a directory or lies inside the checkpoint: the save would move its
    file into the directory and change the directory's permissions (fsspec's commit), or add a file
    that a later save to the checkpoint path refuses."""
    if get_filesystem(output_file).isdir(str(output_file)):
        raise CheckpointError(
            f"consolidate: `{output_file}` is a directory; it writes one file. Name the file, e.g. "
            f"`{str(output_file).rstrip('/')}/consolidated.ckpt` (outside the checkpoint directory)."
        )
    local = isinstance(get_filesystem(checkpoint_dir), LocalFileSystem)
    if local and Path(str(output_file)).resolve().is_relative_to(Path(str(checkpoint_dir)).resolve()):
        raise CheckpointError(
            f"consolidate: `{output_file}` lies inside the checkpoint directory `{checkpoint_dir}`; write it "
            f"elsewhere (a checkpoint directory holds only what MoEStrategy wrote)."
        )


def load_from_checkpoint(module_class: type[ModuleT], checkpoint_path: _PATH, **kwargs: Any) -> ModuleT:
    """``module_class.load_from_checkpoint(checkpoint_path, **kwargs)`` that also reads checkpoint
    directories written by :class:`~lightning_moe.MoEStrategy` at any expert-parallel layout.

    A directory is consolidated in memory first, so the module comes back whole (every expert), in
    one process, with no process group. A single file goes straight to Lightning.

    Example::

        from lightning_moe import load_from_checkpoint
        model = load_from_checkpoint(MyModule, "lightning_logs/version_0/checkpoints/last.ckpt")

    Args:
        module_class: the LightningModule class to build.
        checkpoint_path: a checkpoint directory or file.
        **kwargs: passed on (``map_location``, ``strict``, ``hparams_file``, ``weights_only``,
            hyper-parameter overrides).
    """
    if not is_sharded_checkpoint(checkpoint_path):
        return module_class.load_from_checkpoint(checkpoint_path, **kwargs)  # type: ignore[attr-defined]
    buffer = io.BytesIO()
    # A caller that turned weights_only off (a checkpoint they trust) reaches the directory's files too;
    # anything else loads them with weights_only on.
    torch.save(read_full_checkpoint(checkpoint_path, weights_only=kwargs.get("weights_only") is not False), buffer)
    buffer.seek(0)
    return module_class.load_from_checkpoint(buffer, **kwargs)  # type: ignore[attr-defined]


def consolidate_main(argv: Sequence[str]) -> int:
    """``lightning-moe consolidate CKPT OUT``: see :func:`consolidate_checkpoint`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="lightning-moe consolidate",
        description="Merge a checkpoint directory saved by MoEStrategy into one single-file checkpoint "
        "with full expert tensors, loadable without a process group.",
    )
    parser.add_argument("checkpoint", help="checkpoint directory (e.g. lightning_logs/.../epoch=0-step=100.ckpt)")
    parser.add_argument("output", help="single-file checkpoint to write")
    args = parser.parse_args(list(argv))
    try:
        output = consolidate_checkpoint(args.checkpoint, args.output)
    except (CheckpointError, FileNotFoundError, ValueError) as error:  # a wrong path: a usage error, exit 2
        parser.error(str(error))
    print(f"wrote {output}")
    return 0
