"""Device-level balance (DeepSeek-V2 Sec. 2.2.2-2.2.3) in the topk and sigmoid gates: the device-level
and communication balance losses against their formulas recomputed by hand, their generalisation to
replicas, device-level token dropping, and what happens without expert parallelism."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_moe import MoELayer
from lightning_moe.layers.gates import SigmoidGate, TopKGate
from lightning_moe.layers.gates.device_balance import ExpertDevices

LOGITS = [[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.5, 0.0], [-1.0, 0.2, 0.0, 2.5], [1.0, 1.1, 0.9, 0.0]]


def identity_gate(gate, num_experts: int = 4):
    gate.build(num_experts, num_experts)
    with torch.no_grad():
        gate.weight.copy_(torch.eye(num_experts))
    return gate


def devices(share_GE: list[list[float]]) -> ExpertDevices:
    share = torch.tensor(share_GE)
    return ExpertDevices(share_GE=share, cumulative_EG=share.t().cumsum(dim=1), holders_GE=share > 0)


def softmax(row):
    exps = [math.exp(v) for v in row]
    return [v / sum(exps) for v in exps]


def test_device_and_communication_losses_match_deepseek_v2_without_replicas():
    """2 devices holding experts {0, 1} and {2, 3}; top-2 of 4 experts, 4 tokens."""
    gate = identity_gate(TopKGate(top_k=2, load_balance_coef=0.0, device_balance_coef=1.0,
                                  communication_balance_coef=1.0))
    gate.set_expert_devices(devices([[1, 1, 0, 0], [0, 0, 1, 1]]))
    routing = gate(torch.tensor(LOGITS))
    probs = [softmax(row) for row in LOGITS]
    chosen = [sorted(range(4), key=lambda e: -row[e])[:2] for row in LOGITS]
    num_tokens, top_k, num_experts, num_devices = 4, 2, 4, 2
    f = [num_experts / (top_k * num_tokens) * sum(e in c for c in chosen) for e in range(4)]  # eq. 11
    p = [sum(row[e] for row in probs) / num_tokens for e in range(4)]
    groups = [[0, 1], [2, 3]]
    f_dev = [sum(f[e] for e in g) / len(g) for g in groups]  # eq. 15
    p_dev = [sum(p[e] for e in g) for g in groups]  # eq. 16
    expected_device = sum(a * b for a, b in zip(f_dev, p_dev))  # eq. 14
    sent = [sum(any(e in g for e in c) for c in chosen) for g in groups]
    f_comm = [num_devices / (min(top_k, num_devices) * num_tokens) * s for s in sent]  # eq. 18 (M = 2)
    expected_comm = sum(a * b for a, b in zip(f_comm, p_dev))  # eq. 17, P'' = P'
    assert routing.aux_losses["device_balance_loss"].value.item() == pytest.approx(expected_device, rel=1e-6)
    assert routing.aux_losses["communication_balance_loss"].value.item() == pytest.approx(expected_comm, rel=1e-6)
    # Only the affinities carry gradient.
    routing.aux_losses["device_balance_loss"].value.backward()
    assert gate.weight.grad.abs().sum() > 0


def test_balanced_routing_gives_one():
    torch.manual_seed(0)
    gate = identity_gate(TopKGate(top_k=1, load_balance_coef=0.0, device_balance_coef=1.0,
                                  communication_balance_coef=1.0))
    gate.set_expert_devices(devices([[1, 1, 0, 0], [0, 0, 1, 1]]))
    x = torch.eye(4).repeat(8, 1) * 30.0  # each expert its own quarter of the tokens, probability ~1
    routing = gate(x)
    assert routing.aux_losses["device_balance_loss"].value.item() == pytest.approx(1.0, abs=1e-6)
    assert routing.aux_losses["communication_balance_loss"].value.item() == pytest.approx(1.0, abs=1e-6)


def test_replicas_split_an_experts_load_by_the_routing_fractions():
    """Expert 0 replicated on both devices, this rank sending it 3/4 to device 1: the device load is the
    share-weighted load, and the chance to reach a device comes from the shares."""
    share = [[0.25, 1, 0, 0], [0.75, 0, 1, 1]]
    gate = identity_gate(TopKGate(top_k=1, load_balance_coef=0.0, device_balance_coef=1.0,
                                  communication_balance_coef=1.0))
    gate.set_expert_devices(devices(share))
    x = torch.tensor([[30.0, 0, 0, 0]] * 4)  # every token to expert 0, probability ~1
    routing = gate(x)
    f = [4 / (1 * 4) * 4, 0, 0, 0]  # all 4 assignments to expert 0
    p = [1.0, 0, 0, 0]
    f_dev = [2 / 4 * sum(share[g][e] * f[e] for e in range(4)) for g in range(2)]
    p_dev = [sum(share[g][e] * p[e] for e in range(4)) for g in range(2)]
    expected = sum(a * b for a, b in zip(f_dev, p_dev))
    assert routing.aux_losses["device_balance_loss"].value.item() == pytest.approx(expected, rel=1e-5)
    f_comm = [2 / (1 * 4) * 4 * share[g][0] for g in range(2)]
    expected_comm = sum(a * b for a, b in zip(f_comm, p_dev))
    assert routing.aux_losses["communication_balance_loss"].value.item() == pytest.approx(expected_comm, rel=1e-5)


@pytest.mark.parametrize("gate_class", [TopKGate, SigmoidGate])
def test_device_capacity_drops_the_lowest_affinity_first(gate_class):
    """8 assignments, 2 devices, factor 1.0: each device keeps 4, the ones with the highest affinity."""
    kwargs = {"load_balance_coef": 0.0} if gate_class is TopKGate else {"bias_update_rate": 0.0}
    gate = identity_gate(gate_class(top_k=1, device_capacity_factor=1.0, **kwargs))
    gate.set_expert_devices(devices([[1, 1, 0, 0], [0, 0, 1, 1]]))
    strength = torch.tensor([8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    x = torch.zeros(8, 4)
    x[:6, 0] = strength[:6]  # six tokens want expert 0 (device 0), with falling confidence
    x[6:, 2] = strength[6:]  # two want expert 2 (device 1)
    routing = gate(x)
    assert routing.num_dropped == 2
    assert sorted(routing.token_index_N.tolist()) == [0, 1, 2, 3, 6, 7]  # tokens 4, 5 were the weakest
    assert routing.device_index_N.tolist() == [0 if e < 2 else 1 for e in routing.expert_index_N.tolist()]
    layer = MoELayer(d_model=4, d_ff=4, num_experts=4, gate=gate_class(top_k=1, device_capacity_factor=1.0,
                                                                       **kwargs))
    with torch.no_grad():
        layer.gate.weight.copy_(torch.eye(4))
    layer.gate.set_expert_devices(devices([[1, 1, 0, 0], [0, 0, 1, 1]]))
    layer(x)
    assert int(layer.dropped_tokens) == 2 and int(layer.routed_tokens) == 8


def test_without_expert_parallelism_there_is_nothing_to_balance():
    layer = MoELayer(d_model=8, d_ff=8, num_experts=4, gate="topk", gate_kwargs={"device_balance_coef": 0.05})
    with pytest.warns(UserWarning, match="there is nothing to balance"):
        layer(torch.randn(6, 8))
    assert "device_balance_loss" not in layer.aux_losses
    with pytest.raises(ValueError, match="device_capacity_factor"):
        TopKGate(device_capacity_factor=0.0)
