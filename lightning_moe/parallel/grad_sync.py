"""Gradient reduction and clipping for expert-parallel training.

Dense parameters are replicated on every rank and DDP averages their gradients over the world.
Expert parameters are sharded over the EP group and left out of DDP. In each backward, an expert's
gradient arrives as the sum over the ranks of its EP group (the backward of the dispatch all-to-all
brings every source rank's contribution home); a hook divides it by the EP size on arrival and, for
an expert with replicas on several ranks, sums it over the replicas' slots (each replica received
only the tokens routed to it). Averaging over the expert-data-parallel (EDP) group then gives the
same average over the world that DDP takes of the dense gradients:

    grad_e = (1 / edp) * sum_{edp} (1 / ep) * sum_{ep} dL_rank / dw_e = (1 / W) * sum_{ranks} dL_rank / dw_e.

Like DDP's average, the EDP average leaves a gradient that is already identical on every EDP rank
unchanged, so syncing after each of several backward passes (manual optimization) gives the same
result as syncing once after the last.

Clipping by norm must see the norm of the *whole* model: the dense part once (identical on every
rank) plus each logical expert once, i.e. the sum of squares of the expert part all-reduced over the
EP group, a replicated expert's slots weighted by one over its replica count (EDP replicas hold
identical expert gradients after the sync and are not counted again).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from lightning_moe.layers.experts import is_expert_param
from lightning_moe.layers.moe import MoELayer
from lightning_moe.parallel.placement import ExpertPlacement


_HOOKED = "_lightning_moe_grad_hook"


def reduce_expert_grads_on_arrival(layer: MoELayer, *, ep_size: int, ep_group: dist.ProcessGroup | None) -> bool:
    """Hook each expert parameter of ``layer`` so that, in every backward, its gradient is divided by
    ``ep_size`` and, for an expert with replicas, summed over the slots of all its holders.

    Each replica receives the gradient of the tokens routed to it; summed over the holders, every
    replica gets the gradient the expert would have had without replicas, so identical optimizer
    updates keep the replicas identical. The sum runs in the backward itself (one all-reduce over the
    EP group per parameter, only while the placement in force has replicas), so gradient
    accumulation and several ``manual_backward`` calls add up exactly as without replicas. The
    placement is read at each backward: a migration changes it between steps. A parameter is hooked
    once, however often this is called.

    A frozen parameter (``requires_grad=False``, which takes no hook) is left for a later call.
    Returns whether every expert parameter of the layer is hooked now.
    """
    if ep_size == 1:
        return True
    scale = 1.0 / ep_size
    pending = [p for p in layer.experts.parameters(recurse=False) if not getattr(p, _HOOKED, False)]
    parameters = [p for p in pending if p.requires_grad]

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad * scale
        placement = layer.dispatcher.placement
        if placement.has_replicas:
            grad = _sum_replica_rows(grad, placement, layer.dispatcher.ep_rank, ep_group)
        return grad

    for parameter in parameters:
        parameter.register_hook(hook)
        setattr(parameter, _HOOKED, True)
    return len(parameters) == len(pending)


def _sum_replica_rows(
    grad_S: torch.Tensor, placement: ExpertPlacement, ep_rank: int, ep_group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Rows of ``grad_S`` (one per local slot) whose expert has replicas, summed over every rank's slots
    of the same expert. Every rank all-reduces one buffer with a row per replicated expert, in logical
    order (zeros for the experts it does not hold), so the buffer is the same on every rank."""
    slots, rows, num_replicated = placement.replicated_slots(ep_rank, grad_S.device)
    buffer_X = grad_S.new_zeros((num_replicated, *grad_S.shape[1:]))
    buffer_X.index_copy_(0, rows, grad_S.index_select(0, slots))
    dist.all_reduce(buffer_X, op=dist.ReduceOp.SUM, group=ep_group)
    return grad_S.index_copy(0, slots, buffer_X.index_select(0, rows))


@torch.no_grad()
def sync_expert_grads(parameters: Iterable[torch.nn.Parameter], *, edp_group: dist.ProcessGroup | None, edp_size: int) -> None:
    """Average expert gradients over the EDP group (one flat all-reduce).

    A parameter that no rank of the group used in the step (its layer skipped everywhere) keeps
    ``grad = None``, as in one process or under DDP with ``find_unused_parameters``: the optimizer
    then leaves it and its state alone (no weight decay, no moment update)."""
    parameters = list(parameters)
    if edp_size <= 1 or not parameters:
        return
    # A layer skipped in this forward on some ranks only leaves `grad` unset there: those ranks add
    # zeros, so that every rank all-reduces a buffer of the same size, and one flag per parameter
    # (appended to the buffer) counts the ranks that had a gradient.
    missing = [p.grad is None for p in parameters]
    grads = [torch.zeros_like(p) if absent else p.grad for p, absent in zip(parameters, missing)]
    used = grads[0].new_ones(len(parameters))  # made on the device: no copy from the host, no sync
    for index, absent in enumerate(missing):
        if absent:
            used[index] = 0
    flat = torch.cat([*(g.reshape(-1) for g in grads), used])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=edp_group)
    flat /= edp_size
    # Only a rank that lacked a gradient reads the flags back (a host sync); the others know.
    used_by_some = flat[-len(parameters) :].gt(0).tolist() if any(missing) else [True] * len(parameters)
    offset = 0
    for p, g, absent, keep in zip(parameters, grads, missing, used_by_some):
        if keep:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            if absent:
                p.grad = g
        offset += g.numel()


def replica_counts_of_slots(layers: Iterable[MoELayer]) -> dict[int, torch.Tensor]:
    """For each expert parameter (by ``id``) of the layers whose table has replicas, the replica count
    of the expert in each of its slots ``[S]`` (what :func:`clip_grad_norm_global` weighs by)."""
    counts = {}
    for layer in layers:
        placement = layer.dispatcher.placement
        if placement.has_replicas:
            for parameter in layer.experts.parameters(recurse=False):
                device = parameter.device
                slots_S = placement.on_device("expert_of_slot_RS", device)[layer.dispatcher.ep_rank]
                counts[id(parameter)] = placement.on_device("replicas_E", device)[slots_S]
    return counts


def _norm_of_norms(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The 2-norm of ``grads`` computed as ``torch.nn.utils.clip_grad_norm_`` does: each tensor's norm
    (``_foreach_norm``), then the norm of those norms."""
    if not grads:
        return torch.zeros((), device=device)
    norms = torch._foreach_norm(grads, 2.0)
    return torch.linalg.vector_norm(torch.stack([norm.to(device) for norm in norms]), 2.0)


@torch.no_grad()
def clip_grad_norm_global(
    parameters: Iterable[torch.Tensor],
    max_norm: float,
    *,
    ep_group: dist.ProcessGroup | None,
    ep_size: int,
    replicas_of_slots: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Clip gradients in place by the global norm of dense and sharded expert gradients; return that norm.

    The dense part and the rule are those of ``torch.nn.utils.clip_grad_norm_`` (per-tensor norms, the
    norm of the norms, scale by ``max_norm / (norm + 1e-6)`` clamped at 1); the expert part's square
    is summed over the EP group, each logical expert once: a slot whose expert has ``n`` replicas
    (identical gradients on ``n`` ranks) counts ``1 / n``.

    Args:
        parameters: the parameters whose gradients are clipped.
        max_norm: the largest norm allowed.
        ep_group: the EP group (the expert part is summed over it).
        ep_size: its size.
        replicas_of_slots: for an expert parameter (by ``id``), the replica count of the expert in each
            of its slots ``[S]``; parameters not in it count every slot once.
    """
    replicas_of_slots = replicas_of_slots or {}
    grads_dense, grads_expert, counts_expert = [], [], []
    for p in parameters:
        if p.grad is None:
            continue
        if is_expert_param(p):
            grads_expert.append(p.grad)
            counts_expert.append(replicas_of_slots.get(id(p)))
        else:
            grads_dense.append(p.grad)
    grads = grads_dense + grads_expert
    device = grads[0].device if grads else torch.device("cpu")
    dense_norm = _norm_of_norms(grads_dense, device)
    expert_sq = torch.zeros((), device=device)
    for grad, counts_S in zip(grads_expert, counts_expert):
        squares_S = grad.detach().float().pow(2).reshape(grad.shape[0], -1).sum(dim=1)
        if counts_S is not None:
            squares_S = squares_S / counts_S.to(squares_S)
        expert_sq = expert_sq + squares_S.sum()
    if ep_size > 1:
        dist.all_reduce(expert_sq, op=dist.ReduceOp.SUM, group=ep_group)
    total_norm = torch.linalg.vector_norm(torch.stack([dense_norm, expert_sq.sqrt()]), 2.0)
    clip_coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    if grads:
        torch._foreach_mul_(grads, clip_coef.to(device))
    return total_norm
