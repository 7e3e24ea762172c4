"""Grouped matrix multiply: one GEMM per expert over the contiguous block of rows routed to it.

Under ``torch.compile``, where the compiler cannot trace the kernel (``torch.nn.functional.grouped_mm``
has a shape-only implementation for bf16 on CUDA alone, and the per-group loop splits the rows by
sizes read from the device), the multiply is one opaque operator, ``lightning_moe::grouped_mm``,
whose output shape the compiler knows (``[N, O]``) and whose backward is two more such operators:
with dropless token-choice routing a block compiles into one graph, which a new routing does not
recompile (``tests/test_compile.py``).

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
    """Reference and fallback: one ``matmul`` per group. Same result as :func:`grouped_mm`. Under
    ``torch.compile``, the opaque operator (which takes the kernel where the operands allow it)."""
    if torch.compiler.is_compiling():  # the sizes below are read from the device: opaque to the compiler
        return torch.ops.lightning_moe.grouped_mm(x_NI, w_GIO, tokens_per_group_G)
    return _grouped_mm_loop(x_NI, w_GIO, tokens_per_group_G)


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
    if torch.compiler.is_compiling() and not (x_NI.device.type == "cuda" and _grouped_mm_supported(x_NI, w_GIO)):
        return torch.ops.lightning_moe.grouped_mm(x_NI, w_GIO, tokens_per_group_G)
    return _grouped_mm_eager(x_NI, w_GIO, tokens_per_group_G)


def _grouped_mm_eager(x_NI: torch.Tensor, w_GIO: torch.Tensor, tokens_per_group_G: torch.Tensor) -> torch.Tensor:
    if _grouped_mm_supported(x_NI, w_GIO) and x_NI.shape[0] > 0:  # the kernel refuses zero rows
        offsets_G = torch.cumsum(tokens_per_group_G, dim=0).to(torch.int32)
        # The kernel takes rows that are contiguous and 16-byte aligned only, in its backward too:
        # views are copied here, and so is a gradient that is not (`.sum()`'s ones broadcast over
        # the output, a transposed consumer's).
        output_NO = F.grouped_mm(x_NI.contiguous(), w_GIO.contiguous(), offs=offsets_G)
        if output_NO.requires_grad and not torch.compiler.is_compiling():
            output_NO.register_hook(torch.Tensor.contiguous)
        return output_NO
    return _grouped_mm_loop(x_NI, w_GIO, tokens_per_group_G)


def _grouped_mm_loop(x_NI: torch.Tensor, w_GIO: torch.Tensor, tokens_per_group_G: torch.Tensor) -> torch.Tensor:
    counts = tokens_per_group_G.tolist()
    outputs = [x_block @ w_GIO[g] for g, x_block in enumerate(torch.split(x_NI, counts, dim=0))]
    if not outputs:
        return x_NI.new_empty(0, w_GIO.shape[-1])
    return torch.cat(outputs, dim=0)


@torch.library.custom_op("lightning_moe::grouped_mm", mutates_args=())
def _grouped_mm_op(x_NI: torch.Tensor, w_GIO: torch.Tensor, tokens_per_group_G: torch.Tensor) -> torch.Tensor:
    """:func:`grouped_mm` as one operator the compiler does not look into."""
    # Contiguous operands: the kernel refuses broadcast ones (a gradient of ones from `.sum()`).
    return _grouped_mm_eager(x_NI.contiguous(), w_GIO.contiguous(), tokens_per_group_G)


@_grouped_mm_op.register_fake
def _(x_NI: torch.Tensor, w_GIO: torch.Tensor, tokens_per_group_G: torch.Tensor) -> torch.Tensor:
    return x_NI.new_empty(x_NI.shape[0], w_GIO.shape[-1])


@torch.library.custom_op("lightning_moe::grouped_mm_weight_grad", mutates_args=())
def _grouped_mm_weight_grad(x_NI: torch.Tensor, grad_NO: torch.Tensor, tokens_per_group_G: torch.Tensor) -> torch.Tensor:
    """``[G, I, O]``: the gradient of :func:`grouped_mm`'s weights, ``x_g^T grad_g`` per group ``g``
    (zero for a group with no rows)."""
    x_NI, grad_NO = x_NI.contiguous(), grad_NO.contiguous()
    # The kernel's two-dimensional form (what its own backward uses on a CPU), under the same dtype and
    # stride rules as the forward's operands (``grad_NO[None]`` in the place of the weights: width O).
    if x_NI.device.type == "cpu" and _grouped_mm_supported(x_NI, grad_NO[None]) and x_NI.shape[0] > 0:
        offsets_G = torch.cumsum(tokens_per_group_G, dim=0).to(torch.int32)
        return F.grouped_mm(x_NI.t(), grad_NO, offs=offsets_G)
    counts = tokens_per_group_G.tolist()
    grad_GIO = x_NI.new_zeros(len(counts), x_NI.shape[1], grad_NO.shape[1])
    for g, (x_block, grad_block) in enumerate(zip(torch.split(x_NI, counts), torch.split(grad_NO, counts))):
        if counts[g]:
            torch.matmul(x_block.t(), grad_block, out=grad_GIO[g])
    return grad_GIO


@_grouped_mm_weight_grad.register_fake
def _(x_NI: torch.Tensor, grad_NO: torch.Tensor, tokens_per_group_G: torch.Tensor) -> torch.Tensor:
    return x_NI.new_empty(tokens_per_group_G.shape[0], x_NI.shape[1], grad_NO.shape[1])


def _save_operands(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, grad_NO: torch.Tensor):
    # y_g = x_g w_g, so dx_g = dy_g w_g^T (a grouped multiply by the transposed weights) and
    # dw_g = x_g^T dy_g (one product per group).
    x_NI, w_GIO, tokens_per_group_G = ctx.saved_tensors
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.lightning_moe.grouped_mm(grad_NO, w_GIO.transpose(1, 2), tokens_per_group_G)
    if ctx.needs_input_grad[1]:
        grad_w = torch.ops.lightning_moe.grouped_mm_weight_grad(x_NI, grad_NO, tokens_per_group_G)
    return grad_x, grad_w, None


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_save_operands)
