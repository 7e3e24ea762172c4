"""Causal self-attention with rotary position embeddings and optional grouped-query attention.

Shape legend: ``B`` batch, ``T`` sequence length, ``D`` model width, ``H`` query heads, ``G`` key/value
heads (``G == H`` is multi-head attention, ``G < H`` grouped-query attention), ``Hd`` head width,
``R = Hd / 2`` rotary frequencies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rotary_cos_sin(
    seq_len: int, head_dim: int, *, theta: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines of the rotary angles ``pos * theta^(-2i / Hd)``, each ``[T, R]`` in fp32.

    RoFormer (Su et al. 2021, eq. 15): the pair ``i`` of a head is rotated by the angle
    ``pos * theta^(-2i/Hd)``. Computed per forward in fp32 rather than kept in a buffer, so that
    ``model.to(torch.bfloat16)`` cannot round the angles of late positions.
    """
    inv_freq_R = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles_TR = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq_R)
    return angles_TR.cos(), angles_TR.sin()


def apply_rotary(x_BHTd: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> torch.Tensor:
    """Rotate the feature pairs ``(x[i], x[i + R])`` of every head by the position's angles.

    NOTE: pairs are formed from the two halves of the head (the GPT-NeoX / Llama layout), not from
    adjacent features as in the RoFormer paper; both are the same rotation up to a fixed
    permutation of the head's features, which the projections learn.
    """
    x1_BHTR, x2_BHTR = x_BHTd.float().chunk(2, dim=-1)
    rotated_BHTd = torch.cat((x1_BHTR * cos_TR - x2_BHTR * sin_TR, x1_BHTR * sin_TR + x2_BHTR * cos_TR), dim=-1)
    return rotated_BHTd.to(x_BHTd.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with RoPE, computed by ``scaled_dot_product_attention``.

    With ``n_kv_heads < n_heads`` each key/value head is shared by ``n_heads / n_kv_heads`` query
    heads (grouped-query attention, Ainslie et al. 2023), which shrinks the KV projections.

    Args:
        d_model: model width.
        n_heads: query heads; ``d_model / n_heads`` is the head width.
        n_kv_heads: key/value heads, dividing ``n_heads``.
        init_std: standard deviation of the normal weight initialisation.
    """

    def __init__(self, *, d_model: int, n_heads: int, n_kv_heads: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.kv_proj = nn.Linear(d_model, 2 * n_kv_heads * self.head_dim, bias=False)
        self.out_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        for linear in (self.q_proj, self.kv_proj, self.out_proj):
            nn.init.normal_(linear.weight, std=init_std)

    def forward(self, x_BTD: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x_BTD.shape
        q_BHTd = self.q_proj(x_BTD).view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)
        kv_BT2Gd = self.kv_proj(x_BTD).view(batch, seq_len, 2, self.n_kv_heads, self.head_dim)
        k_BGTd, v_BGTd = kv_BT2Gd.permute(2, 0, 3, 1, 4).unbind(0)
        q_BHTd = apply_rotary(q_BHTd, cos_TR, sin_TR)
        k_BGTd = apply_rotary(k_BGTd, cos_TR, sin_TR)
        y_BHTd = F.scaled_dot_product_attention(
            q_BHTd, k_BGTd, v_BGTd, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads
        )
        y_BTD = y_BHTd.transpose(1, 2).reshape(batch, seq_len, self.n_heads * self.head_dim)
        return self.out_proj(y_BTD)

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}"
