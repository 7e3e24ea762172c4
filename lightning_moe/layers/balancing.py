"""What MoE layers do when a global batch ends, after every optimizer step: aux-loss-free bias
updates (Wang et al. 2024), and a fresh count for global-batch load-balancing losses."""

from __future__ import annotations

import torch
from torch import nn

from lightning_moe.layers.aux_loss import moe_layers

_HOOK_ATTR = "_lightning_moe_global_batch_end_hook"


def end_global_batch(module: nn.Module) -> None:
    """Close the global batch of every MoE layer in ``module`` (:meth:`MoELayer.end_global_batch`)."""
    for layer in moe_layers(module):
        layer.end_global_batch()


def _skipped(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the gradient scaler handed this (fused) optimizer a step to skip: ``found_inf`` is set
    during such a ``step`` (the same on every rank under :class:`~lightning_moe.parallel.amp.WorldSyncedGradScaler`)."""
    found_inf = getattr(optimizer, "found_inf", None)
    return found_inf is not None and bool(found_inf.item() > 0)


def register_global_batch_end(optimizer: torch.optim.Optimizer, module: nn.Module) -> bool:
    """Call :func:`end_global_batch` on ``module`` after every ``optimizer.step()``, and let its MoE
    layers pool the micro-batches of gradient accumulation (:attr:`MoELayer.pool_micro_batches`):
    with the step marking where a global batch ends, their counts can span one.

    A step that the gradient scaler skips (fp16 overflow) does not call ``step``, or, for a fused
    optimizer, calls it with ``found_inf`` set (and it changes nothing): either way the biases are not
    updated and the next global batch is counted on top of the skipped one. Registering twice on the
    same optimizer is a no-op. Returns whether a hook was registered now (``False`` also for a module
    without MoE layers).
    """
    layers = moe_layers(module)
    if not layers or getattr(optimizer, _HOOK_ATTR, None) is not None:
        return False
    handle = optimizer.register_step_post_hook(lambda *_: None if _skipped(optimizer) else end_global_batch(module))
    setattr(optimizer, _HOOK_ATTR, handle)
    for layer in layers:
        layer.pool_micro_batches = True
    return True
