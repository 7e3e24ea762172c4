"""Rotary position embeddings: frequencies (plain, linear-scaled, YaRN or Llama 3's), and the rotation itself.

Shape legend: ``B`` batch, ``H`` heads, ``T`` sequence length, ``Hd`` rotated head width,
``R = Hd / 2`` rotary frequencies.
"""

from __future__ import annotations

import math
from typing import Any

import torch

#: The ``rope_scaling`` types this module computes, and the keys each accepts.
ROPE_SCALING_KEYS: dict[str, frozenset[str]] = {
    "linear": frozenset({"rope_type", "factor"}),
    "yarn": frozenset({
        "rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
        "mscale_all_dim", "attention_factor", "truncate",
    }),
    "llama3": frozenset({
        "rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
    }),
}


def check_rope_scaling(owner: str, rope_scaling: dict[str, Any] | None) -> None:
    """Raise ``ValueError`` naming the key when ``rope_scaling`` is not a dict this module computes."""
    if rope_scaling is None:
        return
    if not isinstance(rope_scaling, dict):
        raise ValueError(
            f"{owner}: `rope_scaling` must be None or a dict such as {{'rope_type': 'yarn', 'factor': 4.0, "
            f"'original_max_position_embeddings': 4096}}, got {rope_scaling!r}."
        )
    rope_type = rope_scaling.get("rope_type")
    if rope_type not in ROPE_SCALING_KEYS:
        raise ValueError(
            f"{owner}: `rope_scaling` rope_type {rope_type!r} is not supported. Use one of "
            f"{sorted(ROPE_SCALING_KEYS)}, or None for plain RoPE."
        )
    unknown = sorted(set(rope_scaling) - ROPE_SCALING_KEYS[rope_type])
    if unknown:
        raise ValueError(
            f"{owner}: `rope_scaling` keys {unknown} are not used by rope_type {rope_type!r}. It accepts "
            f"{sorted(ROPE_SCALING_KEYS[rope_type])}."
        )
    factor = rope_scaling.get("factor")
    if not (isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor >= 1):
        raise ValueError(f"{owner}: `rope_scaling` factor must be a number >= 1, got {factor!r}.")
    if rope_type in ("yarn", "llama3"):
        original = rope_scaling.get("original_max_position_embeddings")
        if not (isinstance(original, int) and not isinstance(original, bool) and original > 0):
            raise ValueError(
                f"{owner}: {rope_type} `rope_scaling` needs `original_max_position_embeddings` (the pre-training "
                f"context length) as a positive integer, got {original!r}."
            )
    if rope_type == "llama3":
        low, high = rope_scaling.get("low_freq_factor"), rope_scaling.get("high_freq_factor")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not 0 < low < high:
            raise ValueError(
                f"{owner}: llama3 `rope_scaling` needs `low_freq_factor` and `high_freq_factor` with "
                f"0 < low < high (Llama 3.1 uses 1 and 4), got {low!r} and {high!r}."
            )


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature ``0.1 * mscale * ln(factor) + 1`` (Peng et al. 2023, eq. 22), 1 for
    ``factor <= 1``."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_frequencies(
    inv_freq_R: torch.Tensor, rotary_dim: int, theta: float, rope_scaling: dict[str, Any]
) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023, Sec. 3.2, "NTK-by-parts"): frequencies that turn fewer than
    ``beta_slow`` times over the pre-training context are interpolated (divided by ``factor``),
    those that turn more than ``beta_fast`` times are kept, with a linear ramp between."""
    factor = float(rope_scaling["factor"])
    original_context = rope_scaling["original_max_position_embeddings"]
    beta_fast = rope_scaling.get("beta_fast") or 32
    beta_slow = rope_scaling.get("beta_slow") or 1

    def dimension_of(rotations: float) -> float:
        # The feature index whose frequency turns `rotations` times over the original context.
        return rotary_dim * math.log(original_context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension_of(beta_fast), dimension_of(beta_slow)
    if rope_scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # a step instead of a ramp, without dividing by zero
    ramp_R = ((torch.arange(rotary_dim // 2, dtype=torch.float32, device=inv_freq_R.device) - low) / (high - low))
    interpolated_share_R = ramp_R.clamp(0, 1)
    inv_freq_R = inv_freq_R / factor * interpolated_share_R + inv_freq_R * (1 - interpolated_share_R)

    attention_factor = rope_scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    return inv_freq_R, float(attention_factor)


def _llama3_frequencies(inv_freq_R: torch.Tensor, rope_scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's context extension (Meta's reference ``apply_scaling``): a frequency whose
    wavelength is longer than ``original / low_freq_factor`` positions is divided by ``factor``, one
    shorter than ``original / high_freq_factor`` is kept, and between the two the frequency moves
    smoothly from one to the other, in proportion to ``original / wavelength``."""
    factor = float(rope_scaling["factor"])
    original = float(rope_scaling["original_max_position_embeddings"])
    low, high = float(rope_scaling["low_freq_factor"]), float(rope_scaling["high_freq_factor"])
    wavelength_R = 2 * math.pi / inv_freq_R
    kept_share_R = ((original / wavelength_R - low) / (high - low)).clamp(0, 1)  # 0: divided, 1: kept
    return inv_freq_R / factor * (1 - kept_share_R) + inv_freq_R * kept_share_R


def rotary_cos_sin(
    seq_len: int,
    head_dim: int,
    *,
    theta: float,
    rope_scaling: dict[str, Any] | None = None,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines of the rotary angles ``pos * theta^(-2i / Hd)``, each ``[T, R]`` in fp32.

    RoFormer (Su et al. 2021, eq. 15): the pair ``i`` of a head is rotated by the angle
    ``pos * theta^(-2i/Hd)``. Computed per forward in fp32 rather than kept in a buffer, so that
    ``model.to(torch.bfloat16)`` cannot round the angles of late positions.

    Args:
        seq_len: positions ``0 .. T-1``.
        head_dim: rotated width ``Hd`` of a head (even).
        theta: RoPE base.
        rope_scaling: ``None`` for plain RoPE; ``{"rope_type": "linear", "factor": s}`` divides every
            frequency by ``s`` (position interpolation, Chen et al. 2023); ``{"rope_type": "yarn",
            ...}`` is YaRN (see :func:`_yarn_frequencies`), whose attention factor multiplies the
            cosines and sines (so both queries and keys); ``{"rope_type": "llama3", ...}`` is Llama
            3.1's (see :func:`_llama3_frequencies`).
        device: where the tables are made.
    """
    inv_freq_R = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    attention_factor = 1.0
    if rope_scaling is not None:
        if rope_scaling["rope_type"] == "linear":
            inv_freq_R = inv_freq_R / float(rope_scaling["factor"])
        elif rope_scaling["rope_type"] == "llama3":
            inv_freq_R = _llama3_frequencies(inv_freq_R, rope_scaling)
        else:
            inv_freq_R, attention_factor = _yarn_frequencies(inv_freq_R, head_dim, theta, rope_scaling)
    angles_TR = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq_R)
    if attention_factor == 1.0:
        return angles_TR.cos(), angles_TR.sin()
    return angles_TR.cos() * attention_factor, angles_TR.sin() * attention_factor


def apply_rotary(
    x_BHTd: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor, *, interleaved: bool = False
) -> torch.Tensor:
    """Rotate the feature pairs of every head by the position's angles.

    NOTE: by default pairs are formed from the two halves of the head, ``(x[i], x[i + R])`` (the
    GPT-NeoX / Llama layout), not from adjacent features as in the RoFormer paper; both are the same
    rotation up to a fixed permutation of the head's features, which the projections learn.
    ``interleaved=True`` pairs adjacent features ``(x[2i], x[2i+1])`` as DeepSeek's checkpoints
    are laid out, and writes the rotated pairs out as two halves (first members, then second
    members): queries and keys get the same permutation, so their dot products are those of the
    interleaved rotation.
    """
    if interleaved:
        x1_BHTR, x2_BHTR = x_BHTd[..., 0::2].float(), x_BHTd[..., 1::2].float()
    else:
        x1_BHTR, x2_BHTR = x_BHTd.float().chunk(2, dim=-1)
    rotated_BHTd = torch.cat((x1_BHTR * cos_TR - x2_BHTR * sin_TR, x1_BHTR * sin_TR + x2_BHTR * cos_TR), dim=-1)
    return rotated_BHTd.to(x_BHTd.dtype)
