"""Parts of :class:`~lightning_moe.MoETransformer`: attention (with RoPE, or multi-head latent), the
decoder block, config checks, optimizer groups and schedules, freezing, activation checkpointing."""

from lightning_moe.modeling.attention import CausalSelfAttention, apply_rotary, rotary_cos_sin
from lightning_moe.modeling.block import DecoderBlock, moe_layer_layout
from lightning_moe.modeling.checkpointing import checkpointed_call, routing_records_paused
from lightning_moe.modeling.freeze import freeze_by_pattern
from lightning_moe.modeling.mla import MultiHeadLatentAttention
from lightning_moe.modeling.optim import LR_SCHEDULES, warmup_constant, warmup_cosine, warmup_linear, weight_decay_groups

__all__ = [
    "LR_SCHEDULES",
    "CausalSelfAttention",
    "DecoderBlock",
    "MultiHeadLatentAttention",
    "apply_rotary",
    "checkpointed_call",
    "freeze_by_pattern",
    "moe_layer_layout",
    "rotary_cos_sin",
    "routing_records_paused",
    "warmup_constant",
    "warmup_cosine",
    "warmup_linear",
    "weight_decay_groups",
]
