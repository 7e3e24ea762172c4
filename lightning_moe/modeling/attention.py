"""Causal self-attention with rotary position embeddings, optional grouped-query attention, biases
and query/key normalisation.

Shape legend: ``B`` batch, ``T`` sequence length, ``D`` model width, ``H`` query heads, ``G`` key/value
heads (``G == H`` is multi-head attention, ``G < H`` grouped-query attention), ``Hd`` head width,
``R = Hd / 2`` rotary frequencies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Re-exported: the rotary helpers lived here first.
from lightning_moe.modeling.rope import apply_rotary, rotary_cos_sin

#: Values of ``qk_norm``: RMSNorm over each head's features (Qwen3-MoE), or over the whole query and
#: key projections (OLMoE).
QK_NORMS = ("head", "full")

__all__ = ["QK_NORMS", "CausalSelfAttention", "apply_rotary", "rotary_cos_sin"]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with RoPE, computed by ``scaled_dot_product_attention``.

    With ``n_kv_heads < n_heads`` each key/value head is shared by ``n_heads / n_kv_heads`` query
    heads (grouped-query attention, Ainslie et al. 2023), which shrinks the KV projections.

    ``qk_norm`` normalises queries and keys with a learned RMSNorm before the rotation, which keeps
    attention logits bounded (Dehghani et al. 2023, "Scaling Vision Transformers to 22B", Sec. 3.1):
    ``"head"`` over each head's ``Hd`` features (Qwen3-MoE), ``"full"`` over the whole ``H * Hd``
    query and ``G * Hd`` key projections (OLMoE, Muennighoff et al. 2024).

    Args:
        d_model: model width.
        n_heads: query heads.
        n_kv_heads: key/value heads, dividing ``n_heads``.
        head_dim: width of each head; ``d_model / n_heads`` by default.
        bias: biases on the query, key and value projections (Qwen2-MoE, OLMoE, Qwen3-MoE options).
        out_bias: a bias on the output projection.
        qk_norm: ``None``, ``"head"`` or ``"full"`` (see above).
        norm_eps: epsilon of the query/key RMSNorms.
        rope_interleave: rotate adjacent feature pairs (see :func:`apply_rotary`).
        init_std: standard deviation of the normal weight initialisation (biases start at zero).
    """

    def __init__(
        self,
        *,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int | None = None,
        bias: bool = False,
        out_bias: bool = False,
        qk_norm: str | None = None,
        norm_eps: float = 1e-6,
        rope_interleave: bool = False,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if qk_norm is not None and qk_norm not in QK_NORMS:
            raise ValueError(f"CausalSelfAttention: `qk_norm` must be None or one of {list(QK_NORMS)}, got {qk_norm!r}.")
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = head_dim or d_model // n_heads
        self.qk_norm, self.rope_interleave = qk_norm, rope_interleave
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        # Keys then values, one GEMM: rows [0, G*Hd) are the keys.
        self.kv_proj = nn.Linear(d_model, 2 * n_kv_heads * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=out_bias)
        for linear in (self.q_proj, self.kv_proj, self.out_proj):
            nn.init.normal_(linear.weight, std=init_std)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        if qk_norm is not None:
            q_width, k_width = (self.head_dim, self.head_dim) if qk_norm == "head" else (
                n_heads * self.head_dim, n_kv_heads * self.head_dim)
            self.q_norm = nn.RMSNorm(q_width, eps=norm_eps)
            self.k_norm = nn.RMSNorm(k_width, eps=norm_eps)

    def forward(self, x_BTD: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x_BTD.shape
        q_BTX = self.q_proj(x_BTD)  # (B, T, H*Hd)
        kv_BTX = self.kv_proj(x_BTD)  # (B, T, 2*G*Hd)
        if self.qk_norm == "full":
            key_width = self.n_kv_heads * self.head_dim
            q_BTX = self.q_norm(q_BTX)
            kv_BTX = torch.cat((self.k_norm(kv_BTX[..., :key_width]), kv_BTX[..., key_width:]), dim=-1)
        q_BTHd = q_BTX.view(batch, seq_len, self.n_heads, self.head_dim)
        kv_BT2Gd = kv_BTX.view(batch, seq_len, 2, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q_BTHd = self.q_norm(q_BTHd)
            kv_BT2Gd = torch.stack((self.k_norm(kv_BT2Gd[:, :, 0]), kv_BT2Gd[:, :, 1]), dim=2)
        q_BHTd = q_BTHd.transpose(1, 2)
        k_BGTd, v_BGTd = kv_BT2Gd.permute(2, 0, 3, 1, 4).unbind(0)
        q_BHTd = apply_rotary(q_BHTd, cos_TR, sin_TR, interleaved=self.rope_interleave)
        k_BGTd = apply_rotary(k_BGTd, cos_TR, sin_TR, interleaved=self.rope_interleave)
        y_BHTd = F.scaled_dot_product_attention(
            q_BHTd, k_BGTd, v_BGTd, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads
        )
        y_BTD = y_BHTd.transpose(1, 2).reshape(batch, seq_len, self.n_heads * self.head_dim)
        return self.out_proj(y_BTD)

    def extra_repr(self) -> str:
        return (
            f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
            f"qk_norm={self.qk_norm}"
        )
