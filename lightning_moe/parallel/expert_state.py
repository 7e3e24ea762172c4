"""One expert's share of an optimizer's state, and back: the codec that checkpoints, consolidation and
expert migration share.

An expert parameter under expert parallelism holds a layer's local slots, ``[L, ...]``. The optimizer
keeps, for such a parameter, two kinds of state:

- **per-expert** tensors, whose leading dimension is the slot: Adam's ``exp_avg`` and ``exp_avg_sq``
  ``[L, D, F]``, SGD's ``momentum_buffer``, Adafactor's factored second moments ``row_var``
  ``[L, D, 1]`` and ``col_var`` ``[L, 1, F]`` (torch factors over the last two dimensions, so the
  expert dimension stays in front);
- **shared** entries, the same for every slot: 0-d tensors (Adam's ``step``) and non-tensors.

A per-expert tensor is split along its first dimension and stacked back in any slot order, so a
checkpoint or a migration never depends on the expert-parallel layout. Any other tensor (a flat
buffer, a state whose first dimension is not the slot count) cannot be split per expert: it is
refused with an error that names the optimizer entry, instead of being stored whole and restored
with the wrong number of experts at another layout.

NOTE: splitting is exact, but the *update* is layout-independent only for optimizers that treat
each element (or each expert) on its own: SGD, Adam, AdamW, Adafactor's factored moments. Those
that use a norm over the whole tensor, e.g. Adafactor's relative step size (``param.norm()``) and
LAMB's trust ratio, see only the local slots, so their steps change with the EP size (see
docs/parallelism.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

#: One expert's part of a parameter's optimizer state: ``"sharded"`` holds that expert's rows of each
#: per-expert tensor, ``"replicated"`` the shared entries.
ExpertStatePart = dict[str, dict[str, Any]]


def is_per_expert(value: Any, num_slots: int) -> bool:
    """Whether an optimizer state entry has one row per expert slot (and is therefore split)."""
    return isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == num_slots


def check_splittable(state: dict[str, Any], num_slots: int, *, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` and the key when an entry of ``state`` is a tensor that is
    neither per-expert (leading dimension ``num_slots``) nor shared (0-d)."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] != num_slots:
            raise ValueError(
                f"The optimizer state `{key}` of {where} has shape {tuple(value.shape)}, which does not start "
                f"with the {num_slots} expert slot(s) of that parameter, so it cannot be split per expert. "
                f"Expert checkpoints and migrations store each expert's state on its own, so that they do not "
                f"depend on the expert-parallel layout. Use an optimizer whose state is elementwise or per "
                f"expert (SGD, Adam, AdamW, Adafactor), or train without expert parallelism."
            )


def split_expert_state(state: dict[str, Any], num_slots: int, *, where: str) -> list[ExpertStatePart]:
    """Each slot's part of a parameter's optimizer ``state``, in slot order (copies, on the CPU).

    Args:
        state: the optimizer state of one expert parameter (``optimizer.state[p]`` or its state-dict entry).
        num_slots: the parameter's leading dimension (its local expert slots).
        where: a description for errors, e.g. "optimizer 0 (AdamW), parameter `blocks.0.ffn.experts.w_in`".
    """
    check_splittable(state, num_slots, where=where)
    replicated = {key: value for key, value in state.items() if not is_per_expert(value, num_slots)}
    per_expert = {key: value for key, value in state.items() if is_per_expert(value, num_slots)}
    return [
        {
            "sharded": {key: value[slot].detach().cpu().clone() for key, value in per_expert.items()},
            "replicated": replicated,
        }
        for slot in range(num_slots)
    ]


def join_expert_states(parts: Sequence[ExpertStatePart]) -> dict[str, Any]:
    """The optimizer state of a parameter whose slots hold ``parts`` in order (the inverse of
    :func:`split_expert_state`); shared entries come from the first part."""
    if not parts:
        raise ValueError("join_expert_states needs the state of at least one expert.")
    state = dict(parts[0]["replicated"])
    for key in parts[0]["sharded"]:
        state[key] = torch.stack([part["sharded"][key] for part in parts])
    return state


def per_expert_tensors(state: dict[str, Any], num_slots: int, *, where: str) -> dict[str, torch.Tensor]:
    """The per-expert tensors of a live optimizer state (no copies): what moves with an expert's slot."""
    check_splittable(state, num_slots, where=where)
    return {key: value for key, value in state.items() if is_per_expert(value, num_slots)}
