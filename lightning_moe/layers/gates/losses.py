"""Auxiliary routing losses shared by several gates.

Shape legend: ``T`` tokens, ``E`` experts, ``K`` experts per token, ``N`` assignments.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lightning_moe.layers.gates.base import AuxLoss, Routing, mean_over_tokens, router_entropy
from lightning_moe.ops.counting import count_per_expert


#: Where a load-balancing loss counts each expert's share of the assignments, ``f_e``: this process's
#: micro-batch (``"local"``), or the global batch: the micro-batch of every process that routes with
#: the gate, and those accumulated since the optimizer step (``"global"``: Qiu et al. 2025).
LOAD_BALANCE_SCOPES = ("local", "global")


def check_load_balance_scope(owner: str, scope: str) -> None:
    if scope not in LOAD_BALANCE_SCOPES:
        raise ValueError(
            f"{owner}: `load_balance_scope` must be one of {list(LOAD_BALANCE_SCOPES)}, got {scope!r}. Use "
            f"\"global\" to count the experts' shares over the global batch."
        )


def switch_load_balance_loss(
    probs_TE: torch.Tensor,
    expert_index_N: torch.Tensor,
    num_experts: int,
    reduce_counts: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4): ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of assignments sent to expert ``e`` (for top-k, of the ``T * K``
    assignments, so the ``f_e`` sum to 1) and ``P_e`` the mean router probability of ``e``. It is 1.0
    for perfectly uniform routing; only ``P_e`` carries gradient.

    ``reduce_counts`` (global-batch balancing, Qiu et al. 2025, "Demons in the Detail"): the
    assignment counts are first summed over every process that routes with the gate (and the
    micro-batches accumulated so far: :meth:`~lightning_moe.MoELayer.count_global_batch`), so ``f_e`` is
    the global batch's while ``P_e`` stays this process's mean. With equal batches, the average of
    the processes' losses (what data parallelism's gradient averaging differentiates) is then the
    loss of one process that routed the whole global batch: a micro-batch of a few sequences no
    longer has to be balanced on its own, which lets experts specialise by domain.
    """
    counts_E = count_per_expert(expert_index_N, num_experts)
    if reduce_counts is not None:
        counts_E = reduce_counts(counts_E)
    counts_E = counts_E.to(probs_TE.dtype)
    fraction_E = counts_E / counts_E.sum().clamp_min(1.0)
    mean_prob_E = mean_over_tokens(probs_TE)
    return num_experts * torch.sum(fraction_E * mean_prob_E)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): ``mean_t (logsumexp_e logits_te)^2``."""
    return mean_over_tokens(torch.logsumexp(logits_TE, dim=-1).square())


def add_softmax_router_losses(
    routing: Routing,
    logits_TE: torch.Tensor,
    probs_TE: torch.Tensor,
    *,
    load_balance_coef: float,
    z_loss_coef: float,
    reduce_counts: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Put the Switch load-balancing loss (its counts summed by ``reduce_counts`` when given) and the
    router z-loss of a softmax gate on ``routing`` (each only when its coefficient is positive), and
    the router entropy in its stats."""
    if load_balance_coef > 0:
        loss = switch_load_balance_loss(probs_TE, routing.expert_index_N, probs_TE.shape[-1], reduce_counts)
        routing.aux_losses["load_balance_loss"] = AuxLoss(loss, load_balance_coef)
    if z_loss_coef > 0:
        routing.aux_losses["z_loss"] = AuxLoss(router_z_loss(logits_TE), z_loss_coef)
    routing.stats["router_entropy"] = router_entropy(probs_TE.detach())
