"""Setup-time checks of :class:`~lightning_moe.MoEStrategy`: what cannot work with sharded experts is
refused before any step, with a message that names the field, the value and the fix."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from lightning_moe.parallel.placement import ExpertPlacement
from lightning_moe.parallel.sharding import named_moe_layers


def placement_problem(
    module: nn.Module, expert_parallel_size: int, placement_for: Callable[[int], ExpertPlacement]
) -> str | None:
    """Why the starting placement (``placement_for(num_experts)``) or a gate's device-level options do
    not fit ``module``, or ``None``."""
    for name, layer in named_moe_layers(module):
        balance = getattr(layer.gate, "device_balance", None)
        if expert_parallel_size == 1 and balance is not None and balance.active:
            return (
                f"MoE layer `{name}`: {balance.describe()} balances load across expert-parallel ranks, but "
                f"expert_parallel_size=1: there is nothing to balance. Set those gate options to 0 / None, or "
                f"use expert_parallel_size > 1."
            )
        try:
            placement = placement_for(layer.num_experts)
        except ValueError as error:
            return f"MoEStrategy: the placement of MoE layer `{name}` is invalid: {error}"
        if layer.num_experts != placement.num_experts:
            return (
                f"MoEStrategy: `expert_placement` places {placement.num_experts} experts but MoE layer `{name}` "
                f"has num_experts={layer.num_experts}. Give a placement of all {layer.num_experts} experts."
            )
    return None


def check_loggers(loggers: Sequence[Any], expert_parallel_size: int) -> None:
    """Refuse loggers that upload checkpoint *files* (W&B / MLflow ``log_model``): with sharded experts a
    checkpoint is a directory."""
    for logger in loggers:
        if getattr(logger, "_log_model", False) or getattr(logger, "_log_model_checkpoints", False):
            raise ValueError(
                f"MoEStrategy: the {type(logger).__name__} uploads checkpoints (`log_model`), but with "
                f"expert_parallel_size={expert_parallel_size} a checkpoint is a directory (each EP rank writes its "
                f"experts), which that logger's upload does not take. Set `log_model=False` and upload the "
                f"checkpoint directory yourself, or upload the single file that `lightning-moe consolidate CKPT "
                f"OUT` writes from it."
            )


def check_optimizers(optimizers: Sequence[Any], expert_parallel_size: int) -> None:
    """Refuse ``ZeroRedundancyOptimizer`` with sharded experts: it would overwrite them."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    for optimizer in optimizers:
        if isinstance(getattr(optimizer, "_optimizer", optimizer), ZeroRedundancyOptimizer):
            raise ValueError(
                f"MoEStrategy: ZeroRedundancyOptimizer cannot hold expert shards (expert_parallel_size="
                f"{expert_parallel_size}): after each step it broadcasts every parameter from the rank that holds "
                f"its optimizer state, which would overwrite every rank's experts with one rank's. Use a regular "
                f"optimizer (e.g. AdamW), or expert_parallel_size=1."
            )
