"""Token dispatch inside one process: capacity limits and the sort of assignments by expert.

The :class:`LocalDispatcher` is what a :class:`~lightning_moe.MoELayer` uses on its own. Under
expert parallelism :class:`~lightning_moe.MoEStrategy` replaces it with an all-to-all dispatcher
from :mod:`lightning_moe.parallel.dispatch` that has the same two methods, so that model code never
holds a collective.

Shape legend: ``N`` assignments, ``D`` model width, ``E`` experts.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_moe.layers.gates.base import Routing
from lightning_moe.ops.counting import count_per_expert


def expert_capacity(num_assignments: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert: ``ceil(capacity_factor * assignments / E)`` (GShard, Lepikhin et al. 2020,
    Sec. 2.2, with ``assignments = T * k`` for top-k routing)."""
    return max(1, math.ceil(capacity_factor * num_assignments / num_experts))


def drop_over_capacity(routing: Routing, num_experts: int, capacity_factor: float) -> tuple[Routing, int]:
    """Keep at most ``expert_capacity`` assignments per expert, in the routing's priority order.

    Returns the kept routing and the number of dropped assignments. A dropped assignment contributes
    nothing to its token's output; the residual connection around the layer carries the token on.
    """
    num_assignments = routing.expert_index_N.numel()
    capacity = expert_capacity(num_assignments, num_experts, capacity_factor)
    # Position of each assignment within its expert's queue, in priority order: a stable sort by
    # expert keeps the priority order inside each expert.
    order_N = torch.argsort(routing.expert_index_N, stable=True)
    counts_E = count_per_expert(routing.expert_index_N, num_experts)
    starts_E = torch.cumsum(counts_E, dim=0) - counts_E
    position_sorted_N = torch.arange(num_assignments, device=order_N.device) - starts_E[routing.expert_index_N[order_N]]
    position_N = torch.empty_like(position_sorted_N)
    position_N[order_N] = position_sorted_N
    keep_N = position_N < capacity
    kept = Routing(
        token_index_N=routing.token_index_N[keep_N],
        expert_index_N=routing.expert_index_N[keep_N],
        weight_N=routing.weight_N[keep_N],
        num_tokens=routing.num_tokens,
        aux_losses=routing.aux_losses,
        stats=routing.stats,
    )
    return kept, int(num_assignments - kept.expert_index_N.numel())


class LocalDispatcher:
    """Sorts assignment rows by expert for a grouped GEMM, and puts the results back in order.

    Args:
        num_experts: experts of the layer; all are local.
    """

    #: Expert-parallel rank and size of this process (a single process is its own EP group).
    ep_rank = 0
    ep_size = 1

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        #: Assignment rows this process sent to each EP rank in the last dispatch, ``[ep_size]``.
        self.tokens_sent_per_rank = torch.zeros(1, dtype=torch.long)

    @property
    def num_local_experts(self) -> int:
        return self.num_experts

    def dispatch(
        self, x_TD: torch.Tensor, token_index_N: torch.Tensor, expert_index_N: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rows of the assignments, gathered from ``x_TD`` already sorted by expert (one gather,
        no intermediate copy), the tokens per local expert ``[E]``, and what :meth:`combine` needs."""
        order_N = torch.argsort(expert_index_N, stable=True)
        tokens_per_expert_E = count_per_expert(expert_index_N, self.num_experts)
        self.tokens_sent_per_rank = tokens_per_expert_E.sum().reshape(1).cpu()
        return x_TD[token_index_N[order_N]], tokens_per_expert_E, order_N

    def combine(self, y_ND: torch.Tensor, order_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert outputs, and for each output row the assignment it belongs to.

        NOTE: the rows stay in expert order; the layer combines them with ``index_add_`` through
        ``order_N``, which saves a scatter back to assignment order (and its gather in backward).
        """
        return y_ND, order_N

    def reduce_load(self, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """The load over every process that shares this layer's gate; a single process has only its own."""
        return tokens_per_expert_E
