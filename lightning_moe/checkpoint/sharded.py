"""Save an expert-parallel run as a checkpoint directory keyed by logical expert id, and read any
checkpoint back in one rank's local form.

The directory's files (see :mod:`lightning_moe.checkpoint.layout`)::

    meta.pt             rank 0: everything Lightning saves (loops, callbacks, schedulers, hyper-
                        parameters), the dense part of the model and of each optimizer state, and the
                        manifest (``"lightning_moe"``: expert parameters with their expert count and
                        shape, which file holds each logical expert, which optimizer entries are
                        expert parameters, each MoE layer's placement table)
    experts-ep00000.pt  the experts EP rank 0 writes (by its first EDP replica only):
    ...                 ``"model"``: ``"<param name>#<logical id>" -> [D, ...]`` and
                        ``"optimizers"``: per optimizer, the same keys -> that expert's part of the
                        state (:mod:`lightning_moe.parallel.expert_state`)

Each logical expert is stored once, whatever the EP size or placement: a run at another layout
reads, for each of its local slots, the logical expert it now holds, wherever it was saved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from torch import nn

from lightning_moe.checkpoint.layout import (
    FORMAT_VERSION,
    MANIFEST_KEY,
    META_FILE,
    CheckpointError,
    commit_version,
    expert_file_name,
    expert_key,
    foreign_entries,
    is_local_link,
    join,
    new_version_name,
    remove_if_empty,
    remove_quietly,
    staging_path,
    swap_in,
    synchronous,
)
from lightning_moe.checkpoint.source import SavedCheckpoint
from lightning_moe.parallel.expert_state import join_expert_states, split_expert_state


def optimizer_param_names(optimizer: Any, module: nn.Module) -> list[str]:
    """The name of each parameter of ``optimizer`` in ``state_dict`` index order (across param groups)."""
    optimizer = getattr(optimizer, "_optimizer", optimizer)  # unwrap a LightningOptimizer
    names = {id(p): name for name, p in module.named_parameters()}
    return [names.get(id(p), f"<unnamed {i}>") for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])]


def _describe(optimizer: Any, index: int, name: str) -> str:
    optimizer = getattr(optimizer, "_optimizer", optimizer)
    return f"optimizer {index} ({type(optimizer).__name__}), parameter `{name}`"


def encode_sharded_checkpoint(
    checkpoint: dict[str, Any],
    *,
    expert_params: Sequence[Any],
    optimizers: Sequence[Any],
    module: nn.Module,
    ep_rank: int,
    placements: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split Lightning's checkpoint dict (this rank's, as Lightning dumped it) into rank 0's ``meta``
    and this rank's expert part ``{"model": ..., "optimizers": [...]}``.

    Raises:
        ValueError: for an optimizer state that cannot be split per expert (it names the entry).
    """
    checkpoint = dict(checkpoint)
    state_dict = dict(checkpoint.pop("state_dict"))
    optimizer_states = checkpoint.pop("optimizer_states", None)
    by_name = {info.name: info for info in expert_params}
    model_part: dict[str, torch.Tensor] = {}
    for info in expert_params:
        local = state_dict.pop(info.name)
        for slot, expert in enumerate(info.local_experts):
            if info.file_rank_of_expert(expert) == ep_rank:
                model_part[expert_key(info.name, expert)] = local[slot].detach().cpu().clone()

    optimizer_parts: list[dict[str, Any]] = []
    optimizer_expert_params: list[dict[int, str]] = []
    dense_optimizer_states = []
    for optimizer_index, (optimizer, optimizer_state) in enumerate(zip(optimizers, optimizer_states or [])):
        names = optimizer_param_names(optimizer, module)
        expert_indices = {index: name for index, name in enumerate(names) if name in by_name}
        part: dict[str, Any] = {}
        saved_state = optimizer_state.get("state", {})
        for index, name in expert_indices.items():
            state = saved_state.get(index)
            if not state:
                continue
            info = by_name[name]
            parts = split_expert_state(
                state, len(info.local_experts), where=_describe(optimizer, optimizer_index, name)
            )
            for slot, expert in enumerate(info.local_experts):
                if info.file_rank_of_expert(expert) == ep_rank:
                    part[expert_key(name, expert)] = parts[slot]
        optimizer_parts.append(part)
        optimizer_expert_params.append(expert_indices)
        dense_state = {index: s for index, s in saved_state.items() if index not in expert_indices}
        dense_optimizer_states.append({**optimizer_state, "state": dense_state})

    manifest = {
        "format_version": FORMAT_VERSION,
        "expert_params": {info.name: info.num_experts for info in expert_params},
        "expert_shapes": {info.name: list(info.parameter.shape[1:]) for info in expert_params},
        "expert_files": {
            info.name: [expert_file_name(info.file_rank_of_expert(e)) for e in range(info.num_experts)]
            for info in expert_params
        },
        "optimizer_expert_params": optimizer_expert_params,
        "expert_parallel_size": expert_params[0].ep_size if expert_params else 1,
        "placements": dict(placements or {}),
    }
    meta = {**checkpoint, "state_dict": state_dict, MANIFEST_KEY: manifest}
    if optimizer_states is not None:
        meta["optimizer_states"] = dense_optimizer_states
    return meta, {"model": model_part, "optimizers": optimizer_parts}


def save_sharded_checkpoint(
    checkpoint: dict[str, Any],
    path: _PATH,
    *,
    expert_params: Sequence[Any],
    optimizers: Sequence[Any],
    module: nn.Module,
    global_rank: int,
    writes_experts: bool,
    ep_rank: int,
    checkpoint_io: CheckpointIO,
    broadcast: Callable[[Any], Any],
    all_gather: Callable[[Any], list[Any]],
    placements: dict[str, Any] | None = None,
) -> None:
    """Write ``checkpoint`` as a checkpoint directory at ``path``; every rank calls it.

    The files go into a new version directory; ``path`` points at it only once every rank has
    written (see :mod:`lightning_moe.checkpoint.layout`), so a failed save keeps the previous
    checkpoint. A failure on any rank raises on every rank (no rank is left in a collective).

    Args:
        checkpoint: Lightning's checkpoint dict with this rank's local (sharded) ``state_dict`` and
            ``optimizer_states``.
        path: the checkpoint directory (local path or fsspec URL).
        expert_params: :class:`~lightning_moe.parallel.sharding.ShardedExpertParam` of the module.
        optimizers: the optimizers whose states are in ``checkpoint["optimizer_states"]``, in order.
        module: the LightningModule (to name optimizer entries).
        global_rank: this rank (rank 0 writes ``meta.pt`` and commits).
        writes_experts: this rank writes its EP rank's expert file (the first EDP replica).
        ep_rank: this rank's EP rank.
        checkpoint_io: writes each file (the strategy's plugin).
        broadcast: sends rank 0's object to every rank.
        all_gather: every rank's object, as a list, on every rank.
        placements: the per-layer placement tables to store in the manifest.
    """
    is_global_zero = global_rank == 0
    checkpoint_io = synchronous(checkpoint_io)  # every file exists before the commit
    if is_global_zero:
        # Over a single-file checkpoint, or a link to another checkpoint (`save_last="link"`), the
        # directory is written beside it and swapped in at the end: the link's target is untouched.
        replaced = get_filesystem(path).isfile(str(path)) or is_local_link(path)
        root = staging_path(path) if replaced else str(path)
        foreign = foreign_entries(path)
        refusal = (
            f"{path} is a directory that holds other files ({foreign[:5]}), not a checkpoint: saving there would "
            f"delete them. Save to a new path." if foreign else None
        )
        target = (new_version_name(int(checkpoint.get("global_step", 0))), root, refusal)
    version, root, refusal = broadcast(target if is_global_zero else None)
    if refusal is not None:  # the same on every rank
        raise CheckpointError(refusal)
    version_dir = join(root, version)

    def agree(problem: str | None, error_type: type[Exception], message: str) -> None:
        problems = [p for p in all_gather(problem) if p]
        if problems:
            if is_global_zero:
                remove_quietly(version_dir if root == str(path) else root)
                if root == str(path):
                    # A first save leaves no empty directory behind: `ckpt_path="last"` would take it
                    # for a checkpoint (and fail) instead of starting afresh.
                    remove_if_empty(path)
            raise error_type(f"{message} {'; '.join(problems)}")

    problem = None
    try:
        meta, expert_part = encode_sharded_checkpoint(
            checkpoint, expert_params=expert_params, optimizers=optimizers, module=module, ep_rank=ep_rank,
            placements=placements,
        )
    except ValueError as error:
        problem = str(error)
    agree(problem, ValueError, f"Cannot save checkpoint {path}:")

    try:
        if writes_experts and expert_params:
            checkpoint_io.save_checkpoint(expert_part, join(version_dir, expert_file_name(ep_rank)))
        if is_global_zero:
            checkpoint_io.save_checkpoint(meta, join(version_dir, META_FILE))
    except Exception as error:  # disk full, permissions, a storage error: reported by every rank below
        problem = f"rank {global_rank}: {type(error).__name__}: {error}"
    agree(problem, CheckpointError, f"Saving checkpoint {path} failed; the previous checkpoint there, if any, is kept.")

    try:
        if is_global_zero:
            commit_version(root, version)
            if root != str(path):
                swap_in(path, root)
    except Exception as error:
        problem = f"rank {global_rank}: {type(error).__name__}: {error}"
    agree(problem, CheckpointError, f"Committing checkpoint {path} failed; the previous checkpoint there is kept.")


def load_local_checkpoint(
    path: _PATH,
    *,
    expert_params: Sequence[Any],
    optimizers: Sequence[Any],
    module: nn.Module,
    weights_only: bool = True,
    checkpoint_io: CheckpointIO | None = None,
    source: SavedCheckpoint | None = None,
) -> dict[str, Any]:
    """Read a checkpoint saved at any layout and return it in this rank's local form.

    The result is what Lightning's ``dump_checkpoint`` would give on this rank now: ``state_dict``
    with this rank's expert slots, ``optimizer_states`` with their states; so Lightning's default
    ``load_model_state_dict`` / ``load_optimizer_state_dict`` apply it unchanged.

    Raises:
        CheckpointError: a missing or damaged file, or experts that do not fit the model.
    """
    source = source or SavedCheckpoint(path, weights_only=weights_only, checkpoint_io=checkpoint_io)
    # A copy: the source reads its experts' shapes from its own state dict (a single file keeps them
    # there), which must not become this rank's local one below.
    checkpoint = dict(source.meta)
    state_dict = dict(checkpoint["state_dict"])
    for info in expert_params:
        if not source.has_expert_param(info.name):
            continue  # `strict` loading reports it as a missing key
        source.check_compatible(info.name, info.num_experts, tuple(info.parameter.shape[1:]))
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
                    state[param_index] = join_expert_states(parts)  # type: ignore[arg-type]
                else:
                    state.pop(param_index, None)
            local_states.append({**saved, "state": state})
        checkpoint["optimizer_states"] = local_states
    return checkpoint
