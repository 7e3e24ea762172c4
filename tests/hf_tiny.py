"""Tiny random transformers MoE models of every supported family, saved with ``save_pretrained``.

Shared by the transformers-interop tests. Weights are drawn with a fixed generator, routers large
enough that routing is far from uniform (a near tie could flip under rounding), DeepSeek-V3's
correction bias negative enough that the dropped-group fill matters.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 64
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=None,
)
_DEEPSEEK = dict(
    intermediate_size=24, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
    topk_group=2, first_k_dense_replace=1, n_shared_experts=2, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16,
    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, routed_scaling_factor=2.5,
)

#: Variant name -> (model_type, config overrides). Each family once with its defining features,
#: plus variants for options that change the mapping.
VARIANTS: dict[str, tuple[str, dict]] = {
    "mixtral": ("mixtral", dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("qwen2_moe", dict(
        intermediate_size=24, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=4,
        num_experts_per_tok=2, mlp_only_layers=[0], norm_topk_prob=False,
    )),
    "qwen2_moe_sparse_step": ("qwen2_moe", dict(
        num_hidden_layers=3, intermediate_size=24, moe_intermediate_size=16, shared_expert_intermediate_size=8,
        num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2, norm_topk_prob=True, qkv_bias=False,
    )),
    "qwen3_moe": ("qwen3_moe", dict(
        intermediate_size=24, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, head_dim=16,
        norm_topk_prob=True,
    )),
    "qwen3_moe_bias_tied": ("qwen3_moe", dict(
        intermediate_size=24, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=3, attention_bias=True,
        tie_word_embeddings=True, norm_topk_prob=False,
    )),
    "olmoe": ("olmoe", dict(intermediate_size=16, num_experts=4, num_experts_per_tok=2, attention_bias=True)),
    "deepseek_v3": ("deepseek_v3", _DEEPSEEK),
    # Yarn as the real config uses it (mscale == mscale_all_dim: the softmax scale changes, the
    # rotary tables do not), direct queries (q_lora_rank None), the non-interleaved rotary layout.
    "deepseek_v3_yarn": ("deepseek_v3", {
        **_DEEPSEEK, "q_lora_rank": None, "max_position_embeddings": 256, "attention_bias": True,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                            "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
                            "mscale": 1.0, "mscale_all_dim": 1.0},
    }),
    # No shared expert: transformers builds (and saves) an empty one.
    "deepseek_v3_no_shared": ("deepseek_v3", {**_DEEPSEEK, "n_shared_experts": 0}),
    # The non-interleaved rotary layout, and an rms_norm_eps that the latent norms (always 1e-6) do not take.
    "deepseek_v3_plain_rope": ("deepseek_v3", {
        **_DEEPSEEK, "rope_interleave": False, "n_group": 1, "topk_group": 1, "rms_norm_eps": 1e-2,
    }),
}


def hf_config(variant: str):
    model_type, overrides = VARIANTS[variant]
    return AutoConfig.for_model(model_type, **{**COMMON, **overrides})


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        scale = 0.5 if name.endswith("gate.weight") else 0.1
        offset = 1.0 if "norm" in name else 0.0
        parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale + offset)
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.3 - 0.4)
    return model.eval()


def save_tiny(variant: str, directory: Path, **save_kwargs) -> tuple[Path, torch.nn.Module]:
    """A random transformers model of ``variant`` saved into ``directory``; returns both."""
    model = randomize(AutoModelForCausalLM.from_config(hf_config(variant)))
    model.save_pretrained(directory, **save_kwargs)
    return directory, model


def token_ids(batch: int = 2, length: int = 11, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits
