"""Gradient reduction and clipping for expert-parallel training.

Dense parameters are replicated on every rank and DDP averages their gradients over the world.
Expert parameters are sharded over the EP group and left out of DDP. In each backward, an expert's
gradient arrives as the sum over the ranks of its EP group (the backward of the dispatch all-to-all
brings every source rank's contribution home); a hook divides it by the EP size on arrival. Averaging
over the expert-data-parallel (EDP) group then gives the same average over the world that DDP takes
of the dense gradients:

    grad_e = (1 / edp) * sum_{edp} (1 / ep) * sum_{ep} dL_rank / dw_e = (1 / W) * sum_{ranks} dL_rank / dw_e.

Like DDP's average, the EDP average leaves a gradient that is already identical on every EDP rank
unchanged, so syncing after each of several backward passes (manual optimization) gives the same
result as syncing once after the last.

Clipping by norm must see the norm of the *whole* model: the dense part once (identical on every
rank) plus each expert shard once, i.e. the sum of squares of the expert part all-reduced over the
EP group (EDP replicas hold identical expert gradients after the sync and are not counted again).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from lightning_moe.layers.experts import is_expert_param


def scale_expert_grads_on_arrival(parameters: Iterable[torch.nn.Parameter], ep_size: int) -> None:
    """Divide each backward's gradient of these expert parameters by ``ep_size`` before it is
    accumulated into ``.grad`` (see the module docstring)."""
    if ep_size == 1:
        return
    scale = 1.0 / ep_size
    for parameter in parameters:
        parameter.register_hook(lambda grad: grad * scale)


@torch.no_grad()
def sync_expert_grads(parameters: Iterable[torch.nn.Parameter], *, edp_group: dist.ProcessGroup | None, edp_size: int) -> None:
    """Average expert gradients over the EDP group (one flat all-reduce)."""
    parameters = list(parameters)
    for p in parameters:
        # A layer skipped in this forward leaves `grad` unset on some ranks only: give it zeros, so
        # that every rank all-reduces a buffer of the same size.
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in parameters]
    if not grads:
        return
    if edp_size > 1:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=edp_group)
        flat /= edp_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def _norm_of_norms(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The 2-norm of ``grads`` computed as ``torch.nn.utils.clip_grad_norm_`` does: each tensor's norm
    (``_foreach_norm``), then the norm of those norms."""
    if not grads:
        return torch.zeros((), device=device)
    norms = torch._foreach_norm(grads, 2.0)
    return torch.linalg.vector_norm(torch.stack([norm.to(device) for norm in norms]), 2.0)


@torch.no_grad()
def clip_grad_norm_global(
    parameters: Iterable[torch.Tensor], max_norm: float, *, ep_group: dist.ProcessGroup | None, ep_size: int
) -> torch.Tensor:
    """Clip gradients in place by the global norm of dense and sharded expert gradients; return that norm.

    The dense part and the rule are those of ``torch.nn.utils.clip_grad_norm_`` (per-tensor norms, the
    norm of the norms, scale by ``max_norm / (norm + 1e-6)`` clamped at 1); the expert part's square
    is summed over the EP group (each shard once), then both parts are combined.
    """
    grads_dense, grads_expert = [], []
    for p in parameters:
        if p.grad is not None:
            (grads_expert if is_expert_param(p) else grads_dense).append(p.grad)
    grads = grads_dense + grads_expert
    device = grads[0].device if grads else torch.device("cpu")
    dense_norm = _norm_of_norms(grads_dense, device)
    expert_sq = _norm_of_norms(grads_expert, device).square()
    if ep_size > 1:
        dist.all_reduce(expert_sq, op=dist.ReduceOp.SUM, group=ep_group)
    total_norm = torch.linalg.vector_norm(torch.stack([dense_norm, expert_sq.sqrt()]), 2.0)
    clip_coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    if grads:
        torch._foreach_mul_(grads, clip_coef.to(device))
    return total_norm
