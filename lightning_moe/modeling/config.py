"""Boundary checks of :class:`~lightning_moe.MoETransformer`'s arguments, and how its gate is saved.

Every check raises ``ValueError`` naming the field, its value and the fix, before anything is built.
"""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Any

from lightning_moe.layers.gates import Gate
from lightning_moe.layers.gates.base import check_positive_int

OWNER = "MoETransformer"


def check_transformer_config(
    *,
    vocab_size: int,
    d_model: int,
    n_layers: int,
    n_heads: int,
    n_kv_heads: int | None,
    d_ff: int,
    moe_d_ff: int | None,
    max_seq_len: int,
    num_experts: int,
    top_k: int,
    moe_every_n_layers: int,
    first_k_dense: int,
    rope_theta: float,
    learning_rate: float,
    weight_decay: float,
    warmup_steps: int,
    min_lr_ratio: float,
    adam_betas: tuple[float, float],
    init_std: float,
    head_width_given: bool = False,
) -> None:
    """Raise ``ValueError`` naming the field, its value and the fix, before anything is built.

    ``head_width_given``: the heads' width is set by ``head_dim`` or multi-head latent attention,
    so ``d_model / n_heads`` need not be a whole, even number.
    """
    for name, value in (
        ("vocab_size", vocab_size),
        ("d_model", d_model),
        ("n_layers", n_layers),
        ("n_heads", n_heads),
        ("d_ff", d_ff),
        ("max_seq_len", max_seq_len),
        ("num_experts", num_experts),
        ("top_k", top_k),
        ("moe_every_n_layers", moe_every_n_layers),
    ):
        check_positive_int(OWNER, name, value)
    if moe_d_ff is not None:
        check_positive_int(OWNER, "moe_d_ff", moe_d_ff)
    if not head_width_given and d_model % n_heads:
        # Head counts that also pass the next check (an even head width, for RoPE).
        divisors = [h for h in range(1, min(d_model, 64) + 1) if d_model % h == 0 and (d_model // h) % 2 == 0]
        raise ValueError(
            f"{OWNER}: `d_model` ({d_model}) must be divisible by `n_heads` ({n_heads}). "
            f"Choose `n_heads` from {divisors} or change `d_model`."
        )
    if not head_width_given and (d_model // n_heads) % 2:
        raise ValueError(
            f"{OWNER}: the head width `d_model / n_heads` = {d_model // n_heads} must be even, because RoPE "
            f"rotates pairs of features. Change `d_model` ({d_model}) or `n_heads` ({n_heads})."
        )
    if n_kv_heads is not None:
        check_positive_int(OWNER, "n_kv_heads", n_kv_heads)
        if n_heads % n_kv_heads:
            raise ValueError(
                f"{OWNER}: `n_kv_heads` ({n_kv_heads}) must divide `n_heads` ({n_heads}) for grouped-query "
                f"attention. Use a divisor of {n_heads}, or None for one key/value head per query head."
            )
    if not isinstance(first_k_dense, int) or isinstance(first_k_dense, bool) or not 0 <= first_k_dense <= n_layers:
        raise ValueError(
            f"{OWNER}: `first_k_dense` must be an integer between 0 and `n_layers` ({n_layers}), got "
            f"{first_k_dense!r}. Lower it, or raise `n_layers`."
        )
    if first_k_dense < n_layers and moe_every_n_layers > n_layers - first_k_dense:
        raise ValueError(
            f"{OWNER}: `moe_every_n_layers` ({moe_every_n_layers}) leaves no MoE layer among the "
            f"{n_layers - first_k_dense} layers after the first {first_k_dense} dense ones. Lower it to at most "
            f"{n_layers - first_k_dense}, or set `first_k_dense` to `n_layers` for an all-dense model."
        )
    if not (isinstance(rope_theta, (int, float)) and rope_theta > 1):
        raise ValueError(f"{OWNER}: `rope_theta` must be a number > 1, got {rope_theta!r}. 10000.0 is the usual base.")
    if not (isinstance(learning_rate, (int, float)) and math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"{OWNER}: `learning_rate` must be a finite number > 0, got {learning_rate!r}. Try 1e-3.")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise ValueError(f"{OWNER}: `weight_decay` must be >= 0, got {weight_decay!r}. Use 0.0 to turn it off.")
    if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
        raise ValueError(f"{OWNER}: `warmup_steps` must be an integer >= 0, got {warmup_steps!r}. Use 0 for no warmup.")
    if not (isinstance(min_lr_ratio, (int, float)) and 0 <= min_lr_ratio <= 1):
        raise ValueError(
            f"{OWNER}: `min_lr_ratio` must lie in [0, 1], got {min_lr_ratio!r}. It is the final learning rate "
            f"as a fraction of `learning_rate`; 0.1 is common."
        )
    if (
        len(adam_betas) != 2
        or not all(isinstance(beta, (int, float)) and not isinstance(beta, bool) for beta in adam_betas)
        or not all(0 <= beta < 1 for beta in adam_betas)
    ):
        raise ValueError(f"{OWNER}: `adam_betas` must be two numbers in [0, 1), got {adam_betas!r}. Try [0.9, 0.95].")
    if not (isinstance(init_std, (int, float)) and init_std > 0):
        raise ValueError(f"{OWNER}: `init_std` must be a number > 0, got {init_std!r}. Try 0.02.")


def gate_to_hparam(gate: str | Gate) -> str | dict[str, Any] | Gate:
    """How ``gate`` is written into the saved hyper-parameters: a name as is, a gate instance as
    ``{"class_path", "init_args"}`` (read back from the attributes that carry its constructor's
    argument names), so that a checkpoint holds no pickled module. A gate whose arguments cannot be
    read back, or whose class cannot be imported by name, is kept as the instance."""
    if not isinstance(gate, Gate):
        return gate
    gate_class = type(gate)
    arguments = [
        parameter.name
        for parameter in inspect.signature(gate_class.__init__).parameters.values()
        if parameter.name != "self" and parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD)
    ]
    if "<locals>" in gate_class.__qualname__ or not all(hasattr(gate, name) for name in arguments):
        return gate
    return {
        "class_path": f"{gate_class.__module__}.{gate_class.__qualname__}",
        "init_args": {name: getattr(gate, name) for name in arguments},
    }


def gate_from_hparam(gate: str | dict[str, Any] | Gate) -> str | Gate:
    """Inverse of :func:`gate_to_hparam`: a ``{"class_path", "init_args"}`` dict becomes the gate."""
    if not isinstance(gate, dict):
        return gate
    class_path = gate.get("class_path", "")
    module_name, _, class_name = class_path.rpartition(".")
    gate_class = getattr(importlib.import_module(module_name), class_name, None) if module_name else None
    if not (isinstance(gate_class, type) and issubclass(gate_class, Gate)):
        raise ValueError(
            f"{OWNER}: `gate` {gate!r} does not name a Gate subclass in `class_path`. Use a gate name such as "
            f"'topk' or a class_path like 'lightning_moe.layers.gates.TopKGate'."
        )
    return gate_class(**gate.get("init_args", {}))
