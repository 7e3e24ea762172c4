"""The trigger rule: when a layer's new plan is worth moving to.

The planner plans from the last ``history_windows`` windows of load (the mean modelled layer time
over them, with one set of routing fractions: see :mod:`~lightning_moe.planning.routing_lp`). A
load that wobbles between states (two experts trading places in popularity and back) then gets
slots and fractions that hold in every state seen, where a plan fitted to the last window alone
loses balance as soon as the load steps back.

The alternative to moving is free: the slots in force (``now``) with fresh routing fractions for the
windows (``kept``; changing fractions moves no data, so every re-plan takes them). The planner's
plan replaces them only when both hold (``layer_time``: the cost model's, averaged over the windows
planned for):

    gain = layer_time(kept) - layer_time(plan)  >  min_gain * layer_time(kept)          (hysteresis)
    gain * horizon_steps                         >  migration_margin * migration_time   (cost of moving)

The gain is measured against ``kept``, not against ``now`` with the fractions it has: those were
fitted to older windows, and a gain that new fractions alone would give must not pay for a copy.
A plan made for several windows must also be no slower than ``kept`` on the latest of them: one that
wins on their mean but loses on the window that just ended pays for its move only if the load goes
back to older states, a bet the data of the last window speaks against.

Which windows are planned for is itself checked on the past (a backtest on the slots in force):
fractions fitted to the windows before the last one are compared, on the last one, with fractions
fitted to the window before it alone. History is dropped, and the plan made for the last window
alone, when it cost more than half the hysteresis there: the load drifts away from its past (a
favourite set that moves on) rather than stepping back and forth.

Whether the load can be followed at all is checked first. Planning from the windows that ended
bets that the next window looks like them; the bet is checked against the two windows known last: a
plan made from the window before (the plan in force, or one planned for the check) must beat the
default placement (:meth:`~lightning_moe.planning.PlacementPlan.default`, no bet on any load) on the
window that ended, by at least ``min_gain``. When it does not (a hot spot that moves on every
window), the load is not one a placement can follow: the default placement is weighed against the
plan in force on the last window by the same two inequalities, so a layer bet on an old load goes
back to it and a layer on it stays. Here, and only here, the plan in force keeps the fractions it
has and is weighed with them: fractions fitted to the last window are one more bet on a load that
does not hold from one window to the next (and the dispatcher re-fits them at every step).

The first inequality keeps small predicted gains, within the noise of the measured load, from making
placements oscillate (2% by default: a window's load is the mean of hundreds of steps); the second
weighs the copy of weights and optimizer state against the time the plan saves until the next
re-plan.

:class:`~lightning_moe.ExpertMigration` applies it to every layer at every re-plan, and
``benchmarks/placement_sim.py`` applies the same rule to the planner's plans, so the simulated
policy is the one the callback runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lightning_moe.planning.plan import PlacementPlan

if TYPE_CHECKING:
    from lightning_moe.planning.planner import PlacementPlanner


@dataclass(frozen=True)
class MigrationTrigger:
    """Decides what a layer runs next (see the module docstring).

    Args:
        horizon_steps: steps the new plan is expected to stay in force.
        migration_margin: the gain over the horizon must exceed this many times the move's time.
        min_gain: the predicted layer time must drop by at least this share of what staying gets
            (the hysteresis); also the margin by which a plan from the window before must beat the
            default placement for the load to count as one to follow, and twice the tolerance of
            the history backtest.
        history_windows: windows of load the plans are made for (the latest and those before it).
    """

    horizon_steps: int
    migration_margin: float = 2.0
    min_gain: float = 0.02
    history_windows: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.history_windows, bool) or not isinstance(self.history_windows, int) or self.history_windows < 1:
            raise ValueError(f"MigrationTrigger: `history_windows` must be an integer >= 1, got {self.history_windows!r}.")

    def accepts(self, seconds_now: float, seconds_new: float, migration_seconds: float) -> bool:
        """Whether a move from a plan of modelled layer time ``seconds_now`` to one of ``seconds_new``
        that takes ``migration_seconds`` pays, by the two inequalities."""
        gain = seconds_now - seconds_new
        return gain > self.min_gain * seconds_now and gain * self.horizon_steps > self.migration_margin * migration_seconds

    def choose(self, now: PlacementPlan, loads: Sequence[np.ndarray], planner: PlacementPlanner) -> PlacementPlan:
        """The plan to run next: the planner's plan, ``now``'s slots with fresh fractions, the
        default placement, or ``now`` itself (see the module docstring).

        Args:
            now: the plan in force.
            loads: ``[R, E]`` per-step loads, the window that ended first, then those before it: up
                to ``history_windows`` are planned for, one more serves the backtest.
            planner: the layer's planner (it plans and prices).
        """
        if not len(loads):
            raise ValueError("MigrationTrigger.choose: loads must hold at least the latest window's load")
        latest = loads[0]
        num_ranks, num_experts = latest.shape
        default = PlacementPlan.default(num_experts, num_ranks, len(now.experts_per_rank[0]))
        if len(loads) > 1:
            made_before = planner.plan(loads[1], now) if now.same_as(default) else now
            followed = planner.estimate(made_before, latest).layer_seconds
            if followed >= (1 - self.min_gain) * planner.estimate(default, latest).layer_seconds:
                # A plan from the window before loses to the default on the window that ended:
                # following the load does not pay. Weigh the default, not a new bet.
                # (`followed` is the time of `now` here: the plan made before is `now` unless `now` is
                # the default, and then there is nothing to move back to.)
                back = planner.estimate(default, latest, now)
                moves = not default.same_as(now) and self.accepts(followed, back.layer_seconds, back.migration_seconds)
                return default if moves else now
        windows = np.stack(loads[: self.history_windows if self._history_helps(now, loads, planner) else 1])
        candidate = planner.plan(windows, now)
        if candidate.experts_per_rank == now.experts_per_rank:
            kept = candidate  # the planner kept the slots: its fractions are the fresh ones
        else:
            kept = planner.route(now, windows)  # the slots in force, fresh fractions: nothing moves
            migration = planner.estimate(candidate, latest, now).migration_seconds
            # The move is weighed against what staying gets for free: the slots in force with fresh
            # fractions. A gain that changing the tables alone would give does not pay for a copy.
            kept_W, new_W = _seconds_per_window(planner, kept, windows), _seconds_per_window(planner, candidate, windows)
            # The plan must not lose on the latest window (windows[0]; see the module docstring). With
            # one window the hysteresis implies it; with several it is a check of its own.
            if self.accepts(kept_W.mean(), new_W.mean(), migration) and new_W[0] <= kept_W[0]:
                return candidate
        return now if kept.same_as(now) else kept

    def _history_helps(self, now: PlacementPlan, loads: Sequence[np.ndarray], planner: PlacementPlanner) -> bool:
        """Whether fractions fitted to the windows before the last predicted the last one within half
        the hysteresis of fractions fitted to the window before it alone (a backtest on the slots in
        force): true for a load that steps back and forth, false for one that drifts away from its
        past. With fewer than three windows there is nothing to test: history is used."""
        if self.history_windows < 2 or len(loads) < 3:
            return self.history_windows > 1
        latest, before = loads[0], np.stack(loads[1 : self.history_windows + 1])
        with_history = planner.estimate(planner.route(now, before), latest).layer_seconds
        alone = planner.estimate(planner.route(now, before[0]), latest).layer_seconds
        return with_history <= (1 + self.min_gain / 2) * alone


def _seconds_per_window(planner: PlacementPlanner, plan: PlacementPlan, windows: np.ndarray) -> np.ndarray:
    """``[W]``: the modelled layer time of ``plan`` on each of ``windows``."""
    return np.array([planner.estimate(plan, window).layer_seconds for window in windows])
