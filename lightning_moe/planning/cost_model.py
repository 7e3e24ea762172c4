"""The per-layer cost model that the planner minimises and the benchmarks report.

Inputs: ``load_RE`` (assignments per training step from source EP rank ``r`` to logical expert
``e``, summed over expert-data-parallel replicas: a window's counts divided by its steps), a
:class:`~lightning_moe.planning.plan.PlacementPlan` (slots and routing fractions ``F_RER``), a
:class:`~lightning_moe.planning.topology.Topology` and the :class:`LayerCost` constants.

Formulas (one MoE layer, one training step, forward and backward):

- Traffic: ``T[r, d] = sum_e load[r, e] * F[r, e, d]`` assignments that rank ``r`` sends to ``d``.
- Compute of rank ``d``: ``seconds_per_token * sum_r T[r, d] + per_expert_overhead * n_d``, with
  ``n_d`` the slots of ``d`` that receive at least one assignment (one grouped-GEMM group each).
- One all-to-all: dispatch moves ``T[r, d]`` rows from ``r`` to ``d``; combine moves them back,
  so both load a rank with its row ``T[r, :]`` one way and its column ``T[:, r]`` the other. Rank
  ``r``'s four link loads (bytes over each link's bandwidth) are

  ``out_intra = token_bytes * sum_{d on r's node, d != r} T[r, d] / intra_node_bandwidth``,
  ``out_inter = token_bytes * sum_{d on another node} T[r, d] / inter_node_bandwidth``,

  and ``in_intra``, ``in_inter`` likewise over the column. A rank drives its NVLink and its NIC,
  each direction, at the same time (full duplex, separate links), so its time is the largest of
  the four; the collective ends when the slowest rank is done:
  ``a2a = max_r max(out_intra, out_inter, in_intra, in_inter)[r] + latency``, where the latency is
  the inter-node one when the group spans nodes, else the intra-node one.
- Layer time: ``max_d compute[d] + all_to_all_passes * a2a``. The four passes are the forward
  dispatch and combine and their two backward all-to-alls; the expert compute is the slowest
  rank's, since every all-to-all waits for it. ``seconds_per_token`` covers forward and backward.
- Migration from a ``current`` plan: every (rank, expert) pair of the new plan that the current
  plan lacks is one copy of ``expert_bytes`` (weights and optimizer state) from the nearest rank
  that holds the expert now (same node first; among equals the one with the fewest copies to send,
  then the lowest rank). Copies run in parallel over the same four links per rank:
  ``migration_seconds = max_r max(link bytes / bandwidth) + latency`` (0 when nothing moves).

Shape legend: ``R`` EP ranks, ``E`` logical experts, ``K = 4`` link loads of a rank
(out-intra, out-inter, in-intra, in-inter).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lightning_moe.planning.plan import PlacementPlan
from lightning_moe.planning.topology import Topology

OUT_INTRA, OUT_INTER, IN_INTRA, IN_INTER = range(4)


@dataclass(frozen=True)
class LayerCost:
    """Constants of one MoE layer for the cost model.

    Args:
        token_bytes: bytes of one hidden row on the wire (``d_model * 2`` in bf16).
        seconds_per_token: expert compute seconds per assignment, forward plus backward.
        per_expert_overhead: seconds per non-empty local slot per step (kernel launch, tails).
        expert_bytes: bytes to migrate one slot: its weights and its optimizer state.
        all_to_all_passes: all-to-alls per step (4 in training: dispatch and combine, forward and
            backward; 2 for inference).
    """

    token_bytes: float
    seconds_per_token: float
    per_expert_overhead: float = 0.0
    expert_bytes: float = 0.0
    all_to_all_passes: int = 4

    def __post_init__(self) -> None:
        for name in ("token_bytes", "seconds_per_token", "per_expert_overhead", "expert_bytes"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"LayerCost: `{name}` must be a finite, non-negative number, got {value!r}.")
        if self.token_bytes == 0 and self.seconds_per_token == 0:
            raise ValueError("LayerCost: token_bytes and seconds_per_token are both 0; nothing would cost anything.")
        if isinstance(self.all_to_all_passes, bool) or not isinstance(self.all_to_all_passes, int) or self.all_to_all_passes < 0:
            raise ValueError(f"LayerCost: `all_to_all_passes` must be a non-negative integer, got {self.all_to_all_passes!r}.")

    @classmethod
    def swiglu(
        cls,
        *,
        d_model: int,
        d_ff: int,
        flops_per_second: float,
        activation_bytes: int = 2,
        bytes_per_expert_param: float = 14.0,
        per_expert_overhead: float = 0.0,
    ) -> LayerCost:
        """Constants of a SwiGLU expert layer from its shape and the achieved expert throughput.

        An assignment costs ``2 * 3 * d_model * d_ff`` FLOPs forward and twice that backward. A slot
        moves ``3 * d_model * d_ff`` parameters at ``bytes_per_expert_param`` bytes each (14 for a
        bf16 weight, its fp32 master copy and Adam's two fp32 moments).

        Args:
            d_model: model width.
            d_ff: expert hidden width.
            flops_per_second: throughput the expert GEMMs reach.
            activation_bytes: bytes per hidden value on the wire.
            bytes_per_expert_param: bytes moved per expert parameter on migration.
            per_expert_overhead: seconds per non-empty local slot.
        """
        params = 3 * d_model * d_ff
        return cls(
            token_bytes=float(d_model * activation_bytes),
            seconds_per_token=3 * 2 * params / flops_per_second,
            per_expert_overhead=per_expert_overhead,
            expert_bytes=float(params * bytes_per_expert_param),
        )


@dataclass(frozen=True)
class PlanEstimate:
    """What the cost model predicts for one layer under a plan and a per-step load.

    Attributes:
        layer_seconds: ``max compute + passes * all_to_all`` per step.
        compute_seconds: the slowest rank's expert compute.
        all_to_all_seconds: one all-to-all (the layer pays ``all_to_all_passes`` of them).
        max_compute_load: assignments computed by the busiest rank.
        mean_compute_load: assignments per rank on average.
        cross_node_share: share of assignments sent to a rank on another node.
        cross_node_bytes: bytes that cross nodes per step, over all passes.
        migration_bytes: bytes to copy to go from ``current`` to this plan (0 without ``current``).
        migration_seconds: time of those copies.
    """

    layer_seconds: float
    compute_seconds: float
    all_to_all_seconds: float
    max_compute_load: float
    mean_compute_load: float
    cross_node_share: float
    cross_node_bytes: float
    migration_bytes: float
    migration_seconds: float

    @property
    def max_over_mean(self) -> float:
        """Busiest rank's load over the mean (1.0 is perfect balance)."""
        return self.max_compute_load / self.mean_compute_load if self.mean_compute_load > 0 else 1.0


def as_load_RE(load_RE: torch.Tensor | np.ndarray, num_ranks: int, num_experts: int, *, where: str) -> np.ndarray:
    """``load_RE`` as a float64 numpy array, checked for shape and sign."""
    if isinstance(load_RE, torch.Tensor):
        load_RE = load_RE.detach().to("cpu", torch.float64).numpy()
    load_RE = np.asarray(load_RE, dtype=np.float64)
    if load_RE.shape != (num_ranks, num_experts):
        raise ValueError(
            f"{where}: load_RE has shape {load_RE.shape}; expected [R, E] = [{num_ranks}, {num_experts}] "
            f"(assignments from each source EP rank to each logical expert)."
        )
    if not np.isfinite(load_RE).all() or (load_RE < 0).any():
        raise ValueError(f"{where}: load_RE must be finite and non-negative.")
    return load_RE


def as_windows_WRE(load: torch.Tensor | np.ndarray, num_ranks: int, num_experts: int, *, where: str) -> np.ndarray:
    """One window ``[R, E]`` or several ``[W, R, E]`` (``W >= 1``), as a checked float64 ``[W, R, E]`` array."""
    if isinstance(load, torch.Tensor):
        load = load.detach().to("cpu", torch.float64).numpy()
    load = np.asarray(load, dtype=np.float64)
    if load.ndim == 2:
        load = load[None]
    if load.ndim != 3 or load.shape[0] < 1:
        raise ValueError(
            f"{where}: the load has shape {load.shape}; expected one window [R, E] = [{num_ranks}, {num_experts}] "
            f"or several [W, R, E] = [W, {num_ranks}, {num_experts}]."
        )
    return np.stack([as_load_RE(window, num_ranks, num_experts, where=where) for window in load])


def traffic_RR(load_RE: np.ndarray, fractions_RER: np.ndarray) -> np.ndarray:
    """``T[r, d] = sum_e load[r, e] * F[r, e, d]``: assignments rank ``r`` sends to rank ``d``."""
    return np.einsum("re,red->rd", load_RE, fractions_RER)


def planned_load_share(plan: PlacementPlan, load_RE: torch.Tensor | np.ndarray) -> torch.Tensor | None:
    """``[R]``: the share of ``load_RE``'s assignments each rank receives under ``plan``'s fractions (the
    column sums of :func:`traffic_RR`), what per-step replica balancing aims at
    (``ExpertPlacement.load_share_R``); ``None`` for a window without load."""
    load_RE = as_load_RE(load_RE, plan.num_ranks, plan.num_experts, where="planned_load_share")
    received_R = traffic_RR(load_RE, plan.routing_fractions_RER.numpy()).sum(axis=0)
    total = received_R.sum()
    return torch.from_numpy(received_R / total) if total > 0 else None


def assignment_seconds(cost: LayerCost, topology: Topology) -> torch.Tensor:
    """``[3]``: the seconds one assignment costs computed, sent to a rank of the same node and sent
    to another node, over every all-to-all of a step (``ExpertPlacement.assignment_seconds``, the
    prices per-step replica balancing weighs its candidates with)."""
    passes_bytes = cost.all_to_all_passes * cost.token_bytes
    return torch.tensor(
        [cost.seconds_per_token, passes_bytes / topology.intra_node_bandwidth, passes_bytes / topology.inter_node_bandwidth],
        dtype=torch.float64,
    )


def link_seconds_RK(traffic: np.ndarray, topology: Topology, token_bytes: float) -> np.ndarray:
    """``[R, 4]`` seconds of one all-to-all on each link load of each rank (see the module docstring)."""
    same_RR = topology.same_node()
    off_diagonal = ~np.eye(topology.num_ranks, dtype=bool)
    intra_RR = np.where(same_RR & off_diagonal, traffic, 0.0)
    inter_RR = np.where(~same_RR, traffic, 0.0)
    seconds_RK = np.empty((topology.num_ranks, 4))
    seconds_RK[:, OUT_INTRA] = intra_RR.sum(axis=1) * token_bytes / topology.intra_node_bandwidth
    seconds_RK[:, OUT_INTER] = inter_RR.sum(axis=1) * token_bytes / topology.inter_node_bandwidth
    seconds_RK[:, IN_INTRA] = intra_RR.sum(axis=0) * token_bytes / topology.intra_node_bandwidth
    seconds_RK[:, IN_INTER] = inter_RR.sum(axis=0) * token_bytes / topology.inter_node_bandwidth
    return seconds_RK


def all_to_all_latency(topology: Topology) -> float:
    """Latency one all-to-all pays: the inter-node one when the group spans nodes."""
    if topology.num_nodes > 1:
        return topology.inter_node_latency
    return topology.intra_node_latency if topology.ranks_per_node > 1 else 0.0


def compute_seconds_R(load_RE: np.ndarray, plan: PlacementPlan, cost: LayerCost) -> np.ndarray:
    """``[R]`` expert seconds of each rank: tokens times the per-token cost plus the overhead of its
    non-empty slots (a slot counts once per copy of its expert on the rank)."""
    fractions_RER = plan.routing_fractions_RER.numpy()
    processed_ER = np.einsum("re,red->ed", load_RE, fractions_RER)
    nonempty_slots_R = ((processed_ER > 0) * plan.slot_counts_ER()).sum(axis=0)
    return cost.seconds_per_token * processed_ER.sum(axis=0) + cost.per_expert_overhead * nonempty_slots_R


def migration_transfers(
    current: Sequence[Sequence[int]], new: Sequence[Sequence[int]], topology: Topology
) -> list[tuple[int, int, int]]:
    """The copies ``(source rank, destination rank, expert)`` that turn ``current`` into ``new``.

    A destination copies every expert it holds in ``new`` but not in ``current`` from the nearest
    rank that holds it in ``current`` (same node first; then the rank with the fewest copies to
    send so far, then the lowest rank). Destinations and experts are visited in increasing order,
    so the result is deterministic.
    """
    node_R = topology.node_of_rank()
    holders: dict[int, list[int]] = {}
    for rank, experts in enumerate(current):
        for expert in set(experts):
            holders.setdefault(int(expert), []).append(rank)
    sends = np.zeros(topology.num_ranks, dtype=np.int64)
    transfers = []
    for rank, experts in enumerate(new):
        for expert in sorted(set(int(e) for e in experts) - set(int(e) for e in current[rank])):
            candidates = holders.get(expert)
            if not candidates:
                raise ValueError(f"migration: expert {expert} is held by no rank of the current plan.")
            source = min(candidates, key=lambda s: (node_R[s] != node_R[rank], sends[s], s))
            sends[source] += 1
            transfers.append((source, rank, expert))
    return transfers


def migration_seconds(transfers: Sequence[tuple[int, int, int]], topology: Topology, expert_bytes: float) -> float:
    """Time of a set of parallel slot copies over the four links per rank (0 when there are none)."""
    if not transfers:
        return 0.0
    count_RR = np.zeros((topology.num_ranks, topology.num_ranks))
    for source, destination, _ in transfers:
        count_RR[source, destination] += 1
    seconds = link_seconds_RK(count_RR, topology, expert_bytes).max()
    same_RR = topology.same_node()
    crosses = any(not same_RR[s, d] for s, d, _ in transfers)
    return float(seconds) + (topology.inter_node_latency if crosses else topology.intra_node_latency)


def estimate_plan(
    plan: PlacementPlan,
    load_RE: torch.Tensor | np.ndarray,
    topology: Topology,
    cost: LayerCost,
    current: PlacementPlan | None = None,
) -> PlanEstimate:
    """Evaluate the cost model of the module docstring for one plan.

    Args:
        plan: the plan to evaluate (colocated replicas, as EPLB makes them, are allowed).
        load_RE: assignments per step from each source EP rank to each logical expert.
        topology: the EP group's nodes and links.
        cost: the layer's constants.
        current: the placement in force now; the migration fields are 0 without it.
    """
    if plan.num_ranks != topology.num_ranks:
        raise ValueError(
            f"estimate: the plan has {plan.num_ranks} ranks but the topology {topology.num_ranks} "
            f"({topology.num_nodes} nodes x {topology.ranks_per_node})."
        )
    load_RE = as_load_RE(load_RE, plan.num_ranks, plan.num_experts, where="estimate")
    traffic = traffic_RR(load_RE, plan.routing_fractions_RER.numpy())
    compute_R = compute_seconds_R(load_RE, plan, cost)
    all_to_all = float(link_seconds_RK(traffic, topology, cost.token_bytes).max()) + all_to_all_latency(topology)
    cross_tokens = float(traffic[~topology.same_node()].sum())
    total = float(load_RE.sum())
    tokens_R = traffic.sum(axis=0)
    moved_bytes = moved_seconds = 0.0
    if current is not None:
        transfers = migration_transfers(current.experts_per_rank, plan.experts_per_rank, topology)
        moved_bytes = len(transfers) * cost.expert_bytes
        moved_seconds = migration_seconds(transfers, topology, cost.expert_bytes)
    return PlanEstimate(
        layer_seconds=float(compute_R.max()) + cost.all_to_all_passes * all_to_all,
        compute_seconds=float(compute_R.max()),
        all_to_all_seconds=all_to_all,
        max_compute_load=float(tokens_R.max()),
        mean_compute_load=float(tokens_R.mean()),
        cross_node_share=cross_tokens / total if total > 0 else 0.0,
        cross_node_bytes=cross_tokens * cost.token_bytes * cost.all_to_all_passes,
        migration_bytes=moved_bytes,
        migration_seconds=moved_seconds,
    )
