"""Parts of :class:`~lightning_moe.MoETransformer` built from its hyper-parameters: a block's attention
(grouped-query or multi-head latent), and the loss coefficients that override a gate's."""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_moe.layers.gates import Gate
from lightning_moe.modeling.attention import CausalSelfAttention
from lightning_moe.modeling.config import OWNER
from lightning_moe.modeling.mla import MultiHeadLatentAttention
from lightning_moe.modeling.rope import yarn_mscale


def build_attention(hp: Any) -> nn.Module:
    """One block's attention from ``MoETransformer``'s hyper-parameters: multi-head latent attention
    when ``kv_lora_rank`` is set, else causal self-attention with RoPE."""
    if hp.kv_lora_rank is None:
        return CausalSelfAttention(
            d_model=hp.d_model,
            n_heads=hp.n_heads,
            n_kv_heads=hp.n_kv_heads or hp.n_heads,
            head_dim=hp.head_dim,
            bias=hp.attention_bias,
            out_bias=hp.attention_out_bias,
            qk_norm=hp.qk_norm,
            norm_eps=hp.norm_eps,
            rope_interleave=hp.rope_interleave,
            init_std=hp.init_std,
        )
    softmax_scale = (hp.qk_nope_head_dim + hp.qk_rope_head_dim) ** -0.5
    mscale_all_dim = (hp.rope_scaling or {}).get("mscale_all_dim")
    if mscale_all_dim:
        # DeepSeek-V2/V3's YaRN: the attention temperature enters the softmax scale, squared
        # (once for queries and once for keys), rather than the rotary tables.
        softmax_scale *= yarn_mscale(float(hp.rope_scaling["factor"]), mscale_all_dim) ** 2
    return MultiHeadLatentAttention(
        d_model=hp.d_model,
        n_heads=hp.n_heads,
        q_lora_rank=hp.q_lora_rank,
        kv_lora_rank=hp.kv_lora_rank,
        qk_nope_head_dim=hp.qk_nope_head_dim,
        qk_rope_head_dim=hp.qk_rope_head_dim,
        v_head_dim=hp.v_head_dim,
        bias=hp.attention_bias,
        out_bias=hp.attention_out_bias,
        # NOTE: not `hp.norm_eps`: DeepSeek's reference code and transformers build the latent norms
        # with their default epsilon (1e-6) whatever `rms_norm_eps` says.
        softmax_scale=softmax_scale,
        rope_interleave=hp.rope_interleave,
        init_std=hp.init_std,
    )


def override_gate_coefficients(gate: Gate, load_balance_coef: float | None, z_loss_coef: float | None) -> None:
    """Set the gate's ``load_balance_coef`` / ``z_loss_coef`` to the given values (``None`` keeps the
    gate's), refusing a gate that has no such loss."""
    for name, value in (("load_balance_coef", load_balance_coef), ("z_loss_coef", z_loss_coef)):
        if value is None:
            continue
        if not hasattr(gate, name):
            raise ValueError(
                f"{OWNER}: `{name}`={value} was given, but gate {type(gate).__name__} has no `{name}`. "
                f"Leave `{name}` unset, or set the gate's own loss coefficients in `gate_kwargs`."
            )
        setattr(gate, name, float(value))
