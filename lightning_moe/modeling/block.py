"""A pre-norm decoder block, and which blocks of a model get an MoE feed-forward.

Shape legend: ``B`` batch, ``T`` sequence length, ``D`` model width, ``R`` rotary frequencies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_moe.layers.moe import MoELayer

#: Default RMSNorm epsilon, as in Llama and DeepSeek-V3 (``MoETransformer(norm_eps=...)`` changes it).
NORM_EPS = 1e-6


def moe_layer_layout(
    *, n_layers: int, first_k_dense: int, moe_every_n_layers: int, moe_layer_indices: Sequence[int] | None = None
) -> list[bool]:
    """Whether each of ``n_layers`` blocks gets an MoE feed-forward (``True``) or a dense one.

    The first ``first_k_dense`` blocks are dense (DeepSeekMoE, Dai et al. 2024, keeps the first
    layers dense because their routing balances poorly). Counting from the first block after them,
    every ``moe_every_n_layers``-th block is MoE: with ``moe_every_n_layers=2`` blocks 1, 3, 5, ...
    as GLaM (Du et al. 2022) and GShard alternate dense and MoE layers; with 1 every block is MoE.
    ``moe_layer_indices``, when given, lists the MoE blocks instead (e.g. Qwen2-MoE's
    ``mlp_only_layers`` leave holes no rule above describes).
    """
    if moe_layer_indices is not None:
        chosen = set(moe_layer_indices)
        return [index in chosen for index in range(n_layers)]
    return [
        index >= first_k_dense and (index - first_k_dense + 1) % moe_every_n_layers == 0 for index in range(n_layers)
    ]


class DecoderBlock(nn.Module):
    """``x + attn(norm(x))`` then ``x + ffn(norm(x))``: the pre-norm residual block (Xiong et al. 2020)
    with RMSNorm (Zhang & Sennrich 2019).

    Args:
        d_model: model width.
        attention: the block's attention, called as ``attention(x, cos, sin)``: a
            :class:`~lightning_moe.modeling.CausalSelfAttention` or a
            :class:`~lightning_moe.modeling.MultiHeadLatentAttention`.
        feed_forward: the block's FFN: a :class:`~lightning_moe.MoELayer` or a dense
            :class:`~lightning_moe.layers.experts.FeedForward`.
        norm_eps: epsilon of the two RMSNorms.
    """

    def __init__(self, *, d_model: int, attention: nn.Module, feed_forward: nn.Module, norm_eps: float = NORM_EPS) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.attn = attention
        self.ffn_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.ffn = feed_forward

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoELayer)

    def forward(self, x_BTD: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> torch.Tensor:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos_TR, sin_TR)
        return x_BTD + self.ffn(self.ffn_norm(x_BTD))
