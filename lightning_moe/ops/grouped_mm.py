"""Grouped matrix multiply: one GEMM per expert over the contiguous block of rows routed to it.

Shape legend: ``N`` rows (tokens sorted by expert), ``G`` groups (local experts), ``I`` input features,
``O`` output features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")


def _grouped_mm_supported(x_NI: torch.Tensor, w_GIO: torch.Tensor) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` can take these operands.

    NOTE: the kernel needs every row stride to be a multiple of 16 bytes (so ``I`` and ``O`` a
    multiple of 4 in fp32, 8 in bf16). On CUDA the fast kernel is bf16 on compute capability >= 9.0
    (Hopper); elsewhere the loop below is as fast and never fails.
    """
    if not _HAS_GROUPED_MM or x_NI.dtype != w_GIO.dtype:
        return False
    element_size = x_NI.element_size()
    if (x_NI.shape[-1] * element_size) % 16 or (w_GIO.shape[-1] * element_size) % 16:
        return False
    if x_NI.device.type == "cpu":
        return x_NI.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if x_NI.device.type == "cuda":
        return x_NI.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x_NI.device)[0] >= 9
    return False


def grouped_mm_loop(x_NI: torch.Tensor, w_GIO: torch.Tensor, tokens_per_group_G: torch.Tensor) -> torch.Tensor:
    """Reference and fallback: one ``matmul`` per group. Same result as :func:`grouped_mm`."""
    counts = tokens_per_group_G.tolist()
    outputs = [x_block @ w_GIO[g] for g, x_block in enumerate(torch.split(x_NI, counts, dim=0))]
    if not outputs:
        return x_NI.new_empty(0, w_GIO.shape[-1])
    return torch.cat(outputs, dim=0)


def grouped_mm(x_NI: torch.Tensor, w_GIO: torch.Tensor, tokens_per_group_G: torch.Tensor) -> torch.Tensor:
    """Multiply row block ``g`` of ``x_NI`` by ``w_GIO[g]``; blocks are given by their sizes.

    Args:
        x_NI: rows sorted by group, ``[N, I]``.
        w_GIO: one weight per group, ``[G, I, O]``.
        tokens_per_group_G: number of rows of each group, ``[G]``, summing to ``N``.

    Returns:
        ``[N, O]``. Uses ``torch.nn.functional.grouped_mm`` (one kernel launch for all groups) where
        the operands allow it, and a per-group loop otherwise.
    """
    if _grouped_mm_supported(x_NI, w_GIO):
        offsets_G = torch.cumsum(tokens_per_group_G, dim=0).to(torch.int32)
        return F.grouped_mm(x_NI, w_GIO, offs=offsets_G)
    return grouped_mm_loop(x_NI, w_GIO, tokens_per_group_G)
