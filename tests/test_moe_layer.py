"""MoELayer: grouped GEMM against a per-expert loop, capacity and drop accounting, shapes, errors."""

import pytest
import torch

from lightning_moe import MoELayer, collect_aux_loss, collect_aux_losses
from lightning_moe.layers.dispatch import (
    LocalDispatcher,
    drop_over_capacity,
    dropped_over_capacity,
    expert_capacity,
    limit_to_capacity,
    weighted_sum_rows,
)
from lightning_moe.layers.gates import Routing
from lightning_moe.ops.grouped_mm import grouped_mm, grouped_mm_loop


def _layer(**kwargs) -> MoELayer:
    torch.manual_seed(0)
    defaults = dict(d_model=16, d_ff=32, num_experts=4, top_k=2)
    defaults.update(kwargs)
    return MoELayer(**defaults)


def _forward_backward(layer: MoELayer, x: torch.Tensor, grad_output: torch.Tensor):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(grad_output)
    grads = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad()
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_matches_loop_with_empty_groups(dtype):
    torch.manual_seed(0)
    x = torch.randn(11, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 16, 8, dtype=dtype, requires_grad=True)
    counts = torch.tensor([3, 0, 8, 0])
    grad = torch.randn(11, 8, dtype=dtype)
    out = grouped_mm(x, w, counts)
    out.backward(grad)
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref = grouped_mm_loop(x, w, counts)
    ref.backward(grad)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(gx, x.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(gw, w.grad, atol=tol, rtol=tol)
    assert gw[1].abs().sum() == 0 and gw[3].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_takes_views_and_gradients_that_are_not_contiguous(dtype):
    """The kernel refuses rows that are not contiguous and 16-byte aligned, in its backward too:
    `.sum()` (a gradient of ones broadcast over the output), a transposed consumer's gradient and
    sliced operands used to raise there, where the loop takes them."""
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 2])
    x_wide, w_wide = torch.randn(10, 18, dtype=dtype), torch.randn(4, 16, 10, dtype=dtype)
    consumer = torch.randn(8, 10, dtype=dtype)
    losses = {
        "sum": lambda y: y.sum(),
        "transposed": lambda y: (y * consumer.t()).sum(),
    }
    for name, loss in losses.items():
        grads = []
        for multiply in (grouped_mm, grouped_mm_loop):
            x = x_wide[:, :16].detach().requires_grad_(True)  # row stride 18 elements
            w = w_wide[..., :8].detach().requires_grad_(True)
            loss(multiply(x, w, counts)).backward()
            grads.append((x.grad, w.grad))
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        for mine, reference in zip(*grads):
            torch.testing.assert_close(mine, reference, atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_grouped_mm_path_equals_per_expert_loop(activation):
    layer = _layer(activation=activation, num_experts=8, top_k=2)
    x = torch.randn(3, 7, 16)
    grad_output = torch.randn(3, 7, 16)
    y_grouped, gx_grouped, grads_grouped = _forward_backward(layer, x, grad_output)
    layer.experts.use_grouped_mm = False
    y_loop, gx_loop, grads_loop = _forward_backward(layer, x, grad_output)
    torch.testing.assert_close(y_grouped, y_loop, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gx_grouped, gx_loop, atol=1e-6, rtol=1e-5)
    assert grads_grouped.keys() == grads_loop.keys()
    for name in grads_grouped:
        torch.testing.assert_close(grads_grouped[name], grads_loop[name], atol=1e-6, rtol=1e-5)


def test_experts_compute_in_the_autocast_dtype():
    """Under bf16 autocast the dispatched rows and the experts' GEMM operands are bf16 (the fast
    grouped kernel's dtype), not fp32; the layer's result stays close to the fp32 one."""
    class RecordDtype(LocalDispatcher):
        def dispatch(self, x_TD, routing):
            self.input_dtype = x_TD.dtype
            return super().dispatch(x_TD, routing)

    layer = _layer(num_experts=4, top_k=2)
    layer.dispatcher = RecordDtype(4)
    x = torch.randn(2, 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = layer.experts(x.view(-1, 16), torch.tensor([4, 4, 4, 4]))
        y_mixed = layer(x)
    assert hidden.dtype == torch.bfloat16 and y_mixed.dtype == torch.bfloat16
    # The rows are cast before dispatch, so an all-to-all would carry bf16.
    assert layer.dispatcher.input_dtype == torch.bfloat16
    torch.testing.assert_close(y_mixed.float(), layer(x), atol=2e-2, rtol=2e-2)


def test_bf16_input_into_an_fp32_layer_with_shared_experts():
    """Without autocast, a bf16 input into an fp32 layer runs in bf16 on the shared path as on the
    routed one (it used to fail in the shared experts' matmul), close to the fp32 result."""
    layer = _layer(num_experts=4, top_k=2, num_shared_experts=1, shared_expert_gate=True)
    x = torch.randn(2, 8, 16).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x.float()), atol=2e-2, rtol=2e-2)


def test_combine_weights_and_sums_in_fp32():
    """bf16 rows times fp32 gate weights: 1 * (1 + 2**-9) + 1 * (2**-9 + 2**-12) is 1 + 2**-8 + 2**-12,
    just above the midpoint between the bf16 neighbours 1 and 1 + 2**-7, so rounding once gives
    1 + 2**-7. Rounding the weights to bf16 first (1 and 2**-9 + 2**-12) would give 1."""
    rows = torch.ones(2, 1, dtype=torch.bfloat16)
    weights = torch.tensor([1 + 2.0**-9, 2.0**-9 + 2.0**-12])
    out = weighted_sum_rows(rows, weights, torch.zeros(2, dtype=torch.long), 1)
    assert out.dtype == torch.bfloat16 and out.item() == 1 + 2.0**-7


def test_layer_equals_dense_reference_per_token():
    """Each token's output is the weighted sum of its experts' SwiGLU outputs, computed naively."""
    layer = _layer(num_experts=4, top_k=2)
    x = torch.randn(5, 16)
    y = layer(x)
    probs = torch.softmax(x @ layer.gate.weight.t(), dim=-1)
    top_probs, top_ids = probs.topk(2, dim=-1)
    top_probs = top_probs / top_probs.sum(-1, keepdim=True)
    expected = torch.zeros_like(x)
    for t in range(5):
        for slot in range(2):
            e = top_ids[t, slot]
            gate, up = (x[t] @ layer.experts.w_in[e]).chunk(2)
            expected[t] += top_probs[t, slot] * ((torch.nn.functional.silu(gate) * up) @ layer.experts.w_out[e])
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-5)


def test_dropless_equals_capacity_mode_with_large_capacity():
    layer = _layer(num_experts=4, top_k=2)
    x, grad_output = torch.randn(2, 9, 16), torch.randn(2, 9, 16)
    dropless = _forward_backward(layer, x, grad_output)
    layer.capacity_factor = 4.0  # every expert could take every assignment
    capped = _forward_backward(layer, x, grad_output)
    assert layer.dropped_tokens.item() == 0
    torch.testing.assert_close(dropless[0], capped[0])
    torch.testing.assert_close(dropless[1], capped[1])
    for name in dropless[2]:
        torch.testing.assert_close(dropless[2][name], capped[2][name])


def test_drop_over_capacity_keeps_first_choices_first():
    # 4 tokens, top-2, 2 experts; k-major order: first choices [0, 0, 0, 1], second [1, 1, 1, 0].
    routing = Routing(
        token_index_N=torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]),
        expert_index_N=torch.tensor([0, 0, 0, 1, 1, 1, 1, 0]),
        weight_N=torch.arange(8, dtype=torch.float32),
        num_tokens=4,
    )
    # capacity = ceil(0.5 * 8 / 2) = 2 per expert
    assert expert_capacity(8, 2, 0.5) == 2
    assert expert_capacity(100, 10, 1.1) == 11  # as written in decimal, not ceil(11.000000000000002)
    assert expert_capacity(10**9 + 1, 1, 1.0) == 10**9 + 1  # exact, however many assignments
    assert expert_capacity(100, 10, 1.15) == 12
    limited = limit_to_capacity(routing, num_experts=2, capacity_factor=0.5)
    assert limited.capacity == 2 and limited.position_in_expert_N.tolist() == [0, 1, 2, 0, 1, 2, 3, 3]
    assert dropped_over_capacity(limited).item() == 4
    kept = drop_over_capacity(limited)
    assert kept.num_dropped == 4 and kept.capacity is None
    # expert 0 keeps tokens 0, 1 (first choices, earliest); expert 1 keeps token 3's first choice and
    # token 0's second choice.
    assert kept.token_index_N.tolist() == [0, 1, 3, 0]
    assert kept.expert_index_N.tolist() == [0, 0, 1, 1]
    assert kept.weight_N.tolist() == [0.0, 1.0, 3.0, 4.0]


def test_dropped_tokens_are_counted_and_pass_as_zero():
    layer = _layer(num_experts=4, top_k=1, capacity_factor=0.5)
    x = torch.randn(1, 16, 16)
    y = layer(x)
    capacity = expert_capacity(16, 4, 0.5)
    assert layer.routed_tokens.item() == 16
    assert layer.tokens_per_expert.max().item() <= capacity
    assert layer.dropped_tokens.item() == 16 - layer.tokens_per_expert.sum().item()
    assert layer.dropped_tokens.item() > 0
    zero_rows = (y.reshape(16, 16).abs().sum(-1) == 0).sum().item()
    assert zero_rows == layer.dropped_tokens.item()  # top-1: a dropped token gets no expert output


@pytest.mark.parametrize(("top_k", "capacity_factor"), [(1, 0.5), (2, 0.75), (2, 1.0), (3, 2.0)])
def test_padded_capacity_matches_dropping_first(top_k, capacity_factor):
    """``pad_to_capacity``: every expert runs on exactly its capacity of rows, padded (no shape that
    depends on the routing); the same outputs, gradients, counts and traffic as computing the kept
    rows alone."""
    results, expert_rows = [], {}
    for pad_to_capacity in (True, False):
        layer = _layer(num_experts=8, top_k=top_k, capacity_factor=capacity_factor, pad_to_capacity=pad_to_capacity)
        layer.experts.register_forward_hook(lambda module, inputs, output, key=pad_to_capacity: expert_rows.update(
            {key: inputs[0].shape[0]}))
        x = torch.randn(3, 10, 16, generator=torch.Generator().manual_seed(1))
        grad_output = torch.randn(3, 10, 16, generator=torch.Generator().manual_seed(2))
        output, grad_x, grads = _forward_backward(layer, x, grad_output)
        results.append((output, grad_x, grads, layer.tokens_per_expert.clone(), layer.dropped_tokens.clone(),
                        layer.traffic.tokens_sent_per_rank, layer.traffic.assignments_sent_per_rank))
    padded, kept_only = results
    capacity = expert_capacity(30 * top_k, 8, capacity_factor)
    assert expert_rows == {True: 8 * capacity, False: int(padded[3].sum())}  # padded rows, or the kept ones
    assert padded[4].item() > 0 or capacity_factor >= 2.0  # something was dropped (but in the roomy case)
    for got, want in zip(padded, kept_only):
        if isinstance(want, dict):
            for name in want:
                torch.testing.assert_close(got[name], want[name], msg=name)
        else:
            torch.testing.assert_close(got, want)


def test_counts_sum_to_tokens_times_k_in_dropless_mode():
    layer = _layer(num_experts=8, top_k=3)
    layer(torch.randn(4, 5, 16))
    assert layer.tokens_per_expert.sum().item() == 4 * 5 * 3
    assert layer.num_tokens == 20 and layer.dropped_tokens.item() == 0


@pytest.mark.parametrize("shape", [(16,), (7, 16), (2, 3, 16), (2, 2, 3, 16)])
def test_any_leading_dimensions(shape):
    layer = _layer()
    assert layer(torch.randn(*shape)).shape == shape


def test_shared_experts_with_sigmoid_gate_add_to_output():
    layer = _layer(num_shared_experts=2, shared_expert_gate=True)
    assert layer.shared_experts.w_out.in_features == 64
    x = torch.randn(6, 16)
    y = layer(x)
    shared = layer.shared_experts(x) * torch.sigmoid(layer.shared_expert_gate(x))
    layer.shared_experts = None
    torch.testing.assert_close(y, layer(x) + shared)


def test_fine_grained_experts_and_aux_losses():
    layer = _layer(num_experts=64, d_ff=8, top_k=6, gate_kwargs={"z_loss_coef": 1e-3})
    layer(torch.randn(32, 16))
    losses = collect_aux_losses(layer)
    assert set(losses) == {"load_balance_loss", "z_loss"}
    expected = 0.01 * layer.aux_losses["load_balance_loss"].value + 1e-3 * layer.aux_losses["z_loss"].value
    torch.testing.assert_close(collect_aux_loss(layer), expected)


def test_a_gate_instance_is_copied_per_layer():
    from lightning_moe.layers.gates import TopKGate

    template = TopKGate(top_k=1, normalize=False)
    first = MoELayer(d_model=16, d_ff=32, num_experts=4, gate=template)
    second = MoELayer(d_model=16, d_ff=32, num_experts=4, gate=template)
    assert first.gate is not second.gate and template.num_experts is None
    assert first.gate.top_k == 1


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(pad_to_capacity=True), "pad_to_capacity"),
        (dict(capacity_factor=1.0, pad_to_capacity="yes"), "pad_to_capacity"),
        (dict(top_k=5), "top_k"),
        (dict(gate="nope"), "gate"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(capacity_factor=-1.0), "capacity_factor"),
        (dict(num_experts=0), "num_experts"),
        (dict(activation="relu6"), "activation"),
        (dict(gate_kwargs={"temperature": 2.0}), "gate_kwargs"),
        (dict(num_shared_experts=-1), "num_shared_experts"),
        (dict(shared_expert_gate=True), "`shared_expert_gate`=True scales the shared experts' output, but the layer"),
    ],
)
def test_bad_configuration_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        _layer(**kwargs)


def test_top_k_given_twice_is_a_value_error():
    with pytest.raises(ValueError, match="top_k"):
        _layer(top_k=2, gate_kwargs={"top_k": 3})


def test_expert_choice_refuses_a_second_capacity_limit():
    with pytest.raises(ValueError, match="capacity_factor"):
        _layer(gate="expert_choice", capacity_factor=1.0)
