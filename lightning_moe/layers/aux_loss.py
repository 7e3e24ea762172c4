"""Gather the auxiliary losses that the MoE layers of a model kept from their last forward."""

from __future__ import annotations

import torch
from torch import nn

from lightning_moe.layers.moe import MoELayer


def moe_layers(module: nn.Module) -> list[MoELayer]:
    """Every :class:`MoELayer` inside ``module``, in registration order."""
    return [child for child in module.modules() if isinstance(child, MoELayer)]


def collect_aux_loss(module: nn.Module) -> torch.Tensor:
    """The weighted sum ``sum_layers sum_losses coefficient * value`` of the aux losses of every
    MoE layer in ``module`` from its last forward; add it to the task loss before ``backward``.

    Returns a zero tensor when no layer has an aux loss.
    """
    total: torch.Tensor | None = None
    for layer in moe_layers(module):
        for aux in layer.aux_losses.values():
            total = aux.weighted if total is None else total + aux.weighted
    if total is None:
        parameter = next(module.parameters(), None)
        return torch.zeros((), device=parameter.device if parameter is not None else None)
    return total


def collect_aux_losses(module: nn.Module) -> dict[str, torch.Tensor]:
    """Each aux loss by name, its raw value averaged over the layers that produced it (for logging)."""
    sums: dict[str, list[torch.Tensor]] = {}
    for layer in moe_layers(module):
        for name, aux in layer.aux_losses.items():
            sums.setdefault(name, []).append(aux.value.detach())
    return {name: torch.stack(values).mean() for name, values in sums.items()}
