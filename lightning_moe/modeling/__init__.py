"""Parts of :class:`~lightning_moe.MoETransformer`: attention with RoPE, the decoder block, config checks, optimizer."""

from lightning_moe.modeling.attention import CausalSelfAttention, apply_rotary, rotary_cos_sin
from lightning_moe.modeling.block import DecoderBlock, moe_layer_layout
from lightning_moe.modeling.optim import warmup_cosine, weight_decay_groups

__all__ = [
    "CausalSelfAttention",
    "DecoderBlock",
    "apply_rotary",
    "moe_layer_layout",
    "rotary_cos_sin",
    "warmup_cosine",
    "weight_decay_groups",
]
