"""The all-to-all dispatcher in real gloo processes (world 2, EP 2), on a hand-built routing.

Each token crosses to a remote rank once, however many of that rank's experts it uses, and the
results (outputs, input gradients, gate-weight gradients, expert gradients) equal the single-process
dispatcher over the same tokens; under device-limited routing with replicas, a token is served by the
replicas on its kept ranks only; with replica balancing, the split over replicas evens the ranks out
from the step's counts, unless the table's prices make the planned split cheaper. Each rank asserts in its own process (``worker``); the test reads
the files they write.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_moe.ops.tensor_operations import TensorOperations, copies_of
from lightning_moe.parallel.dispatch import AllToAllDispatcher

WORLD, NUM_EXPERTS, TOKENS, D_MODEL, D_FF = 2, 4, 6, 8, 4
PLACEMENT = [[2, 0], [3, 1]]  # permuted: rank 0 holds experts 2 and 0, rank 1 holds 3 and 1
# (token, expert) assignments of every rank; rank 1 also sends token 3 to expert 3.
ASSIGNMENTS = [
    (0, 2), (0, 0),  # both experts on rank 0
    (1, 3), (1, 1),  # both on rank 1
    (2, 0), (2, 3),  # one on each rank
    (4, 1),  # token 3 has no expert (on rank 0)
    (5, 0), (5, 1), (5, 2), (5, 3),  # four experts on two ranks
]
EXTRA_ON_RANK_1 = [(3, 3)]
# Distinct tokens each rank sends to ranks 0 and 1, and the assignments, counted by hand.
EXPECTED_TOKENS_SENT = {0: [3, 4], 1: [3, 5]}
EXPECTED_ASSIGNMENTS_SENT = {0: [5, 6], 1: [5, 7]}
# Experts 0 and 1 replicated on both ranks; the ranks each token may reach (device-limited routing):
# token 5 uses experts 2 and 3, so it keeps both ranks.
REPLICATED_PLACEMENT = [[2, 0, 1], [3, 1, 0]]
KEPT_RANKS = [[1, 0], [0, 1], [0, 1], [0, 1], [1, 0], [1, 1]]
EXPECTED_TOKENS_SENT_LIMITED = {0: [3, 3], 1: [3, 4]}
# A plan that sends every assignment of the replicated experts 0 and 1 to rank 0.
ALL_TO_RANK_0 = torch.tensor(
    [[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]] * WORLD, dtype=torch.float64
)
# A plan that keeps each source's assignments of experts 0 and 1 on its own rank: ranks 0 and 1
# receive 10 and 13 assignments, and 3 and 2 cross between them.
EACH_TO_ITSELF = torch.tensor(
    [[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]],
    dtype=torch.float64,
)
# Prices of one assignment (computed, sent within the node, sent across nodes): only compute counts,
# then only sending does (the table's default, compute with transfers breaking ties, is the `True` case).
PRICES = {"compute": [1.0, 0.0, 0.0], "sending": [0.0, 1.0, 0.0]}


def routing_of(rank: int, generator: torch.Generator):
    from lightning_moe.layers.gates.base import Routing

    pairs = ASSIGNMENTS + (EXTRA_ON_RANK_1 if rank == 1 else [])
    token_N, expert_N = torch.tensor(pairs).t()
    weight_N = torch.rand(len(pairs), generator=generator).requires_grad_()
    return Routing(token_index_N=token_N, expert_index_N=expert_N, weight_N=weight_N, num_tokens=TOKENS)


def inputs_of(rank: int):
    generator = torch.Generator().manual_seed(100 + rank)
    x_TD = torch.randn(TOKENS, D_MODEL, generator=generator).requires_grad_()
    grad_TD = torch.randn(TOKENS, D_MODEL, generator=generator)
    return x_TD, routing_of(rank, generator), grad_TD


def run(dispatcher, experts, x_TD, routing, grad_TD):
    """The output and the traffic of one dispatch, with a backward; nothing but the split sizes is
    read back to the host on the way, and no table of the placement is copied from the host (after a
    first dispatch, which copies them and builds the replica balancer, once per placement)."""
    dispatcher.dispatch(x_TD.detach(), routing)
    placement = getattr(dispatcher, "placement", None)
    tables = [value for value in vars(placement).values() if isinstance(value, torch.Tensor)] if placement else []
    with TensorOperations() as operations, copies_of(tables) as copied:
        dispatched = dispatcher.dispatch(x_TD, routing)
        y_TD = dispatcher.combine(experts(dispatched.rows, dispatched.rows_per_slot), dispatched.context)
        y_TD.backward(grad_TD)
    if isinstance(dispatcher, AllToAllDispatcher):
        assert operations.read_back == [], operations.read_back
        assert copied == [], copied  # the placement's host tables reach the device once, not per step
    return y_TD.detach(), dispatched.traffic


def shard(full, experts_per_rank: list[list[int]], rank: int, fractions_RER=None, balance_replicas=False, prices=None):
    """This rank's dispatcher and slots (copies of ``full``'s experts) under a placement."""
    import torch.distributed as dist

    from lightning_moe.layers.experts import Experts
    from lightning_moe.parallel.dispatch import AllToAllDispatcher
    from lightning_moe.parallel.placement import ExpertPlacement

    placement = ExpertPlacement.from_experts_per_rank(experts_per_rank, fractions_RER, assignment_seconds=prices)
    slots = placement.experts_on_rank(rank)
    local = Experts(num_experts=len(slots), d_model=D_MODEL, d_ff=D_FF)
    with torch.no_grad():
        local.w_in.copy_(full.w_in[slots])
        local.w_out.copy_(full.w_out[slots])
    dispatcher = AllToAllDispatcher(
        placement=placement, ep_rank=rank, ep_group=dist.group.WORLD, balance_replicas=balance_replicas
    )
    return dispatcher, local, slots


def worker(out_dir: Path) -> None:
    import torch.distributed as dist

    from lightning_moe.layers.dispatch import LocalDispatcher
    from lightning_moe.layers.experts import Experts

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    full = Experts(num_experts=NUM_EXPERTS, d_model=D_MODEL, d_ff=D_FF, init_std=0.3)

    # Reference: every rank's tokens through all experts in this one process.
    reference = {}
    for source in range(WORLD):
        x_TD, routing, grad_TD = inputs_of(source)
        y_TD, _ = run(LocalDispatcher(NUM_EXPERTS), full, x_TD, routing, grad_TD)
        reference[source] = (y_TD, x_TD.grad, routing.weight_N.grad)

    # Expert parallel: this rank's slots of the same experts, this rank's tokens.
    dispatcher, local, slots = shard(full, PLACEMENT, rank)
    x_TD, routing, grad_TD = inputs_of(rank)
    y_TD, traffic = run(dispatcher, local, x_TD, routing, grad_TD)

    assert traffic.tokens_sent_per_rank.tolist() == EXPECTED_TOKENS_SENT[rank], traffic.tokens_sent_per_rank
    assert traffic.assignments_sent_per_rank.tolist() == EXPECTED_ASSIGNMENTS_SENT[rank]
    y_ref, x_grad_ref, weight_grad_ref = reference[rank]
    torch.testing.assert_close(y_TD, y_ref)
    if rank == 0:
        assert torch.all(y_TD[3] == 0)  # a token with no expert gets nothing
    torch.testing.assert_close(x_TD.grad, x_grad_ref)
    torch.testing.assert_close(routing.weight_N.grad, weight_grad_ref)
    # An expert's gradient sums the contributions of both ranks' tokens, as in the reference.
    torch.testing.assert_close(local.w_in.grad, full.w_in.grad[slots])
    torch.testing.assert_close(local.w_out.grad, full.w_out.grad[slots])

    # Device-limited routing with replicas: experts 0 and 1 are on both ranks. A token kept to one
    # rank is served there alone (token 2 takes expert 0 on rank 1, its kept rank, not rank 0); the
    # output is the same function.
    dispatcher, local, _ = shard(full, REPLICATED_PLACEMENT, rank)
    x_TD, routing, grad_TD = inputs_of(rank)
    routing.allowed_devices_TG = torch.tensor(KEPT_RANKS, dtype=torch.bool)
    y_TD, limited = run(dispatcher, local, x_TD, routing, grad_TD)
    assert limited.tokens_sent_per_rank.tolist() == EXPECTED_TOKENS_SENT_LIMITED[rank], limited.tokens_sent_per_rank
    torch.testing.assert_close(y_TD, y_ref)
    torch.testing.assert_close(x_TD.grad, x_grad_ref)

    # Replica balancing: the plan sends every token of experts 0 and 1 to rank 0 (16 of the 23
    # assignments); fitted to the step's counts, the split evens the ranks out. Same function.
    sent, kept = {}, {}
    for balance in (False, True):
        dispatcher, local, _ = shard(full, REPLICATED_PLACEMENT, rank, ALL_TO_RANK_0, balance_replicas=balance)
        x_TD, routing, grad_TD = inputs_of(rank)
        y_TD, balanced = run(dispatcher, local, x_TD, routing, grad_TD)
        torch.testing.assert_close(y_TD, y_ref)
        torch.testing.assert_close(x_TD.grad, x_grad_ref)
        sent[str(balance)] = balanced.assignments_sent_per_rank.tolist()
        kept[str(balance)] = None if balanced.replica_split is None else balanced.replica_split.tolist()
    # The table's prices reach the balancer: balancing the plan that keeps tokens on their rank costs
    # 1.5 more assignments sent, so when only sending costs, the plan's split is kept.
    for name, prices in PRICES.items():
        dispatcher, local, _ = shard(full, REPLICATED_PLACEMENT, rank, EACH_TO_ITSELF, balance_replicas=True, prices=prices)
        x_TD, routing, grad_TD = inputs_of(rank)
        y_TD, priced = run(dispatcher, local, x_TD, routing, grad_TD)
        torch.testing.assert_close(y_TD, y_ref)
        sent[name] = priced.assignments_sent_per_rank.tolist()
        kept[name] = priced.replica_split.tolist()
    (out_dir / f"rank{rank}.json").write_text(
        json.dumps({"tokens_sent": traffic.tokens_sent_per_rank.tolist(), "assignments_sent": sent, "kept": kept})
    )
    dist.destroy_process_group()


@pytest.mark.parametrize("operation", ["mask_index", "mask_assign", "masked_select", "unique", "item", "nonzero"])
def test_the_recorder_sees_every_read_back(operation):
    """What `run` relies on: every operation whose output size (or value) the host must read is
    recorded, boolean-mask indexing and `unique` too (their `nonzero` runs below the dispatch mode);
    indexing with integers reads nothing back."""
    x = torch.arange(6.0)
    mask = x > 2
    operations_of = {
        "mask_index": lambda: x[mask], "mask_assign": lambda: x.clone().index_put_((mask,), torch.zeros(())),
        "masked_select": lambda: torch.masked_select(x, mask), "unique": lambda: torch.unique(x),
        "item": lambda: x.sum().item(), "nonzero": lambda: mask.nonzero(),
    }
    with TensorOperations() as operations:
        operations_of[operation]()
    assert len(operations.read_back) == 1, operations.read_back
    with TensorOperations() as operations:
        x[torch.tensor([0, 2])]
        x.clone().index_put_((torch.tensor([1]),), torch.zeros(()))
    assert operations.read_back == []


def test_tokens_cross_once_per_rank_and_results_match_one_process(tmp_path):
    from dist_workers.launch import launch

    launch(Path(__file__), [str(tmp_path)], world_size=WORLD, timeout=60, log_dir=tmp_path / "logs")
    for rank in range(WORLD):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["tokens_sent"] == EXPECTED_TOKENS_SENT[rank]
    received = {
        balance: np.sum([json.loads((tmp_path / f"rank{r}.json").read_text())["assignments_sent"][balance]
                         for r in range(WORLD)], axis=0).tolist()
        for balance in ("False", "True", *PRICES)
    }
    assert received["False"] == [16, 7]  # the plan's fractions
    assert abs(received["True"][0] - received["True"][1]) <= 2, received  # fitted to the step: 11.5 each
    assert abs(received["compute"][0] - received["compute"][1]) <= 2, received  # balanced
    assert received["sending"] == [10, 13], received  # the plan's split: nothing more crosses
    # Which split each step kept (planned, plan's share, even share, their local twins, and their
    # node-matched twins, which one node, as here, does not have), the same on every rank: none without balancing; a fit where it balanced; the planned fractions where only
    # sending costs. Under the table's default prices (compute, transfers breaking ties) the even
    # fit's local twin: the same load per rank, and rank 0 keeps all 6 of its assignments of the
    # replicated experts, of which the fit sends 0.013 to rank 1 (in expectation).
    kept = [json.loads((tmp_path / f"rank{r}.json").read_text())["kept"] for r in range(WORLD)]
    assert all(k == kept[0] for k in kept)
    assert kept[0]["False"] is None
    assert kept[0]["True"] == [0, 0, 0, 0, 1, 0, 0]
    assert kept[0]["compute"][0] == 0 and sum(kept[0]["compute"]) == 1
    assert kept[0]["sending"] == [1, 0, 0, 0, 0, 0, 0]


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
