"""All-to-all token dispatch for expert parallelism.

:class:`AllToAllDispatcher` has the same methods as
:class:`~lightning_moe.layers.dispatch.LocalDispatcher`, so :class:`~lightning_moe.MoELayer` runs
unchanged; :class:`~lightning_moe.MoEStrategy` swaps it in at setup.

A token whose experts sit on one remote rank crosses the network once, however many of that rank's
experts it uses (the de-duplication of DeepEP and Megatron-Core's "flex" dispatcher). One dispatch,
on every rank of an expert-parallel (EP) group:

1. map each assignment's logical expert to its physical position ``rank * L + slot`` through the
   :class:`~lightning_moe.parallel.placement.ExpertPlacement`, and sort the assignments by it
   (grouped by destination rank, then by slot);
2. collect the distinct (destination rank, token) *pairs*, grouped by rank (one hidden row is sent
   per pair), and give each assignment the index of its pair inside the block sent to its rank;
3. exchange the counts (assignments per slot and pairs per rank) with one plain all-to-all;
4. send the pair rows, and each assignment's pair index and gate weight, with all-to-alls; rows and
   weights go through ``all_to_all_single_autograd``, whose backward is the reverse all-to-all, so
   expert and router gradients sum the contributions of every rank of the EP group;
5. on the expert side, gather one row per assignment from the received pairs, one contiguous block
   per local expert, for the grouped GEMM.

``combine`` weights each expert output, sums the outputs of one pair *before* sending them back
(so the return trip also carries one row per pair), and adds the returned rows into their tokens.
With one EP rank nothing is sent: each assignment reads its token's row directly.

Shape legend: ``T`` tokens, ``N`` assignments routed by this rank, ``U`` pairs sent by this rank,
``V`` pairs received, ``M`` assignments received, ``D`` model width, ``R`` EP ranks, ``L`` local
expert slots, ``E`` logical experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

from lightning_moe.layers.dispatch import weighted_sum_rows
from lightning_moe.layers.gates.base import Routing
from lightning_moe.ops.counting import count_per_expert, count_routed_tokens
from lightning_moe.parallel.placement import ExpertPlacement


@dataclass
class DispatchContext:
    """What :meth:`AllToAllDispatcher.combine` needs from the matching dispatch."""

    token_of_pair_U: torch.Tensor | None  # token of each pair sent, by destination rank (None: EP 1)
    pair_of_row_M: torch.Tensor  # received pair each expert-input row was copied from
    weight_M: torch.Tensor  # gate weight of each expert-input row
    pairs_sent: list[int]  # pairs sent to each EP rank
    pairs_received: list[int]  # pairs received from each EP rank
    num_tokens: int


class AllToAllDispatcher:
    """Sends each token once to every EP rank that holds one of its experts, and brings the
    weighted sum of those experts' outputs back.

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
        #: In the last dispatch, per EP rank ``[ep_size]``: distinct tokens sent to it (one hidden row
        #: each, what crosses the network) and assignments sent to its experts (their work).
        self.tokens_sent_per_rank = torch.zeros(self.ep_size, dtype=torch.long)
        self.assignments_sent_per_rank = torch.zeros(self.ep_size, dtype=torch.long)

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

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, DispatchContext]:
        """Rows for this rank's experts, sorted by local slot; rows per local slot ``[L]``; the context."""
        ranks, slots = self.ep_size, self.num_local_experts
        num_tokens, device = x_TD.shape[0], x_TD.device
        # 1. Physical position of each assignment; sorted by it, assignments are grouped by
        # destination rank and, inside a rank, by slot.
        physical_N = self.placement.physical_of_expert_E.to(device)[routing.expert_index_N]
        send_order_N = torch.argsort(physical_N, stable=True)
        assignments_RL = count_per_expert(physical_N, ranks * slots).view(ranks, slots)
        token_sorted_N = routing.token_index_N[send_order_N]
        weight_sorted_N = routing.weight_N[send_order_N]
        if ranks == 1:
            return self._dispatch_on_one_rank(x_TD, token_sorted_N, weight_sorted_N, assignments_RL[0])

        # 2. The distinct (rank, token) pairs, rank-major, and each assignment's pair in its rank's block.
        rank_sorted_N = torch.div(physical_N[send_order_N], slots, rounding_mode="floor")
        needed_RT = torch.zeros(ranks, num_tokens, dtype=torch.bool, device=device)
        needed_RT[rank_sorted_N, token_sorted_N] = True
        pair_of_cell_RT = (torch.cumsum(needed_RT.view(-1), 0) - 1).view(ranks, num_tokens)
        token_of_pair_U = needed_RT.nonzero()[:, 1]
        pairs_per_rank_R = needed_RT.sum(dim=1)
        first_pair_R = torch.cumsum(pairs_per_rank_R, 0) - pairs_per_rank_R
        pair_in_block_N = pair_of_cell_RT[rank_sorted_N, token_sorted_N] - first_pair_R[rank_sorted_N]

        # 3. Counts: received[r, :L] = rank r's assignments to our slots, received[r, L] = its pairs.
        counts_RC = torch.cat([assignments_RL, pairs_per_rank_R.unsqueeze(1)], dim=1)
        received_RC = torch.empty_like(counts_RC)
        dist.all_to_all_single(received_RC, counts_RC, group=self.ep_group)
        received_RL, pairs_received_R = received_RC[:, :slots], received_RC[:, slots]
        # One device-to-host copy for all split sizes.
        sizes = torch.stack([pairs_per_rank_R, pairs_received_R, assignments_RL.sum(1), received_RL.sum(1)])
        pairs_sent, pairs_received, assignments_sent, assignments_received = sizes.tolist()
        self.tokens_sent_per_rank = torch.tensor(pairs_sent)
        self.assignments_sent_per_rank = torch.tensor(assignments_sent)

        # 4. Pair rows and assignment weights differentiably; pair indices as plain int32.
        x_received_VD = all_to_all_single_autograd(x_TD[token_of_pair_U], pairs_received, pairs_sent, self.ep_group)
        weight_received_M = all_to_all_single_autograd(
            weight_sorted_N.contiguous(), assignments_received, assignments_sent, self.ep_group
        )
        pair_in_block_M = torch.empty(sum(assignments_received), dtype=torch.int32, device=device)
        dist.all_to_all_single(
            pair_in_block_M, pair_in_block_N.to(torch.int32), assignments_received, assignments_sent,
            group=self.ep_group,
        )

        # 5. Received assignments come in (source rank, slot) blocks; re-order them to one block per
        # slot, and point each at its source rank's pair row.
        block_of_row_M = torch.repeat_interleave(torch.arange(ranks * slots, device=device), received_RL.reshape(-1))
        source_rank_M, slot_M = block_of_row_M // slots, block_of_row_M % slots
        local_order_M = torch.argsort(slot_M * ranks + source_rank_M, stable=True)
        first_received_pair_R = torch.cumsum(pairs_received_R, 0) - pairs_received_R
        pair_of_row_M = (pair_in_block_M + first_received_pair_R[source_rank_M])[local_order_M]
        context = DispatchContext(
            token_of_pair_U=token_of_pair_U,
            pair_of_row_M=pair_of_row_M,
            weight_M=weight_received_M[local_order_M],
            pairs_sent=pairs_sent,
            pairs_received=pairs_received,
            num_tokens=num_tokens,
        )
        return x_received_VD[pair_of_row_M], received_RL.sum(dim=0), context

    def _dispatch_on_one_rank(
        self, x_TD: torch.Tensor, token_N: torch.Tensor, weight_N: torch.Tensor, assignments_L: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchContext]:
        """EP size 1: nothing crosses a network, so each assignment reads its token's row directly
        (the tokens are the "pairs") and the combine adds straight into the tokens."""
        num_tokens = x_TD.shape[0]
        self.tokens_sent_per_rank = count_routed_tokens(token_N, num_tokens)
        self.assignments_sent_per_rank = assignments_L.sum().reshape(1)
        context = DispatchContext(
            token_of_pair_U=None,
            pair_of_row_M=token_N,
            weight_M=weight_N,
            pairs_sent=[num_tokens],
            pairs_received=[num_tokens],
            num_tokens=num_tokens,
        )
        return x_TD[token_N], assignments_L, context

    def combine(self, y_MD: torch.Tensor, context: DispatchContext) -> torch.Tensor:
        """``[T, D]``: each token's expert outputs, weighted by the gate and summed, back on the rank
        the token came from."""
        # Sum each pair's weighted outputs here, so the return trip carries one row per pair too.
        y_pairs_VD = weighted_sum_rows(y_MD, context.weight_M, context.pair_of_row_M, sum(context.pairs_received))
        if context.token_of_pair_U is None:
            return y_pairs_VD  # one EP rank: the pairs are the tokens
        # The reverse all-to-all: what we received from rank r goes back to rank r.
        y_pairs_UD = all_to_all_single_autograd(y_pairs_VD, context.pairs_sent, context.pairs_received, self.ep_group)
        return weighted_sum_rows(y_pairs_UD, None, context.token_of_pair_U, context.num_tokens)

    def reduce_load(self, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """Expert load summed over every process (all of them route with the same replicated gate),
        so that bias-balanced gates stay identical on every rank."""
        load_E = tokens_per_expert_E.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load_E, op=dist.ReduceOp.SUM, group=self.load_group)
        return load_E
