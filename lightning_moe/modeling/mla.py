"""Multi-head latent attention (MLA) of DeepSeek-V2 and DeepSeek-V3.

DeepSeek-AI 2024, "DeepSeek-V2", Sec. 2.1.2-2.1.3, eqs. 9-19: keys and values are expanded from
one low-rank latent ``c_KV`` per token (what an inference cache keeps); queries optionally from a
low-rank latent ``c_Q``. Position enters only through a few extra "decoupled" rotary features:
``qk_rope_head_dim`` per query head, and one rotary key shared by every head (eq. 15).

Shape legend: ``B`` batch, ``T`` sequence length, ``D`` model width, ``H`` heads, ``C`` key/value latent
width (``kv_lora_rank``), ``Q`` query latent width (``q_lora_rank``), ``N`` per-head features without
position (``qk_nope_head_dim``), ``P`` rotary features (``qk_rope_head_dim``), ``V`` value width
(``v_head_dim``), ``R = P / 2`` rotary frequencies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_moe.modeling.rope import apply_rotary


class MultiHeadLatentAttention(nn.Module):
    """Causal multi-head latent attention (DeepSeek-V2/V3).

    Queries: ``q = W_UQ norm(W_DQ x)`` with ``q_lora_rank``, else ``q = W_Q x``; each head's ``N + P``
    features split into a part without position and a rotary part. Keys and values: ``[c_KV, k_R]
    = W_DKV x``; ``[k_C; v] = W_UKV norm(c_KV)`` per head, and the key of head ``h`` is
    ``[k_C,h ; rope(k_R)]``. Then causal softmax attention with ``softmax_scale`` and an output
    projection from ``H * V``.

    Args:
        d_model: model width ``D``.
        n_heads: heads ``H``.
        q_lora_rank: width ``Q`` of the query latent; ``None`` projects queries directly (DeepSeek-V2-Lite).
        kv_lora_rank: width ``C`` of the key/value latent.
        qk_nope_head_dim: per-head query/key features without position ``N``.
        qk_rope_head_dim: rotary features ``P`` per query head and of the shared rotary key.
        v_head_dim: per-head value width ``V``.
        bias: biases on the two down-projections ``W_DQ`` and ``W_DKV`` (DeepSeek's ``attention_bias``).
        out_bias: a bias on the output projection.
        norm_eps: epsilon of the latent RMSNorms (DeepSeek's checkpoints use 1e-6, not the model's
            ``rms_norm_eps``).
        softmax_scale: factor on the attention logits; ``(N + P) ** -0.5`` by default. DeepSeek's
            YaRN checkpoints multiply it by ``mscale**2`` (see ``MoETransformer``'s ``rope_scaling``).
        rope_interleave: the rotary features are stored as adjacent pairs (DeepSeek's layout).
        init_std: standard deviation of the normal weight initialisation.
    """

    def __init__(
        self,
        *,
        d_model: int,
        n_heads: int,
        q_lora_rank: int | None,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        bias: bool = False,
        out_bias: bool = False,
        norm_eps: float = 1e-6,
        softmax_scale: float | None = None,
        rope_interleave: bool = True,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.n_heads, self.q_lora_rank, self.kv_lora_rank = n_heads, q_lora_rank, kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.softmax_scale = softmax_scale if softmax_scale is not None else qk_head_dim**-0.5
        self.rope_interleave = rope_interleave
        if q_lora_rank is None:
            self.q_proj = nn.Linear(d_model, n_heads * qk_head_dim, bias=False)
            linears = [self.q_proj]
        else:
            self.q_a_proj = nn.Linear(d_model, q_lora_rank, bias=bias)
            self.q_a_norm = nn.RMSNorm(q_lora_rank, eps=norm_eps)
            self.q_b_proj = nn.Linear(q_lora_rank, n_heads * qk_head_dim, bias=False)
            linears = [self.q_a_proj, self.q_b_proj]
        self.kv_a_proj = nn.Linear(d_model, kv_lora_rank + qk_rope_head_dim, bias=bias)
        self.kv_a_norm = nn.RMSNorm(kv_lora_rank, eps=norm_eps)
        self.kv_b_proj = nn.Linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.out_proj = nn.Linear(n_heads * v_head_dim, d_model, bias=out_bias)
        for linear in (*linears, self.kv_a_proj, self.kv_b_proj, self.out_proj):
            nn.init.normal_(linear.weight, std=init_std)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def forward(self, x_BTD: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x_BTD.shape
        heads, nope, rope, value = self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        # 1. Queries (eqs. 12-13): from the latent c_Q, or directly.
        if self.q_lora_rank is None:
            q_BTX = self.q_proj(x_BTD)
        else:
            q_BTX = self.q_b_proj(self.q_a_norm(self.q_a_proj(x_BTD)))
        q_BHTX = q_BTX.view(batch, seq_len, heads, nope + rope).transpose(1, 2)
        q_nope_BHTN, q_rope_BHTP = q_BHTX.split((nope, rope), dim=-1)

        # 2. The key/value latent c_KV (eq. 9) and the shared rotary key k_R (eq. 15).
        latent_BTX = self.kv_a_proj(x_BTD)  # (B, T, C + P)
        c_kv_BTC, k_rope_BTP = latent_BTX.split((self.kv_lora_rank, rope), dim=-1)
        k_rope_B1TP = k_rope_BTP.unsqueeze(1)

        # 3. Rotary features of the queries (eq. 14) and of the shared key (eq. 15).
        q_rope_BHTP = apply_rotary(q_rope_BHTP, cos_TR, sin_TR, interleaved=self.rope_interleave)
        k_rope_B1TP = apply_rotary(k_rope_B1TP, cos_TR, sin_TR, interleaved=self.rope_interleave)

        # 4. Per-head keys and values expanded from the normalised latent (eqs. 10-11, 16-17).
        kv_BTHX = self.kv_b_proj(self.kv_a_norm(c_kv_BTC)).view(batch, seq_len, heads, nope + value)
        k_nope_BHTN, v_BHTV = kv_BTHX.transpose(1, 2).split((nope, value), dim=-1)
        k_BHTX = torch.cat((k_nope_BHTN, k_rope_B1TP.expand(-1, heads, -1, -1)), dim=-1)
        q_BHTX = torch.cat((q_nope_BHTN, q_rope_BHTP), dim=-1)

        # 5. Attention (eqs. 18-19); the value width may differ from the query/key width.
        y_BHTV = F.scaled_dot_product_attention(q_BHTX, k_BHTX, v_BHTV, is_causal=True, scale=self.softmax_scale)
        return self.out_proj(y_BHTV.transpose(1, 2).reshape(batch, seq_len, heads * value))

    def extra_repr(self) -> str:
        return (
            f"n_heads={self.n_heads}, q_lora_rank={self.q_lora_rank}, kv_lora_rank={self.kv_lora_rank}, "
            f"qk_nope_head_dim={self.qk_nope_head_dim}, qk_rope_head_dim={self.qk_rope_head_dim}, "
            f"v_head_dim={self.v_head_dim}"
        )
