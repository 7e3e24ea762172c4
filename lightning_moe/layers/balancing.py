"""Aux-loss-free load balancing (Wang et al. 2024): bias updates after every optimizer step."""

from __future__ import annotations

import torch
from torch import nn

from lightning_moe.layers.aux_loss import moe_layers

_HOOK_ATTR = "_lightning_moe_bias_update_hook"


def update_gate_biases(module: nn.Module) -> None:
    """Apply the bias update of every MoE layer in ``module`` whose gate balances by bias."""
    for layer in moe_layers(module):
        layer.update_gate_bias()


def register_bias_update(optimizer: torch.optim.Optimizer, module: nn.Module) -> bool:
    """Call :func:`update_gate_biases` on ``module`` after every ``optimizer.step()``.

    A step that the gradient scaler skips (fp16 overflow) does not call ``step`` and so does not
    update the biases. Registering twice on the same optimizer is a no-op. Returns whether a hook
    was registered now.
    """
    if not any(layer.gate.needs_bias_update for layer in moe_layers(module)):
        return False
    if getattr(optimizer, _HOOK_ATTR, None) is not None:
        return False
    handle = optimizer.register_step_post_hook(lambda *_: update_gate_biases(module))
    setattr(optimizer, _HOOK_ATTR, handle)
    return True
