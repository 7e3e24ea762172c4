"""Read the per-logical-expert tensors and optimizer states of a saved checkpoint, whatever layout
wrote it: a checkpoint directory of :class:`~lightning_moe.MoEStrategy`, or a single file with full
``[E, ...]`` expert tensors (a run without expert parallelism, or a consolidated checkpoint).

Everything is loaded with ``weights_only=True`` unless the caller asks otherwise, and every problem
is a :class:`~lightning_moe.checkpoint.layout.CheckpointError` that names the file, the expert or the
field at fault: never a silent partial load.
"""

from __future__ import annotations

from typing import Any

import torch
from fsspec.core import url_to_fs
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol, get_filesystem
from lightning.fabric.utilities.types import _PATH

from lightning_moe.checkpoint.layout import (
    MANIFEST_KEY,
    META_FILE,
    CheckpointError,
    check_manifest_version,
    committed_directory,
    expert_key,
    join,
)
from lightning_moe.parallel.expert_state import ExpertStatePart, split_expert_state


def load_file(path: str, *, checkpoint_io: CheckpointIO | None, weights_only: bool, what: str) -> dict[str, Any]:
    """Load one file of a checkpoint; a missing or unreadable file raises a :class:`CheckpointError`
    naming it and ``what`` it should hold.

    Local files read through the default ``TorchCheckpointIO`` are memory-mapped, so a rank reads
    only the expert tensors it touches.
    """
    fs = get_filesystem(path)
    if not fs.exists(path):
        raise CheckpointError(
            f"Checkpoint file {path} is missing ({what}). The checkpoint is incomplete: load an earlier one, "
            f"or restore the file."
        )
    try:
        if (checkpoint_io is None or type(checkpoint_io) is TorchCheckpointIO) and _is_local_file_protocol(path):
            local_path = url_to_fs(path)[1]  # `file:///x` -> `/x`
            return torch.load(local_path, map_location="cpu", weights_only=weights_only, mmap=True)
        io = checkpoint_io or TorchCheckpointIO()
        return io.load_checkpoint(path, map_location="cpu", weights_only=weights_only)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError... for bad files
        raise CheckpointError(
            f"Cannot read checkpoint file {path} ({what}): {type(error).__name__}: {error}. The file is damaged "
            f"or truncated, or it was not written by lightning_moe. Load an earlier checkpoint."
        ) from error


class SavedCheckpoint:
    """A saved checkpoint, read lazily: ``meta`` (Lightning's dict without the expert tensors) and one
    logical expert at a time.

    Args:
        path: a checkpoint directory or a single-file checkpoint (local path or fsspec URL).
        weights_only: load with ``torch.load(weights_only=...)``; keep ``True`` unless the file is trusted.
        checkpoint_io: the plugin that reads files (the strategy's); ``None`` for the default.
    """

    def __init__(self, path: _PATH, *, weights_only: bool = True, checkpoint_io: CheckpointIO | None = None) -> None:
        self.path = str(path)
        self.weights_only = weights_only
        self.checkpoint_io = checkpoint_io
        self.directory = committed_directory(path)
        self._files: dict[str, dict[str, Any]] = {}
        self._split_cache: dict[tuple[int, int], list[ExpertStatePart]] = {}
        if self.directory is not None:
            self.meta = self._load(join(self.directory, META_FILE), "Lightning's state and the dense weights")
            if MANIFEST_KEY not in self.meta:
                raise CheckpointError(
                    f"{self.path} has a {META_FILE} without the lightning_moe manifest: it was not written by "
                    f"MoEStrategy. Pass the checkpoint directory MoEStrategy saved, or a single-file checkpoint."
                )
            # Expert tensors are not in meta.pt: they are read lazily from the expert files.
            self.manifest: dict[str, Any] | None = self.meta.pop(MANIFEST_KEY)
            check_manifest_version(self.manifest, self.path)
        else:
            if get_filesystem(path).isdir(self.path):
                raise CheckpointError(
                    f"{self.path} is a directory but not a lightning_moe checkpoint (no {META_FILE} and no "
                    f"pointer file in it). Pass the `.ckpt` directory that ModelCheckpoint or "
                    f"`trainer.save_checkpoint` wrote, or a single-file checkpoint."
                )
            self.meta = self._load(self.path, "a single-file checkpoint")
            self.manifest = None
            self.meta.pop(MANIFEST_KEY, None)

    def _load(self, path: str, what: str) -> dict[str, Any]:
        return load_file(path, checkpoint_io=self.checkpoint_io, weights_only=self.weights_only, what=what)

    @property
    def placements(self) -> dict[str, Any]:
        """The per-layer placement tables the checkpoint was saved with (empty for a single file)."""
        return dict((self.manifest or {}).get("placements", {}))

    @property
    def expert_parallel_size(self) -> int:
        return int((self.manifest or {}).get("expert_parallel_size", 1))

    def expert_param_names(self) -> list[str]:
        if self.manifest is not None:
            return list(self.manifest["expert_params"])
        return []

    def has_expert_param(self, name: str) -> bool:
        if self.manifest is not None:
            return name in self.manifest["expert_params"]
        return name in self.meta["state_dict"]

    def num_experts(self, name: str) -> int:
        if self.manifest is not None:
            return int(self.manifest["expert_params"][name])
        return int(self.meta["state_dict"][name].shape[0])

    def expert_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape of one expert's tensor of ``name``, when the checkpoint records it."""
        if self.manifest is not None:
            shape = self.manifest.get("expert_shapes", {}).get(name)
            return None if shape is None else tuple(shape)
        return tuple(self.meta["state_dict"][name].shape[1:])

    def check_compatible(self, name: str, num_experts: int, expert_shape: tuple[int, ...]) -> None:
        """Raise when expert parameter ``name`` of the checkpoint does not fit the model's."""
        if self.num_experts(name) != num_experts:
            raise CheckpointError(
                f"The checkpoint {self.path} has {self.num_experts(name)} experts for `{name}` but the model has "
                f"{num_experts}. Load it into a model with the same `num_experts`."
            )
        saved = self.expert_shape(name)
        if saved is not None and saved != tuple(expert_shape):
            raise CheckpointError(
                f"The checkpoint {self.path} has experts of shape {list(saved)} for `{name}` but the model's are "
                f"{list(expert_shape)}. Load it into a model with the same widths (d_model, d_ff)."
            )

    def _file(self, name: str, expert: int) -> tuple[str, dict[str, Any]]:
        assert self.directory is not None and self.manifest is not None
        file_name = self.manifest["expert_files"][name][expert]
        if file_name not in self._files:
            self._files[file_name] = self._load(join(self.directory, file_name), f"experts of `{name}` and others")
        return file_name, self._files[file_name]

    def expert(self, name: str, expert: int) -> torch.Tensor:
        """Logical expert ``expert``'s tensor of expert parameter ``name``."""
        if self.manifest is None:
            return self.meta["state_dict"][name][expert]
        file_name, content = self._file(name, expert)
        key = expert_key(name, expert)
        if key not in content.get("model", {}):
            raise CheckpointError(
                f"The manifest of {self.path} places expert {expert} of `{name}` in {file_name}, but that file does "
                f"not hold it: the checkpoint is damaged, or its files come from different saves."
            )
        return content["model"][key]

    def expert_optimizer_state(
        self, optimizer_index: int, param_index: int, name: str, expert: int
    ) -> ExpertStatePart | None:
        """Logical expert ``expert``'s part of the optimizer state of ``name`` (``None`` if none saved)."""
        if self.manifest is not None:
            _, content = self._file(name, expert)
            parts = content.get("optimizers", [])
            return parts[optimizer_index].get(expert_key(name, expert)) if optimizer_index < len(parts) else None
        key = (optimizer_index, param_index)
        if key not in self._split_cache:
            state = self.meta["optimizer_states"][optimizer_index]["state"].get(param_index)
            num_experts = self.num_experts(name)
            where = f"optimizer {optimizer_index}, parameter `{name}` of {self.path}"
            self._split_cache[key] = split_expert_state(state, num_experts, where=where) if state else []
        parts = self._split_cache[key]
        return parts[expert] if parts else None
