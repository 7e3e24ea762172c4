"""Each gate against its published formula on small hand-checkable inputs, inside an MoELayer, and
its configuration errors.

The router weight is set to the identity so that the logits are the numbers written in the test;
expected ids, weights and losses are recomputed here with plain Python math, not the gates' helpers.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_moe.layers import MoELayer, collect_aux_loss, register_global_batch_end
from lightning_moe.layers.dispatch import LocalDispatcher
from lightning_moe.layers.gates import GATES, DynamicGate, ExpertChoiceGate, NoisyTopKGate, SigmoidGate, TopKGate


def softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [v / sum(exps) for v in exps]


def cv_squared(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values) / mean**2


def switch_loss(probs: list[list[float]], experts: list[int], num_experts: int) -> float:
    """Fedus et al. 2021, eq. 4: E * sum_e f_e P_e, f over the assignments made."""
    fraction = [experts.count(e) / len(experts) for e in range(num_experts)]
    mean_prob = [sum(row[e] for row in probs) / len(probs) for e in range(num_experts)]
    return num_experts * sum(f * p for f, p in zip(fraction, mean_prob))


def identity_gate(gate, num_experts: int, d_model: int | None = None):
    """Build ``gate`` with W = I, so that the logits of x are x's first ``num_experts`` features."""
    gate.build(d_model or num_experts, num_experts)
    with torch.no_grad():
        gate.weight.copy_(torch.eye(num_experts, d_model or num_experts))
    return gate


def ranked(row: list[float]) -> list[int]:
    return sorted(range(len(row)), key=lambda e: -row[e])


LOGITS = [[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.5, 0.0], [-1.0, 0.2, 0.0, 2.5]]


# ----------------------------------------------------------------------------- top-k (Switch, Mixtral)


def test_topk_k1_switch_weight_is_top_probability():
    gate = identity_gate(TopKGate(top_k=1, normalize=False, load_balance_coef=0.0), 4)
    routing = gate(torch.tensor(LOGITS))
    expected_ids = [ranked(row)[0] for row in LOGITS]
    expected_weights = [softmax(row)[e] for row, e in zip(LOGITS, expected_ids)]
    assert routing.token_index_N.tolist() == [0, 1, 2]
    assert routing.expert_index_N.tolist() == expected_ids == [0, 1, 3]
    torch.testing.assert_close(routing.weight_N, torch.tensor(expected_weights))


def test_topk_normalizes_by_default_only_when_k_exceeds_one():
    assert not TopKGate(top_k=1).normalize  # Switch: y = p_i(x) E_i(x)
    assert TopKGate(top_k=2).normalize  # Mixtral / GShard
    assert TopKGate(top_k=1, normalize=True).normalize and not TopKGate(top_k=2, normalize=False).normalize


def test_switch_top1_router_gets_gradient_from_the_task_loss():
    """With top-1 and renormalised weights every weight is exactly 1 and the router learns nothing from
    the task loss; Switch's default (the raw probability) must give it a real gradient."""
    torch.manual_seed(0)
    layer = MoELayer(d_model=16, d_ff=16, num_experts=4, gate="topk", top_k=1,
                     gate_kwargs={"load_balance_coef": 0.0}, init_std=0.2)
    x = torch.randn(64, 16)
    layer(x).pow(2).sum().backward()
    grad_norm = layer.gate.weight.grad.norm().item()
    assert grad_norm > 1e-2, grad_norm

    renormalised = MoELayer(d_model=16, d_ff=16, num_experts=4, gate="topk", top_k=1,
                            gate_kwargs={"load_balance_coef": 0.0, "normalize": True}, init_std=0.2)
    renormalised.load_state_dict(layer.state_dict())
    renormalised(x).pow(2).sum().backward()
    assert renormalised.gate.weight.grad.norm().item() < 1e-6 * grad_norm


@pytest.mark.parametrize("gate", sorted(GATES))
def test_gate_weights_follow_the_layer_init_std(gate):
    torch.manual_seed(0)
    kwargs = {"expert_choice": {"capacity_factor": 2.0}}.get(gate)
    layer = MoELayer(d_model=64, d_ff=8, num_experts=32, gate=gate, top_k=2, gate_kwargs=kwargs, init_std=0.5)
    assert layer.gate.weight.std().item() == pytest.approx(0.5, rel=0.05)


def test_topk_k2_renormalised_in_k_major_order():
    gate = identity_gate(TopKGate(top_k=2, normalize=True, load_balance_coef=0.0), 4)
    routing = gate(torch.tensor(LOGITS))
    first, second, w1, w2 = [], [], [], []
    for row in LOGITS:
        probs, (a, b) = softmax(row), ranked(row)[:2]
        first.append(a), second.append(b)
        w1.append(probs[a] / (probs[a] + probs[b])), w2.append(probs[b] / (probs[a] + probs[b]))
    assert routing.token_index_N.tolist() == [0, 1, 2, 0, 1, 2]
    assert routing.expert_index_N.tolist() == first + second
    torch.testing.assert_close(routing.weight_N, torch.tensor(w1 + w2))


def test_switch_load_balance_loss_value():
    gate = identity_gate(TopKGate(top_k=2, load_balance_coef=0.01), 4)
    routing = gate(torch.tensor(LOGITS))
    experts = [e for k in range(2) for e in (ranked(row)[k] for row in LOGITS)]
    expected = switch_loss([softmax(row) for row in LOGITS], experts, 4)
    aux = routing.aux_losses["load_balance_loss"]
    assert aux.coefficient == 0.01
    torch.testing.assert_close(aux.value, torch.tensor(expected))


class OtherRanksCounts(LocalDispatcher):
    """A dispatcher whose load reduction adds fixed counts, as if other ranks had routed them."""

    def __init__(self, num_experts: int, others_E: torch.Tensor) -> None:
        super().__init__(num_experts)
        self.others_E = others_E

    def reduce_load(self, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        return tokens_per_expert_E + self.others_E


@pytest.mark.parametrize("make_gate", [
    lambda: TopKGate(top_k=2, load_balance_coef=1.0, load_balance_scope="global"),
    lambda: DynamicGate(threshold=0.6, max_k=2, load_balance_coef=1.0, load_balance_scope="global"),
    lambda: SigmoidGate(top_k=2, load_balance_coef=1.0, load_balance_scope="global"),
], ids=["topk", "dynamic", "sigmoid"])
def test_global_load_balance_counts_through_the_layers_dispatcher(make_gate):
    """``load_balance_scope="global"``: ``f_e`` from the counts the layer's dispatcher reduces (here
    with other ranks' counts added), ``P_e`` from this rank's tokens alone.

    The loss ``E sum_e f_e P_e`` is linear in ``f``: other ranks that routed a huge number of tokens
    to expert ``e`` alone make it ``E P_e``, which gives ``P`` without the gate's formula."""
    torch.manual_seed(0)
    moe = MoELayer(d_model=8, d_ff=4, num_experts=4, gate=make_gate())
    x_TD = torch.randn(6, 8)

    def loss_with(others_E: torch.Tensor) -> torch.Tensor:
        moe.dispatcher = OtherRanksCounts(4, others_E)
        moe(x_TD)
        return moe.aux_losses["load_balance_loss"].value.detach().double()

    probs_E = torch.stack([loss_with(1e12 * torch.eye(4, dtype=torch.long)[e]) / 4 for e in range(4)])
    others_E = torch.tensor([30, 0, 0, 10])
    counts_E = (moe.tokens_per_expert + others_E).double()
    torch.testing.assert_close(loss_with(others_E), 4 * (counts_E / counts_E.sum() * probs_E).sum(), rtol=1e-6, atol=0)
    local_E = moe.tokens_per_expert.double()
    torch.testing.assert_close(loss_with(torch.zeros(4, dtype=torch.long)), 4 * (local_E / local_E.sum() * probs_E).sum(),
                               rtol=1e-6, atol=0)
    assert not torch.allclose(loss_with(others_E), loss_with(torch.zeros(4, dtype=torch.long)))
    # In evaluation the counts stay this rank's: a forward one rank runs alone waits for no one.
    moe.eval()
    torch.testing.assert_close(loss_with(others_E), 4 * (local_E / local_E.sum() * probs_E).sum(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("gate", ["topk", "dynamic", "sigmoid"])
def test_global_load_balance_pools_the_micro_batches_until_the_optimizer_step(gate):
    """Once an optimizer step ends each global batch (``register_global_batch_end``), the ``k``-th
    micro-batch's ``f_e`` counts micro-batches ``1..k`` (and the other ranks'); the step starts a
    new count. Before that registration, each forward counts alone: nothing would restart a pool."""
    torch.manual_seed(0)
    kwargs = {"topk": {"top_k": 2}, "dynamic": {"threshold": 0.6, "max_k": 2}, "sigmoid": {"top_k": 2}}[gate]
    moe = MoELayer(d_model=8, d_ff=4, num_experts=4, gate=gate,
                   gate_kwargs={**kwargs, "load_balance_coef": 1.0, "load_balance_scope": "global"})
    others_E = torch.tensor([3, 0, 0, 1])
    moe.dispatcher = OtherRanksCounts(4, others_E)
    with torch.no_grad():  # a confident router (P_e far from even: f_e shows in the loss) ...
        moe.gate.weight.mul_(50)
    # ... and micro-batch k leans towards expert k, so that each one's f_e is far from the pool's.
    direction_ED = moe.gate.weight.detach() / moe.gate.weight.detach().norm(dim=1, keepdim=True)
    micro_batches = [torch.randn(6, 8) + 3 * direction_ED[k] for k in range(3)]

    def probs_E(x_TD: torch.Tensor) -> torch.Tensor:
        """``P_e`` of ``x_TD``: the loss is linear in ``f``, and the counts of a huge pool on one expert
        read it off (the layer left as it was)."""
        pooled, flag = moe.global_batch_load.clone(), moe.pool_micro_batches
        moe.pool_micro_batches = True
        columns = []
        for e in range(4):
            moe.global_batch_load.copy_(10**12 * torch.eye(4, dtype=torch.long)[e])
            moe.record_routing = False  # reads the pool without adding to it
            columns.append(moe.gate(x_TD).aux_losses["load_balance_loss"].value.detach().double() / 4)
        moe.record_routing, moe.pool_micro_batches = True, flag
        moe.global_batch_load.copy_(pooled)
        return torch.stack(columns)

    def loss(counts_E: torch.Tensor, x_TD: torch.Tensor) -> torch.Tensor:
        counts_E = counts_E.double()
        return 4 * (counts_E / counts_E.sum() * probs_E(x_TD)).sum()

    def forward(x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        moe(x_TD)
        return moe.aux_losses["load_balance_loss"].value.detach().double(), moe.tokens_per_expert + others_E

    # Not registered: every micro-batch is balanced on its own (and the other ranks').
    value, own_E = forward(micro_batches[0])
    torch.testing.assert_close(value, loss(own_E, micro_batches[0]), rtol=1e-6, atol=0)
    value, second_E = forward(micro_batches[1])
    torch.testing.assert_close(value, loss(second_E, micro_batches[1]), rtol=1e-6, atol=0)

    optimizer = torch.optim.SGD(moe.parameters(), lr=0.0)
    assert register_global_batch_end(optimizer, moe)
    pooled_E = torch.zeros(4, dtype=torch.long)
    for x_TD in micro_batches:
        value, counts_E = forward(x_TD)
        pooled_E += counts_E
        torch.testing.assert_close(value, loss(pooled_E, x_TD), rtol=1e-6, atol=0)
    assert not torch.allclose(value, loss(counts_E, micro_batches[-1]))  # the pool changed the loss
    optimizer.step()  # ends the global batch
    assert moe.global_batch_load.sum() == 0
    value, counts_E = forward(micro_batches[0])
    torch.testing.assert_close(value, loss(counts_E, micro_batches[0]), rtol=1e-6, atol=0)
    # Evaluation forwards count alone and leave the pool as it is.
    moe.eval()
    pool = moe.global_batch_load.clone()
    value, _ = forward(micro_batches[1])
    assert torch.equal(moe.global_batch_load, pool)


def test_switch_load_balance_loss_is_one_for_uniform_routing():
    gate = identity_gate(TopKGate(top_k=1, load_balance_coef=1.0), 4)
    routing = gate(3.0 * torch.eye(4))  # token t goes to expert t: f_e = 1/E for every e
    assert routing.expert_index_N.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(routing.aux_losses["load_balance_loss"].value, torch.tensor(1.0))


def test_router_z_loss_value():
    gate = identity_gate(TopKGate(top_k=2, load_balance_coef=0.0, z_loss_coef=1e-3), 4)
    routing = gate(torch.tensor(LOGITS))
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in LOGITS) / len(LOGITS)
    aux = routing.aux_losses["z_loss"]
    assert aux.coefficient == 1e-3
    torch.testing.assert_close(aux.value, torch.tensor(expected))


# ----------------------------------------------------------------------------- noisy top-k (Shazeer 2017)


def noisy_gate(noise_std: list[float], *, top_k: int = 2, noise_epsilon: float = 0.01) -> NoisyTopKGate:
    """E experts, D = E + 1: logits = x[:, :E]; W_noise reads the constant last feature so that
    softplus(x W_noise)_e = noise_std[e] for inputs whose last feature is 1."""
    num_experts = len(noise_std)
    gate = identity_gate(NoisyTopKGate(top_k=top_k, noise_epsilon=noise_epsilon), num_experts, num_experts + 1)
    with torch.no_grad():
        gate.noise_weight.zero_()
        gate.noise_weight[:, -1] = torch.tensor([math.log(math.expm1(s)) for s in noise_std])  # softplus^-1
    return gate


def with_bias_feature(logits: list[list[float]]) -> torch.Tensor:
    return torch.tensor([row + [1.0] for row in logits])


def test_noisy_topk_eval_is_clean_topk_with_softmax_over_kept():
    gate = noisy_gate([1.0, 2.0, 3.0, 4.0]).eval()  # large noise, which eval must ignore
    routing = gate(with_bias_feature(LOGITS))
    first, second, w1, w2 = [], [], [], []
    for row in LOGITS:
        a, b = ranked(row)[:2]
        kept = softmax([row[a], row[b]])  # softmax over the k kept logits only
        first.append(a), second.append(b), w1.append(kept[0]), w2.append(kept[1])
    assert routing.expert_index_N.tolist() == first + second
    torch.testing.assert_close(routing.weight_N, torch.tensor(w1 + w2))
    torch.testing.assert_close(routing.weight_N.view(2, 3).sum(0), torch.ones(3))

    # Eval: the load falls back to token counts per expert.
    counts = [(first + second).count(e) for e in range(4)]
    torch.testing.assert_close(routing.aux_losses["load_loss"].value, torch.tensor(cv_squared(counts)))
    importance = [0.0] * 4
    for e, w in zip(first + second, w1 + w2):
        importance[e] += w
    torch.testing.assert_close(routing.aux_losses["importance_loss"].value, torch.tensor(cv_squared(importance)))


def test_noisy_topk_noise_has_softplus_std():
    noise_std = [0.1, 0.5, 2.0]
    epsilon = 0.01
    gate = noisy_gate(noise_std, noise_epsilon=epsilon)
    torch.manual_seed(0)
    x = torch.cat([torch.randn(20000, 3), torch.ones(20000, 1)], dim=1)
    clean, noisy, std = gate.noisy_logits(x)
    expected_std = torch.tensor([s + epsilon for s in noise_std])
    torch.testing.assert_close(clean, x[:, :3])
    torch.testing.assert_close(std, expected_std.expand(20000, 3))
    noise = noisy - clean
    assert noise.mean(0).abs().max() < 0.05 * expected_std.max()
    torch.testing.assert_close(noise.std(0), expected_std, rtol=0.03, atol=0.0)


def test_noisy_topk_training_routes_on_seeded_noisy_logits():
    noise_std, epsilon = [0.3, 0.7, 1.2, 0.05], 0.01
    gate = noisy_gate(noise_std, noise_epsilon=epsilon).train()
    torch.manual_seed(123)
    routing = gate(with_bias_feature(LOGITS))
    torch.manual_seed(123)
    draws = torch.randn(3, 4).tolist()  # the gate draws one [T, E] standard normal per forward
    noisy = [[row[e] + draws[t][e] * (noise_std[e] + epsilon) for e in range(4)] for t, row in enumerate(LOGITS)]
    first, second, w1, w2 = [], [], [], []
    for row in noisy:
        a, b = ranked(row)[:2]
        kept = softmax([row[a], row[b]])
        first.append(a), second.append(b), w1.append(kept[0]), w2.append(kept[1])
    assert routing.expert_index_N.tolist() == first + second
    torch.testing.assert_close(routing.weight_N, torch.tensor(w1 + w2))


@pytest.mark.parametrize("top_k", [1, 2])
def test_noisy_topk_importance_and_smooth_load_losses(top_k):
    noise_std, epsilon = [0.3, 0.7, 1.2, 0.5], 0.01
    gate = noisy_gate(noise_std, top_k=top_k, noise_epsilon=epsilon).train()
    torch.manual_seed(7)
    routing = gate(with_bias_feature(LOGITS))
    torch.manual_seed(7)
    draws = torch.randn(3, 4).tolist()
    stds = [s + epsilon for s in noise_std]
    noisy = [[row[e] + draws[t][e] * stds[e] for e in range(4)] for t, row in enumerate(LOGITS)]

    importance, load = [0.0] * 4, [0.0] * 4
    for t, row in enumerate(noisy):
        kept = ranked(row)[:top_k]
        for e, w in zip(kept, softmax([row[e] for e in kept])):
            importance[e] += w  # eq. 6: sum over the batch of G(x)_e
        for e in range(4):
            # eq. 9: P(x, e) = Phi((clean_e - kth_excluding(H(x), k, e)) / std_e)
            kth_excluding = sorted((row[j] for j in range(4) if j != e), reverse=True)[top_k - 1]
            z = (LOGITS[t][e] - kth_excluding) / stds[e]
            load[e] += 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))
    torch.testing.assert_close(routing.aux_losses["importance_loss"].value, torch.tensor(cv_squared(importance)))
    torch.testing.assert_close(routing.aux_losses["load_loss"].value, torch.tensor(cv_squared(load)))
    assert routing.aux_losses["load_loss"].coefficient == 0.01

    # The smooth estimator carries gradient to both W_g and W_noise (counts would not).
    routing.aux_losses["load_loss"].value.backward()
    assert gate.weight.grad.abs().sum() > 0
    assert gate.noise_weight.grad.abs().sum() > 0


def test_noisy_topk_noise_weight_starts_at_zero():
    gate = NoisyTopKGate().build(8, 4)
    gate.reset_parameters(0.5)
    assert torch.count_nonzero(gate.noise_weight) == 0
    assert torch.count_nonzero(gate.weight) > 0


# ----------------------------------------------------------------------------- dynamic (Huang et al. 2024)

DYNAMIC_LOGITS = [
    [4.0, 0.0, 0.0, 0.0],  # confident: p_0 = 0.948
    [1.0, 0.9, 0.0, -1.0],  # uncertain: 0.415, then 0.790
    [0.3, 0.2, 0.1, 0.0],  # almost uniform: 0.289, 0.550, 0.786, 1
]


def top_p_choices(probs: list[float], threshold: float, max_k: int) -> list[int]:
    """The smallest most-probable prefix whose mass reaches ``threshold``, at most ``max_k`` long."""
    chosen, mass = [], 0.0
    for e in ranked(probs):
        if mass >= threshold or len(chosen) == max_k:
            break
        chosen.append(e)
        mass += probs[e]
    return chosen


def test_dynamic_confident_token_takes_one_uncertain_takes_more():
    gate = identity_gate(DynamicGate(threshold=0.5, max_k=3, load_balance_coef=0.01), 4)
    routing = gate(torch.tensor(DYNAMIC_LOGITS))
    probs = [softmax(row) for row in DYNAMIC_LOGITS]
    choices = [top_p_choices(p, 0.5, 3) for p in probs]
    assert [len(c) for c in choices] == [1, 2, 2]
    # k-major: all first choices, then the second choices of the tokens that take two.
    expected = [(t, c[k]) for k in range(3) for t, c in enumerate(choices) if len(c) > k]
    assert list(zip(routing.token_index_N.tolist(), routing.expert_index_N.tolist())) == expected
    # Weights are the kept probabilities, not renormalised.
    torch.testing.assert_close(routing.weight_N, torch.tensor([probs[t][e] for t, e in expected]))
    torch.testing.assert_close(routing.stats["experts_per_token"], torch.tensor(5 / 3))
    expected_loss = switch_loss(probs, [e for _, e in expected], 4)
    torch.testing.assert_close(routing.aux_losses["load_balance_loss"].value, torch.tensor(expected_loss))
    entropy = sum(-sum(p * math.log(p) for p in row) for row in probs) / 3
    torch.testing.assert_close(routing.stats["router_entropy"], torch.tensor(entropy))


def test_dynamic_threshold_and_max_k_cap():
    probs = [softmax(row) for row in DYNAMIC_LOGITS]
    # threshold 0.9: the almost-uniform token needs all four experts, max_k=3 caps it at three.
    gate = identity_gate(DynamicGate(threshold=0.9, max_k=3), 4)
    routing = gate(torch.tensor(DYNAMIC_LOGITS))
    per_token = torch.bincount(routing.token_index_N, minlength=3).tolist()
    assert per_token == [len(top_p_choices(p, 0.9, 3)) for p in probs] == [1, 3, 3]
    # threshold 1.0 always fills max_k.
    gate = identity_gate(DynamicGate(threshold=1.0, max_k=2), 4)
    routing = gate(torch.tensor(DYNAMIC_LOGITS))
    assert torch.bincount(routing.token_index_N, minlength=3).tolist() == [2, 2, 2]
    assert routing.stats["experts_per_token"].item() == 2.0


def test_dynamic_stops_when_mass_reaches_threshold_exactly():
    # probabilities [0.5, 0.5, ~0, ~0] exactly in fp32: the first expert alone reaches p = 0.5.
    gate = identity_gate(DynamicGate(threshold=0.5, max_k=4), 4)
    routing = gate(torch.tensor([[0.0, 0.0, -100.0, -100.0]]))
    assert routing.weight_N.tolist() == [0.5]


def test_dynamic_z_and_entropy_losses():
    gate = identity_gate(DynamicGate(load_balance_coef=0.0, z_loss_coef=1e-3, entropy_loss_coef=0.1), 4)
    routing = gate(torch.tensor(DYNAMIC_LOGITS))
    assert set(routing.aux_losses) == {"z_loss", "entropy_loss"}
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in DYNAMIC_LOGITS) / 3
    entropy = sum(-sum(p * math.log(p) for p in softmax(row)) for row in DYNAMIC_LOGITS) / 3
    torch.testing.assert_close(routing.aux_losses["z_loss"].value, torch.tensor(z))
    torch.testing.assert_close(routing.aux_losses["entropy_loss"].value, torch.tensor(entropy))


# ----------------------------------------------------------------------------- expert choice (Zhou et al. 2022)

EC_LOGITS = [
    [3.0, 0.0, 0.1],
    [2.0, 1.0, 0.0],
    [0.2, 2.5, 0.0],
    [0.0, 0.4, 3.5],
    [0.0, 2.0, 2.0],  # torn between experts 1 and 2: both take it
    [0.5, 0.0, 0.3],  # nobody's top two: unrouted
]


def test_expert_choice_each_expert_takes_its_top_c_tokens():
    gate = identity_gate(ExpertChoiceGate(capacity_factor=1.0), 3)
    routing = gate(torch.tensor(EC_LOGITS))
    probs = [softmax(row) for row in EC_LOGITS]
    capacity = math.ceil(6 * 1.0 / 3)
    # Rank-major order: every expert's best token, then every expert's second best.
    by_expert = [sorted(range(6), key=lambda t: -probs[t][e])[:capacity] for e in range(3)]
    expected = [(by_expert[e][rank], e) for rank in range(capacity) for e in range(3)]
    assert list(zip(routing.token_index_N.tolist(), routing.expert_index_N.tolist())) == expected
    assert torch.bincount(routing.expert_index_N, minlength=3).tolist() == [capacity] * 3
    torch.testing.assert_close(routing.weight_N, torch.tensor([probs[t][e] for t, e in expected]))

    taken = [sum(t == token for t, _ in expected) for token in range(6)]
    assert 0 in taken  # some token is taken by no expert, ...
    assert max(taken) >= 2  # ... another by several.
    torch.testing.assert_close(routing.stats["unrouted_fraction"], torch.tensor(taken.count(0) / 6))
    torch.testing.assert_close(routing.stats["experts_per_token"], torch.tensor(capacity * 3 / 6))
    assert routing.aux_losses == {}


def test_expert_choice_capacity_is_ceil_and_clamped():
    gate = ExpertChoiceGate(capacity_factor=1.0).build(4, 3)
    assert gate.capacity(5) == 2  # ceil(5 / 3)
    assert gate.capacity(6) == 2
    gate = ExpertChoiceGate(capacity_factor=10.0).build(4, 3)
    assert gate.capacity(5) == 5  # clamped to T
    # 1.1 * 100 / 10 is 11.000000000000002 in binary floating point: the capacity is still 11.
    assert ExpertChoiceGate(capacity_factor=1.1).build(4, 10).capacity(100) == 11
    routing = gate(torch.randn(5, 4))
    assert routing.expert_index_N.numel() == 15  # every expert takes every token
    assert routing.stats["unrouted_fraction"].item() == 0.0


# ----------------------------------------------------------------------------- device-limited routing

GROUPS = torch.tensor([0, 0, 1, 1])  # experts {0, 1} on one device, {2, 3} on the other
LIMITED_LOGITS = [[2.0, 0.0, 1.9, 1.8], [0.1, 0.0, 1.0, 3.0]]  # best group: 0 for token 0, 1 for token 1


def test_noisy_topk_device_limited_routing():
    gate = noisy_gate([0.3, 0.7, 1.2, 0.5], top_k=2)
    gate.set_expert_groups(GROUPS, 1)
    routing = gate.eval()(with_bias_feature(LIMITED_LOGITS))
    assert routing.expert_index_N.tolist() == [0, 3, 1, 2]  # without the limit token 0 would take 0 and 2
    w0, w1 = softmax([2.0, 0.0]), softmax([3.0, 1.0])
    torch.testing.assert_close(routing.weight_N, torch.tensor([w0[0], w1[0], w0[1], w1[1]]))

    # Training, k = 1: the smooth load counts only the allowed experts (P = 0 outside the token's
    # group), and kth_excluding is taken among the allowed ones.
    stds = [s + 0.01 for s in [0.3, 0.7, 1.2, 0.5]]
    gate = noisy_gate([0.3, 0.7, 1.2, 0.5], top_k=1)
    gate.set_expert_groups(GROUPS, 1)
    torch.manual_seed(3)
    routing = gate(with_bias_feature(LIMITED_LOGITS))
    torch.manual_seed(3)
    draws = torch.randn(2, 4).tolist()
    load = [0.0] * 4
    for t, row in enumerate(LIMITED_LOGITS):
        noisy = [row[e] + draws[t][e] * stds[e] for e in range(4)]
        group = 0 if max(noisy[:2]) >= max(noisy[2:]) else 1
        allowed = [e for e in range(4) if int(GROUPS[e]) == group]
        for e in allowed:
            (other,) = (noisy[j] for j in allowed if j != e)
            load[e] += 0.5 * (1.0 + math.erf((row[e] - other) / stds[e] / math.sqrt(2.0)))
    assert 0.0 < min(v for v in load if v > 0) < 1.0  # a contested estimate, not a count
    torch.testing.assert_close(routing.aux_losses["load_loss"].value, torch.tensor(cv_squared(load)))
    routing.aux_losses["load_loss"].value.backward()
    assert torch.isfinite(gate.weight.grad).all() and torch.isfinite(gate.noise_weight.grad).all()
    assert gate.noise_weight.grad.abs().sum() > 0

    # k = 2 with groups of two: no allowed expert competes, every allowed one has P = 1.
    gate = noisy_gate([0.3, 0.7, 1.2, 0.5], top_k=2)
    gate.set_expert_groups(GROUPS, 1)
    routing = gate(with_bias_feature(LIMITED_LOGITS))
    routing.aux_losses["load_loss"].value.backward()
    assert torch.isfinite(gate.noise_weight.grad).all()


def test_dynamic_device_limited_routing():
    gate = identity_gate(DynamicGate(threshold=1.0, max_k=3), 4)
    gate.set_expert_groups(GROUPS, 1)
    routing = gate(torch.tensor(LIMITED_LOGITS))
    # threshold 1.0 would take three experts; only the two of the token's best group are allowed.
    expected = [(0, 0), (1, 3), (0, 1), (1, 2)]
    assert list(zip(routing.token_index_N.tolist(), routing.expert_index_N.tolist())) == expected
    probs = [softmax(row) for row in LIMITED_LOGITS]
    torch.testing.assert_close(routing.weight_N, torch.tensor([probs[t][e] for t, e in expected]))


def test_device_limited_routing_counts_replicas_once():
    """Ranks that share experts (replicas) hold fewer together than their sizes add up to: a limit
    that could leave a token fewer than top_k distinct experts is refused, so that top-k never picks
    an expert outside the kept ranks (DeepSeek-V2 Sec. 2.1.3)."""
    from lightning_moe.layers.gates.base import fewest_experts_in_groups

    # Ranks 0 and 1 both hold experts {0, 1}; rank 2 holds {2, 3}: two ranks can hold only 2 experts.
    shared = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert fewest_experts_in_groups(shared, 2) == 2
    gate = identity_gate(TopKGate(top_k=3), 4)
    with pytest.raises(ValueError, match="2 distinct expert\\(s\\), fewer than top_k=3"):
        gate.set_expert_groups(shared, 2)
    # The same sizes without the shared pair: any two ranks hold 3 experts, and every token keeps 3.
    spread = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert fewest_experts_in_groups(spread, 2) == 3
    gate.set_expert_groups(spread, 2)
    routing = gate(torch.randn(32, 4))
    kept_TG = routing.allowed_devices_TG[routing.token_index_N]
    assert bool((kept_TG & spread.t()[routing.expert_index_N]).any(dim=1).all())  # on a kept rank
    # Beyond the exhaustive search, a lower bound: one rank's experts and the others' own ones.
    # 40 ranks (C(40, 4) choices of 4), rank r holding experts 2r and 2r + 1, and expert 0 on every
    # rank: rank 0's 2 experts plus 1 own expert of each of 3 others (smallest counts) bound it by 5;
    # the fewest is 8 (rank 0 and three others), so the bound is safe, not tight.
    many = torch.eye(40, dtype=torch.bool).repeat_interleave(2, dim=1)
    many[:, 0] = True
    assert fewest_experts_in_groups(many, 4) == 5


def test_expert_choice_refuses_device_limited_routing():
    gate = ExpertChoiceGate().build(4, 4)
    gate.set_expert_groups(None, None)  # lifting a limit is fine
    with pytest.raises(ValueError, match="`max_groups`"):
        gate.set_expert_groups(GROUPS, 1)


# ----------------------------------------------------------------------------- inside an MoELayer


@pytest.mark.parametrize("gate", ["topk", "noisy_topk", "dynamic", "expert_choice"])
def test_gate_in_moe_layer_forward_backward(gate):
    torch.manual_seed(0)
    layer = MoELayer(d_model=8, d_ff=16, num_experts=4, gate=gate, top_k=2).train()
    assert isinstance(layer.gate, GATES[gate])
    x = torch.randn(2, 6, 8)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert int(layer.tokens_per_expert.sum()) == int(layer.routed_tokens) > 0
    # NOTE: a random grad_output: grouped_mm's backward fails on the stride-0 gradient of .sum().
    loss = (y * torch.randn_like(y)).sum() + collect_aux_loss(layer)
    loss.backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert layer.gate.weight.grad.abs().sum() > 0
    if gate == "noisy_topk":
        assert layer.gate.noise_weight.grad.abs().sum() > 0

    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer(x))  # no noise in eval


def test_layer_top_k_reaches_gates_that_take_it():
    assert MoELayer(d_model=8, d_ff=16, num_experts=4, gate="noisy_topk", top_k=1).gate.top_k == 1
    assert MoELayer(d_model=8, d_ff=16, num_experts=4, gate="dynamic", top_k=3).gate.max_k == 2


# ----------------------------------------------------------------------------- configuration errors


def layer(**kwargs) -> MoELayer:
    return MoELayer(d_model=8, d_ff=16, num_experts=4, **kwargs)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: layer(gate="topk", top_k=5), "top_k"),
        (lambda: layer(gate="noisy_topk", top_k=5), "top_k"),
        (lambda: layer(gate="nope"), "gate"),
        (lambda: layer(gate="dynamic", gate_kwargs={"top_p": 0.5}), "gate_kwargs"),
        (lambda: layer(gate="dynamic", gate_kwargs={"max_k": 5}), "max_k"),
        (lambda: DynamicGate(threshold=0.0), "threshold"),
        (lambda: DynamicGate(threshold=1.5), "threshold"),
        (lambda: DynamicGate(threshold=float("nan")), "threshold"),
        (lambda: DynamicGate(max_k=0), "max_k"),
        (lambda: DynamicGate(load_balance_coef=-0.1), "load_balance_coef"),
        (lambda: DynamicGate(entropy_loss_coef=-1.0), "entropy_loss_coef"),
        (lambda: NoisyTopKGate(importance_coef=-0.1), "importance_coef"),
        (lambda: NoisyTopKGate(load_coef=-0.1), "load_coef"),
        (lambda: NoisyTopKGate(noise_epsilon=-1e-3), "noise_epsilon"),
        (lambda: NoisyTopKGate(top_k=0), "top_k"),
        (lambda: ExpertChoiceGate(capacity_factor=0.0), "capacity_factor"),
        (lambda: ExpertChoiceGate(capacity_factor=-2.0), "capacity_factor"),
        (lambda: ExpertChoiceGate(capacity_factor=float("inf")), "capacity_factor"),
        (lambda: TopKGate(load_balance_scope="world"), "load_balance_scope"),
        (lambda: DynamicGate(load_balance_scope="batch"), "load_balance_scope"),
        (lambda: SigmoidGate(load_balance_scope=None), "load_balance_scope"),
    ],
)
def test_bad_config_raises_value_error_naming_the_field(make, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        make()


# ----------------------------------------------------------------------------- degenerate inputs


@pytest.mark.parametrize(("gate", "gate_kwargs"), [
    ("topk", {}),
    ("dynamic", {"z_loss_coef": 1e-3, "entropy_loss_coef": 0.1}),
    ("sigmoid", {"load_balance_coef": 0.01}),
    ("sigmoid", {"sequence_balance_coef": 1e-4}),
    ("noisy_topk", {}),
])
def test_a_batch_of_no_tokens_gives_zero_aux_losses(gate, gate_kwargs):
    """A layer that routes nothing (an empty batch) adds 0 to the loss, not NaN: the means over the
    tokens have no token to divide by."""
    layer = MoELayer(d_model=8, d_ff=8, num_experts=4, gate=gate, top_k=2, gate_kwargs=gate_kwargs).train()
    output = layer(torch.randn(0, 16, 8))
    assert output.shape == (0, 16, 8) and layer.aux_losses
    total = output.sum() + collect_aux_loss(layer)
    assert total.item() == 0.0
    total.backward()
    assert torch.isfinite(layer.gate.weight.grad).all()


def test_sigmoid_gate_losses_stay_finite_when_every_score_underflows():
    """A token whose logits are all below about -104 has fp32 sigmoid scores of exactly 0: its
    normalised scores are a row of zeros (the epsilon DeepSeek-V3 adds to the weights' sum), so the
    balance losses and their router gradient stay finite."""
    gate = identity_gate(SigmoidGate(top_k=2, sequence_balance_coef=1e-4, load_balance_coef=1e-2), 4)
    routing = gate(torch.tensor([[1.0, 0.5, -0.5, -1.0], [-120.0, -130.0, -140.0, -150.0]]))
    for name, aux in routing.aux_losses.items():
        assert torch.isfinite(aux.value), name
    assert torch.isfinite(routing.stats["router_entropy"])
    sum(aux.weighted for aux in routing.aux_losses.values()).backward()
    assert torch.isfinite(gate.weight.grad).all()
