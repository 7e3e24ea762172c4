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
from lightning_moe.parallel.dispatch import AllToAllDispatcher
from lightning_moe.parallel.grad_sync import clip_grad_norm_global
from lightning_moe.parallel.placement import ExpertPlacement
from lightning_moe.parallel.sharding import shard_layer


def test_placement_identity_and_permuted():
    identity = ExpertPlacement.identity(8, 4)
    assert identity.experts_per_rank() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    permuted = ExpertPlacement.from_experts_per_rank([[5, 0], [7, 2], [1, 3], [6, 4]])
    assert permuted.rank_of_expert_E.tolist() == [0, 2, 1, 2, 3, 0, 3, 1]
    assert permuted.slot_of_expert_E.tolist() == [1, 0, 1, 1, 1, 0, 0, 0]
    assert permuted.experts_on_rank(1) == [7, 2]
    assert ExpertPlacement.from_experts_per_rank(permuted.experts_per_rank()) == permuted


@pytest.mark.parametrize(
    ("experts_per_rank", "message"),
    [([[0, 1], [1, 2]], "exactly once"), ([[0, 1], [2]], "spread evenly"), ([[0, 1, 2], [3]], "exactly once")],
)
def test_placement_rejects_bad_tables(experts_per_rank, message):
    with pytest.raises(ValueError, match=message):
        ExpertPlacement.from_experts_per_rank(experts_per_rank)
    with pytest.raises(ValueError, match="not divisible by expert_parallel_size=3"):
        ExpertPlacement.identity(4, 3)


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
    for dispatcher in (sharded.dispatcher, reference.dispatcher):
        assert dispatcher.assignments_sent_per_rank.tolist() == [int(sharded.tokens_per_expert.sum())]
        if capacity_factor is None:
            assert dispatcher.tokens_sent_per_rank.tolist() == [12]


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
    with pytest.raises(ValueError, match="cannot reach top_k=3"):
        layer.gate.set_expert_groups(groups, 1)


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
    with pytest.raises(ValueError, match="`device_limited_routing` must be None or a positive integer"):
        MoEStrategy(device_limited_routing=0)
    with pytest.raises(ValueError, match="`expert_placement` lists 1 ranks but expert_parallel_size=2"):
        MoEStrategy(expert_parallel_size=2, expert_placement=[[0, 1]])
