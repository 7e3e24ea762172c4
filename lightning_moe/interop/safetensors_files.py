"""Reading and writing transformers checkpoints' safetensors one tensor at a time (no whole model in memory)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


class SafetensorsCheckpoint:
    """The tensors of a transformers checkpoint directory's safetensors, read one at a time.

    Args:
        directory: holds ``model.safetensors`` or ``model.safetensors.index.json`` and its shards.
    """

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (directory / "model.safetensors").is_file():
            with safe_open(directory / "model.safetensors", framework="pt") as handle:
                weight_map = {key: "model.safetensors" for key in handle.keys()}
        else:
            raise ValueError(
                f"{str(directory)!r} has no model.safetensors (or model.safetensors.index.json). Re-save the model "
                f"with transformers' save_pretrained (safetensors is its default)."
            )
        self.directory, self.weight_map = directory, weight_map
        self._open = lambda name: safe_open(directory / name, framework="pt")

    def keys(self) -> list[str]:
        """Every tensor name, in the order of the index (or the file)."""
        return list(self.weight_map)

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key``, read from its shard."""
        with self._open(self.weight_map[key]) as handle:
            return handle.get_tensor(key)


class ShardedSafetensorsWriter:
    """Writes tensors, as they come, to safetensors shards of at most ``max_shard_bytes`` and the index.

    One shard becomes ``model.safetensors``; more become ``model-0000k-of-0000n.safetensors`` and
    ``model.safetensors.index.json``, the layout transformers' ``from_pretrained`` reads. At most one
    shard's tensors are held in memory.

    Args:
        out_dir: an existing directory.
        max_shard_bytes: the largest shard (a single larger tensor gets a shard of its own).
    """

    def __init__(self, out_dir: Path, *, max_shard_bytes: int = 4 << 30) -> None:
        self.out_dir, self.max_shard_bytes = out_dir, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes, self.shards, self.total_bytes = 0, [], 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` under ``key``; writes the pending shard first when it would overflow."""
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = f"shard-{len(self.shards):05d}.tmp"
        save_file(self.pending, str(self.out_dir / name), metadata={"format": "pt"})
        self.shards.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Write the last shard, name the shards and write the index."""
        if self.pending:
            self._flush()
        if len(self.shards) == 1:
            (self.out_dir / self.shards[0][0]).rename(self.out_dir / "model.safetensors")
            return
        weight_map = {}
        for number, (temporary, keys) in enumerate(self.shards, start=1):
            name = f"model-{number:05d}-of-{len(self.shards):05d}.safetensors"
            (self.out_dir / temporary).rename(self.out_dir / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
