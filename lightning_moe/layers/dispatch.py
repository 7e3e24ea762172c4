"""Token dispatch inside one process: capacity limits and the sort of assignments by expert.

The :class:`LocalDispatcher` is what a :class:`~lightning_moe.MoELayer` uses on its own. Under
expert parallelism :class:`~lightning_moe.MoEStrategy` replaces it with an all-to-all dispatcher
from :mod:`lightning_moe.parallel.dispatch` that has the same methods, so that model code never
holds a collective.

Shape legend: ``N`` assignments, ``T`` tokens, ``D`` model width, ``E`` experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

from lightning_moe.layers.gates.base import Routing
from lightning_moe.ops.counting import ceil_share, count_per_expert, count_routed_tokens, positions_in_groups


def expert_capacity(num_assignments: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert: ``ceil(capacity_factor * assignments / E)`` (GShard, Lepikhin et al. 2020,
    Sec. 2.2, with ``assignments = T * k`` for top-k routing)."""
    return max(1, ceil_share(capacity_factor, num_assignments, num_experts))


def limit_to_capacity(routing: Routing, num_experts: int, capacity_factor: float) -> Routing:
    """``routing`` (marked in place) with a capacity: each expert takes at most ``expert_capacity``
    assignments, the first in the routing's priority order; the rest are dropped.

    Only marks the assignments (``Routing.capacity`` and each one's ``position_in_expert_N``), with no
    shape that depends on the routing. :func:`drop_over_capacity` then removes the dropped ones (what
    :class:`~lightning_moe.MoELayer` does by default, and the expert-parallel dispatcher before its
    all-to-alls); given a marked routing, :class:`LocalDispatcher` instead runs every expert on
    exactly ``capacity`` rows, padded (``MoELayer(pad_to_capacity=True)``). A dropped assignment
    contributes nothing to its token's output; the residual connection around the layer carries the
    token on.
    """
    num_assignments = routing.expert_index_N.numel()
    # The routing is in priority order: each expert keeps its first `capacity` assignments.
    priority_N = torch.arange(num_assignments, device=routing.expert_index_N.device)
    routing.position_in_expert_N = positions_in_groups(routing.expert_index_N, priority_N, num_experts)
    routing.capacity = expert_capacity(num_assignments, num_experts, capacity_factor)
    return routing


def dropped_over_capacity(routing: Routing) -> torch.Tensor | int:
    """Assignments a capacity drops: a 0-d tensor on the routing's device (no host read), 0 without one."""
    if routing.capacity is None:
        return 0
    return (routing.position_in_expert_N >= routing.capacity).sum()


def drop_over_capacity(routing: Routing) -> Routing:
    """The assignments a capacity keeps (all of them without one), the others counted as dropped.
    Their number depends on the routing: reading it waits for the device."""
    if routing.capacity is None:
        return routing
    return routing.subset(routing.position_in_expert_N < routing.capacity)


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
class DispatchTraffic:
    """What one dispatch moved, per destination EP rank ``[R]`` (int64, on the input's device).

    Attributes:
        tokens_sent_per_rank: distinct tokens sent to each rank: one hidden row each, what crosses
            the network.
        assignments_sent_per_rank: assignments sent to each rank's experts: their work.
        replica_split: with per-step replica balancing, which split of replicated experts' tokens
            the step kept, one-hot ``[7]`` over
            :data:`~lightning_moe.parallel.replica_balance.SPLITS` (planned, plan's share, even
            share, and the two shares' local and node-matched twins); ``None`` otherwise.
    """

    tokens_sent_per_rank: torch.Tensor
    assignments_sent_per_rank: torch.Tensor
    replica_split: torch.Tensor | None = None


class Dispatched(NamedTuple):
    """The result of :meth:`Dispatcher.dispatch`."""

    rows: torch.Tensor  # [M, D] rows for this rank's expert slots, one block per slot
    rows_per_slot: torch.Tensor  # [S] rows of each local slot (int64)
    context: Any  # what `combine` needs
    traffic: DispatchTraffic


@runtime_checkable
class Dispatcher(Protocol):
    """How an :class:`~lightning_moe.MoELayer` sends assignment rows to its experts and brings the
    results back: :class:`LocalDispatcher` in one process, the all-to-all dispatcher of
    :mod:`lightning_moe.parallel.dispatch` under expert parallelism."""

    ep_rank: int
    ep_size: int
    num_experts: int

    @property
    def num_local_experts(self) -> int:
        """Expert slots on this rank (the leading dimension of the layer's expert weights)."""

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> Dispatched:
        """The rows of ``x_TD`` that this rank's experts must process, grouped by local slot."""

    def combine(self, y_MD: torch.Tensor, context: Any) -> torch.Tensor:
        """``[T, D]``: each token's expert outputs, weighted by the gate and summed."""

    def reduce_load(self, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """Expert load summed over every process that routes with the same gate."""


@dataclass
class LocalDispatchContext:
    """What :meth:`LocalDispatcher.combine` needs: each slot-ordered row's token and weight (under a
    capacity, the padding rows' token is ``num_tokens``, a row past the output, and their weight 0)."""

    token_index_N: torch.Tensor
    weight_N: torch.Tensor
    num_tokens: int
    padded: bool = False


class LocalDispatcher:
    """Sorts assignment rows by expert slot for a grouped GEMM, and sums the results into their tokens.

    The one code path of a single expert-parallel rank: an :class:`~lightning_moe.MoELayer` on its own
    uses it, and so does the expert-parallel dispatcher at EP size 1.

    Args:
        num_experts: experts of the layer; all are local.
        slot_of_expert_E: the local slot of each logical expert (a permutation); ``None`` is the
            identity (slot ``e`` holds expert ``e``).
    """

    #: Expert-parallel rank and size of this process (a single process is its own EP group).
    ep_rank = 0
    ep_size = 1

    def __init__(self, num_experts: int, slot_of_expert_E: torch.Tensor | None = None) -> None:
        self.num_experts = num_experts
        self.slot_of_expert_E = None if slot_of_expert_E is None else torch.as_tensor(slot_of_expert_E).long()
        # The table on each device it was used on: on a GPU a copy from the host at every dispatch
        # would wait for the kernels queued before it.
        self._slot_of_expert_on: dict[torch.device, torch.Tensor] = {}

    @property
    def num_local_experts(self) -> int:
        return self.num_experts

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> Dispatched:
        """The rows of the assignments, gathered from ``x_TD`` already sorted by slot (one gather, no
        intermediate copy), the rows per slot ``[E]``, what :meth:`combine` needs, and the traffic.
        A routing still marked with a capacity (:func:`limit_to_capacity`) gives every slot exactly
        ``capacity`` rows (:meth:`_dispatch_padded`)."""
        slot_N = routing.expert_index_N
        if self.slot_of_expert_E is not None:
            if slot_N.device not in self._slot_of_expert_on:
                self._slot_of_expert_on[slot_N.device] = self.slot_of_expert_E.to(slot_N.device)
            slot_N = self._slot_of_expert_on[slot_N.device][slot_N]
        if routing.capacity is not None:
            return self._dispatch_padded(x_TD, routing, slot_N)
        order_N = torch.argsort(slot_N, stable=True)
        rows_per_slot_E = count_per_expert(slot_N, self.num_experts)
        token_index_N = routing.token_index_N[order_N]
        # NOTE: kept on the input's device: reading them back here would synchronise every forward.
        traffic = DispatchTraffic(
            tokens_sent_per_rank=count_routed_tokens(token_index_N, x_TD.shape[0]),
            assignments_sent_per_rank=rows_per_slot_E.sum().reshape(1),
        )
        context = LocalDispatchContext(token_index_N, routing.weight_N[order_N], x_TD.shape[0])
        return Dispatched(x_TD[token_index_N], rows_per_slot_E, context, traffic)

    def _dispatch_padded(self, x_TD: torch.Tensor, routing: Routing, slot_N: torch.Tensor) -> Dispatched:
        """Drop and pad (GShard's fixed expert capacity; Megatron-Core's
        ``moe_pad_expert_input_to_capacity``): row ``s * C + p`` of the ``[E * C, D]`` rows is the
        ``p``-th kept assignment of slot ``s``, or zeros. Every shape is fixed by ``T``, ``k`` and the
        capacity, not by the routing: nothing is read back to the host, and a compiled layer is one
        graph. The experts compute the padding rows (at most ``capacity_factor`` times the dropless
        work in all); their weight is 0 and they add into a row past the output."""
        num_tokens, width = x_TD.shape
        num_assignments, capacity = slot_N.numel(), routing.capacity
        num_rows = self.num_experts * capacity
        kept_N = routing.position_in_expert_N < capacity
        # Each assignment's row; the dropped ones all go to one spare entry past the rows.
        row_N = torch.where(kept_N, slot_N * capacity + routing.position_in_expert_N, num_rows)
        no_assignment = num_assignments  # the index of an extra, empty assignment
        assignment_of_row = torch.full((num_rows + 1,), no_assignment, dtype=torch.long, device=x_TD.device)
        assignment_of_row = assignment_of_row.scatter(0, row_N, torch.arange(num_assignments, device=x_TD.device))
        assignment_of_row = assignment_of_row[:num_rows]
        # The extra assignment: token `num_tokens` (a zero row of the input, a spare row of the
        # output) with weight 0.
        token_of_row = torch.cat([routing.token_index_N, routing.token_index_N.new_full((1,), num_tokens)])[assignment_of_row]
        weight_of_row = torch.cat([routing.weight_N, routing.weight_N.new_zeros(1)])[assignment_of_row]
        rows_RD = torch.cat([x_TD, x_TD.new_zeros(1, width)])[token_of_row]
        traffic = DispatchTraffic(
            tokens_sent_per_rank=count_routed_tokens(token_of_row, num_tokens),
            assignments_sent_per_rank=kept_N.sum().reshape(1),
        )
        rows_per_slot_E = torch.full((self.num_experts,), capacity, dtype=torch.long, device=x_TD.device)
        context = LocalDispatchContext(token_of_row, weight_of_row, num_tokens, padded=True)
        return Dispatched(rows_RD, rows_per_slot_E, context, traffic)

    def combine(self, y_ND: torch.Tensor, context: LocalDispatchContext) -> torch.Tensor:
        """``[T, D]``: each token's expert outputs, weighted by the gate and summed.

        NOTE: the rows stay in slot order and are added into their tokens through the sorted token
        index, which saves a scatter back to assignment order (and its gather in backward).
        """
        if context.padded:  # the padding rows add into row T, dropped here
            return weighted_sum_rows(y_ND, context.weight_N, context.token_index_N, context.num_tokens + 1)[:-1]
        return weighted_sum_rows(y_ND, context.weight_N, context.token_index_N, context.num_tokens)

    def reduce_load(self, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """The load over every process that shares this layer's gate; a single process has only its own."""
        return tokens_per_expert_E
