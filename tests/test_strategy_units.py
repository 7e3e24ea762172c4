"""Single-process checks of the expert-parallel pieces: placement, dispatcher, device-limited
routing, global-norm clipping, strategy arguments (the checkpoint format: test_checkpoint.py).

The multi-process behaviour is tested in test_strategy_ep.py.
"""

from __future__ import annotations


import lightning as L
import pytest
import torch

from lightning_moe import MoELayer, MoEStrategy
from lightning_moe.layers.dispatch import LocalDispatcher
from lightning_moe.layers.gates.device_balance import ExpertDevices
from lightning_moe.layers.replicas import allowed_replicas, choose_replica_ranks
from lightning_moe.parallel.dispatch import AllToAllDispatcher
from lightning_moe.parallel.grad_sync import clip_grad_norm_global
from lightning_moe.parallel.placement import ExpertPlacement
from lightning_moe.parallel.sharding import shard_layer


def test_placement_identity_permuted_and_with_spare_slots():
    identity = ExpertPlacement.identity(8, 4)
    assert identity.experts_per_rank() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert not identity.has_replicas and identity.file_rank_E.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    permuted = ExpertPlacement.from_experts_per_rank([[5, 0], [7, 2], [1, 3], [6, 4]])
    assert permuted.file_rank_E.tolist() == [0, 2, 1, 2, 3, 0, 3, 1]
    assert permuted.slot_of_expert_ER[0].tolist() == [1, -1, -1, -1]  # expert 0: slot 1 of rank 0
    assert permuted.experts_on_rank(1) == [7, 2]
    assert ExpertPlacement.from_experts_per_rank(permuted.experts_per_rank()) == permuted

    # One spare slot per rank: rank r's spare holds the first expert of the next rank's block.
    spare = ExpertPlacement.identity(8, 4, spare_slots=1)
    assert spare.experts_per_rank() == [[0, 1, 2], [2, 3, 4], [4, 5, 6], [6, 7, 0]]
    assert spare.replicas_E.tolist() == [2, 1, 2, 1, 2, 1, 2, 1] and spare.has_replicas
    assert spare.file_rank_E.tolist() == [0, 0, 0, 1, 1, 2, 2, 3]  # stored once, by the first holder
    # Even split over the replicas, from every source rank.
    assert spare.routing_fractions_RER[1, 2].tolist() == [0.5, 0.5, 0.0, 0.0]
    assert spare.routing_fractions_RER[3, 3].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert ExpertPlacement.from_dict(spare.to_dict()) == spare

    # What the dispatcher and the gradient hooks take at every step, made once per device: the same
    # tensors on the second call (a copy from the host per step would wait for the GPU).
    cpu = torch.device("cpu")
    assert spare.on_device("slot_of_expert_ER", cpu) is spare.on_device("slot_of_expert_ER", cpu)
    slots, rows, num_replicated = spare.replicated_slots(1, cpu)  # rank 1 holds 2, 3, 4; 2 and 4 replicated
    assert (slots.tolist(), rows.tolist(), num_replicated) == ([0, 2], [1, 2], 4)  # rows of experts 0, 2, 4, 6
    assert spare.replicated_slots(1, cpu)[0] is slots


@pytest.mark.parametrize(
    ("experts_per_rank", "message"),
    [
        ([[0, 1], [1, 3]], "at least once"),  # expert 2 is missing
        ([[0, 1], [2]], "same, non-zero number of slots"),
        ([[0, 0, 1], [2, 3, 1]], "an expert twice"),
        ([[0, 1], [2, 5]], "at least once"),
        ([[0, 1], [2.5, 3]], "integer expert ids"),  # int() took it as expert 2
        ([[0, 1], [float("inf"), 3]], "integer expert ids"),  # an OverflowError, not a ValueError
        ([[0, 1], [2, 10**30]], "at least once"),  # an OverflowError building range(10**30)
        ([[0, 1], [-1, 2]], "from 0 up"),
    ],
)
def test_placement_rejects_bad_tables(experts_per_rank, message):
    with pytest.raises(ValueError, match=message):
        ExpertPlacement.from_experts_per_rank(experts_per_rank)
    with pytest.raises(ValueError, match="not divisible by expert_parallel_size=3"):
        ExpertPlacement.identity(4, 3)
    with pytest.raises(ValueError, match="spare_expert_slots=3 does not fit"):
        ExpertPlacement.identity(4, 2, spare_slots=3)


def test_placement_routing_fractions_are_checked():
    table = [[0, 1, 2], [2, 3, 0]]
    fractions = ExpertPlacement.from_experts_per_rank(table).routing_fractions_RER.clone()
    fractions[0, 2] = torch.tensor([0.9, 0.1])  # source 0 keeps most of expert 2 at home
    placement = ExpertPlacement.from_experts_per_rank(table, fractions)
    assert placement.routing_fractions_RER[0, 2].tolist() == pytest.approx([0.9, 0.1])
    wrong = fractions.clone()
    wrong[0, 1] = torch.tensor([0.5, 0.5])  # rank 1 does not hold expert 1
    with pytest.raises(ValueError, match="does not hold it"):
        ExpertPlacement.from_experts_per_rank(table, wrong)
    wrong = fractions.clone()
    wrong[1, 0] = torch.tensor([0.5, 0.2])
    with pytest.raises(ValueError, match="must sum to 1"):
        ExpertPlacement.from_experts_per_rank(table, wrong)
    with pytest.raises(ValueError, match=r"shape \[R_src, E, R_dst\]"):
        ExpertPlacement.from_experts_per_rank(table, fractions[:, :3])


def test_replica_choice_follows_the_fractions():
    from lightning_moe.layers.replicas import allowed_replicas, choose_replica_ranks

    cumulative_ER = torch.tensor([[1.0, 1.0, 1.0], [0.25, 0.25, 1.0], [0.0, 0.5, 1.0]])  # expert 0 on rank 0 only
    expert_N = torch.tensor([1] * 8 + [0] * 3 + [2] * 4)[torch.randperm(15, generator=torch.Generator().manual_seed(0))]
    rank_N = choose_replica_ranks(expert_N, cumulative_ER)
    assert rank_N[expert_N == 0].tolist() == [0, 0, 0]
    assert sorted(rank_N[expert_N == 1].tolist()) == [0, 0, 2, 2, 2, 2, 2, 2]  # a quarter, three quarters
    assert sorted(rank_N[expert_N == 2].tolist()) == [1, 1, 2, 2]  # rank 0 has a zero share
    # Deterministic: the first assignments of an expert (in priority order) go to the first replica.
    assert rank_N[expert_N == 1].tolist()[:2] == [0, 0]


def _layer(**kwargs) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(d_model=8, d_ff=4, num_experts=4, init_std=0.3, **kwargs)


@pytest.mark.parametrize("experts_per_rank", [[[0, 1, 2, 3]], [[2, 0, 3, 1]]])
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_dispatcher_with_any_placement_matches_local(experts_per_rank, capacity_factor):
    """The all-to-all dispatcher (one EP rank, no collective) with a permuted table: same outputs and
    the same gradients, per logical expert, as the plain local dispatcher."""
    reference, sharded = _layer(capacity_factor=capacity_factor), _layer(capacity_factor=capacity_factor)
    placement = ExpertPlacement.from_experts_per_rank(experts_per_rank)
    shard_layer(sharded, placement=placement, ep_rank=0, ep_group=None)
    assert isinstance(sharded.dispatcher, AllToAllDispatcher) and isinstance(reference.dispatcher, LocalDispatcher)
    x = torch.randn(2, 6, 8)
    grad = torch.randn(2, 6, 8)
    out_ref, out = reference(x), sharded(x)
    torch.testing.assert_close(out, out_ref)
    out_ref.backward(grad)
    out.backward(grad)
    slots = placement.experts_on_rank(0)
    torch.testing.assert_close(sharded.experts.w_in.grad, reference.experts.w_in.grad[slots])
    torch.testing.assert_close(sharded.experts.w_out.grad, reference.experts.w_out.grad[slots])
    torch.testing.assert_close(sharded.gate.weight.grad, reference.gate.weight.grad)
    # One row per token that kept an assignment, however many of its experts it uses.
    for layer in (sharded, reference):
        assert layer.traffic.assignments_sent_per_rank.tolist() == [int(sharded.tokens_per_expert.sum())]
        if capacity_factor is None:
            assert layer.traffic.tokens_sent_per_rank.tolist() == [12]


def test_device_limited_routing_keeps_tokens_on_few_groups():
    layer = MoELayer(d_model=8, d_ff=4, num_experts=8, top_k=3)
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    layer.gate.set_expert_groups(groups, 2)
    routing = layer.gate(torch.randn(64, 8))
    experts_TK = routing.expert_index_N.view(3, 64).t()
    assert all(len(set(groups[row].tolist())) <= 2 for row in experts_TK)
    # Lifting the limit restores plain top-k; a limit that cannot reach top_k is refused.
    layer.gate.set_expert_groups(None, None)
    assert layer.gate.limit_to_expert_groups(torch.ones(2, 8)).isfinite().all()
    with pytest.raises(ValueError, match="fewer than top_k=3"):
        layer.gate.set_expert_groups(groups, 1)


@pytest.mark.parametrize("plan", ["even", "first_holder"])
@pytest.mark.parametrize("gate", ["topk", "sigmoid", "noisy_topk", "dynamic"])
def test_device_limited_routing_with_replicas_reaches_only_the_kept_ranks(gate, plan):
    """Experts 0, 2, 4 and 6 have a replica on another rank. A token limited to one rank must be
    served there: the replica of each assignment is chosen among its token's kept ranks, in their
    routing fractions (by the dispatcher, and by the gate's device-level capacity drop), or evenly
    when the plan gives the kept replica no share (``first_holder``: every token of a replicated
    expert planned to its first holder)."""
    table = [[0, 1, 4], [2, 3, 6], [4, 5, 0], [6, 7, 2]]
    fractions_RER = None
    if plan == "first_holder":
        first_RE = ExpertPlacement.from_experts_per_rank(table).file_rank_E
        fractions_RER = torch.nn.functional.one_hot(first_RE, 4).double().expand(4, -1, -1)
    placement = ExpertPlacement.from_experts_per_rank(table, fractions_RER)
    options = {"dynamic": {"threshold": 0.9, "max_k": 2}}.get(gate, {})
    if gate in ("topk", "sigmoid"):
        options["device_capacity_factor"] = 4.0  # every assignment kept; the gate chooses the replicas
    layer = MoELayer(d_model=8, d_ff=4, num_experts=8, gate=gate, top_k=2, gate_kwargs=options)
    layer.gate.set_expert_groups(placement.holders_RE, 1)
    layer.gate.set_expert_devices(ExpertDevices(
        share_GE=placement.routing_fractions_RER[0].t().float().contiguous(),
        cumulative_EG=placement.cumulative_fractions_RER[0],
        holders_GE=placement.holders_RE,
    ))
    torch.manual_seed(0)
    routing = layer.gate(torch.randn(512, 8))
    assert routing.allowed_devices_TG is not None and routing.allowed_devices_TG.sum(dim=1).eq(1).all()
    allowed_NR = allowed_replicas(routing.allowed_devices_TG, routing.token_index_N, routing.expert_index_N,
                                  placement.holders_RE)
    cumulative_ER = placement.cumulative_fractions_RER[0]
    ranks_N = choose_replica_ranks(routing.expert_index_N, cumulative_ER, allowed_NR)
    if routing.device_index_N is not None:  # the gate chose them (device-level capacity)
        assert torch.equal(routing.device_index_N, ranks_N)
    assert placement.holders_RE[ranks_N, routing.expert_index_N].all()
    assert allowed_NR[torch.arange(ranks_N.numel()), ranks_N].all()  # fan-out 1: the token's kept rank
    # Without the kept ranks, tokens fan out to two ranks (the replicas split evenly, or all go to
    # the first holder, whichever rank the token kept).
    unlimited_N = choose_replica_ranks(routing.expert_index_N, cumulative_ER)
    assert not allowed_NR[torch.arange(ranks_N.numel()), unlimited_N].all()


def test_replica_choice_among_allowed_ranks_keeps_their_fractions():
    # Expert 0 on ranks 0, 1, 2 in fractions 0.2 / 0.3 / 0.5; expert 1 on rank 3 only.
    fractions_ER = torch.tensor([[0.2, 0.3, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    cumulative_ER = fractions_ER.cumsum(dim=1).float()
    experts_N = torch.tensor([0] * 1000 + [1] * 10)
    everything_NR = torch.ones(1010, 4, dtype=torch.bool)
    assert torch.equal(choose_replica_ranks(experts_N, cumulative_ER, everything_NR),
                       choose_replica_ranks(experts_N, cumulative_ER))
    allowed_NR = everything_NR.clone()
    allowed_NR[:1000, 2] = False  # expert 0 may use ranks 0 and 1 only: 0.4 / 0.6 of its assignments
    ranks_N = choose_replica_ranks(experts_N, cumulative_ER, allowed_NR)
    assert torch.bincount(ranks_N, minlength=4).tolist() == [400, 600, 0, 10]


def test_global_norm_clipping_matches_torch_on_one_rank():
    layers = [_layer(), _layer()]
    x, grad = torch.randn(3, 8), torch.randn(3, 8)
    for layer in layers:
        layer(x).backward(grad)
    expected = torch.nn.utils.clip_grad_norm_(layers[0].parameters(), 0.01)
    norm = clip_grad_norm_global(list(layers[1].parameters()), 0.01, ep_group=None, ep_size=1)
    torch.testing.assert_close(norm, expected)
    for p, q in zip(layers[0].parameters(), layers[1].parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_strategy_arguments_and_registry():
    trainer = L.Trainer(strategy="moe", accelerator="cpu", devices=1, logger=False)
    assert isinstance(trainer.strategy, MoEStrategy) and trainer.strategy.expert_parallel_size == 1
    with pytest.raises(ValueError, match="`expert_parallel_size` must be a positive integer, got 0"):
        MoEStrategy(expert_parallel_size=0)
    assert MoEStrategy().balance_replicas is True and MoEStrategy(balance_replicas=False).balance_replicas is False
    with pytest.raises(ValueError, match="`device_limited_routing` must be None or a positive integer"):
        MoEStrategy(device_limited_routing=0)
    with pytest.raises(ValueError, match="`expert_placement` lists 1 ranks but expert_parallel_size=2"):
        MoEStrategy(expert_parallel_size=2, expert_placement=[[0, 1]])
    # The table sets the slots; a spare count that disagrees with it is named, not ignored.
    strategy = MoEStrategy(expert_parallel_size=2, expert_placement=[[3, 0], [1, 2]], spare_expert_slots=1)
    with pytest.raises(ValueError, match="gives each rank 2 slots, but spare_expert_slots=1 asks for 3"):
        strategy._placement_for(4)
    agreeing = MoEStrategy(expert_parallel_size=2, expert_placement=[[3, 0, 1], [1, 2, 3]], spare_expert_slots=1)
    assert agreeing._placement_for(4).slots_per_rank == 3
