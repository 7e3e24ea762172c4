"""MoE building blocks: gates, experts, the MoE layer. No collectives live here."""

from lightning_moe.layers.aux_loss import collect_aux_loss, collect_aux_losses, moe_layers
from lightning_moe.layers.balancing import end_global_batch, register_global_batch_end
from lightning_moe.layers.experts import Experts, FeedForward, is_expert_param, mark_expert_param
from lightning_moe.layers.gates import GATES, AuxLoss, Gate, Routing, make_gate
from lightning_moe.layers.moe import MoELayer

__all__ = [
    "GATES",
    "AuxLoss",
    "Experts",
    "FeedForward",
    "Gate",
    "MoELayer",
    "Routing",
    "collect_aux_loss",
    "collect_aux_losses",
    "end_global_batch",
    "is_expert_param",
    "make_gate",
    "mark_expert_param",
    "moe_layers",
    "register_global_batch_end",
]
