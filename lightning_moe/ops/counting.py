"""Counting assignments per expert, and routed tokens, without a device-to-host synchronisation."""

from __future__ import annotations

import math

import torch


def ceil_share(factor: float, count: int, parts: int) -> int:
    """``ceil(factor * count / parts)`` as written in decimal: ``1.1 * 100 / 10`` is 11, not the 12 that
    binary floating point gives (11.000000000000002). Capacities (GShard's ``ceil(c N / E)``) use it."""
    share = factor * count / parts
    # Rounding error is relative (about 1e-16), so the allowance is too, but at most 1e-6: a fixed
    # relative one (1e-9) reached a whole unit at a billion assignments and rounded 1e9 + 1 down.
    # Plain arithmetic, which torch.compile traces with a symbolic count and factor.
    return math.ceil(share - min(1e-9 * abs(share), 1e-6))


def count_per_expert(expert_index_N: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert, ``[E]`` int64.

    NOTE: ``torch.bincount`` on CUDA reads the input's min and max back to the host (a sync per
    call); a ``scatter_add_`` into a fixed-size vector does not.
    """
    counts_E = torch.zeros(num_experts, dtype=torch.long, device=expert_index_N.device)
    return counts_E.scatter_add_(0, expert_index_N, torch.ones_like(expert_index_N))


def count_routed_tokens(token_index_N: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Distinct tokens among the assignments (tokens with at least one expert), ``[1]`` int64, on the
    assignments' device (no synchronisation). An index ``num_tokens`` (a padding row's) is no token."""
    routed_T = torch.zeros(num_tokens + 1, dtype=torch.bool, device=token_index_N.device)
    return routed_T.index_fill_(0, token_index_N, True)[:num_tokens].sum().reshape(1)


def positions_in_groups(group_N: torch.Tensor, priority_N: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Each element's position ``[N]`` inside its group when the elements are taken in the order
    ``priority_N`` (a permutation: first the most important); what a capacity keeps the first of.

    Args:
        group_N: the group of each element (an expert, a device).
        priority_N: the element indices, most important first.
        num_groups: the number of groups.
    """
    order_N = priority_N[torch.argsort(group_N[priority_N], stable=True)]  # by group, priority inside
    counts_G = count_per_expert(group_N, num_groups)
    starts_G = torch.cumsum(counts_G, dim=0) - counts_G
    position_N = torch.empty_like(order_N)
    position_N[order_N] = torch.arange(order_N.numel(), device=order_N.device) - starts_G[group_N[order_N]]
    return position_N
