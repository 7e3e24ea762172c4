"""SigmoidGate (DeepSeek-V3): hand-checked routing, group limits, balance losses, validation, and
aux-loss-free bias balancing lowering MaxVio."""

import math

import pytest
import torch

from lightning_moe import MoELayer, collect_aux_loss
from lightning_moe.layers import register_global_batch_end
from lightning_moe.layers.gates import GATES, SigmoidGate
from lightning_moe.layers.gates.sigmoid import sequence_balance_loss


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _identity_gate(num_experts: int, **kwargs) -> SigmoidGate:
    """A gate with ``W = I`` (``D = E``), so that a token's features are its logits."""
    gate = SigmoidGate(**kwargs).build(num_experts, num_experts)
    with torch.no_grad():
        gate.weight.copy_(torch.eye(num_experts))
    return gate


def _tokens_with_scores(rows: list[list[float]]) -> torch.Tensor:
    """Tokens whose sigmoid scores under an identity gate are ``rows``."""
    return torch.tensor([[_logit(p) for p in row] for row in rows])


def _max_violation(load_E: torch.Tensor) -> float:
    load_E = load_E.float()
    return ((load_E.max() - load_E.mean()) / load_E.mean()).item()


def test_registered_by_name_and_built_by_moe_layer():
    assert GATES["sigmoid"] is SigmoidGate
    layer = MoELayer(d_model=8, d_ff=8, num_experts=4, gate="sigmoid", top_k=2)
    assert isinstance(layer.gate, SigmoidGate) and layer.gate.top_k == 2
    assert layer(torch.randn(2, 3, 8)).shape == (2, 3, 8)


def test_bias_changes_selection_but_not_weights():
    gate = _identity_gate(4, top_k=1, normalize=False)
    x = _tokens_with_scores([[0.9, 0.6, 0.3, 0.2]])
    routing = gate(x)
    assert routing.expert_index_N.tolist() == [0]
    assert routing.weight_N.item() == pytest.approx(0.9, abs=1e-6)

    gate.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.75]))  # 0.2 + 0.75 > 0.9
    routing = gate(x)
    assert routing.expert_index_N.tolist() == [3]
    assert routing.weight_N.item() == pytest.approx(0.2, abs=1e-6)  # the unbiased score


def test_normalized_weights_times_routed_scaling_factor_in_priority_order():
    gate = _identity_gate(4, top_k=2, routed_scaling_factor=2.5)
    x = _tokens_with_scores([[0.2, 0.8, 0.6, 0.1], [0.7, 0.1, 0.1, 0.9]])
    routing = gate(x)
    # k-major: first choices of both tokens, then second choices.
    assert routing.token_index_N.tolist() == [0, 1, 0, 1]
    assert routing.expert_index_N.tolist() == [1, 3, 2, 0]
    expected = [2.5 * 0.8 / 1.4, 2.5 * 0.9 / 1.6, 2.5 * 0.6 / 1.4, 2.5 * 0.7 / 1.6]
    torch.testing.assert_close(routing.weight_N, torch.tensor(expected), atol=1e-6, rtol=0)


def test_group_limited_routing_keeps_the_groups_with_best_top2_sum():
    # 4 groups of 2. Group sums of the top-2: 1.0, 1.15, 1.2, 0.4 -> keep groups 2 and 1.
    scores = [[0.9, 0.1, 0.6, 0.55, 0.7, 0.5, 0.2, 0.2]]
    x = _tokens_with_scores(scores)
    grouped = _identity_gate(8, top_k=2, n_group=4, topk_group=2, normalize=False)
    routing = grouped(x)
    assert routing.expert_index_N.tolist() == [4, 2]  # not expert 0, although its score is the best
    torch.testing.assert_close(routing.weight_N, torch.tensor([0.7, 0.6]), atol=1e-6, rtol=0)

    ungrouped = _identity_gate(8, top_k=2, normalize=False)
    assert ungrouped(x).expert_index_N.tolist() == [0, 4]


def test_group_scores_use_the_biased_scores():
    x = _tokens_with_scores([[0.9, 0.1, 0.6, 0.55, 0.7, 0.5, 0.2, 0.2]])
    gate = _identity_gate(8, top_k=2, n_group=4, topk_group=1, normalize=False)
    assert gate(x).expert_index_N.tolist() == [4, 5]  # group 2 wins unbiased
    gate.expert_bias.copy_(torch.tensor([0.0, 0.3, 0, 0, 0, 0, 0, 0]))  # group 0: 0.9 + 0.4 = 1.3
    routing = gate(x)
    assert routing.expert_index_N.tolist() == [0, 1]
    torch.testing.assert_close(routing.weight_N, torch.tensor([0.9, 0.1]), atol=1e-6, rtol=0)


def test_dropped_groups_are_filled_with_minus_inf_by_default_and_zero_on_request():
    # Kept group 0 has biased scores -0.4 and -0.5 (negative bias), group 1 (dropped) -0.6 and -0.7.
    x = _tokens_with_scores([[0.5, 0.5, 0.5, 0.5]])
    bias = torch.tensor([-0.9, -1.0, -1.1, -1.2])
    default = _identity_gate(4, top_k=2, n_group=2, topk_group=1)
    default.expert_bias.copy_(bias)
    assert default(x).expert_index_N.tolist() == [0, 1]  # only experts of the kept group
    # DeepSeek-V3's release (0.0): a dropped expert's masked score 0.0 beats the kept negative ones.
    zero_fill = _identity_gate(4, top_k=2, n_group=2, topk_group=1, dropped_group_fill=0.0)
    zero_fill.expert_bias.copy_(bias)
    assert sorted(zero_fill(x).expert_index_N.tolist()) == [2, 3]


def test_uniform_bias_shift_changes_no_routing_and_keeps_to_kept_groups():
    """Selection depends on bias differences only: shifting every bias by -0.6 must not move a token,
    and no token may reach an expert outside its ``topk_group`` kept groups (the bound that
    group-limited routing exists for)."""
    torch.manual_seed(0)
    gate = SigmoidGate(top_k=4, n_group=4, topk_group=2).build(16, 16)
    x = torch.randn(512, 16)
    with torch.no_grad():
        gate.expert_bias.normal_(std=0.05)
    before = gate.select(torch.sigmoid(gate.logits(x)))
    with torch.no_grad():
        gate.expert_bias -= 0.6
    after = gate.select(torch.sigmoid(gate.logits(x)))
    assert torch.equal(before, after)
    groups_per_token = [torch.unique(row // 4).numel() for row in after]  # 4 experts per group
    assert max(groups_per_token) <= 2


def test_expert_bias_stays_fp32_under_module_casts_and_keeps_moving():
    """Under ``bf16-true`` (the module cast to bf16) the bias must stay fp32: in bf16 a bias past 0.5
    has a spacing of 2**-8, so steps of 1e-3 would round away and balancing would stop."""
    layer = MoELayer(d_model=8, d_ff=8, num_experts=4, gate="sigmoid", top_k=1,
                     gate_kwargs={"bias_update_rate": 1e-3})
    with torch.no_grad():
        layer.gate.expert_bias.copy_(torch.tensor([0.6, 0.6, -0.6, 0.123456789]))
    layer = layer.to(torch.bfloat16)
    assert layer.gate.weight.dtype == torch.bfloat16
    assert layer.gate.expert_bias.dtype == torch.float32
    assert layer.gate.expert_bias[3].item() == torch.tensor(0.123456789).item()  # not rounded via bf16
    before = layer.gate.expert_bias.clone()
    layer.gate.update_bias(torch.tensor([10, 0, 0, 0]))
    torch.testing.assert_close(layer.gate.expert_bias - before, torch.tensor([-1e-3, 1e-3, 1e-3, 1e-3]))
    layer = layer.half().float()
    assert layer.gate.expert_bias.dtype == torch.float32
    state = layer.gate.state_dict()
    assert state["expert_bias"].dtype == torch.float32


def test_device_limited_routing_from_the_strategy_applies_to_the_biased_scores():
    x = _tokens_with_scores([[0.9, 0.8, 0.3, 0.2]])
    gate = _identity_gate(4, top_k=2, normalize=False)
    gate.set_expert_groups(torch.tensor([0, 0, 1, 1]), max_groups=1)
    assert gate(x).expert_index_N.tolist() == [0, 1]
    gate.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.7, 0.7]))  # biased 0.9 0.8 | 1.0 0.9: group 1 wins
    routing = gate(x)
    assert routing.expert_index_N.tolist() == [2, 3]
    torch.testing.assert_close(routing.weight_N, torch.tensor([0.3, 0.2]), atol=1e-6, rtol=0)


def test_group_limited_and_device_limited_routing_need_whole_groups_on_each_rank():
    """6 experts in 3 groups over 2 ranks of 3: a kept group can straddle the ranks, and one kept rank
    then holds a single expert of it, fewer than top_k=2 (top-k took experts of dropped groups)."""
    gate = SigmoidGate(top_k=2, n_group=3, topk_group=1).build(8, 6)
    with pytest.raises(ValueError, match=r"group-limited routing \(n_group=3, groups of 2 experts\) and device-limited"):
        gate.set_expert_groups(torch.tensor([0, 0, 0, 1, 1, 1]), max_groups=1)
    gate.set_expert_groups(torch.tensor([0, 0, 0, 1, 1, 1]), max_groups=None)  # no device limit: fine
    # Whole groups on each rank (groups 0 and 1 on rank 0, group 2 on rank 1): every token keeps 2.
    gate.set_expert_groups(torch.tensor([0, 0, 0, 0, 1, 1]), max_groups=1)
    torch.manual_seed(0)
    ids_TK = gate(torch.randn(500, 8)).expert_index_N.view(2, -1).t()
    assert bool(((ids_TK // 2)[:, 0] == (ids_TK // 2)[:, 1]).all())  # one group (topk_group=1)
    assert bool(((ids_TK >= 4)[:, 0] == (ids_TK >= 4)[:, 1]).all())  # on one rank


def test_sequence_balance_loss_matches_an_independent_computation():
    torch.manual_seed(0)
    num_sequences, seq_len, num_experts, top_k = 3, 5, 6, 2
    gate = SigmoidGate(top_k=top_k, sequence_balance_coef=1e-4).build(8, num_experts)
    with torch.no_grad():
        gate.weight.normal_(std=1.0)
        gate.expert_bias.normal_(std=0.2)
    x = torch.randn(num_sequences, seq_len, 8)
    routing = gate(x.reshape(-1, 8), num_sequences=num_sequences)
    aux = routing.aux_losses["sequence_balance_loss"]
    assert aux.coefficient == 1e-4

    scores = torch.sigmoid(x @ gate.weight.detach().t())  # (S, L, E)
    biased = scores + gate.expert_bias
    total = 0.0
    for s in range(num_sequences):
        chosen = [set(biased[s, t].topk(top_k).indices.tolist()) for t in range(seq_len)]
        for i in range(num_experts):
            f_i = num_experts / (top_k * seq_len) * sum(i in c for c in chosen)
            p_i = sum((scores[s, t, i] / scores[s, t].sum()).item() for t in range(seq_len)) / seq_len
            total += f_i * p_i
    assert aux.value.item() == pytest.approx(total / num_sequences, rel=1e-5)

    # It is 1.0 for a perfectly uniform batch, and it carries gradient to the router.
    uniform = sequence_balance_loss(torch.full((4, 4), 0.5), torch.tensor([[0], [1], [2], [3]]), 4, 1)
    assert uniform.item() == pytest.approx(1.0)
    aux.value.backward()
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0


def test_sequence_balance_loss_through_moe_layer_uses_batch_as_sequences():
    torch.manual_seed(0)
    layer = MoELayer(
        d_model=8, d_ff=8, num_experts=4, gate="sigmoid", top_k=2,
        gate_kwargs={"sequence_balance_coef": 0.5, "load_balance_coef": 0.25},
    )
    x = torch.randn(2, 6, 8)
    layer(x)
    assert set(layer.aux_losses) == {"sequence_balance_loss", "load_balance_loss"}
    scores = torch.sigmoid(x.reshape(-1, 8) @ layer.gate.weight.detach().t())
    ids = layer.gate.select(scores)
    expected = sequence_balance_loss(scores, ids, 4, num_sequences=2)
    assert layer.aux_losses["sequence_balance_loss"].value.item() == pytest.approx(expected.item())
    total = 0.5 * layer.aux_losses["sequence_balance_loss"].value + 0.25 * layer.aux_losses["load_balance_loss"].value
    assert collect_aux_loss(layer).item() == pytest.approx(total.item())


def test_no_aux_losses_by_default():
    gate = SigmoidGate(top_k=2).build(8, 4)
    assert gate(torch.randn(5, 8)).aux_losses == {}


@pytest.mark.parametrize(
    ("kwargs", "num_experts", "field"),
    [
        ({"n_group": 3}, 8, "n_group"),
        ({"n_group": 8, "topk_group": 2, "top_k": 2}, 8, "n_group"),  # 1 expert per group
        ({"n_group": 2, "topk_group": 3}, 8, "topk_group"),
        ({"n_group": 4, "topk_group": 1, "top_k": 3}, 8, "top_k"),  # 3 > 1 group of 2
        ({"top_k": 9}, 8, "top_k"),
        ({"top_k": 0}, 8, "top_k"),
        ({"routed_scaling_factor": 0.0}, 8, "routed_scaling_factor"),
        ({"bias_update_rate": -1e-3}, 8, "bias_update_rate"),
        ({"sequence_balance_coef": float("nan")}, 8, "sequence_balance_coef"),
        ({"dropped_group_fill": float("nan")}, 8, "dropped_group_fill"),
    ],
)
def test_bad_configuration_names_the_field(kwargs, num_experts, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        SigmoidGate(**kwargs).build(16, num_experts)


def test_sequences_must_divide_tokens():
    gate = SigmoidGate(top_k=2, sequence_balance_coef=1e-3).build(8, 4)
    with pytest.raises(ValueError, match="`num_sequences`"):
        gate(torch.randn(7, 8), num_sequences=2)


def test_bias_is_a_checkpointed_buffer_and_update_follows_the_sign_rule():
    gate = SigmoidGate(top_k=1, bias_update_rate=0.01).build(8, 4)
    assert gate.needs_bias_update
    assert "expert_bias" in gate.state_dict() and not any(n == "expert_bias" for n, _ in gate.named_parameters())
    gate.update_bias(torch.tensor([10, 2, 4, 4]))  # mean 5
    torch.testing.assert_close(gate.expert_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))

    restored = SigmoidGate(top_k=1).build(8, 4)
    restored.load_state_dict(gate.state_dict())
    torch.testing.assert_close(restored.expert_bias, gate.expert_bias)

    frozen = SigmoidGate(top_k=1, bias_update_rate=0.0).build(8, 4)
    assert not frozen.needs_bias_update
    frozen.update_bias(torch.tensor([10, 2, 4, 4]))
    assert frozen.expert_bias.abs().sum() == 0
    frozen.bias_update_rate = 1e-3  # switching it on later is enough
    assert frozen.needs_bias_update


def _skewed_tokens(generator: torch.Generator, num_tokens: int, common_D: torch.Tensor) -> torch.Tensor:
    """Tokens sharing a strong common direction: the experts aligned with it take most of them."""
    return torch.randn(num_tokens, common_D.numel(), generator=generator) + 2.0 * common_D


def test_aux_loss_free_bias_updates_lower_max_violation(single_thread):
    """Wang et al. 2024: routing + bias updates with no learning bring MaxVio from > 1 to near 0."""
    num_experts, d_model, num_tokens = 8, 16, 1024
    generator = torch.Generator().manual_seed(0)
    gate = SigmoidGate(top_k=2, bias_update_rate=1e-3).build(d_model, num_experts)
    common_D = torch.randn(d_model, generator=generator)
    common_D = common_D / common_D.norm()
    with torch.no_grad():
        gate.weight.copy_(0.3 * torch.randn(num_experts, d_model, generator=generator))
        gate.weight[:2] += common_D  # experts 0 and 1 dominate
    held_out = _skewed_tokens(generator, 4 * num_tokens, common_D)

    def held_out_max_violation() -> float:
        load_E = torch.bincount(gate(held_out).expert_index_N, minlength=num_experts)
        return _max_violation(load_E)

    before = held_out_max_violation()
    for _ in range(400):
        routing = gate(_skewed_tokens(generator, num_tokens, common_D))
        gate.update_bias(torch.bincount(routing.expert_index_N, minlength=num_experts))
    after = held_out_max_violation()
    print(f"MaxVio before {before:.3f}, after {after:.3f}; bias {gate.expert_bias.tolist()}")
    assert before > 1.0
    assert after < 0.3
    assert gate.expert_bias[:2].max() < gate.expert_bias[2:].min()  # the dominant experts were pushed down


def test_register_global_batch_end_balances_a_training_moe_layer(single_thread):
    """The full path: MoELayer accumulates the load, an optimizer post-step hook updates the bias."""
    torch.manual_seed(0)
    num_experts, d_model = 8, 16
    layer = MoELayer(
        d_model=d_model, d_ff=8, num_experts=num_experts, gate="sigmoid", top_k=2,
        gate_kwargs={"bias_update_rate": 5e-3},
    )
    common_D = torch.randn(d_model)
    common_D = common_D / common_D.norm()
    with torch.no_grad():
        layer.gate.weight.normal_(std=0.3)
        layer.gate.weight[:2] += common_D
    # lr = 0: the weights stay put, so any change in balance comes from the bias alone.
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.0)
    assert register_global_batch_end(optimizer, layer)
    generator = torch.Generator().manual_seed(1)

    first_load = None
    for step in range(60):
        x = _skewed_tokens(generator, 4 * 64, common_D).view(4, 64, d_model)
        layer(x).backward(torch.randn(4, 64, d_model, generator=generator))
        if step == 0:
            first_load = layer.load_since_bias_update.clone()
            bias_before = layer.gate.expert_bias.clone()
        optimizer.step()
        optimizer.zero_grad()
        if step == 0:
            expected = bias_before + 5e-3 * torch.sign(first_load.float().mean() - first_load.float())
            torch.testing.assert_close(layer.gate.expert_bias, expected)
            assert layer.load_since_bias_update.sum() == 0  # reset after the update
    layer.eval()
    with torch.no_grad():
        layer(_skewed_tokens(generator, 2048, common_D))
    before, after = _max_violation(first_load), _max_violation(layer.tokens_per_expert)
    print(f"MaxVio first step {before:.3f}, after 60 steps {after:.3f}")
    assert before > 1.0 and after < 0.3
