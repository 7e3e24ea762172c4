"""Activation (gradient) checkpointing of decoder blocks that contain MoE layers.

Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost": a checkpointed block keeps only
its input during the forward and runs again in the backward to rebuild the activations it needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_moe.layers.aux_loss import moe_layers


@contextlib.contextmanager
def routing_records_paused(module: nn.Module) -> Iterator[None]:
    """Within the block, MoE layers route and compute but do not record their routing.

    NOTE: an :class:`~lightning_moe.MoELayer` records each forward's token counts (and the load its
    bias-balanced gate has seen since the last optimizer step) and replaces its aux losses. The
    recomputation in the backward would count the same tokens twice and swap the aux losses the
    loss was built from for copies that are not in it; this context keeps the first forward's.
    """
    layers = moe_layers(module)
    previous = [layer.record_routing for layer in layers]
    for layer in layers:
        layer.record_routing = False
    try:
        yield
    finally:
        for layer, state in zip(layers, previous):
            layer.record_routing = state


def checkpointed_call(block: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """``block(*inputs)``, keeping only the inputs for the backward and recomputing the rest.

    Non-reentrant checkpointing (``use_reentrant=False``): the aux losses an MoE layer keeps from
    the forward stay connected to the graph, and the RNG state is replayed, so a noisy gate routes
    the same tokens again. The recomputation runs under :func:`routing_records_paused`.
    """
    if torch.compiler.is_compiling():
        # Traced by the compiler (:func:`compiled_checkpointed_call`): the recomputation replays the
        # graph's own operations in the backward, where no Python side effect (a record) runs again.
        return checkpoint(block, *inputs, use_reentrant=False)
    return checkpoint(
        block,
        *inputs,
        use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), routing_records_paused(block)),
    )


# `torch.compile` is lazy: nothing is compiled until the first call (a model with `compile_blocks`).
_compiled_checkpointed_call = torch.compile(checkpointed_call)


def compiled_checkpointed_call(block: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """:func:`checkpointed_call` compiled with ``torch.compile``, the checkpoint inside the graph.

    NOTE: a block compiled on its own and checkpointed from outside would be traced twice, once
    recording its routing and once in the recomputation without, and the two graphs save different
    tensors for the backward, which checkpointing refuses. Traced as one graph, the recomputation
    is the graph's own: the forward's records are kept (``skip_fwd_side_effects_in_bwd_under_checkpoint``
    tells the compiler that they must not be replayed in the backward) and made once.
    """
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        return _compiled_checkpointed_call(block, *inputs)
