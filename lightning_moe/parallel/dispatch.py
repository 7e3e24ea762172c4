"""All-to-all token dispatch for expert parallelism.

:class:`AllToAllDispatcher` has the same methods as
:class:`~lightning_moe.layers.dispatch.LocalDispatcher`, so :class:`~lightning_moe.MoELayer` runs
unchanged; :class:`~lightning_moe.MoEStrategy` swaps it in at setup.

A token whose experts sit on one remote rank crosses the network once, however many of that rank's
experts it uses (the de-duplication of DeepEP and Megatron-Core's "flex" dispatcher). One dispatch,
on every rank of an expert-parallel (EP) group:

1. pick the rank of each assignment: the expert's only holder; for an expert with replicas, the
   replica this rank's routing fractions give (:func:`~lightning_moe.layers.replicas.choose_replica_ranks`),
   among the token's kept ranks under device-limited routing. The fractions are the placement's,
   or, with ``balance_replicas``, chosen for the step's counts over the EP group
   (:mod:`~lightning_moe.parallel.replica_balance`); a rank the gate chose (device-level capacity)
   is kept. Then its physical position ``rank * S + slot`` through the
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

The host reads one thing per dispatch, the split sizes of the all-to-alls (step 3, one copy);
everything else stays on the device, so on a GPU the host waits for the kernels once per dispatch.

``combine`` weights each expert output, sums the outputs of one pair *before* sending them back
(so the return trip also carries one row per pair), and adds the returned rows into their tokens.
With one EP rank nothing is sent: the dispatcher is the
:class:`~lightning_moe.layers.dispatch.LocalDispatcher`, the one code path of a single rank.

Shape legend: ``T`` tokens, ``N`` assignments routed by this rank, ``U`` pairs sent by this rank,
``V`` pairs received, ``M`` assignments received, ``D`` model width, ``R`` EP ranks, ``L`` local
expert slots (``S`` in the placement), ``E`` logical experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

from lightning_moe.layers.dispatch import (
    Dispatched,
    DispatchTraffic,
    LocalDispatcher,
    drop_over_capacity,
    weighted_sum_rows,
)
from lightning_moe.layers.gates.base import Routing
from lightning_moe.layers.replicas import allowed_replicas, choose_replica_ranks
from lightning_moe.ops.counting import count_per_expert
from lightning_moe.parallel.placement import ExpertPlacement
from lightning_moe.parallel.replica_balance import SPLITS, ReplicaBalancer


@dataclass
class DispatchContext:
    """What :meth:`AllToAllDispatcher.combine` needs from the matching dispatch."""

    token_of_pair_U: torch.Tensor  # token of each pair sent, by destination rank
    pair_of_row_M: torch.Tensor  # received pair each expert-input row was copied from
    weight_M: torch.Tensor  # gate weight of each expert-input row
    pairs_sent: list[int]  # pairs sent to each EP rank
    pairs_received: list[int]  # pairs received from each EP rank
    num_tokens: int


class AllToAllDispatcher:
    """Sends each token once to every EP rank that holds one of its experts, and brings the
    weighted sum of those experts' outputs back.

    Args:
        placement: the layer's slot table, identical on every rank.
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
        balance_replicas: bool = False,
        node_of_rank: torch.Tensor | None = None,
    ) -> None:
        self.ep_rank = ep_rank
        self.ep_group = ep_group
        self.load_group = load_group
        self.configure_replica_balance(balance_replicas, node_of_rank)
        self.set_placement(placement)

    def configure_replica_balance(self, enabled: bool, node_of_rank: torch.Tensor | None = None) -> None:
        """Whether the tokens of replicated experts are split from each step's counts
        (:mod:`~lightning_moe.parallel.replica_balance`) rather than by the placement's fixed
        fractions; ``node_of_rank``: ``[R]``, the node of each EP rank (``None``: one node)."""
        self.balance_replicas = bool(enabled)
        self.node_of_rank = None if node_of_rank is None else torch.as_tensor(node_of_rank).long()
        self._balancer: ReplicaBalancer | None = None  # of the placement in force, made on first use

    @property
    def num_local_experts(self) -> int:
        return self.placement.slots_per_rank

    def set_placement(self, placement: ExpertPlacement) -> None:
        """Use ``placement`` from the next dispatch on (the caller moves the expert weights: see
        :mod:`lightning_moe.parallel.migration`)."""
        current = getattr(self, "placement", None)
        if current is not None and not current.same_layout(placement):
            raise ValueError(
                f"A new placement must keep num_experts={current.num_experts}, ep_size={current.ep_size} and "
                f"slots_per_rank={current.slots_per_rank}, got {placement.num_experts}, {placement.ep_size} and "
                f"{placement.slots_per_rank}."
            )
        self.placement = placement
        self._balancer = None
        self.ep_size = placement.ep_size
        self.num_experts = placement.num_experts
        self._local: LocalDispatcher | None = None
        if self.ep_size == 1:
            self._local = LocalDispatcher(placement.num_experts, slot_of_expert_E=placement.slot_of_expert_ER[:, 0])

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> Dispatched:
        """Rows for this rank's experts, grouped by local slot; rows per slot ``[L]``; the context; the traffic."""
        if self._local is not None:
            return self._local.dispatch(x_TD, routing)
        # Under a capacity, the dropped assignments go nowhere (the split sizes below are read back
        # anyway; padding every expert to its capacity would send the padding over the network).
        routing = drop_over_capacity(routing)
        placement = self.placement
        ranks, slots = self.ep_size, self.num_local_experts
        num_tokens, device = x_TD.shape[0], x_TD.device
        # 1. Destination rank and physical position of each assignment; sorted by position,
        # assignments are grouped by destination rank and, inside a rank, by slot.
        expert_N = routing.expert_index_N
        replica_split = None
        if routing.device_index_N is not None:
            rank_N = routing.device_index_N
        elif placement.has_replicas:
            holders_RE = placement.on_device("holders_RE", device)
            allowed_NR = allowed_replicas(routing.allowed_devices_TG, routing.token_index_N, expert_N, holders_RE)
            cumulative_ER, replica_split = self._replica_cumulative_ER(expert_N)
            rank_N = choose_replica_ranks(expert_N, cumulative_ER, allowed_NR)
        else:
            rank_N = placement.on_device("file_rank_E", device)[expert_N]  # each expert's only holder
        physical_N = rank_N * slots + placement.on_device("slot_of_expert_ER", device)[expert_N, rank_N]
        send_order_N = torch.argsort(physical_N, stable=True)
        assignments_RL = count_per_expert(physical_N, ranks * slots).view(ranks, slots)
        token_sorted_N = routing.token_index_N[send_order_N]
        weight_sorted_N = routing.weight_N[send_order_N]

        # 2. The distinct (rank, token) pairs, rank-major, and each assignment's pair in its rank's block.
        rank_sorted_N = rank_N[send_order_N]
        needed_RT = torch.zeros(ranks, num_tokens, dtype=torch.bool, device=device)
        needed_RT[rank_sorted_N, token_sorted_N] = True
        pair_of_cell_RT = (torch.cumsum(needed_RT.view(-1), 0) - 1).view(ranks, num_tokens)
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
        # The sizes known, nothing else is read back: on a GPU every read waits for the kernels before it.
        token_of_pair_U = torch.nonzero_static(needed_RT, size=sum(pairs_sent))[:, 1]
        traffic = DispatchTraffic(
            tokens_sent_per_rank=pairs_per_rank_R, assignments_sent_per_rank=assignments_RL.sum(1), replica_split=replica_split
        )

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
        block_of_row_M = torch.repeat_interleave(
            torch.arange(ranks * slots, device=device), received_RL.reshape(-1), output_size=sum(assignments_received)
        )
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
        return Dispatched(x_received_VD[pair_of_row_M], received_RL.sum(dim=0), context, traffic)

    def _replica_cumulative_ER(self, expert_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's cumulative routing fractions ``[E, R]``: the placement's, or, with replica
        balancing, chosen for this step's counts of every rank of the EP group (one all-reduce); and,
        with balancing, which split the step kept (one-hot ``[7]`` over ``replica_balance.SPLITS``,
        on the device: nothing is read back)."""
        placement, device = self.placement, expert_N.device
        if not self.balance_replicas:
            return placement.on_device("cumulative_fractions_RER", device)[self.ep_rank], None
        if self._balancer is None or self._balancer.fractions_RER.device != device:
            nodes = self.node_of_rank if self.node_of_rank is not None else torch.zeros(self.ep_size, dtype=torch.long)
            self._balancer = ReplicaBalancer(
                placement.routing_fractions_RER, placement.holders_RE, nodes, placement.load_share_R,
                placement.assignment_seconds,
            ).to(device)
        counts_RE = torch.zeros(self.ep_size, self.num_experts, dtype=torch.int64, device=device)
        counts_RE[self.ep_rank] = count_per_expert(expert_N, self.num_experts)
        dist.all_reduce(counts_RE, group=self.ep_group)
        index, fractions_ER = self._balancer.choose(counts_RE, source_rank=self.ep_rank)
        cumulative_ER = fractions_ER.cumsum(dim=-1)
        cumulative_ER[:, -1] = 1.0  # no assignment may fall past the last replica
        # A one-hot by comparison: indexing with the 0-d ``index`` or ``one_hot``'s range check would read
        # it back to the host.
        kept = self._balancer.split_of_candidate.index_select(0, index.view(1))
        split = (kept == torch.arange(len(SPLITS), device=device)).long()
        return cumulative_ER, split

    def combine(self, y_MD: torch.Tensor, context: DispatchContext) -> torch.Tensor:
        """``[T, D]``: each token's expert outputs, weighted by the gate and summed, back on the rank
        the token came from."""
        if self._local is not None:
            return self._local.combine(y_MD, context)
        # Sum each pair's weighted outputs here, so the return trip carries one row per pair too.
        y_pairs_VD = weighted_sum_rows(y_MD, context.weight_M, context.pair_of_row_M, sum(context.pairs_received))
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
