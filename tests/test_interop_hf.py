"""transformers interop: converted MoE blocks reproduce the transformers block's outputs and
gradients, and export back (round trip), for Mixtral, Qwen2-MoE, Qwen3-MoE and DeepSeek-V3."""

import copy

import pytest
import torch
from torch import nn
from transformers import DeepseekV3Config, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from lightning_moe import MoELayer
from lightning_moe.interop import from_hf_moe_block, hf_moe_family, to_hf_moe_block
from lightning_moe.layers.gates import SigmoidGate, TopKGate

D_MODEL = 32
COMMON = dict(hidden_size=D_MODEL, num_attention_heads=4, num_key_value_heads=4, experts_implementation="eager")


def _mixtral(**overrides):
    kwargs = dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)
    return MixtralSparseMoeBlock(MixtralConfig(**COMMON, **{**kwargs, **overrides}))


def _qwen2(**overrides):
    kwargs = dict(
        moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=False,
    )
    return Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(**COMMON, **{**kwargs, **overrides}))


def _qwen3(**overrides):
    kwargs = dict(moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)
    return Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(**COMMON, **{**kwargs, **overrides}))


def _deepseek(**overrides):
    # n_group > 1 and topk_group < n_group: group-limited routing is exercised.
    kwargs = dict(
        moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
        n_shared_experts=2, routed_scaling_factor=2.5, norm_topk_prob=True,
        q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    )
    return DeepseekV3MoE(DeepseekV3Config(**COMMON, **{**kwargs, **overrides}))


FAMILIES = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2,
    "qwen2_moe_norm": lambda: _qwen2(norm_topk_prob=True),
    "qwen3_moe": _qwen3,
    "qwen3_moe_no_norm": lambda: _qwen3(norm_topk_prob=False),
    "deepseek_v3": _deepseek,
}


@torch.no_grad()
def _randomize(block: nn.Module, seed: int) -> nn.Module:
    """Random weights; router weights large enough that routing is far from uniform."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in list(block.named_parameters()) + list(block.named_buffers()):
        std = 0.5 if name == "gate.weight" else 0.2
        tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)
        if name == "gate.e_score_correction_bias":
            # Negative enough that some kept experts have negative biased scores: the fill of dropped
            # groups then matters (checked below).
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3 - 0.4)
    return block.float().eval()


def _run(module: nn.Module, x: torch.Tensor, grad_output: torch.Tensor):
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(grad_output)
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    module.zero_grad()
    return y.detach(), x.grad, grads


def _inputs(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, D_MODEL, generator=generator)
    return x, torch.randn(3, 7, D_MODEL, generator=generator)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_converted_layer_matches_transformers_forward_and_backward(name):
    block = _randomize(FAMILIES[name](), seed=0)
    layer = from_hf_moe_block(block)
    assert isinstance(layer, MoELayer)
    x, grad_output = _inputs()

    y_ref, dx_ref, grads_ref = _run(block, x, grad_output)
    y, dx, grads = _run(layer, x, grad_output)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=0)
    # Parameter gradients too, mapped through the layouts.
    torch.testing.assert_close(grads["gate.weight"], grads_ref["gate.weight"], atol=1e-5, rtol=0)
    for ours, theirs in (("experts.w_in", "experts.gate_up_proj"), ("experts.w_out", "experts.down_proj")):
        torch.testing.assert_close(grads[ours], grads_ref[theirs].transpose(1, 2), atol=1e-5, rtol=0)
    shared = {"qwen2_moe": "shared_expert", "deepseek_v3": "shared_experts"}.get(hf_moe_family(block))
    if shared is not None:
        gate_up_grad = torch.cat([grads_ref[f"{shared}.gate_proj.weight"], grads_ref[f"{shared}.up_proj.weight"]])
        torch.testing.assert_close(grads["shared_experts.w_in.weight"], gate_up_grad, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            grads["shared_experts.w_out.weight"], grads_ref[f"{shared}.down_proj.weight"], atol=1e-5, rtol=0
        )
    if "shared_expert_gate.weight" in grads_ref:
        torch.testing.assert_close(
            grads["shared_expert_gate.weight"], grads_ref["shared_expert_gate.weight"], atol=1e-5, rtol=0
        )
    # Routing is not trivial: several experts are used.
    assert (layer.tokens_per_expert > 0).sum() >= 4
    assert layer.aux_losses == {}


def test_conversion_reads_each_family_routing():
    mixtral = from_hf_moe_block(_randomize(_mixtral(), 0))
    assert isinstance(mixtral.gate, TopKGate) and mixtral.gate.normalize and mixtral.shared_experts is None
    qwen2 = from_hf_moe_block(_randomize(_qwen2(), 0))
    assert not qwen2.gate.normalize and qwen2.shared_expert_gate is not None
    assert qwen2.shared_experts.w_out.in_features == 24
    deepseek_block = _randomize(_deepseek(), 0)
    deepseek = from_hf_moe_block(deepseek_block)
    gate = deepseek.gate
    assert isinstance(gate, SigmoidGate)
    assert (gate.top_k, gate.n_group, gate.topk_group, gate.routed_scaling_factor) == (3, 4, 2, 2.5)
    assert gate.bias_update_rate == 0.0 and not gate.needs_bias_update
    assert gate.load_balance_coef == 0.0 and gate.sequence_balance_coef == 0.0
    torch.testing.assert_close(gate.expert_bias, deepseek_block.gate.e_score_correction_bias)
    assert deepseek.shared_experts.w_out.in_features == 2 * 16
    assert {hf_moe_family(b) for b in (_mixtral(), _qwen2(), _qwen3(), _deepseek())} == {
        "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"
    }


def test_deepseek_correction_bias_stays_fp32_in_a_bf16_block():
    """transformers keeps ``e_score_correction_bias`` in fp32 in a bf16 model (`_keep_in_fp32_modules_strict`);
    the converted gate must too, or routing changes (the bias steers selection by small margins)."""
    block = _randomize(_deepseek(), seed=0).to(torch.bfloat16)
    with torch.no_grad():
        block.gate.e_score_correction_bias = torch.randn(8, dtype=torch.float32) * 1e-3 + 0.3
    layer = from_hf_moe_block(block)
    assert layer.experts.w_in.dtype == torch.bfloat16
    assert layer.gate.expert_bias.dtype == torch.float32
    assert torch.equal(layer.gate.expert_bias, block.gate.e_score_correction_bias)


def test_deepseek_dropped_group_fill_is_the_one_transformers_uses():
    """The test data routes tokens whose kept experts have negative biased scores, so a converted layer
    with the other fill value (0.0 vs -inf) would route differently: the probe picked the right one."""
    block = _randomize(_deepseek(), seed=0)
    layer = from_hf_moe_block(block)
    x, _ = _inputs()
    with torch.no_grad():
        y_ref = block(x)
        other = copy.deepcopy(layer)
        other.gate.dropped_group_fill = 0.0 if layer.gate.dropped_group_fill == float("-inf") else float("-inf")
        torch.testing.assert_close(layer(x), y_ref, atol=1e-5, rtol=0)
        assert not torch.allclose(other(x), y_ref, atol=1e-3)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"])
def test_round_trip_into_a_fresh_block(name):
    block = _randomize(FAMILIES[name](), seed=0)
    layer = from_hf_moe_block(block)
    fresh = _randomize(FAMILIES[name](), seed=5)
    assert to_hf_moe_block(layer, fresh) is fresh
    reference = block.state_dict()
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, reference[key], atol=0, rtol=0, msg=key)
    x, _ = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), block(x), atol=0, rtol=0)


def test_export_of_a_trained_layer_changes_the_block():
    block = _randomize(_qwen2(), seed=0)
    layer = from_hf_moe_block(block)
    with torch.no_grad():
        layer.experts.w_in.mul_(2.0)
        layer.shared_experts.w_in.weight[:24].add_(1.0)  # gate_proj rows only
    to_hf_moe_block(layer, block)
    torch.testing.assert_close(block.experts.gate_up_proj, layer.experts.w_in.transpose(1, 2))
    torch.testing.assert_close(block.shared_expert.gate_proj.weight, layer.shared_experts.w_in.weight[:24])
    torch.testing.assert_close(block.shared_expert.up_proj.weight, layer.shared_experts.w_in.weight[24:])


def test_dtype_is_kept():
    block = _randomize(_deepseek(), seed=0).to(torch.bfloat16)
    layer = from_hf_moe_block(block)
    assert {p.dtype for p in layer.parameters()} == {torch.bfloat16}
    assert torch.equal(layer.experts.w_out, block.experts.down_proj.transpose(1, 2))
    x = torch.randn(2, 5, D_MODEL, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16


def test_unsupported_block_names_its_type():
    with pytest.raises(ValueError, match="Unsupported MoE block type .*Linear"):
        from_hf_moe_block(nn.Linear(4, 4))


def test_export_into_a_mismatched_block_names_the_field():
    layer = from_hf_moe_block(_randomize(_qwen3(), 0))
    with pytest.raises(ValueError, match="`gate.top_k`"):
        to_hf_moe_block(layer, _qwen3(num_experts_per_tok=3))
    with pytest.raises(ValueError, match="TopKGate"):
        to_hf_moe_block(layer, _deepseek())
    with pytest.raises(ValueError, match="`gate.n_group`"):
        to_hf_moe_block(from_hf_moe_block(_randomize(_deepseek(), 0)), _deepseek(n_group=2, topk_group=1))


def test_non_silu_experts_are_refused():
    with pytest.raises(ValueError, match="silu"):
        from_hf_moe_block(_mixtral(hidden_act="gelu"))


def test_export_refuses_a_layer_with_another_dropped_group_fill():
    """The block's fill (the installed transformers') decides its routing when biased scores are negative:
    a layer routed with the other one would be copied into a block that computes something else."""
    layer = from_hf_moe_block(_randomize(_deepseek(), 0))
    installed = layer.gate.dropped_group_fill
    layer.gate.dropped_group_fill = 0.0 if installed == float("-inf") else float("-inf")
    message = f"`gate.dropped_group_fill` is {layer.gate.dropped_group_fill}.*fills dropped groups with {installed}"
    with pytest.raises(ValueError, match=message):
        to_hf_moe_block(layer, _randomize(_deepseek(), 5))


@pytest.mark.parametrize(
    "make_block",
    [lambda: _qwen2(shared_expert_intermediate_size=0), lambda: _deepseek(n_shared_experts=0)],
    ids=["qwen2_moe_shared_width_0", "deepseek_v3_no_shared_experts"],
)
def test_a_block_whose_shared_expert_is_empty_converts_without_one(make_block):
    """An empty shared expert (what `lightning-moe upcycle` writes for Qwen2-MoE) outputs zeros: the layer
    has none, and exports back into such a block."""
    block = _randomize(make_block(), seed=0)
    layer = from_hf_moe_block(block)
    assert layer.shared_experts is None and layer.shared_expert_gate is None
    x, _ = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), block(x), atol=1e-5, rtol=0)
        fresh = to_hf_moe_block(layer, _randomize(make_block(), seed=5))
        torch.testing.assert_close(fresh(x), block(x), atol=0, rtol=0)
