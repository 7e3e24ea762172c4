"""Replica balancing from each step's counts (lightning_moe/parallel/replica_balance.py): the fitted
fractions are valid routing fractions, even out the ranks where the planned ones do not, keep tokens
on their node when that balances too, and survive empty steps; of its candidates the balancer keeps
the one the planner's cost model prices lowest, which keeps the planned fractions where balancing
would load a slow link. The dispatcher's use of them, across real processes, is in
test_ep_dispatch.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from lightning_moe.ops.tensor_operations import TensorOperations
from lightning_moe.parallel.placement import DEFAULT_ASSIGNMENT_SECONDS, ExpertPlacement
from lightning_moe.parallel.replica_balance import SPLITS, ReplicaBalancer
from lightning_moe.planning import LayerCost, PlacementPlan, Topology
from lightning_moe.planning.cost_model import assignment_seconds, estimate_plan


def _loads(counts_RE: torch.Tensor, fractions_RER: torch.Tensor) -> torch.Tensor:
    return torch.einsum("re,red->d", counts_RE.double(), fractions_RER)


def _best_max_load(counts_RE: torch.Tensor, holders_RE: torch.Tensor) -> float:
    """The smallest busiest-rank load any split over the replicas reaches (an LP: x[e, d] >= 0 on
    holders, sum_d x[e, d] = load of e, sum_e x[e, d] <= z, minimise z)."""
    load_E = counts_RE.sum(dim=0).double().numpy()
    pairs = [(e, d) for e in range(holders_RE.shape[1]) for d in range(holders_RE.shape[0]) if holders_RE[d, e]]
    n = len(pairs)
    cost = np.zeros(n + 1)
    cost[-1] = 1.0
    equal = np.zeros((len(load_E), n + 1))
    upper = np.zeros((holders_RE.shape[0], n + 1))
    for i, (e, d) in enumerate(pairs):
        equal[e, i] = 1.0
        upper[d, i] = 1.0
    upper[:, -1] = -1.0
    result = linprog(cost, A_ub=upper, b_ub=np.zeros(holders_RE.shape[0]), A_eq=equal, b_eq=load_E, method="highs")
    return float(result.fun)


def test_fitted_fractions_even_out_a_load_the_plan_did_not_expect():
    # 4 ranks, 8 experts, one spare slot each: experts 0-3 have a replica on the next rank.
    placement = ExpertPlacement.from_experts_per_rank([[0, 1, 3], [2, 3, 0], [4, 5, 1], [6, 7, 2]])
    nodes = torch.zeros(4, dtype=torch.long)
    counts_RE = torch.tensor([[40, 30, 5, 5, 5, 5, 5, 5]] * 4)  # experts 0 and 1 hot, the plan split evenly
    planned = _loads(counts_RE, placement.routing_fractions_RER)
    balancer = ReplicaBalancer(placement.routing_fractions_RER, placement.holders_RE, nodes)
    fitted_RER = balancer.fractions(counts_RE)
    fitted = _loads(counts_RE, fitted_RER)
    best = _best_max_load(counts_RE, placement.holders_RE)
    assert planned.max() > 1.2 * best
    assert fitted.max() < 1.005 * best
    # Valid fractions: rows sum to 1, nothing to a rank that does not hold the expert.
    torch.testing.assert_close(fitted_RER.sum(dim=-1), torch.ones(4, 8, dtype=torch.float64))
    assert (fitted_RER * ~placement.holders_RE.t()[None]).abs().max() == 0
    # The same counts give the same fractions (every rank computes them alone), and a rank's own
    # row alone (what the dispatcher asks for) is that row of the whole.
    again = ReplicaBalancer(placement.routing_fractions_RER, placement.holders_RE, nodes)  # another rank's
    assert torch.equal(again.fractions(counts_RE), fitted_RER)
    for rank in range(4):
        torch.testing.assert_close(balancer.fractions(counts_RE, source_rank=rank), fitted_RER[rank])


def test_a_local_plan_stays_local_when_that_balances():
    # 2 nodes x 2 ranks; experts 0 (hot) and 3 have a replica on each node, and the plan sends each
    # source's tokens for them to its own node's replica. The load changes (expert 0 heats up on
    # both nodes alike): the fit balances it without sending it across.
    experts_per_rank = [[0, 1], [2, 3], [4, 0], [5, 3]]
    nodes = torch.tensor([0, 0, 1, 1])
    holders_RE = ExpertPlacement.from_experts_per_rank(experts_per_rank).holders_RE
    local_RER = holders_RE.t()[None].double() * (nodes[:, None] == nodes[None, :])[:, None, :]
    plan_RER = torch.where(local_RER.sum(-1, keepdim=True) > 0, local_RER, holders_RE.t()[None].double().expand(4, -1, -1))
    placement = ExpertPlacement.from_experts_per_rank(experts_per_rank, plan_RER / plan_RER.sum(-1, keepdim=True))
    counts_RE = torch.tensor([[30, 10, 10, 10, 10, 10]] * 4)
    fitted_RER = ReplicaBalancer(placement.routing_fractions_RER, placement.holders_RE, nodes).fractions(counts_RE)
    fitted = _loads(counts_RE, fitted_RER)
    assert fitted.max() < 1.005 * _best_max_load(counts_RE, placement.holders_RE)
    crossing = sum(float(counts_RE[r].double() @ fitted_RER[r][:, nodes != nodes[r]].sum(dim=-1)) for r in range(4))
    # Experts 1, 2 (node 0 only) and 4, 5 (node 1 only) must cross: 80 of 320 assignments; no more
    # than the little mass the fit spreads over every holder.
    assert crossing < 80 + 0.01 * 320


def test_within_half_a_percent_of_the_best_balance_on_random_loads():
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        placement = ExpertPlacement.identity(8, 4, spare_slots=1)
        table = placement.experts_per_rank()
        for r in range(4):  # a random replica per rank, of an expert it does not hold yet
            others = [e for e in range(8) if e not in table[r][:2]]
            table[r][2] = others[int(torch.randint(len(others), (1,), generator=generator))]
        placement = ExpertPlacement.from_experts_per_rank(table)
        skew_E = torch.rand(8, generator=generator) ** 3 * 50 + 1
        counts_RE = torch.poisson(skew_E.expand(4, 8).contiguous(), generator=generator).long()
        nodes = torch.tensor([0, 0, 1, 1])
        balancer = ReplicaBalancer(placement.routing_fractions_RER, placement.holders_RE, nodes)
        fitted = _loads(counts_RE, balancer.fractions(counts_RE))
        assert fitted.max() < 1.005 * _best_max_load(counts_RE, placement.holders_RE), (trial, table)


def test_an_empty_step_gives_finite_fractions():
    placement = ExpertPlacement.identity(4, 2, spare_slots=1)
    balancer = ReplicaBalancer(placement.routing_fractions_RER, placement.holders_RE, torch.zeros(2, dtype=torch.long))
    fitted_RER = balancer.fractions(torch.zeros(2, 4, dtype=torch.int64))
    assert torch.isfinite(fitted_RER).all()
    torch.testing.assert_close(fitted_RER, placement.routing_fractions_RER)  # nothing to balance: as planned
    # A step where only one rank's experts are used: the idle rank's factor stays finite.
    counts_RE = torch.tensor([[10, 0, 0, 0], [10, 0, 0, 0]])
    assert torch.isfinite(balancer.candidates(counts_RE)).all()
    assert torch.isfinite(balancer.candidates(torch.zeros(2, 4, dtype=torch.int64))).all()


def test_a_fit_aims_at_the_plans_share_of_load():
    """A plan that gives rank 0 a little more than its even share (fewer bytes across nodes, say):
    one candidate keeps those shares when the load drifts, another flattens them."""
    placement = ExpertPlacement.from_experts_per_rank(
        [[0, 1, 3], [2, 3, 0], [4, 5, 1], [6, 7, 2]], load_share_R=torch.tensor([0.31, 0.23, 0.23, 0.23])
    )
    # The table's prices, as the dispatcher passes them: the table sets none, so the defaults.
    balancer = ReplicaBalancer(
        placement.routing_fractions_RER, placement.holders_RE, torch.zeros(4, dtype=torch.long), placement.load_share_R,
        placement.assignment_seconds,
    )
    unpriced = ReplicaBalancer(
        placement.routing_fractions_RER, placement.holders_RE, torch.zeros(4, dtype=torch.long), placement.load_share_R
    )
    assert balancer.prices == unpriced.prices == DEFAULT_ASSIGNMENT_SECONDS
    counts_RE = torch.tensor([[12, 10, 9, 11, 5, 5, 5, 5]] * 4)
    # One node: every node already computes what its sources send, so no node-matched twins. Each
    # target is fitted plainly and over-relaxed (the same split).
    planned, *fits, share_local, even_local, share_local_over, even_local_over = (
        _loads(counts_RE, c) for c in balancer.candidates(counts_RE)
    )
    to_share, to_even, to_share_over, to_even_over = fits
    assert balancer.split_of_candidate.tolist() == [0, 1, 2, 1, 2, 3, 4, 3, 4]
    torch.testing.assert_close(share_local, to_share)  # the local twins: the same load per rank
    torch.testing.assert_close(even_local, to_even)
    torch.testing.assert_close(share_local_over, to_share_over)
    torch.testing.assert_close(even_local_over, to_even_over)
    torch.testing.assert_close(planned, _loads(counts_RE, placement.routing_fractions_RER))
    for share, even in ((to_share, to_even), (to_share_over, to_even_over)):
        torch.testing.assert_close(share / share.sum(), placement.load_share_R, atol=2e-3, rtol=0)
        assert even.max() / even.mean() < 1.01
    # Only compute costs (the default prices): the even fit is the cheapest, and of it and its local
    # twin, the same load, the twin, which sends fewer tokens to other ranks (the ties' breaker).
    index, chosen_RER = balancer.choose(counts_RE)
    assert SPLITS[int(balancer.split_of_candidate[index])] == "even_share_local"
    assert _loads(counts_RE, chosen_RER).max() <= min(to_even.max(), to_even_over.max()) + 1e-9


def _local_plan(experts_per_rank, nodes):
    """Each source's tokens for an expert to the holders on its own node, where there are any."""
    holders_RE = ExpertPlacement.from_experts_per_rank(experts_per_rank).holders_RE
    local_RER = holders_RE.t()[None].double() * (nodes[:, None] == nodes[None, :])[:, None, :]
    plan_RER = torch.where(local_RER.sum(-1, keepdim=True) > 0, local_RER, holders_RE.t()[None].double().expand(len(nodes), -1, -1))
    return plan_RER / plan_RER.sum(-1, keepdim=True)


def test_a_slow_link_between_nodes_keeps_the_planned_fractions():
    """Expert 0 runs hot on node 0's sources only. Balancing sends some of it to node 1's replica:
    worth it when the link between nodes is fast, not when it is slow. Either way the choice is the
    candidate the cost model prices lowest."""
    experts_per_rank = [[0, 1], [2, 3], [4, 0], [5, 3]]
    nodes = torch.tensor([0, 0, 1, 1])
    placement = ExpertPlacement.from_experts_per_rank(experts_per_rank, _local_plan(experts_per_rank, nodes))
    counts_RE = torch.tensor([[60, 10, 10, 10, 10, 10], [60, 10, 10, 10, 10, 10], [5, 10, 10, 10, 10, 10], [5, 10, 10, 10, 10, 10]])
    cost = LayerCost(token_bytes=1000.0, seconds_per_token=1e-6)
    chosen = {}
    for inter in (1e12, 1e8):  # bytes/s between nodes: fast, then slow
        topology = Topology(2, 2, intra_node_bandwidth=1e12, inter_node_bandwidth=inter)
        balancer = ReplicaBalancer(placement.routing_fractions_RER, placement.holders_RE, nodes, None,
                                   assignment_seconds(cost, topology))
        fractions_RER = balancer.fractions(counts_RE)
        seconds = [estimate_plan(PlacementPlan(experts_per_rank, c), counts_RE.double(), topology, cost).layer_seconds
                   for c in balancer.candidates(counts_RE)]
        chosen[inter] = fractions_RER
        assert estimate_plan(PlacementPlan(experts_per_rank, fractions_RER), counts_RE.double(), topology, cost).layer_seconds == pytest.approx(min(seconds))
    torch.testing.assert_close(chosen[1e8], placement.routing_fractions_RER)  # slow: as planned, nothing crosses
    fast = _loads(counts_RE, chosen[1e12])
    assert fast.max() < 1.005 * _best_max_load(counts_RE, placement.holders_RE)  # fast: balanced
    assert _loads(counts_RE, placement.routing_fractions_RER).max() > 1.3 * fast.max()


def test_the_choice_is_the_cost_models_cheapest_on_random_steps():
    generator = torch.Generator().manual_seed(1)
    nodes = torch.tensor([0, 0, 1, 1])
    winners = set()
    for trial in range(30):
        table = [[0, 1, 4], [2, 3, 5], [4, 5, 0], [6, 7, 2]]
        placement = ExpertPlacement.from_experts_per_rank(table, _local_plan(table, nodes),
                                                          load_share_R=torch.rand(4, generator=generator) + 1.0)
        inter = float(10 ** (8 + 4 * torch.rand(1, generator=generator)))
        topology = Topology(2, 2, intra_node_bandwidth=1e12, inter_node_bandwidth=inter)
        cost = LayerCost(token_bytes=1000.0, seconds_per_token=1e-6)
        skew_E = torch.rand(8, generator=generator) ** 2 * 40 + 1
        counts_RE = torch.poisson((skew_E * (0.5 + torch.rand(4, 1, generator=generator))).contiguous(), generator=generator).long()
        balancer = ReplicaBalancer(placement.routing_fractions_RER, placement.holders_RE, nodes, placement.load_share_R,
                                   assignment_seconds(cost, topology))
        candidates = balancer.candidates(counts_RE)
        seconds = torch.tensor([estimate_plan(PlacementPlan(table, c), counts_RE.double(), topology, cost).layer_seconds
                                for c in candidates])
        fractions_RER = balancer.fractions(counts_RE)
        index = next(i for i, c in enumerate(candidates) if torch.equal(c, fractions_RER))
        chosen_index, chosen_RER = balancer.choose(counts_RE)
        assert int(chosen_index) == index and torch.equal(chosen_RER, fractions_RER)
        mine, my_RER = balancer.choose(counts_RE, source_rank=trial % 4)  # the dispatcher's call
        assert int(mine) == index and torch.equal(my_RER, fractions_RER[trial % 4])
        assert seconds[index] <= seconds.min() * (1 + 1e-12), (trial, seconds)
        winners.add(index)
    # The choice matters: the planned fractions, both fits, their local twins and a node-matched twin
    # are each the cheapest somewhere, and so are plain and over-relaxed fits (candidates 1 to 4: the
    # plan's share and the even one, plainly, then over-relaxed). The node-matched twin of the plan's
    # share (split 5) was the cheapest in 2 of these 30 steps before the over-relaxed fits came; the
    # over-relaxed fits themselves are cheaper there now (candidates 3 and 4).
    splits = {int(balancer.split_of_candidate[index]) for index in winners}
    assert splits >= {0, 1, 2, 3, 4, 6}, splits
    assert winners & {1, 2} and winners & {3, 4}, winners
    # The candidates' splits (planned; plan's share, even share, each fitted plainly then over-relaxed;
    # the fits' local and node-matched twins): with an even plan share there is one target, the even one.
    assert balancer.split_of_candidate.tolist() == [0, 1, 2, 1, 2, 3, 4, 3, 4, 5, 6, 5, 6]
    even = ReplicaBalancer(placement.routing_fractions_RER, placement.holders_RE, nodes)
    assert len(even.candidates(counts_RE)) == 7 and even.split_of_candidate.tolist() == [0, 2, 2, 4, 4, 6, 6]


def _crossing(counts_RE: torch.Tensor, fractions_RER: torch.Tensor, nodes: torch.Tensor) -> float:
    """Assignments sent to a rank of another node."""
    across_RR = (nodes[:, None] != nodes[None, :]).double()
    return float(torch.einsum("re,red,rd->", counts_RE.double(), fractions_RER, across_RR))


def test_a_local_twin_keeps_each_ranks_load_and_sends_the_nearest_replicas_first():
    """Experts 0 and 1 have a replica on each node, and the planned fractions (a plan for another
    load) split each source's tokens evenly over them. A fit keeps that mix, its one factor per
    rank being the same for every source, so half of those tokens cross nodes; its local twin gives
    every replica the same tokens from its own node. Where crossing costs, the twin is chosen."""
    experts_per_rank = [[0, 2], [1, 3], [0, 4], [1, 5]]
    nodes = torch.tensor([0, 0, 1, 1])
    placement = ExpertPlacement.from_experts_per_rank(experts_per_rank)  # even over replicas
    counts_RE = torch.tensor([[30, 20, 10, 10, 10, 10], [30, 20, 10, 10, 10, 10], [40, 10, 10, 10, 10, 10], [20, 30, 10, 10, 10, 10]])
    topology = Topology(2, 2, intra_node_bandwidth=1e12, inter_node_bandwidth=1e9)
    cost = LayerCost(token_bytes=1000.0, seconds_per_token=1e-6)
    balancer = ReplicaBalancer(placement.routing_fractions_RER, placement.holders_RE, nodes, None,
                               assignment_seconds(cost, topology))
    planned, even, _, even_local, *_ = balancer.candidates(counts_RE)  # the plain fit's (not over-relaxed)
    # The twin: the same tokens per replica (so per rank), valid fractions.
    torch.testing.assert_close(torch.einsum("re,red->ed", counts_RE.double(), even_local),
                               torch.einsum("re,red->ed", counts_RE.double(), even))
    torch.testing.assert_close(even_local.sum(dim=-1), torch.ones(4, 6, dtype=torch.float64))
    assert (even_local * ~placement.holders_RE.t()[None]).abs().max() == 0 and even_local.min() >= 0
    # Experts 2 to 5 have one holder each: 10 of their assignments from each of the 2 ranks of the
    # other node cross, 80 in all. Experts 0 and 1 (100 assignments each, 50 per node) need not cross
    # at all once the fit has split them 50/50 over the nodes; the fit sends half across.
    assert _crossing(counts_RE, even, nodes) > 80 + 50
    assert _crossing(counts_RE, even_local, nodes) == pytest.approx(80)
    # A source that holds a replica sends it its own tokens first: rank 0 keeps its 30 for expert 0.
    assert float(even_local[0, 0, 0]) == pytest.approx(1.0)
    seconds = [estimate_plan(PlacementPlan(experts_per_rank, c), counts_RE.double(), topology, cost).layer_seconds
               for c in (planned, even, even_local)]
    index, chosen_RER = balancer.choose(counts_RE)
    assert int(balancer.split_of_candidate[index]) == 4 and torch.equal(chosen_RER, even_local)
    assert seconds[2] < min(seconds[:2])


def test_a_local_twin_spreads_what_must_cross_and_keeps_rows_without_tokens():
    """Three nodes; random holders and counts: every twin keeps every replica's tokens, sends no more
    across nodes than its fit, and leaves a (source, expert) row with no tokens as the fit had it."""
    from lightning_moe.parallel.replica_balance import _as_fractions, nearest_first

    generator = torch.Generator().manual_seed(3)
    nodes = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    node_of_rank_RN = torch.nn.functional.one_hot(nodes).double()
    for trial in range(20):
        holders_RX = torch.rand(8, 5, generator=generator) < 0.4
        holders_RX[trial % 8] = True  # every expert held somewhere
        fractions_TRXR = torch.rand(2, 8, 5, 8, generator=generator, dtype=torch.float64) * holders_RX.t()[None, None]
        fractions_TRXR = fractions_TRXR / fractions_TRXR.sum(dim=-1, keepdim=True)
        counts_RX = torch.poisson(torch.rand(8, 5, generator=generator) * 40)
        counts_RX[trial % 8, trial % 5] = 0
        # The twin as the balancer makes it: the fit's tokens per replica, sent nearest first; the
        # assignments pricing reads are the twin's fractions times the counts.
        quota_TXR = torch.einsum("rx,trxd->txd", counts_RX.double(), fractions_TRXR)
        amounts_TRXR = nearest_first(quota_TXR, counts_RX, node_of_rank_RN)
        twin_TRXR = _as_fractions(amounts_TRXR, counts_RX.double(), fractions_TRXR)
        torch.testing.assert_close(amounts_TRXR, counts_RX.double()[None, :, :, None] * twin_TRXR)
        torch.testing.assert_close(torch.einsum("rx,trxd->txd", counts_RX.double(), twin_TRXR),
                                   torch.einsum("rx,trxd->txd", counts_RX.double(), fractions_TRXR))
        torch.testing.assert_close(twin_TRXR.sum(dim=-1), torch.ones(2, 8, 5, dtype=torch.float64))
        assert twin_TRXR.min() >= 0 and (twin_TRXR * ~holders_RX.t()[None, None]).abs().max() == 0
        for t in range(2):
            assert _crossing(counts_RX, twin_TRXR[t], nodes) <= _crossing(counts_RX, fractions_TRXR[t], nodes) + 1e-9
        torch.testing.assert_close(twin_TRXR[:, trial % 8, trial % 5], fractions_TRXR[:, trial % 8, trial % 5])


def test_a_node_matched_twin_gives_each_node_what_its_sources_send():
    """Experts 0 and 1 have a replica on each node, on ranks 0 and 2 (which hold both); node 0's
    sources send expert 0 three times what they send expert 1, node 1's the reverse. The even fit
    keeps about the plan's even mix on ranks 0 and 2 (near 40 of each expert each), so whichever
    source feeds them, near 20 assignments of each expert cross nodes; the node-matched twin gives
    rank 0 node 0's 60 and 20 and rank 2 node 1's, the same 80 per rank, and nothing of theirs
    crosses. Where crossing costs, the node-matched twin is chosen."""
    experts_per_rank = [[0, 1], [2, 3], [0, 1], [2, 3]]
    nodes = torch.tensor([0, 0, 1, 1])
    placement = ExpertPlacement.from_experts_per_rank(experts_per_rank)  # even over replicas
    counts_RE = torch.tensor([[30, 10, 10, 10], [30, 10, 10, 10], [10, 30, 10, 10], [10, 30, 10, 10]])
    topology = Topology(2, 2, intra_node_bandwidth=1e12, inter_node_bandwidth=1e9)
    cost = LayerCost(token_bytes=1000.0, seconds_per_token=1e-6)
    balancer = ReplicaBalancer(placement.routing_fractions_RER, placement.holders_RE, nodes, None,
                               assignment_seconds(cost, topology))
    planned, even, _, even_local, _, even_matched, _ = balancer.candidates(counts_RE)  # the plain fit's
    torch.testing.assert_close(_loads(counts_RE, even_matched), _loads(counts_RE, even))  # 80, 40, 80, 40
    torch.testing.assert_close(even_matched.sum(dim=-1), torch.ones(4, 4, dtype=torch.float64))
    assert (even_matched * ~placement.holders_RE.t()[None]).abs().max() == 0 and even_matched.min() >= 0
    assert _crossing(counts_RE, even_local, nodes) > 35
    assert _crossing(counts_RE, even_matched, nodes) == pytest.approx(0, abs=1e-3)
    index, chosen_RER = balancer.choose(counts_RE)
    assert SPLITS[int(balancer.split_of_candidate[index])] == "even_share_matched" and torch.equal(chosen_RER, even_matched)
    moved = balancer.to(torch.device("cpu"))  # what the dispatcher holds
    assert torch.equal(moved.choose(counts_RE, source_rank=2)[1], even_matched[2])
    # The strategy numbers nodes across the world: an EP group inside one node (node 3, say) has no
    # node-matched twins, as on node 0.
    inside = ReplicaBalancer(placement.routing_fractions_RER, placement.holders_RE, torch.full((4,), 3), None,
                             assignment_seconds(cost, topology))
    assert inside.split_of_candidate.tolist() == [0, 2, 2, 4, 4] and len(inside.candidates(counts_RE)) == 5


def test_node_matched_quotas_split_the_counts_and_keep_the_rank_loads():
    """Three nodes, random holders, splits and counts: the node-matched quotas are a split of every
    expert's tokens over its holders and keep every rank's load to within 1% of the mean rank load;
    sent nearest first, they send fewer assignments across nodes than the split's local twin in most
    splits, and fewer in all (a heuristic, not a bound: a few send more, and the cost model chooses)."""
    from lightning_moe.parallel.replica_balance import nearest_first, node_matched

    generator = torch.Generator().manual_seed(5)
    nodes = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    node_of_rank_RN = torch.nn.functional.one_hot(nodes).double()
    across_RR = (nodes[:, None] != nodes[None, :]).double()
    fewer, crossing_local, crossing_matched = 0, 0.0, 0.0
    for trial in range(40):
        holders_RX = torch.rand(8, 5, generator=generator) < 0.4
        holders_RX[trial % 8] = True  # every expert held somewhere
        fractions_TRXR = torch.rand(2, 8, 5, 8, generator=generator, dtype=torch.float64) * holders_RX.t()[None, None]
        fractions_TRXR = fractions_TRXR / fractions_TRXR.sum(dim=-1, keepdim=True)
        counts_RX = torch.poisson(torch.rand(8, 5, generator=generator) * 40, generator=generator).double()
        counts_RX[:, trial % 5] = 0  # an expert without tokens
        quota_TXR = torch.einsum("rx,trxd->txd", counts_RX, fractions_TRXR)
        matched_TXR = node_matched(quota_TXR, counts_RX, holders_RX.t().double(), node_of_rank_RN)
        torch.testing.assert_close(matched_TXR.sum(dim=-1), counts_RX.sum(dim=0).expand(2, -1))
        assert matched_TXR.min() >= 0 and (matched_TXR * ~holders_RX.t()[None]).abs().max() == 0
        loads_TR, matched_loads_TR = quota_TXR.sum(dim=1), matched_TXR.sum(dim=1)
        assert ((matched_loads_TR - loads_TR).abs() / loads_TR.mean(dim=-1, keepdim=True)).max() < 0.01
        # Sent nearest first: every replica gets its quota.
        local_TRXR, matched_TRXR = (nearest_first(q, counts_RX, node_of_rank_RN) for q in (quota_TXR, matched_TXR))
        torch.testing.assert_close(matched_TRXR.sum(dim=1), matched_TXR)
        torch.testing.assert_close(local_TRXR.sum(dim=1), quota_TXR)
        for t in range(2):
            local = float(torch.einsum("rxd,rd->", local_TRXR[t], across_RR))
            matched = float(torch.einsum("rxd,rd->", matched_TRXR[t], across_RR))
            fewer += matched < local - 1e-6 * float(counts_RX.sum())
            crossing_local, crossing_matched = crossing_local + local, crossing_matched + matched
    assert fewer >= 60 and crossing_matched < 0.9 * crossing_local  # of 80 splits (72 and 0.83 when written)


def test_a_round_is_a_handful_of_tensor_operations():
    """The dispatcher runs the balancer in every layer at every step, and on a GPU each tensor
    operation is a kernel launch, however small the tensors: the rounds must stay few operations. A
    round of the fits (side by side) is 8: two matrix products, a division, a fused multiply-add, a
    division, a power (the over-relaxed fits' exponent), a product and a clamp; a round of the
    node-matching 14 in its first half and 8 in its second, 11 on average. Counted as the difference between 20 and 10 rounds.
    Nothing is read back to the host: on a GPU that would wait for every kernel of the balancer."""
    placement = ExpertPlacement.from_experts_per_rank([[0, 1, 3], [2, 3, 0], [4, 5, 1], [6, 7, 2]])
    counts_RE = torch.tensor([[40, 30, 5, 5, 5, 5, 5, 5]] * 4)
    share_R = torch.tensor([0.31, 0.23, 0.23, 0.23])
    per_round = {}
    for nodes in (torch.zeros(4, dtype=torch.long), torch.tensor([0, 0, 1, 1])):
        counted = []
        for rounds in (10, 20):
            balancer = ReplicaBalancer(placement.routing_fractions_RER, placement.holders_RE, nodes, share_R, rounds=rounds)
            with TensorOperations() as operations:
                balancer.choose(counts_RE, source_rank=0)
            counted.append(operations.count)
            assert operations.read_back == []  # the choice stays on the device (a 0-d index would not)
        per_round[balancer.several_nodes] = (counted[1] - counted[0]) / 10
    assert per_round[False] <= 8  # one node: the fits alone
    assert per_round[True] <= 8 + 11  # several nodes: and the node-matching


def test_load_shares_are_checked_and_travel_with_the_table(tmp_path):
    placement = ExpertPlacement.identity(4, 2, spare_slots=1)
    shared = ExpertPlacement.from_experts_per_rank(placement.experts_per_rank(), load_share_R=torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(shared.load_share_R, torch.tensor([0.75, 0.25], dtype=torch.float64))
    assert shared != placement
    torch.save(shared.to_dict(), tmp_path / "table.pt")
    assert ExpertPlacement.from_dict(torch.load(tmp_path / "table.pt", weights_only=True)) == shared
    before_shares = {key: value for key, value in placement.to_dict().items() if key != "load_share_R"}
    assert ExpertPlacement.from_dict(before_shares) == placement  # tables saved before shares: even shares
    torch.testing.assert_close(placement.load_share_R, torch.full((2,), 0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="`load_share_R` must be 2 finite, non-negative shares"):
        ExpertPlacement.from_experts_per_rank(placement.experts_per_rank(), load_share_R=torch.tensor([1.0, -1.0]))


def test_assignment_prices_are_checked_and_travel_with_the_table(tmp_path):
    placement = ExpertPlacement.identity(4, 2, spare_slots=1)
    torch.testing.assert_close(placement.assignment_seconds, torch.tensor(DEFAULT_ASSIGNMENT_SECONDS, dtype=torch.float64))
    priced = ExpertPlacement.from_experts_per_rank(placement.experts_per_rank(), assignment_seconds=[2e-6, 1e-7, 4e-7])
    assert priced != placement
    torch.save(priced.to_dict(), tmp_path / "table.pt")
    assert ExpertPlacement.from_dict(torch.load(tmp_path / "table.pt", weights_only=True)) == priced
    before_prices = {key: value for key, value in placement.to_dict().items() if key != "assignment_seconds"}
    assert ExpertPlacement.from_dict(before_prices) == placement  # tables saved before prices: compute only
    with pytest.raises(ValueError, match="`assignment_seconds` must be 3 finite, non-negative prices"):
        ExpertPlacement.from_experts_per_rank(placement.experts_per_rank(), assignment_seconds=[1.0, -1.0, 0.0])
