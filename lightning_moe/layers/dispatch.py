"""Token dispatch inside one process: capacity limits and the sort of assignments by expert.

The :class:`LocalDispatcher` is what a :class:`~lightning_moe.MoELayer` uses on its own. Under
expert parallelism :class:`~lightning_moe.MoEStrategy` replaces it with an all-to-all dispatcher
from :mod:`lightning_moe.parallel.dispatch` that has the same methods, so that model code never
holds a collective.

Shape legend: ``N`` assignments, ``T`` tokens, ``D`` model width, ``E`` experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lightning_moe.layers.gates.base import Routing
from lightning_moe.ops.counting import count_per_expert, count_routed_tokens


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


def weighted_sum_rows(rows_ND: torch.Tensor, weight_N: torch.Tensor | None, target_N: torch.Tensor, num_targets: int) -> torch.Tensor:
    """``out[target_N[n]] += weight_N[n] * rows_ND[n]``: the combine of routed outputs into their tokens
    (or, under expert parallelism, into the (token, rank) rows that go back). ``None`` weights are 1.

    The products and sums are in fp32 (the gate's weights are fp32) and the result has the rows'
    dtype, so bf16 expert outputs are not rounded once per added expert.
    """
    rows_dtype = rows_ND.dtype
    accumulate_dtype = torch.promote_types(rows_dtype, torch.float32)
    rows_ND = rows_ND.to(accumulate_dtype)
    if weight_N is not None:
        rows_ND = rows_ND * weight_N.to(accumulate_dtype).unsqueeze(-1)
    out = rows_ND.new_zeros(num_targets, rows_ND.shape[-1]).index_add_(0, target_N, rows_ND)
    return out.to(rows_dtype)


@dataclass
class LocalDispatchContext:
    """What :meth:`LocalDispatcher.combine` needs: each expert-ordered row's token and weight."""

    token_index_N: torch.Tensor
    weight_N: torch.Tensor
    num_tokens: int


class LocalDispatcher:
    """Sorts assignment rows by expert for a grouped GEMM, and sums the results into their tokens.

    Args:
        num_experts: experts of the layer; all are local.
    """

    #: Expert-parallel rank and size of this process (a single process is its own EP group).
    ep_rank = 0
    ep_size = 1

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        #: In the last dispatch, per EP rank ``[ep_size]``: distinct tokens sent to it (one hidden row
        #: each) and assignments sent to its experts. A single process is its own only EP rank.
        self.tokens_sent_per_rank = torch.zeros(1, dtype=torch.long)
        self.assignments_sent_per_rank = torch.zeros(1, dtype=torch.long)

    @property
    def num_local_experts(self) -> int:
        return self.num_experts

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, LocalDispatchContext]:
        """The rows of the assignments, gathered from ``x_TD`` already sorted by expert (one gather,
        no intermediate copy), the tokens per local expert ``[E]``, and what :meth:`combine` needs."""
        order_N = torch.argsort(routing.expert_index_N, stable=True)
        tokens_per_expert_E = count_per_expert(routing.expert_index_N, self.num_experts)
        token_index_N = routing.token_index_N[order_N]
        # NOTE: kept on the input's device: reading them back here would synchronise every forward.
        self.tokens_sent_per_rank = count_routed_tokens(token_index_N, x_TD.shape[0])
        self.assignments_sent_per_rank = tokens_per_expert_E.sum().reshape(1)
        context = LocalDispatchContext(token_index_N, routing.weight_N[order_N], x_TD.shape[0])
        return x_TD[token_index_N], tokens_per_expert_E, context

    def combine(self, y_ND: torch.Tensor, context: LocalDispatchContext) -> torch.Tensor:
        """``[T, D]``: each token's expert outputs, weighted by the gate and summed.

        NOTE: the rows stay in expert order and are added into their tokens through the sorted token
        index, which saves a scatter back to assignment order (and its gather in backward).
        """
        return weighted_sum_rows(y_ND, context.weight_N, context.token_index_N, context.num_tokens)

    def reduce_load(self, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """The load over every process that shares this layer's gate; a single process has only its own."""
        return tokens_per_expert_E
