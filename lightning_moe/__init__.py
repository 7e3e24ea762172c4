"""lightning-moe: Mixture-of-Experts training for PyTorch Lightning."""

from lightning_moe.layers import (
    Gate,
    MoELayer,
    collect_aux_loss,
    collect_aux_losses,
    is_expert_param,
    mark_expert_param,
)

__version__ = "0.1.0"

__all__ = [
    "Gate",
    "MoELayer",
    "collect_aux_loss",
    "collect_aux_losses",
    "is_expert_param",
    "mark_expert_param",
]
