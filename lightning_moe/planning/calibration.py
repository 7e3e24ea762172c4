"""Fit the compute constants of the cost model to measured layer (or step) times.

Each sample is ``(load_RE, plan, seconds)``: the load a layer saw, the plan it ran under and the
time it took. The model of :mod:`~lightning_moe.planning.cost_model` says

    seconds = max_d (seconds_per_token * tokens[d] + per_expert_overhead * slots[d]) + comm

with ``tokens[d]`` and ``slots[d]`` (non-empty slots) from the plan and the load, and ``comm`` the
all-to-all time from the topology. The bandwidths are taken as known (declared or from
:meth:`Topology.measure`); the two compute constants are fitted by least squares. The maximum
makes the fit non-linear, so it alternates (Lloyd-style): pick each sample's slowest rank under
the current constants, solve the linear least squares ``seconds - comm ~ a * tokens + o * slots``
on those ranks (non-negative: a negative coefficient is dropped and the other refitted), and
repeat until the slowest ranks stop changing; from three starting points, keeping the best fit.

Shape legend: ``R`` EP ranks, ``E`` logical experts, ``M`` samples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lightning_moe.planning.cost_model import (
    LayerCost,
    all_to_all_latency,
    as_load_RE,
    link_seconds_RK,
    traffic_RR,
)
from lightning_moe.planning.plan import PlacementPlan
from lightning_moe.planning.topology import Topology

_MAX_ROUNDS = 50


@dataclass(frozen=True)
class Calibration:
    """A fitted cost and how well it fits.

    Attributes:
        cost: the input cost with ``seconds_per_token`` and ``per_expert_overhead`` fitted.
        rms_error: root-mean-square of ``predicted - measured`` seconds over the samples.
        max_relative_error: largest ``|predicted - measured| / measured``.
    """

    cost: LayerCost
    rms_error: float
    max_relative_error: float


def calibrate(
    samples: Sequence[tuple[torch.Tensor | np.ndarray, PlacementPlan, float]],
    topology: Topology,
    cost: LayerCost,
    *,
    fit_overhead: bool = True,
) -> Calibration:
    """Fit ``seconds_per_token`` (and ``per_expert_overhead``) to measured times (module docstring).

    Args:
        samples: ``(load_RE, plan, measured_seconds)`` triples, ``load_RE`` per step as in the cost model.
        topology: the links, used for the all-to-all part of each sample.
        cost: the other constants (``token_bytes``, passes, ``expert_bytes``) and the starting point.
        fit_overhead: fit the per-slot overhead too (needs at least two samples that differ in
            slots); otherwise keep ``cost.per_expert_overhead``.
    """
    if not samples:
        raise ValueError("calibrate: no samples; give (load_RE, plan, measured_seconds) triples.")
    tokens_MR, slots_MR, target_M = [], [], []
    for index, (load_RE, plan, seconds) in enumerate(samples):
        if not np.isfinite(seconds) or seconds <= 0:
            raise ValueError(f"calibrate: sample {index} has measured_seconds={seconds!r}; it must be positive.")
        load_RE = as_load_RE(load_RE, plan.num_ranks, plan.num_experts, where="calibrate")
        fractions_RER = plan.routing_fractions_RER.numpy()
        traffic = traffic_RR(load_RE, fractions_RER)
        comm = cost.all_to_all_passes * (
            link_seconds_RK(traffic, topology, cost.token_bytes).max() + all_to_all_latency(topology)
        )
        processed_ER = np.einsum("re,red->ed", load_RE, fractions_RER)
        tokens_MR.append(traffic.sum(axis=0))
        slots_MR.append(((processed_ER > 0) * plan.slot_counts_ER()).sum(axis=0).astype(np.float64))
        target_M.append(seconds - comm)
    tokens_MR, slots_MR, target_M = np.array(tokens_MR), np.array(slots_MR), np.array(target_M)

    # The alternation stops at a fixed point, not always the best one (from all-zero constants every
    # sample's slowest rank is rank 0). It runs from the given constants and from those that rank the
    # samples' ranks by tokens alone and by slots alone (a kept overhead stays as given); the fit with
    # the least squared error wins.
    given = cost.per_expert_overhead
    starts = [(cost.seconds_per_token, given)] + ([(1.0, 0.0), (0.0, 1.0)] if fit_overhead else [(1.0, given)])
    fits = [
        _alternate(tokens_MR, slots_MR, target_M, per_token, overhead, fit_overhead=fit_overhead)
        for per_token, overhead in starts
    ]
    per_token, overhead = min(fits, key=lambda fit: _squared_error(tokens_MR, slots_MR, target_M, *fit))
    fitted = dataclasses.replace(cost, seconds_per_token=per_token, per_expert_overhead=overhead)
    predicted_M = (per_token * tokens_MR + overhead * slots_MR).max(axis=1)
    error_M = predicted_M - target_M
    measured_M = np.array([seconds for _, _, seconds in samples], dtype=np.float64)
    return Calibration(
        cost=fitted,
        rms_error=float(np.sqrt(np.mean(error_M**2))),
        max_relative_error=float(np.max(np.abs(error_M) / measured_M)),
    )


def _alternate(
    tokens_MR: np.ndarray,
    slots_MR: np.ndarray,
    target_M: np.ndarray,
    per_token: float,
    overhead: float,
    *,
    fit_overhead: bool,
) -> tuple[float, float]:
    """The Lloyd-style alternation of the module docstring from ``(per_token, overhead)``."""
    rows = np.arange(len(target_M))
    slowest_M = None
    for _ in range(_MAX_ROUNDS):
        new_slowest_M = (per_token * tokens_MR + overhead * slots_MR).argmax(axis=1)
        if slowest_M is not None and np.array_equal(new_slowest_M, slowest_M):
            break
        slowest_M = new_slowest_M
        columns = [tokens_MR[rows, slowest_M]] + ([slots_MR[rows, slowest_M]] if fit_overhead else [])
        residual_M = target_M - (0.0 if fit_overhead else overhead * slots_MR[rows, slowest_M])
        per_token, fitted_overhead = _nonnegative_least_squares(np.stack(columns, axis=1), residual_M)
        overhead = fitted_overhead if fit_overhead else overhead
    return per_token, overhead


def _squared_error(tokens_MR, slots_MR, target_M, per_token: float, overhead: float) -> float:
    return float(np.sum(((per_token * tokens_MR + overhead * slots_MR).max(axis=1) - target_M) ** 2))


def _nonnegative_least_squares(columns_MK: np.ndarray, target_M: np.ndarray) -> tuple[float, float]:
    """Least squares with one or two non-negative coefficients (the second is 0 when absent)."""
    solution = np.linalg.lstsq(columns_MK, target_M, rcond=None)[0]
    if (solution >= 0).all():
        return float(solution[0]), float(solution[1]) if len(solution) > 1 else 0.0
    # One coefficient would be negative: the best non-negative fit uses the other one alone.
    best = (np.inf, 0.0, 0.0)
    for keep in range(columns_MK.shape[1]):
        column = columns_MK[:, keep]
        value = max(float(column @ target_M / max(column @ column, 1e-300)), 0.0)
        error = float(np.sum((target_M - value * column) ** 2))
        if error < best[0]:
            best = (error, value if keep == 0 else 0.0, value if keep == 1 else 0.0)
    return best[1], best[2]
