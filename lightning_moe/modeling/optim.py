"""AdamW parameter groups and the learning-rate schedules of :class:`~lightning_moe.MoETransformer`."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn


def weight_decay_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW parameter groups: matrices (and 3-D expert weights) with ``weight_decay``; norm
    gains, biases and embeddings without it. Frozen parameters (``requires_grad=False``) are in
    neither group, so the optimizer never sees them.

    NOTE: decaying a norm gain or a bias pulls it towards zero, which changes what the layer
    computes rather than regularising it; decaying embeddings shrinks the rows of rare tokens that
    get few gradient updates (GPT-2/nanoGPT, Llama recipes). A tied output head shares the
    embedding's parameter and is counted once.
    """
    embedding_ids = {
        id(child.weight) for child in module.modules() if isinstance(child, nn.Embedding)
    }
    decay, no_decay, seen = [], [], set()
    for parameter in module.parameters():
        if not parameter.requires_grad or id(parameter) in seen:
            continue
        seen.add(id(parameter))
        if parameter.ndim >= 2 and id(parameter) not in embedding_ids:
            decay.append(parameter)
        else:
            no_decay.append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _warmup(step: int, warmup_steps: int) -> float | None:
    """The linear warmup multiplier ``(step + 1) / warmup_steps`` during warmup, else ``None``."""
    return (step + 1) / warmup_steps if step < warmup_steps else None


def _progress(step: int, warmup_steps: int, total_steps: float) -> float:
    """Fraction ``[0, 1]`` of the steps after warmup that are done."""
    return min(1.0, (step - warmup_steps) / max(1.0, total_steps - warmup_steps))


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: float, min_lr_ratio: float) -> float:
    """Learning-rate multiplier at optimizer ``step`` (0-based).

    Linear warmup from ``1 / warmup_steps`` to 1 over ``warmup_steps`` steps, then a half cosine
    from 1 down to ``min_lr_ratio`` at ``total_steps`` (SGDR, Loshchilov & Hutter 2017, eq. 5, one
    cycle), and ``min_lr_ratio`` after it. An infinite ``total_steps`` (no step or epoch limit)
    keeps the rate constant after warmup.
    """
    warmup = _warmup(step, warmup_steps)
    if warmup is not None:
        return warmup
    if not math.isfinite(total_steps):
        return 1.0
    progress = _progress(step, warmup_steps, total_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_linear(step: int, *, warmup_steps: int, total_steps: float, min_lr_ratio: float) -> float:
    """Linear warmup (as :func:`warmup_cosine`), then a straight line from 1 down to ``min_lr_ratio``
    at ``total_steps``, and ``min_lr_ratio`` after it (constant after warmup when ``total_steps``
    is infinite)."""
    warmup = _warmup(step, warmup_steps)
    if warmup is not None:
        return warmup
    if not math.isfinite(total_steps):
        return 1.0
    return 1.0 - (1.0 - min_lr_ratio) * _progress(step, warmup_steps, total_steps)


def warmup_constant(step: int, *, warmup_steps: int, total_steps: float, min_lr_ratio: float) -> float:
    """Linear warmup (as :func:`warmup_cosine`), then the peak rate for good (the usual choice for short
    fine-tuning runs). ``total_steps`` and ``min_lr_ratio`` are unused."""
    warmup = _warmup(step, warmup_steps)
    return 1.0 if warmup is None else warmup


#: ``MoETransformer(lr_schedule=...)`` names and the multiplier functions they stand for.
LR_SCHEDULES: dict[str, Callable[..., float]] = {
    "cosine": warmup_cosine,
    "linear": warmup_linear,
    "constant": warmup_constant,
}
