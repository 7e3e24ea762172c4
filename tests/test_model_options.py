"""MoETransformer's architecture options: boundary checks naming the field, meta-device construction,
the explicit MoE layer list, and RoPE scaling against transformers' own frequencies."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV3Config, Qwen3MoeConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from lightning_moe import MoETransformer
from lightning_moe.modeling.rope import rotary_cos_sin

TINY = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=4, d_ff=32, max_seq_len=32, num_experts=4, top_k=2)
MLA = dict(kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)


@pytest.mark.parametrize(
    "overrides, fields",
    [
        (dict(qk_norm="layer"), ["qk_norm", "layer"]),
        (dict(head_dim=7), ["head_dim", "7", "even"]),
        (dict(head_dim=0), ["head_dim", "0"]),
        (dict(norm_eps=0.0), ["norm_eps", "0.0"]),
        (dict(attention_bias="yes"), ["attention_bias", "yes"]),
        (dict(kv_lora_rank=8), ["qk_nope_head_dim", "kv_lora_rank"]),
        (dict(v_head_dim=8), ["v_head_dim", "kv_lora_rank"]),
        (dict(MLA, qk_rope_head_dim=3), ["qk_rope_head_dim", "3", "even"]),
        (dict(MLA, n_kv_heads=2), ["n_kv_heads", "latent"]),
        (dict(MLA, qk_norm="head"), ["qk_norm", "latent"]),
        (dict(moe_layer_indices=[0, 3]), ["moe_layer_indices", "[0, 3)"]),
        (dict(moe_layer_indices=[1, 1]), ["moe_layer_indices", "distinct"]),
        (dict(moe_layer_indices=[1], first_k_dense=1), ["moe_layer_indices", "first_k_dense"]),
        (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), ["rope_type", "dynamic"]),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), ["original_max_position_embeddings"]),
        (dict(rope_scaling={"rope_type": "linear", "factor": 0.5}), ["factor", "0.5"]),
        (dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "beta_fast": 32}), ["beta_fast", "linear"]),
        (dict(hf_config={"hidden_size": 4}), ["hf_config", "model_type"]),
        (dict(gradient_checkpointing=1), ["gradient_checkpointing"]),
        (dict(compile_blocks="yes"), ["compile_blocks", "yes"]),
    ],
)
def test_bad_options_raise_value_error_naming_the_field(overrides, fields):
    with pytest.raises(ValueError) as error:
        MoETransformer(**{**TINY, **overrides})
    for field in fields:
        assert field in str(error.value), str(error.value)


def test_head_dim_frees_d_model_from_the_head_count():
    model = MoETransformer(**{**TINY, "d_model": 30, "n_heads": 4, "head_dim": 16, "n_kv_heads": 2})
    assert model.blocks[0].attn.q_proj.weight.shape == (64, 30)
    assert model(torch.randint(0, 64, (2, 5))).shape == (2, 5, 64)


def test_moe_layer_indices_choose_the_moe_blocks():
    model = MoETransformer(**{**TINY, "moe_layer_indices": [0, 2]})
    assert model.moe_layout == [True, False, True] and not model.blocks[1].is_moe


def test_building_on_the_meta_device_allocates_nothing():
    with torch.device("meta"):
        model = MoETransformer(**{**TINY, **MLA, "gate": "sigmoid", "d_model": 4096, "d_ff": 2048, "num_experts": 64})
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert model.num_parameters() > 4e9  # about 19 GB in fp32, never allocated


@pytest.mark.parametrize(
    "config",
    [
        Qwen3MoeConfig(head_dim=16, max_position_embeddings=512,
                       rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                        "original_max_position_embeddings": 128}),
        DeepseekV3Config(qk_rope_head_dim=16, max_position_embeddings=4096 * 40,
                         rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 40.0, "beta_fast": 32,
                                          "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
                                          "original_max_position_embeddings": 4096}),
        Qwen3MoeConfig(head_dim=16, rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 8.0}),
        # Llama 3.2's own values, with a short original context so that the ramp falls on these 8 pairs.
        Qwen3MoeConfig(head_dim=16, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0,
                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 2048}),
    ],
)
def test_scaled_rope_matches_transformers(config):
    parameters = dict(config.rope_parameters)
    theta, rope_type = parameters.pop("rope_theta"), parameters["rope_type"]
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](config)
    positions = torch.arange(300, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    cos, sin = rotary_cos_sin(300, config.head_dim, theta=theta, rope_scaling=parameters)
    torch.testing.assert_close(cos, angles.cos() * attention_factor, atol=2e-5, rtol=0)
    torch.testing.assert_close(sin, angles.sin() * attention_factor, atol=2e-5, rtol=0)
    if rope_type == "yarn" and "mscale" not in parameters:
        assert attention_factor > 1  # the Qwen case scales the tables; DeepSeek's does not (mscale == mscale_all_dim)


def test_expert_choice_warns_that_a_causal_model_sees_later_tokens():
    """Expert choice routes over the whole batch: the warning is true (earlier logits move when only
    later tokens change), and a top-k model, which is causal, gives none."""
    import warnings

    options = dict(vocab_size=64, d_model=32, n_layers=1, n_heads=4, d_ff=16, max_seq_len=16, num_experts=4)
    with pytest.warns(UserWarning, match="gate='expert_choice' is not causal"):
        model = MoETransformer(gate="expert_choice", **options).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        causal = MoETransformer(gate="topk", top_k=2, **options).eval()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 64
    with torch.no_grad():
        assert not torch.allclose(model(ids)[:, :8], model(changed)[:, :8])
        torch.testing.assert_close(causal(ids)[:, :8], causal(changed)[:, :8])


@pytest.mark.parametrize("pad_to_capacity", [False, True])
def test_a_capacity_limit_warns_that_a_causal_model_sees_later_tokens(pad_to_capacity):
    """An expert over capacity drops in priority order over the whole batch: the warning is true
    (earlier logits move when only the last token changes; without the limit they do not)."""
    options = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16, num_experts=4,
                   top_k=2, init_std=0.3)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="capacity_factor=1.0 is not causal"):
        model = MoETransformer(capacity_factor=1.0, pad_to_capacity=pad_to_capacity, **options).eval()
    moved = 0.0
    with torch.no_grad():
        for seed in range(8):  # a few batches: one may drop nothing
            ids = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(seed))
            later = ids.clone()
            later[:, -1] = (later[:, -1] + 7) % 32
            moved = max(moved, (model(ids)[:, :-1] - model(later)[:, :-1]).abs().max().item())
    assert moved > 1e-3
