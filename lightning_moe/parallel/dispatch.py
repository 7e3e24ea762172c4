"""All-to-all token dispatch for expert parallelism.

:class:`AllToAllDispatcher` has the same methods as
:class:`~lightning_moe.layers.dispatch.LocalDispatcher`, so :class:`~lightning_moe.MoELayer` runs
unchanged; :class:`~lightning_moe.MoEStrategy` swaps it in at setup.

One dispatch, on every rank of an expert-parallel (EP) group:

1. map each assignment's logical expert to its physical position ``rank * L + slot`` through the
   :class:`~lightning_moe.parallel.placement.ExpertPlacement`, and sort rows by it (so rows are
   grouped by destination rank, then by slot);
2. exchange the row counts ``[R, L]`` with a plain all-to-all (the split sizes of step 3);
3. send the rows with an all-to-all that carries autograd and variable split sizes
   (``all_to_all_single_autograd``); its backward is the reverse all-to-all, so every expert
   gradient sums the contributions of all ranks of the EP group;
4. re-order the received rows from (source rank, slot) to (slot, source rank): one contiguous
   block per local expert, for the grouped GEMM.

``combine`` undoes 4, 3 and 1 in that order.

Shape legend: ``N`` assignment rows sent by this rank, ``M`` rows received, ``D`` model width,
``R`` EP ranks, ``L`` local expert slots, ``E`` logical experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

from lightning_moe.parallel.placement import ExpertPlacement


@dataclass
class DispatchContext:
    """What :meth:`AllToAllDispatcher.combine` needs from the matching dispatch."""

    send_order_N: torch.Tensor
    local_order_M: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]


class AllToAllDispatcher:
    """Sends each assignment row to the EP rank that holds its expert, and brings the result back.

    Args:
        placement: logical expert -> (EP rank, slot), identical on every rank.
        ep_rank: this process's rank inside its EP group.
        ep_group: the EP process group (consecutive global ranks).
        load_group: the group over which :meth:`reduce_load` sums expert load: every process that
            routes with the same gate, i.e. the whole world (``None`` = the default group).
    """

    def __init__(
        self,
        *,
        placement: ExpertPlacement,
        ep_rank: int,
        ep_group: dist.ProcessGroup | None,
        load_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.placement = placement
        self.ep_rank = ep_rank
        self.ep_size = placement.ep_size
        self.ep_group = ep_group
        self.load_group = load_group
        self.num_experts = placement.num_experts
        #: Assignment rows this rank sent to each EP rank in the last dispatch, ``[ep_size]``.
        self.tokens_sent_per_rank = torch.zeros(self.ep_size, dtype=torch.long)

    @property
    def num_local_experts(self) -> int:
        return self.placement.slots_per_rank

    def set_placement(self, placement: ExpertPlacement) -> None:
        """Use a new table from the next dispatch on (the caller moves the expert weights)."""
        if placement.num_experts != self.num_experts or placement.ep_size != self.ep_size:
            raise ValueError(
                f"A new placement must keep num_experts={self.num_experts} and ep_size={self.ep_size}, got "
                f"{placement.num_experts} and {placement.ep_size}."
            )
        self.placement = placement

    def dispatch(
        self, x_TD: torch.Tensor, token_index_N: torch.Tensor, expert_index_N: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchContext]:
        """Rows for this rank's experts, sorted by local slot; rows per local slot ``[L]``; the context.

        The assignment rows are gathered from ``x_TD`` directly in send order (one gather)."""
        ranks, slots = self.ep_size, self.num_local_experts
        # 1. Physical position of each row, and the rows sorted by it.
        physical_N = self.placement.physical_of_expert_E.to(expert_index_N.device)[expert_index_N]
        send_order_N = torch.argsort(physical_N, stable=True)
        send_counts_RL = torch.bincount(physical_N, minlength=ranks * slots).view(ranks, slots)
        x_sorted_ND = x_TD[token_index_N[send_order_N]]
        self.tokens_sent_per_rank = send_counts_RL.sum(dim=1).detach().cpu()

        if ranks == 1:
            recv_counts_RL = send_counts_RL
            x_recv_MD = x_sorted_ND
            send_splits = recv_splits = [x_sorted_ND.shape[0]]
        else:
            # 2. Row counts: recv_counts_RL[r, l] = rows that rank r sends to our slot l.
            recv_counts_RL = torch.empty_like(send_counts_RL)
            dist.all_to_all_single(recv_counts_RL, send_counts_RL.contiguous(), group=self.ep_group)
            send_splits = send_counts_RL.sum(dim=1).tolist()
            recv_splits = recv_counts_RL.sum(dim=1).tolist()
            # 3. The rows themselves, differentiably.
            x_recv_MD = all_to_all_single_autograd(x_sorted_ND.contiguous(), recv_splits, send_splits, self.ep_group)

        # 4. (source rank, slot) blocks -> (slot, source rank) blocks: one block per local expert.
        block_of_row_M = torch.repeat_interleave(
            torch.arange(ranks * slots, device=recv_counts_RL.device), recv_counts_RL.reshape(-1)
        )
        source_rank_M, slot_M = block_of_row_M // slots, block_of_row_M % slots
        local_order_M = torch.argsort(slot_M * ranks + source_rank_M, stable=True)
        tokens_per_local_expert_L = recv_counts_RL.sum(dim=0)
        context = DispatchContext(send_order_N, local_order_M, send_splits, recv_splits)
        return x_recv_MD[local_order_M.to(x_recv_MD.device)], tokens_per_local_expert_L, context

    def combine(self, y_MD: torch.Tensor, context: DispatchContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert outputs back on the rank the assignments came from, in send order, and for each
        row the assignment it belongs to (the layer combines through it; no scatter back)."""
        y_recv_MD = torch.empty_like(y_MD)
        y_recv_MD[context.local_order_M.to(y_MD.device)] = y_MD
        if self.ep_size == 1:
            y_sorted_ND = y_recv_MD
        else:
            # The reverse all-to-all: what we received from rank r goes back to rank r.
            y_sorted_ND = all_to_all_single_autograd(
                y_recv_MD.contiguous(), context.send_splits, context.recv_splits, self.ep_group
            )
        return y_sorted_ND, context.send_order_N.to(y_sorted_ND.device)

    def reduce_load(self, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """Expert load summed over every process (all of them route with the same replicated gate),
        so that bias-balanced gates stay identical on every rank."""
        load_E = tokens_per_expert_E.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load_E, op=dist.ReduceOp.SUM, group=self.load_group)
        return load_E
