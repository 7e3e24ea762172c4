"""Routed experts stored as 3-D tensors and run as grouped GEMMs, and the dense MLP of shared experts.

Shape legend: ``N`` rows (tokens sorted by expert), ``D`` model width, ``F`` expert hidden width,
``E`` experts held by this module (local slots under expert parallelism).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_moe.ops.grouped_mm import grouped_mm, grouped_mm_loop

ACTIVATIONS = ("swiglu", "gelu")

#: Attribute set on expert parameters; see :func:`mark_expert_param`.
_EXPERT_PARAM_ATTR = "_lightning_moe_expert"


def mark_expert_param(parameter: nn.Parameter) -> nn.Parameter:
    """Tag a parameter as an expert shard: it is sharded over expert-parallel ranks, left out of
    DDP, and its gradient is reduced over the expert-data-parallel group only."""
    setattr(parameter, _EXPERT_PARAM_ATTR, True)
    return parameter


def is_expert_param(parameter: torch.Tensor) -> bool:
    """Whether :func:`mark_expert_param` tagged this parameter."""
    return getattr(parameter, _EXPERT_PARAM_ATTR, False)


def to_autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the autocast dtype when autocast is on for its device, else ``x`` unchanged.

    NOTE: autocast does not cast grouped_mm's operands (it is on no autocast list), so under mixed
    precision the experts would run in fp32, which has no fast grouped kernel on CUDA. Their inputs
    are cast as autocast casts a matmul's.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return x.to(torch.get_autocast_dtype(device_type))
    return x


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"Unknown `activation` {activation!r}. Use one of {list(ACTIVATIONS)}.")


class Experts(nn.Module):
    """``num_experts`` feed-forward experts with weights ``[E, D, *]``.

    SwiGLU (Shazeer 2020): ``(silu(x W_gate) * (x W_up)) W_down``, with ``W_gate`` and ``W_up`` fused
    into one ``w_in: [E, D, 2F]`` (gate half first) so that one grouped GEMM computes both.
    GELU: ``gelu(x W_in) W_out`` with ``w_in: [E, D, F]``.

    Args:
        num_experts: experts held by this module.
        d_model: model width ``D``.
        d_ff: hidden width ``F`` of each expert.
        activation: ``"swiglu"`` or ``"gelu"``.
        init_std: standard deviation of the normal initialisation.
        use_grouped_mm: use ``torch.nn.functional.grouped_mm``; ``False`` runs one GEMM per expert
            (the reference the tests compare against).
    """

    def __init__(
        self,
        *,
        num_experts: int,
        d_model: int,
        d_ff: int,
        activation: str = "swiglu",
        init_std: float = 0.02,
        use_grouped_mm: bool = True,
    ) -> None:
        super().__init__()
        check_activation(activation)
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.activation = activation
        self.use_grouped_mm = use_grouped_mm
        in_width = 2 * d_ff if activation == "swiglu" else d_ff
        self.w_in = mark_expert_param(nn.Parameter(torch.empty(num_experts, d_model, in_width)))  # (E, D, 2F|F)
        self.w_out = mark_expert_param(nn.Parameter(torch.empty(num_experts, d_ff, d_model)))  # (E, F, D)
        self.reset_parameters(init_std)

    def reset_parameters(self, init_std: float = 0.02) -> None:
        nn.init.normal_(self.w_in, std=init_std)
        nn.init.normal_(self.w_out, std=init_std)

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """Run row block ``e`` of ``x_ND`` (rows sorted by expert) through expert ``e``.

        Args:
            x_ND: ``[N, D]`` rows sorted by local expert.
            tokens_per_expert_E: ``[E]`` rows per expert (int64, on any device), summing to ``N``.
        """
        matmul = grouped_mm if self.use_grouped_mm else grouped_mm_loop
        tokens_per_expert_E = tokens_per_expert_E.to(x_ND.device)
        x_ND = to_autocast_dtype(x_ND)
        hidden_NF = matmul(x_ND, self.w_in.to(x_ND.dtype), tokens_per_expert_E)  # (N, 2F) or (N, F)
        if self.activation == "swiglu":
            gate_NF, up_NF = hidden_NF.chunk(2, dim=-1)
            hidden_NF = F.silu(gate_NF) * up_NF  # (N, F)
        else:
            hidden_NF = F.gelu(hidden_NF)
        return matmul(hidden_NF, self.w_out.to(x_ND.dtype), tokens_per_expert_E)  # (N, D)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, activation={self.activation}"


class FeedForward(nn.Module):
    """A dense FFN (SwiGLU or GELU) with the same weight layout as one expert; used for shared
    experts (DeepSeekMoE, Dai et al. 2024) and dense layers.

    Args:
        d_model: model width.
        d_ff: hidden width.
        activation: ``"swiglu"`` or ``"gelu"``.
        init_std: standard deviation of the normal initialisation.
    """

    def __init__(self, *, d_model: int, d_ff: int, activation: str = "swiglu", init_std: float = 0.02) -> None:
        super().__init__()
        check_activation(activation)
        self.activation = activation
        in_width = 2 * d_ff if activation == "swiglu" else d_ff
        self.w_in = nn.Linear(d_model, in_width, bias=False)
        self.w_out = nn.Linear(d_ff, d_model, bias=False)
        nn.init.normal_(self.w_in.weight, std=init_std)
        nn.init.normal_(self.w_out.weight, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In the input's dtype, as the routed experts compute: a bf16 input into an fp32 layer runs
        # in bf16 on both paths (under autocast, F.linear casts both operands as usual).
        hidden = F.linear(x, self.w_in.weight.to(x.dtype))
        if self.activation == "swiglu":
            gate, up = hidden.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        else:
            hidden = F.gelu(hidden)
        return F.linear(hidden, self.w_out.weight.to(hidden.dtype))
