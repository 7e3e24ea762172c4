"""Boundary checks of :class:`~lightning_moe.MoETransformer`'s architecture options (attention
variants, normalisation, RoPE scaling, MoE placement) and fine-tuning options.

Every check raises ``ValueError`` naming the field, its value and the fix, before anything is built.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lightning_moe.modeling.attention import QK_NORMS
from lightning_moe.modeling.config import OWNER
from lightning_moe.modeling.optim import LR_SCHEDULES
from lightning_moe.modeling.rope import check_rope_scaling
from lightning_moe.validation import check_positive_int

#: The fields that only multi-head latent attention uses (set with ``kv_lora_rank``).
MLA_FIELDS = ("q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{OWNER}: `{name}` must be true or false, got {value!r}.")


def _check_optional_coefficient(name: str, value: Any) -> None:
    if value is None:
        return
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0):
        raise ValueError(
            f"{OWNER}: `{name}` must be None (keep the gate's) or a finite number >= 0, got {value!r}. "
            f"Use 0.0 to turn the loss off."
        )


def check_architecture_options(
    *,
    n_layers: int,
    n_heads: int,
    n_kv_heads: int | None,
    head_dim: int | None,
    attention_bias: bool,
    attention_out_bias: bool,
    tie_embeddings: bool,
    qk_norm: str | None,
    norm_eps: float,
    rope_scaling: dict[str, Any] | None,
    rope_interleave: bool,
    kv_lora_rank: int | None,
    mla_dims: dict[str, int | None],
    moe_layer_indices: Sequence[int] | None,
    first_k_dense: int,
    moe_every_n_layers: int,
) -> None:
    """Check the architecture options beyond the from-scratch model's (see ``MoETransformer``)."""
    for name, value in (
        ("attention_bias", attention_bias),
        ("attention_out_bias", attention_out_bias),
        ("tie_embeddings", tie_embeddings),
        ("rope_interleave", rope_interleave),
    ):
        _check_bool(name, value)
    if qk_norm is not None and qk_norm not in QK_NORMS:
        raise ValueError(
            f"{OWNER}: `qk_norm` must be None, 'head' (per-head RMSNorm, Qwen3-MoE) or 'full' (over the whole "
            f"projection, OLMoE), got {qk_norm!r}."
        )
    if not (isinstance(norm_eps, (int, float)) and not isinstance(norm_eps, bool) and 0 < norm_eps < 1):
        raise ValueError(f"{OWNER}: `norm_eps` must be a number in (0, 1), got {norm_eps!r}. 1e-6 or 1e-5 are usual.")
    check_rope_scaling(OWNER, rope_scaling)
    if kv_lora_rank is None:
        extra = sorted(name for name, value in mla_dims.items() if value is not None)
        if extra:
            raise ValueError(
                f"{OWNER}: {extra} only apply to multi-head latent attention, which `kv_lora_rank` turns on "
                f"(it is None). Set `kv_lora_rank` too, or leave {extra} unset."
            )
        if head_dim is not None:
            check_positive_int(OWNER, "head_dim", head_dim)
            if head_dim % 2:
                raise ValueError(f"{OWNER}: `head_dim` ({head_dim}) must be even, because RoPE rotates pairs of features.")
    else:
        check_positive_int(OWNER, "kv_lora_rank", kv_lora_rank)
        for name in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if mla_dims[name] is None:
                raise ValueError(
                    f"{OWNER}: multi-head latent attention (`kv_lora_rank`={kv_lora_rank}) needs `{name}`. "
                    f"Set all of qk_nope_head_dim, qk_rope_head_dim and v_head_dim."
                )
            check_positive_int(OWNER, name, mla_dims[name])
        if mla_dims["q_lora_rank"] is not None:
            check_positive_int(OWNER, "q_lora_rank", mla_dims["q_lora_rank"])
        if mla_dims["qk_rope_head_dim"] % 2:
            raise ValueError(
                f"{OWNER}: `qk_rope_head_dim` ({mla_dims['qk_rope_head_dim']}) must be even, because RoPE rotates "
                f"pairs of features."
            )
        for name, value, allowed in (
            ("head_dim", head_dim, None),
            ("qk_norm", qk_norm, None),
            ("n_kv_heads", n_kv_heads, n_heads),
        ):
            if value is not None and value != allowed:
                raise ValueError(
                    f"{OWNER}: `{name}`={value!r} does not apply to multi-head latent attention (`kv_lora_rank` is "
                    f"set): its head widths are qk_nope_head_dim + qk_rope_head_dim and v_head_dim, and every head "
                    f"has its own keys. Leave `{name}` unset."
                )
    if moe_layer_indices is not None:
        indices = list(moe_layer_indices)
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_layers for i in indices) or len(
            set(indices)
        ) != len(indices):
            raise ValueError(
                f"{OWNER}: `moe_layer_indices` must list distinct block indices in [0, {n_layers}), got "
                f"{moe_layer_indices!r}."
            )
        if first_k_dense != 0 or moe_every_n_layers != 1:
            raise ValueError(
                f"{OWNER}: `moe_layer_indices` ({indices}) replaces `first_k_dense` ({first_k_dense}) and "
                f"`moe_every_n_layers` ({moe_every_n_layers}). Leave those at 0 and 1, or drop `moe_layer_indices`."
            )


def check_finetuning_options(
    *,
    load_balance_coef: float | None,
    z_loss_coef: float | None,
    freeze: Sequence[str] | None,
    lr_schedule: str,
    gradient_checkpointing: bool,
    compile_blocks: bool,
    hf_config: dict[str, Any] | None,
    hf_source: str | None,
) -> None:
    """Check the fine-tuning and provenance options (see ``MoETransformer``)."""
    _check_optional_coefficient("load_balance_coef", load_balance_coef)
    _check_optional_coefficient("z_loss_coef", z_loss_coef)
    _check_bool("gradient_checkpointing", gradient_checkpointing)
    _check_bool("compile_blocks", compile_blocks)
    if freeze is not None and (
        isinstance(freeze, str) or not all(isinstance(pattern, str) and pattern.lstrip("!") for pattern in freeze)
    ):
        raise ValueError(
            f"{OWNER}: `freeze` must be a list of name patterns such as ['*.attn.*'] or ['*', '!*.experts.*'], "
            f"got {freeze!r}."
        )
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"{OWNER}: `lr_schedule` must be one of {sorted(LR_SCHEDULES)}, got {lr_schedule!r}.")
    if hf_config is not None and not (isinstance(hf_config, dict) and isinstance(hf_config.get("model_type"), str)):
        raise ValueError(
            f"{OWNER}: `hf_config` must be None or a transformers config.json as a dict with a `model_type`, "
            f"got {type(hf_config).__name__}. It is set by `MoETransformer.from_pretrained`; leave it unset."
        )
    if hf_source is not None and not isinstance(hf_source, str):
        raise ValueError(f"{OWNER}: `hf_source` must be None or a directory path, got {hf_source!r}.")
