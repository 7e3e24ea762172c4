"""Which replica of an expert each assignment goes to, in given fractions.

Under expert parallelism an expert may have replicas on several ranks, and each source rank splits
its assignments to that expert over the replicas in fractions set by the placement
(:class:`~lightning_moe.parallel.placement.ExpertPlacement`). The split is deterministic, so that the
gate (for device-level capacity) and the dispatcher agree on it without talking. No collectives.

Shape legend: ``N`` assignments, ``E`` experts, ``R`` ranks.
"""

from __future__ import annotations

import torch

from lightning_moe.ops.counting import count_per_expert


def choose_replica_ranks(
    expert_index_N: torch.Tensor,
    cumulative_fractions_ER: torch.Tensor,
    allowed_ranks_NR: torch.Tensor | None = None,
) -> torch.Tensor:
    """The rank each assignment goes to, ``[N]``: the ``i``-th of expert ``e``'s ``n`` assignments (in
    priority order) goes to the rank whose interval of cumulative fractions holds ``(i + 1/2) / n``.

    The counts per replica then match the fractions to within one assignment, and a replica with a
    zero fraction (a rank that does not hold the expert) gets none.

    Args:
        expert_index_N: the logical expert of each assignment.
        cumulative_fractions_ER: ``[E, R]``, the running sum over ranks of this source rank's routing
            fractions, with the last column exactly 1; on the assignments' device (a copy from the
            host at every call would wait, on a GPU, for the kernels queued before it).
        allowed_ranks_NR: ``[N, R]`` booleans, the holders of its expert each assignment may go to
            (device-limited routing: :func:`allowed_replicas`), or ``None``. An assignment then splits
            over its allowed replicas in their fractions, renormalised, or evenly when the fractions
            give them nothing (a plan that sent this source's tokens for the expert elsewhere).
    """
    num_experts = cumulative_fractions_ER.shape[0]
    order_N = torch.argsort(expert_index_N, stable=True)
    expert_sorted_N = expert_index_N[order_N]
    counts_E = count_per_expert(expert_index_N, num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    position_N = torch.arange(expert_index_N.numel(), device=expert_index_N.device) - starts_E[expert_sorted_N]
    quantile_N = (position_N.float() + 0.5) / counts_E[expert_sorted_N].float()
    cumulative_NR = cumulative_fractions_ER[expert_sorted_N]
    if allowed_ranks_NR is not None:
        cumulative_NR = cumulative_NR.double()
        fractions_NR = torch.diff(cumulative_NR, dim=1, prepend=torch.zeros_like(cumulative_NR[:, :1])).clamp_min(0)
        fractions_NR = restrict_to_allowed(fractions_NR, allowed_ranks_NR[order_N])
        cumulative_NR = fractions_NR.cumsum(dim=1)
        # Exactly 1 from the last allowed replica on, so that rounding cannot carry an assignment
        # past it to a rank that does not hold its expert.
        ranks_R = torch.arange(cumulative_NR.shape[1], device=cumulative_NR.device)
        last_allowed_N = torch.where(fractions_NR > 0, ranks_R, -1).amax(dim=1)
        cumulative_NR = torch.where(ranks_R >= last_allowed_N.unsqueeze(1), 1.0, cumulative_NR)
    rank_sorted_N = (cumulative_NR[:, :-1] <= quantile_N.unsqueeze(1)).sum(dim=1)
    rank_N = torch.empty_like(rank_sorted_N)
    rank_N[order_N] = rank_sorted_N
    return rank_N


def allowed_replicas(
    allowed_devices_TG: torch.Tensor | None,
    token_index_N: torch.Tensor,
    expert_index_N: torch.Tensor,
    holders_RE: torch.Tensor,
) -> torch.Tensor | None:
    """``[N, R]``: the replicas each assignment may use under device-limited routing, the holders of its
    expert among its token's kept ranks (``Routing.allowed_devices_TG``); ``None`` without a limit.
    ``holders_RE`` on the assignments' device, as the fractions of :func:`choose_replica_ranks`."""
    if allowed_devices_TG is None:
        return None
    return allowed_devices_TG[token_index_N] & holders_RE.t()[expert_index_N]


def restrict_to_allowed(fractions_XR: torch.Tensor, allowed_XR: torch.Tensor) -> torch.Tensor:
    """Each row's fractions over the ranks it may use (``allowed_XR``, booleans), renormalised to sum to
    1; a row whose fractions give its allowed ranks nothing splits evenly over them (a plan that sent
    this source's tokens for the expert to another holder). Every row must allow some rank."""
    allowed_XR = allowed_XR.to(fractions_XR.dtype)
    kept_XR = fractions_XR * allowed_XR
    kept_XR = torch.where(kept_XR.sum(dim=-1, keepdim=True) > 0, kept_XR, allowed_XR)
    return kept_XR / kept_XR.sum(dim=-1, keepdim=True)
