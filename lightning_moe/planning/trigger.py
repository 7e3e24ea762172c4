"""The trigger rule: when a layer's new plan is worth moving to.

A plan replaces the one in force only when both hold (``layer_time`` from the cost model):

    gain = layer_time(now) - layer_time(plan)  >  min_gain * layer_time(now)          (hysteresis)
    gain * horizon_steps                        >  migration_margin * migration_time  (cost of moving)

The gain is the smallest over the windows weighed: the window the plan was made from and, when
there is one, the window before it. The first alone flatters the plan: its routing fractions are
fitted to that very load, so a plan made from the next window would always look a little better
there and placements would follow noise. A gain that also holds on a window the plan was not
fitted to is a gain of the load's lasting shape, one that a load which moves on from window to
window (a hot spot that rotates) does not show.

When the planner's plan is refused, the plan in force is checked in turn: if the default placement
(:meth:`~lightning_moe.planning.PlacementPlan.default`, no bet on any load) beats it on the latest
window by the same rule, the load it was made for has gone, and the layer goes back to the default
rather than staying bet on a load that has moved on.

The first inequality keeps small predicted gains, within the noise of the measured load, from making
placements oscillate; the second weighs the copy of weights and optimizer state against the time
the plan saves until the next re-plan.

:class:`~lightning_moe.ExpertMigration` applies it to every layer at every re-plan, and
``benchmarks/placement_sim.py`` applies the same rule to the planner's plans, so the simulated
policy is the one the callback runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lightning_moe.planning.cost_model import PlanEstimate
from lightning_moe.planning.plan import PlacementPlan


@dataclass(frozen=True)
class MigrationTrigger:
    """Decides whether a new plan replaces the one in force (see the module docstring).

    Args:
        horizon_steps: steps the new plan is expected to stay in force.
        migration_margin: the gain over the horizon must exceed this many times the move's time.
        min_gain: the predicted layer time must drop by at least this share of the current one.
    """

    horizon_steps: int
    migration_margin: float = 2.0
    min_gain: float = 0.05

    def accepts(
        self, now: PlacementPlan, plan: PlacementPlan, estimates: Sequence[tuple[PlanEstimate, PlanEstimate]]
    ) -> bool:
        """Whether to move from ``now`` to ``plan``.

        Args:
            estimates: per window weighed, ``(estimate of now, estimate of plan)`` on that window's
                load, the window the plan was made from first; the plan's estimates must carry the
                migration from ``now`` (``estimate_plan(plan, load, ..., current=now)``).
        """
        if not estimates:
            raise ValueError("MigrationTrigger.accepts: estimates must hold at least the latest window's pair")
        changed = plan.experts_per_rank != now.experts_per_rank or not torch.allclose(
            plan.routing_fractions_RER, now.routing_fractions_RER, atol=1e-9
        )
        if not changed:
            return False
        for estimate_now, estimate_new in estimates:
            gain = estimate_now.layer_seconds - estimate_new.layer_seconds
            if gain <= self.min_gain * estimate_now.layer_seconds:
                return False
            if gain * self.horizon_steps <= self.migration_margin * estimate_new.migration_seconds:
                return False
        return True

    def choose(
        self,
        now: PlacementPlan,
        plan: PlacementPlan,
        loads: Sequence[np.ndarray],
        estimate: Callable[..., PlanEstimate],
    ) -> PlacementPlan:
        """The plan to run next: ``plan`` when it gains on every load weighed; else the default
        placement when it gains on the latest load (the plan in force has lapsed); else ``now``.

        Args:
            now: the plan in force.
            plan: the planner's plan, made from ``loads[0]``.
            loads: ``[R, E]`` per-step loads, the window ``plan`` was made from first, then the
                window before it when there is one.
            estimate: the cost model, ``estimate(plan, load, current) -> PlanEstimate`` (as
                :meth:`~lightning_moe.planning.PlacementPlanner.estimate`).
        """
        if not len(loads):
            raise ValueError("MigrationTrigger.choose: loads must hold at least the latest window's load")
        estimates_now = [estimate(now, load, None) for load in loads]
        if self.accepts(now, plan, [(e, estimate(plan, load, now)) for e, load in zip(estimates_now, loads)]):
            return plan
        num_ranks, num_experts = loads[0].shape
        default = PlacementPlan.default(num_experts, num_ranks, len(now.experts_per_rank[0]))
        if self.accepts(now, default, [(estimates_now[0], estimate(default, loads[0], now))]):
            return default
        return now
