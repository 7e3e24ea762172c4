"""The trigger rule: when a layer's new plan is worth moving to.

A plan replaces the one in force only when both hold (``layer_time`` from the cost model):

    gain = layer_time(now) - layer_time(plan)  >  min_gain * layer_time(now)          (hysteresis)
    gain * horizon_steps                        >  migration_margin * migration_time  (cost of moving)

Which plan is weighed depends on whether the load can be followed at all. Planning from the window
that ended bets that the next window looks like it; the bet is checked against the two windows
known: a plan made from the window before (the plan in force, or one planned for the check) must
beat the default placement (:meth:`~lightning_moe.planning.PlacementPlan.default`, no bet on any
load) on the window that ended, by at least ``min_gain``. When it does (a drifting popularity, a
hot expert that stays), the planner's plan is weighed by the rule above. When it does not (a hot
spot that moves on every window), the load is not one a placement can follow: the default placement
is weighed instead, so a layer bet on an old load goes back to it and a layer on it stays.

The first inequality keeps small predicted gains, within the noise of the measured load, from making
placements oscillate; the second weighs the copy of weights and optimizer state against the time
the plan saves until the next re-plan.

:class:`~lightning_moe.ExpertMigration` applies it to every layer at every re-plan, and
``benchmarks/placement_sim.py`` applies the same rule to the planner's plans, so the simulated
policy is the one the callback runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lightning_moe.planning.cost_model import PlanEstimate
from lightning_moe.planning.plan import PlacementPlan

if TYPE_CHECKING:
    from lightning_moe.planning.planner import PlacementPlanner


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
        self, now: PlacementPlan, plan: PlacementPlan, estimate_now: PlanEstimate, estimate_new: PlanEstimate
    ) -> bool:
        """Whether to move from ``now`` to ``plan``, by the two inequalities, on one window's load;
        ``estimate_new`` must carry the migration from ``now`` (``estimate_plan(plan, load, ...,
        current=now)``)."""
        if plan.same_as(now):
            return False
        gain = estimate_now.layer_seconds - estimate_new.layer_seconds
        pays = gain * self.horizon_steps > self.migration_margin * estimate_new.migration_seconds
        return gain > self.min_gain * estimate_now.layer_seconds and pays

    def choose(self, now: PlacementPlan, loads: Sequence[np.ndarray], planner: PlacementPlanner) -> PlacementPlan:
        """The plan to run next: the planner's plan for ``loads[0]``, the default placement, or
        ``now`` (see the module docstring).

        Args:
            now: the plan in force.
            loads: ``[R, E]`` per-step loads: the window that ended, then the window before it when
                there is one.
            planner: the layer's planner (it plans and prices).
        """
        if not len(loads):
            raise ValueError("MigrationTrigger.choose: loads must hold at least the latest window's load")
        latest = loads[0]
        num_ranks, num_experts = latest.shape
        default = PlacementPlan.default(num_experts, num_ranks, len(now.experts_per_rank[0]))
        follow = True
        if len(loads) > 1:
            made_before = planner.plan(loads[1], now) if now.same_as(default) else now
            followed = planner.estimate(made_before, latest).layer_seconds
            follow = followed < (1 - self.min_gain) * planner.estimate(default, latest).layer_seconds
        # Following the load does not pay when a plan from the window before loses to the default on
        # the window that ended: weigh the default, not a new bet.
        candidate = planner.plan(latest, now) if follow else default
        accepted = self.accepts(now, candidate, planner.estimate(now, latest), planner.estimate(candidate, latest, now))
        return candidate if accepted else now
