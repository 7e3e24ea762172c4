"""Replica balancing from each step's counts (lightning_moe/parallel/replica_balance.py): the fitted
fractions are valid routing fractions, even out the ranks where the planned ones do not, keep tokens
on their node when that balances too, and survive empty steps. The dispatcher's use of them, across
real processes, is in test_ep_dispatch.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from lightning_moe.parallel.placement import ExpertPlacement
from lightning_moe.parallel.replica_balance import ReplicaBalancer, balanced_fractions, balancing_weights


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
    weights = balancing_weights(placement.routing_fractions_RER, placement.holders_RE, nodes)
    counts_RE = torch.tensor([[40, 30, 5, 5, 5, 5, 5, 5]] * 4)  # experts 0 and 1 hot, the plan split evenly
    planned = _loads(counts_RE, placement.routing_fractions_RER)
    fitted_RER = balanced_fractions(weights, counts_RE)
    fitted = _loads(counts_RE, fitted_RER)
    best = _best_max_load(counts_RE, placement.holders_RE)
    assert planned.max() > 1.2 * best
    assert fitted.max() < 1.005 * best
    # Valid fractions: rows sum to 1, nothing to a rank that does not hold the expert.
    torch.testing.assert_close(fitted_RER.sum(dim=-1), torch.ones(4, 8, dtype=torch.float64))
    assert (fitted_RER * ~placement.holders_RE.t()[None]).abs().max() == 0
    # The same counts give the same fractions (every rank computes them alone), and a rank's own
    # row alone (what the dispatcher asks for) is that row of the whole.
    assert torch.equal(balanced_fractions(weights, counts_RE), fitted_RER)
    for rank in range(4):
        torch.testing.assert_close(ReplicaBalancer(weights).fractions(counts_RE, source_rank=rank), fitted_RER[rank])


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
    weights = balancing_weights(placement.routing_fractions_RER, placement.holders_RE, nodes)
    counts_RE = torch.tensor([[30, 10, 10, 10, 10, 10]] * 4)
    fitted_RER = balanced_fractions(weights, counts_RE)
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
        weights = balancing_weights(placement.routing_fractions_RER, placement.holders_RE, torch.tensor([0, 0, 1, 1]))
        fitted = _loads(counts_RE, balanced_fractions(weights, counts_RE))
        assert fitted.max() < 1.005 * _best_max_load(counts_RE, placement.holders_RE), (trial, table)


def test_an_empty_step_gives_finite_fractions():
    placement = ExpertPlacement.identity(4, 2, spare_slots=1)
    weights = balancing_weights(placement.routing_fractions_RER, placement.holders_RE, torch.zeros(2, dtype=torch.long))
    fitted_RER = balanced_fractions(weights, torch.zeros(2, 4, dtype=torch.int64))
    assert torch.isfinite(fitted_RER).all()
    torch.testing.assert_close(fitted_RER.sum(dim=-1), torch.ones(2, 4, dtype=torch.float64))
    # A step where only one rank's experts are used: the idle rank's factor stays finite.
    counts_RE = torch.tensor([[10, 0, 0, 0], [10, 0, 0, 0]])
    assert torch.isfinite(balanced_fractions(weights, counts_RE)).all()


def test_the_fit_aims_at_the_plans_share_of_load():
    """A plan that gives rank 0 a little more than its even share (fewer bytes across nodes, say):
    the fit keeps those shares when the load drifts, instead of flattening them."""
    placement = ExpertPlacement.from_experts_per_rank(
        [[0, 1, 3], [2, 3, 0], [4, 5, 1], [6, 7, 2]], load_share_R=torch.tensor([0.31, 0.23, 0.23, 0.23])
    )
    weights = balancing_weights(placement.routing_fractions_RER, placement.holders_RE, torch.zeros(4, dtype=torch.long))
    counts_RE = torch.tensor([[12, 10, 9, 11, 5, 5, 5, 5]] * 4)
    fitted = _loads(counts_RE, balanced_fractions(weights, counts_RE, placement.load_share_R))
    torch.testing.assert_close(fitted / fitted.sum(), placement.load_share_R, atol=2e-3, rtol=0)
    even = _loads(counts_RE, balanced_fractions(weights, counts_RE))
    assert even.max() / even.mean() < 1.01  # without shares: even


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
