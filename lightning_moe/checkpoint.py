"""Checkpoints of expert-parallel runs, keyed by logical expert id so that any layout can resume them.

A checkpoint is a directory (Lightning's ``ModelCheckpoint`` names it ``epoch=...-step=....ckpt``)::

    meta.pt             rank 0: everything Lightning saves (loops, callbacks, schedulers, hyper-
                        parameters), the dense part of the model and of each optimizer state, and a
                        manifest (``"lightning_moe"``: expert parameters, which file holds each
                        logical expert, which optimizer entries are expert parameters)
    experts-ep00000.pt  the experts of EP rank 0 (written by its first EDP replica only):
    experts-ep00001.pt  ``"model"``: ``"<param name>#<logical id>" -> [D, ...]`` and
    ...                 ``"optimizers"``: per optimizer, the same keys -> that expert's slice of
                        each state tensor (``exp_avg``...) plus the replicated entries (``step``)

Nothing in it depends on the EP size or the placement: a run at another layout reads, for each of
its local slots, the logical expert it now holds, wherever it was saved. A single-file checkpoint
with full ``[E, ...]`` expert tensors (a run without expert parallelism, or the output of
:func:`consolidate_checkpoint`) loads the same way. ``lightning-moe consolidate CKPT OUT`` turns a
directory into such a single file, which loads with no process group.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

META_FILE = "meta.pt"
MANIFEST_KEY = "lightning_moe"
FORMAT_VERSION = 1


def expert_file_name(ep_rank: int) -> str:
    return f"experts-ep{ep_rank:05d}.pt"


def expert_key(name: str, logical_expert: int) -> str:
    return f"{name}#{logical_expert}"


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint directory written by :class:`~lightning_moe.MoEStrategy`."""
    return Path(path).is_dir() and (Path(path) / META_FILE).is_file()


def optimizer_param_names(optimizer: Any, module: nn.Module) -> list[str]:
    """The name of each parameter of ``optimizer`` in ``state_dict`` index order (across param groups)."""
    optimizer = getattr(optimizer, "_optimizer", optimizer)  # unwrap a LightningOptimizer
    names = {id(p): name for name, p in module.named_parameters()}
    return [names.get(id(p), f"<unnamed {i}>") for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])]


def _split_state(state: dict[str, Any], local_shape: torch.Size, slot: int) -> dict[str, dict[str, Any]]:
    """One expert's part of a parameter's optimizer state: slices of the tensors shaped like the
    parameter (``exp_avg``, ``momentum_buffer``...), and the rest (``step``) as is."""
    sharded, replicated = {}, {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.shape == local_shape:
            sharded[key] = value[slot].detach().cpu().clone()
        else:
            replicated[key] = value
    return {"sharded": sharded, "replicated": replicated}


def _join_states(parts: Sequence[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    state = dict(parts[0]["replicated"])
    for key in parts[0]["sharded"]:
        state[key] = torch.stack([part["sharded"][key] for part in parts])
    return state


def save_sharded_checkpoint(
    checkpoint: dict[str, Any],
    path: Path,
    *,
    expert_params: Sequence[Any],
    optimizers: Sequence[Any],
    module: nn.Module,
    is_global_zero: bool,
    writes_experts: bool,
    ep_rank: int,
    barrier: Callable[[], None],
) -> None:
    """Write ``checkpoint`` (this rank's, as Lightning dumped it) as a checkpoint directory; every rank calls it.

    Args:
        checkpoint: Lightning's checkpoint dict with this rank's local (sharded) ``state_dict`` and
            ``optimizer_states``.
        path: the directory to write (replaced if it exists).
        expert_params: :class:`~lightning_moe.parallel.sharding.ShardedExpertParam` of the module.
        optimizers: the optimizers whose states are in ``checkpoint["optimizer_states"]``, in order.
        module: the LightningModule (to name optimizer entries).
        is_global_zero: this rank writes ``meta.pt``.
        writes_experts: this rank writes its EP rank's expert file (the first EDP replica).
        ep_rank: this rank's EP rank.
        barrier: a barrier over all ranks.
    """
    if is_global_zero:
        if path.is_file() or path.is_symlink():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        path.mkdir(parents=True)
    barrier()

    state_dict = dict(checkpoint.pop("state_dict"))
    optimizer_states = checkpoint.pop("optimizer_states", None)
    by_name = {info.name: info for info in expert_params}
    model_part: dict[str, torch.Tensor] = {}
    for info in expert_params:
        local = state_dict.pop(info.name)
        for slot, expert in enumerate(info.local_experts):
            model_part[expert_key(info.name, expert)] = local[slot].detach().cpu().clone()

    optimizer_parts: list[dict[str, Any]] = []
    optimizer_expert_params: list[dict[int, str]] = []
    dense_optimizer_states = []
    for optimizer, optimizer_state in zip(optimizers, optimizer_states or []):
        names = optimizer_param_names(optimizer, module)
        expert_indices = {index: name for index, name in enumerate(names) if name in by_name}
        part: dict[str, Any] = {}
        dense_state = {index: s for index, s in optimizer_state["state"].items() if index not in expert_indices}
        for index, name in expert_indices.items():
            state = optimizer_state["state"].get(index)
            if not state:
                continue
            info = by_name[name]
            for slot, expert in enumerate(info.local_experts):
                part[expert_key(name, expert)] = _split_state(state, info.parameter.shape, slot)
        optimizer_parts.append(part)
        optimizer_expert_params.append(expert_indices)
        dense_optimizer_states.append({**optimizer_state, "state": dense_state})

    if writes_experts and expert_params:
        torch.save({"model": model_part, "optimizers": optimizer_parts}, path / expert_file_name(ep_rank))
    if is_global_zero:
        manifest = {
            "format_version": FORMAT_VERSION,
            "expert_params": {info.name: info.placement.num_experts for info in expert_params},
            "expert_files": {
                info.name: [expert_file_name(int(rank)) for rank in info.placement.rank_of_expert_E]
                for info in expert_params
            },
            "optimizer_expert_params": optimizer_expert_params,
            "expert_parallel_size": expert_params[0].placement.ep_size if expert_params else 1,
        }
        meta = {**checkpoint, "state_dict": state_dict, MANIFEST_KEY: manifest}
        if optimizer_states is not None:
            meta["optimizer_states"] = dense_optimizer_states
        torch.save(meta, path / META_FILE)
    barrier()


class _ExpertSource:
    """Per-logical-expert tensors and optimizer states of a saved checkpoint (directory or single file)."""

    def __init__(self, path: Path, weights_only: bool) -> None:
        self.directory = path if path.is_dir() else None
        self.weights_only = weights_only
        self._files: dict[str, dict[str, Any]] = {}
        if self.directory is not None:
            if not (path / META_FILE).is_file():
                raise ValueError(
                    f"{path} is a directory without {META_FILE}: it is not a lightning_moe checkpoint. Pass the "
                    f"directory that MoEStrategy saved, or a single-file checkpoint."
                )
            self.meta = torch.load(path / META_FILE, map_location="cpu", weights_only=weights_only)
            # Expert tensors are not in meta.pt: they are read lazily from the expert files.
            self.manifest = self.meta.pop(MANIFEST_KEY)
        else:
            self.meta = torch.load(path, map_location="cpu", weights_only=weights_only)
            self.manifest = None
            self.meta.pop(MANIFEST_KEY, None)

    def _file(self, name: str, expert: int) -> dict[str, Any]:
        assert self.directory is not None and self.manifest is not None
        file_name = self.manifest["expert_files"][name][expert]
        if file_name not in self._files:
            self._files[file_name] = torch.load(
                self.directory / file_name, map_location="cpu", weights_only=self.weights_only, mmap=True
            )
        return self._files[file_name]

    def has_expert_param(self, name: str) -> bool:
        if self.manifest is not None:
            return name in self.manifest["expert_params"]
        return name in self.meta["state_dict"]

    def num_experts(self, name: str) -> int:
        if self.manifest is not None:
            return int(self.manifest["expert_params"][name])
        return int(self.meta["state_dict"][name].shape[0])

    def expert(self, name: str, expert: int) -> torch.Tensor:
        if self.manifest is not None:
            return self._file(name, expert)["model"][expert_key(name, expert)]
        return self.meta["state_dict"][name][expert]

    def expert_optimizer_state(
        self, optimizer_index: int, param_index: int, name: str, expert: int
    ) -> dict[str, dict[str, Any]] | None:
        if self.manifest is not None:
            parts = self._file(name, expert)["optimizers"]
            return parts[optimizer_index].get(expert_key(name, expert)) if optimizer_index < len(parts) else None
        state = self.meta["optimizer_states"][optimizer_index]["state"].get(param_index)
        if not state:
            return None
        full_shape = self.meta["state_dict"][name].shape
        return _split_state(state, full_shape, expert)


def load_local_checkpoint(
    path: Path,
    *,
    expert_params: Sequence[Any],
    optimizers: Sequence[Any],
    module: nn.Module,
    weights_only: bool | None = None,
) -> dict[str, Any]:
    """Read a checkpoint saved at any layout and return it in this rank's local form.

    The result is what Lightning's ``dump_checkpoint`` would give on this rank now: ``state_dict``
    with this rank's expert slots, ``optimizer_states`` with their states; so Lightning's default
    ``load_model_state_dict`` / ``load_optimizer_state_dict`` apply it unchanged.
    """
    source = _ExpertSource(path, weights_only=bool(weights_only))
    checkpoint = source.meta
    state_dict = dict(checkpoint["state_dict"])
    for info in expert_params:
        if not source.has_expert_param(info.name):
            continue  # `strict` loading reports it as a missing key
        if source.num_experts(info.name) != info.placement.num_experts:
            raise ValueError(
                f"The checkpoint has {source.num_experts(info.name)} experts for `{info.name}` but the model has "
                f"{info.placement.num_experts}. Load it into a model with the same `num_experts`."
            )
        state_dict[info.name] = torch.stack([source.expert(info.name, e) for e in info.local_experts])
    checkpoint["state_dict"] = state_dict

    if "optimizer_states" in checkpoint:
        by_name = {info.name: info for info in expert_params}
        local_states = []
        for optimizer_index, (optimizer, saved) in enumerate(zip(optimizers, checkpoint["optimizer_states"])):
            state = dict(saved["state"])
            for param_index, name in enumerate(optimizer_param_names(optimizer, module)):
                if name not in by_name:
                    continue
                parts = [
                    source.expert_optimizer_state(optimizer_index, param_index, name, e)
                    for e in by_name[name].local_experts
                ]
                if all(part is not None for part in parts):
                    state[param_index] = _join_states(parts)  # type: ignore[arg-type]
                else:
                    state.pop(param_index, None)
            local_states.append({**saved, "state": state})
        checkpoint["optimizer_states"] = local_states
    return checkpoint


def consolidate_checkpoint(checkpoint_dir: str | Path, output_file: str | Path) -> Path:
    """Write one single-file checkpoint with full ``[E, ...]`` expert tensors (logical order) and full
    optimizer states, as a run without expert parallelism would have saved it.

    It loads with no process group: ``MyModule.load_from_checkpoint(output_file)``, or
    ``module.load_state_dict(torch.load(output_file)["state_dict"])`` into the unsharded module,
    and ``Trainer(...).fit(model, ckpt_path=output_file)`` resumes from it with any strategy.

    Args:
        checkpoint_dir: a checkpoint directory saved by :class:`~lightning_moe.MoEStrategy`.
        output_file: the file to write.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not is_sharded_checkpoint(checkpoint_dir):
        raise ValueError(
            f"`{checkpoint_dir}` is not a checkpoint directory written by MoEStrategy (no {META_FILE} in it). "
            f"Pass the `.ckpt` directory that ModelCheckpoint or `trainer.save_checkpoint` wrote."
        )
    source = _ExpertSource(checkpoint_dir, weights_only=False)
    manifest = source.manifest
    assert manifest is not None
    checkpoint = source.meta
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
                    state[param_index] = _join_states(parts)  # type: ignore[arg-type]
            full_states.append({**saved, "state": dict(sorted(state.items()))})
        checkpoint["optimizer_states"] = full_states
    output_file = Path(output_file)
    output_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, output_file)
    return output_file


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
    output = consolidate_checkpoint(args.checkpoint, args.output)
    print(f"wrote {output}")
    return 0
