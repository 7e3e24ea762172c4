"""``MoETransformer.from_pretrained``: a local transformers checkpoint directory in, a model out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lightning_moe.interop.hf_config import model_kwargs_from_hf_config
from lightning_moe.interop.hf_load import load_pretrained_weights, read_hf_config
from lightning_moe.layers.gates import Gate
from lightning_moe.modeling.config import gate_to_hparam

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``torch.bfloat16`` from ``"bfloat16"`` (or ``"bf16"``, ``"fp32"``...); ``None`` stays ``None``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = aliases.get(str(dtype), str(dtype)).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}. Use one of {sorted(_DTYPES)}.")
    return _DTYPES[name]


def _merge_gate_kwargs(gate: Gate, gate_kwargs: dict[str, Any]) -> Gate:
    """A gate of the same class as ``gate`` with ``gate_kwargs`` replacing some of its arguments."""
    saved = gate_to_hparam(gate)
    arguments = saved["init_args"] if isinstance(saved, dict) else {}
    unknown = sorted(set(gate_kwargs) - set(arguments))
    if unknown:
        raise ValueError(
            f"from_pretrained: `gate_kwargs` {unknown} are not arguments of the checkpoint's gate "
            f"{type(gate).__name__}. It accepts {sorted(arguments)}."
        )
    return type(gate)(**{**arguments, **gate_kwargs})


def from_pretrained(
    path: str | Path,
    *,
    load_weights: bool = True,
    dtype: torch.dtype | str | None = None,
    model_class: type | None = None,
    **overrides: Any,
) -> Any:
    """Build the :class:`~lightning_moe.MoETransformer` of a transformers checkpoint directory.

    The model is built on the meta device (no memory), cast to ``dtype``, then filled from the
    safetensors files by :func:`~lightning_moe.interop.hf_load.load_pretrained_weights` unless
    ``load_weights=False`` (then every tensor stays on the meta device, for a caller that loads
    only some experts per process). The source ``config.json`` and directory are kept as the
    ``hf_config`` and ``hf_source`` hyper-parameters, so Lightning checkpoints of the model know how
    to export it back.

    Args:
        path: a local directory with ``config.json`` and ``model.safetensors`` (or a sharded
            ``model.safetensors.index.json``) of a Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE or
            DeepSeek-V3 model.
        load_weights: read the weights now (all experts).
        dtype: parameter dtype (``torch.bfloat16``, ``"bfloat16"``...); fp32 by default.
        model_class: the class to build (``MoETransformer`` or a subclass).
        overrides: further ``MoETransformer`` arguments: fine-tuning options (``learning_rate``,
            ``freeze``, ``load_balance_coef``, ``z_loss_coef``, ``lr_schedule``,
            ``gradient_checkpointing``, ``max_seq_len`` up to the model's, ...); ``gate_kwargs``
            updates the checkpoint's gate (e.g. ``{"bias_update_rate": 1e-3}`` for DeepSeek-V3).
            An architecture argument (``rope_interleave``, ``qk_norm``, ``moe_d_ff``...: every one that
            config.json determines) set to another value than the checkpoint's fails, naming both.

    Raises:
        FileNotFoundError: no such directory, no config.json, no safetensors files.
        ValueError: an unsupported ``model_type`` or feature, or a config that does not match the weights.
    """
    if model_class is None:
        from lightning_moe.model import MoETransformer

        model_class = MoETransformer
    kwargs = pretrained_arguments(path, overrides)
    with torch.device("meta"):
        model = model_class(**kwargs)
    resolved = resolve_dtype(dtype)
    if resolved is not None:
        model.to(resolved)
    if load_weights:
        load_pretrained_weights(model, path)
    return model


#: Arguments a fine-tuning run may set to other values than the checkpoint's: the rest of what
#: ``model_kwargs_from_hf_config`` returns is the architecture (every architecture argument, each
#: family's features switched off explicitly), which the weights fix.
_MAY_DIFFER = {"max_seq_len", "capacity_factor", "init_std"}


def _resolved(name: str, kwargs: dict[str, Any]) -> Any:
    """The checkpoint's value of an architecture argument, with a ``None`` that means a derived default
    given as that default (``head_dim=None`` is ``d_model // n_heads``: an override that names it
    describes the same model)."""
    if name == "head_dim" and kwargs["head_dim"] is None:
        return kwargs["d_model"] // kwargs["n_heads"]
    return kwargs[name]


def pretrained_arguments(
    path: str | Path, given: dict[str, Any], defaults: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The :class:`~lightning_moe.MoETransformer` arguments of a model read from a checkpoint directory:
    its architecture, from ``config.json``, and the fine-tuning options of ``given``.

    Args:
        path: the transformers checkpoint directory.
        given: arguments the caller passed (learning rate, ``freeze``, ``gate_kwargs``...).
        defaults: ``MoETransformer``'s defaults: an architecture argument in ``given`` equal to its
            default is taken from the checkpoint; ``None`` treats every given argument as set.

    Raises:
        ValueError: an architecture argument set to another value than the checkpoint's (naming both),
            or a ``max_seq_len`` beyond what the checkpoint supports.
    """
    path = Path(path)
    config = read_hf_config(path)
    kwargs = model_kwargs_from_hf_config(config, source=str(path / "config.json"))
    defaults = defaults or {}
    given = {name: value for name, value in given.items() if name not in defaults or value != defaults[name]}
    for name, value in given.items():
        if name in kwargs and name not in _MAY_DIFFER and name != "gate" and value != _resolved(name, kwargs):
            raise ValueError(
                f"MoETransformer: `{name}`={value!r} differs from the checkpoint's {kwargs[name]!r} ({path}). The "
                f"architecture comes from the checkpoint: leave `{name}` out."
            )
    gate_kwargs = given.pop("gate_kwargs", None)
    if gate_kwargs and "gate" not in given:
        kwargs["gate"] = _merge_gate_kwargs(kwargs["gate"], dict(gate_kwargs))
    elif gate_kwargs:
        given["gate_kwargs"] = gate_kwargs
    longest = kwargs["max_seq_len"]
    if given.get("max_seq_len", longest) > longest:
        raise ValueError(
            f"MoETransformer: `max_seq_len`={given['max_seq_len']} exceeds what {path} supports ({longest}: its "
            f"max_position_embeddings, or its sliding window). Use at most {longest}."
        )
    kwargs.update(given)
    kwargs.update(hf_config=config, hf_source=str(path.resolve()))
    return kwargs
