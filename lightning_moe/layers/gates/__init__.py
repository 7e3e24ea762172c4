"""Routing rules, selectable by short name (``gate="topk"``) or by class (``class_path`` in YAML)."""

from __future__ import annotations

import inspect
from typing import Any

from lightning_moe.layers.gates.base import AuxLoss, Gate, LinearRouterGate, Routing, routing_from_topk
from lightning_moe.layers.gates.dynamic import DynamicGate
from lightning_moe.layers.gates.expert_choice import ExpertChoiceGate
from lightning_moe.layers.gates.noisy_topk import NoisyTopKGate
from lightning_moe.layers.gates.sigmoid import SigmoidGate
from lightning_moe.layers.gates.topk import TopKGate

#: Short gate names and the classes they stand for.
GATES: dict[str, type[Gate]] = {
    "topk": TopKGate,
    "noisy_topk": NoisyTopKGate,
    "dynamic": DynamicGate,
    "expert_choice": ExpertChoiceGate,
    "sigmoid": SigmoidGate,
}


def make_gate(gate: str | Gate, *, top_k: int | None = None, gate_kwargs: dict[str, Any] | None = None) -> Gate:
    """A fresh, unbuilt gate from a short name (with keyword arguments) or a gate instance.

    ``top_k`` is passed to gate classes whose constructor takes it. A gate instance is returned as
    is; pass a new instance per layer (:class:`~lightning_moe.MoELayer` copies it).
    """
    gate_kwargs = dict(gate_kwargs or {})
    if isinstance(gate, Gate):
        if gate_kwargs:
            raise ValueError(
                f"`gate_kwargs` {sorted(gate_kwargs)} were given with a gate instance ({type(gate).__name__}). "
                f"Set them on the instance instead."
            )
        return gate
    if not isinstance(gate, str) or gate not in GATES:
        raise ValueError(
            f"Unknown `gate` {gate!r}. Use one of {sorted(GATES)}, or a `Gate` subclass instance "
            f"(`class_path` in YAML)."
        )
    gate_class = GATES[gate]
    parameters = inspect.signature(gate_class.__init__).parameters
    if top_k is not None and "top_k" in parameters:
        if "top_k" in gate_kwargs and gate_kwargs["top_k"] != top_k:
            raise ValueError(
                f"`top_k` is given twice for gate {gate!r}: top_k={top_k} and gate_kwargs top_k={gate_kwargs['top_k']}. "
                f"Set it once, with the layer's `top_k`."
            )
        gate_kwargs = {"top_k": top_k, **gate_kwargs}
    unknown = sorted(name for name in gate_kwargs if name not in parameters)
    if unknown:
        accepted = sorted(name for name in parameters if name != "self")
        raise ValueError(f"`gate_kwargs` {unknown} are not arguments of gate {gate!r}. It accepts {accepted}.")
    return gate_class(**gate_kwargs)


__all__ = [
    "GATES",
    "AuxLoss",
    "DynamicGate",
    "ExpertChoiceGate",
    "Gate",
    "LinearRouterGate",
    "NoisyTopKGate",
    "Routing",
    "SigmoidGate",
    "TopKGate",
    "make_gate",
    "routing_from_topk",
]
