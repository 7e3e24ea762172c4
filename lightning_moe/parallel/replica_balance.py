"""Split each replicated expert's tokens over its replicas from the load of the step itself.

A placement's routing fractions (``[R_src, E, R_dst]``) are planned from past windows of load. When the
load moves on (a favourite expert of one source rank changes, two experts trade places in
popularity), fractions fitted to the past send too much to some replicas: the slots could still
balance the step, but the fractions do not. So the dispatcher re-fits them at every step, after one
small all-reduce of the step's counts (``[R, E]`` integers per layer), and every rank computes the
same fractions from the same counts.

The fit scales the planned fractions by one factor per destination rank, ``u_d``, renormalised over
each (source, expert) row: ``f[r, e, d] = w[r, e, d] u_d / sum_d' w[r, e, d'] u_d'``, with ``u`` found
by iterative proportional fitting (the destination half of Sinkhorn's matrix scaling): each round
multiplies ``u_d`` by ``target_d / load_d``. The target is the plan's own share of the load per rank
(``ExpertPlacement.load_share_R``, even unless a plan set it): the planner may accept a little
imbalance for fewer bytes across nodes, and the fit keeps that choice while the load drifts under it.
The planned fractions are the prior, so the fit also keeps which replicas serve which sources, as
far as the target allows; it is a few dozen small tensor operations, no solver. ``w`` is the planned
fractions plus a little mass on every holder, mostly on the source's own node, so that any replica
can take load the plan did not give it.

Shape legend: ``R`` EP ranks, ``E`` logical experts, ``X`` experts with replicas.
"""

from __future__ import annotations

import torch

#: Share of each (source, expert) row added over the holders on the source's node (then, a tenth of
#: it, over every holder), so that every replica can take load; see :func:`balancing_weights`.
LOCAL_MASS = 0.05
#: Rounds of proportional fitting; the loads are within a fraction of a percent of balanced by then
#: on the simulator's workloads (tests/test_replica_balance.py).
ROUNDS = 50


def balancing_weights(fractions_RER: torch.Tensor, holders_RE: torch.Tensor, node_of_rank_R: torch.Tensor) -> torch.Tensor:
    """``w[r, e, d]``: the planned fractions plus :data:`LOCAL_MASS` spread over the holders of ``e``
    on ``r``'s node and a tenth of it over all holders of ``e`` (float64; compute once per placement)."""
    holds_ER = holders_RE.t().to(torch.float64)
    same_node_RR = (node_of_rank_R[:, None] == node_of_rank_R[None, :]).to(torch.float64)
    local_RER = holds_ER[None] * same_node_RR[:, None, :]
    local_RER = local_RER / local_RER.sum(dim=-1, keepdim=True).clamp_min(1.0)
    everywhere_ER = holds_ER / holds_ER.sum(dim=-1, keepdim=True)
    return fractions_RER.to(torch.float64) + LOCAL_MASS * local_RER + 0.1 * LOCAL_MASS * everywhere_ER[None]


class ReplicaBalancer:
    """Fits routing fractions to each step's counts for one placement (see the module docstring).

    Args:
        weights_RER: ``w`` of :func:`balancing_weights` (or any non-negative ``[R, E, R]`` weights
            that are positive on the holders of each expert).
        target_share_R: ``[R]``, the share of the load each rank should receive (the plan's
            ``load_share_R``); ``None``: an even share.
        rounds: rounds of proportional fitting.
    """

    def __init__(self, weights_RER: torch.Tensor, target_share_R: torch.Tensor | None = None, rounds: int = ROUNDS) -> None:
        weights_RER = weights_RER.to(torch.float64)
        self.rounds = rounds
        num_ranks = weights_RER.shape[-1]
        share_R = torch.full((num_ranks,), 1.0 / num_ranks, dtype=torch.float64) if target_share_R is None else (
            torch.as_tensor(target_share_R, dtype=torch.float64).to(weights_RER.device)
        )
        self.target_share_R = share_R / share_R.sum()
        self.fractions_RER = weights_RER / weights_RER.sum(dim=-1, keepdim=True)
        # Only experts with several holders have a choice; the others' load is fixed (their rows are
        # the same one-hot from every source). Fitting the replicated ones alone keeps the rounds
        # small: a few replicas among hundreds of experts.
        self.replicated_E = (weights_RER > 0).sum(dim=-1).amax(dim=0) > 1
        self.holder_of_fixed_FR = self.fractions_RER[0, ~self.replicated_E]
        self.weights_RXR = weights_RER[:, self.replicated_E]

    def fractions(self, counts_RE: torch.Tensor, source_rank: int | None = None) -> torch.Tensor:
        """The fractions that even out the ranks' load under ``counts_RE`` (the assignments each source
        rank routes to each expert now): ``[R, E, R]``, or source rank ``source_rank``'s ``[E, R]``.
        Rows sum to 1 and are zero where the weights are. Deterministic: the same counts give the same
        fractions on every rank."""
        counts_RE = counts_RE.to(self.fractions_RER)
        fractions_RER = self.fractions_RER if source_rank is None else self.fractions_RER[source_rank : source_rank + 1]
        fractions_RER = fractions_RER.clone()
        num_ranks = self.fractions_RER.shape[-1]
        total = counts_RE.sum()
        if total > 0 and bool(self.replicated_E.any()):
            fixed_R = counts_RE[:, ~self.replicated_E].sum(dim=0) @ self.holder_of_fixed_FR
            counts_RX = counts_RE[:, self.replicated_E]
            target_R = self.target_share_R * total
            damping = 1e-3 * total / num_ranks
            log_scale_R = torch.zeros(num_ranks, dtype=torch.float64, device=counts_RE.device)
            for _ in range(self.rounds):
                load_R = fixed_R + torch.einsum("rx,rxd->d", counts_RX, _scaled(self.weights_RXR, log_scale_R))
                # A rank whose load no factor changes (it holds no replica anyone routes) must not
                # drift without bound: the damping terms and the clamp keep every factor finite.
                log_scale_R = (log_scale_R + torch.log((target_R + damping) / (load_R + damping))).clamp(-30.0, 30.0)
            rows_RXR = self.weights_RXR if source_rank is None else self.weights_RXR[source_rank : source_rank + 1]
            fractions_RER[:, self.replicated_E] = _scaled(rows_RXR, log_scale_R)
        return fractions_RER if source_rank is None else fractions_RER[0]

    def to(self, device: torch.device) -> ReplicaBalancer:
        """This balancer with its tensors on ``device``."""
        moved = object.__new__(ReplicaBalancer)
        moved.rounds = self.rounds
        for name in ("fractions_RER", "replicated_E", "holder_of_fixed_FR", "weights_RXR", "target_share_R"):
            setattr(moved, name, getattr(self, name).to(device))
        return moved


def balanced_fractions(
    weights_RER: torch.Tensor, counts_RE: torch.Tensor, target_share_R: torch.Tensor | None = None, rounds: int = ROUNDS
) -> torch.Tensor:
    """``[R, E, R]`` routing fractions fitted to ``counts_RE`` (:class:`ReplicaBalancer`, once)."""
    return ReplicaBalancer(weights_RER, target_share_R, rounds).fractions(counts_RE)


def _scaled(weights_RXR: torch.Tensor, log_scale_R: torch.Tensor) -> torch.Tensor:
    scaled_RXR = weights_RXR * torch.exp(log_scale_R - log_scale_R.max())
    return scaled_RXR / scaled_RXR.sum(dim=-1, keepdim=True)
