"""``PlacementPlanner``: choose expert slots and routing fractions that minimise the modelled layer time.

The algorithm, for one layer and one window of load:

1. Score the current placement (when there is one) and two built from the load by
   :mod:`~lightning_moe.planning.construct`: a topology-aware one (hot experts replicated on every
   node that sends them tokens, the rest spread to balance the nodes, a balanced and source-local
   packing inside each node) and a locality-blind balanced one.
2. Improve each by :func:`~lightning_moe.planning.local_search.local_search`: slot replacements and
   swaps ranked by the routing LP's dual prices, each checked by solving the routing LP exactly.
   With a current placement the score adds ``migration_margin`` times the migration time to
   ``horizon_steps`` times the layer time, so a slot moves only when its gain over the horizon
   pays for the copy, with a margin.
3. Keep the lower score (ties: the current placement's branch). With a current placement, undo
   the slot changes it hardly needs: one at a time, while the score stays within
   ``move_tolerance`` of the best, no more tokens cross nodes and at most that share of the
   tokens more leave their rank (:func:`~lightning_moe.planning.local_search.undo_small_moves`).
4. Give every expert that stays on a rank the slot it has now, and return the plan with its LP
   routing fractions.

Balance and locality are optimised together because the score is the whole modelled layer time:
the LP chooses fractions that even out compute and keep traffic on-node, and the placement moves
replicas to the nodes that send them tokens when that lowers the slowest rank's time.

Every step is deterministic (stable sorts, lowest-index ties, a fixed number of iterations, no
randomness and no wall clock), so every rank computes the same plan from the same load with the
same libraries; a job that mixes machines should still broadcast one rank's plan.

Shape legend: ``R`` EP ranks, ``E`` logical experts.
"""

from __future__ import annotations

import numpy as np
import torch

from lightning_moe.planning.construct import balanced_placement, initial_placement, random_placements
from lightning_moe.planning.cost_model import LayerCost, PlanEstimate, as_windows_WRE, estimate_plan
from lightning_moe.planning.local_search import (
    PlacementScorer,
    Scored,
    holds_to_lists,
    lists_to_holds,
    local_search,
    undo_small_moves,
)
from lightning_moe.planning.plan import PlacementPlan, check_shape
from lightning_moe.planning.routing_lp import program_size, solve_routing
from lightning_moe.planning.topology import Topology

# The automatic search budget: LP size x solves (an LP costs about 1.5 us per unit of size on one
# CPU core), and its bounds in solves.
_AUTO_SEARCH_WORK = 1.2e6
_AUTO_MIN_SOLVES, _AUTO_MAX_SOLVES = 24, 256


class PlacementPlanner:
    """Plans expert placements for one MoE layer shape on one EP group.

    Args:
        topology: the EP group's nodes and links.
        num_experts: ``E`` logical experts of the layer.
        slots_per_rank: expert slots on each EP rank (``R * slots_per_rank >= E``; spare slots hold
            replicas).
        token_bytes: bytes of one hidden row on the wire.
        seconds_per_token: expert compute seconds per assignment, forward plus backward.
        per_expert_overhead: seconds per non-empty local slot. The search's LP leaves it out (it is
            the same on every rank for every plan whose slots all receive tokens); a plan it would
            make slower than ``current``'s slots with fresh fractions (:meth:`route`) by
            :meth:`estimate` (slots left empty by a cold expert) is not returned: those are.
        expert_bytes: bytes to migrate one slot (weights and optimizer state).
        all_to_all_passes: all-to-alls per step (4 when training).
        horizon_steps: steps until the next re-plan: the gain of a move is weighed over them.
        migration_margin: a move must save, over the horizon, this many times its migration time.
        locality_weight: weight of the mean link load next to the slowest one, as a tie-break (at
            most this share of the layer time is traded for it).
        search_rounds: most slot changes one plan makes (each is one accepted local-search move).
        candidates_per_round: moves scored exactly per round.
        max_solves: most moves scored exactly (one routing LP each) in one call, over all starts
            (undoing small moves scores up to a quarter of it more, rounded up): a deterministic
            bound on the planner's run time. ``None`` picks ``clip(1.2e6 / size, 24, 256)`` with
            ``size`` the routing LP's flows plus pairs of flows of one source and expert: about two
            seconds of LP work on one CPU core for 256 experts over 32 ranks, and the full search
            of every start for small layers.
        random_starts: extra starting placements drawn from a fixed-seed generator (they matter
            for small problems, whose search converges well within the budget).
        move_tolerance: with a current placement, the best plan's slot changes are undone while its
            score stays within this share of the best, no more tokens cross nodes and at most this
            share of the tokens more leave their rank: fewer bytes moved for nearly the same plan.
            Copies over distinct links overlap, so their time alone barely tells four moved slots
            from nine (see
            :func:`~lightning_moe.planning.local_search.undo_small_moves`). 0 returns the best plan
            found.
    """

    def __init__(
        self,
        topology: Topology,
        num_experts: int,
        slots_per_rank: int,
        *,
        token_bytes: float,
        seconds_per_token: float,
        per_expert_overhead: float = 0.0,
        expert_bytes: float = 0.0,
        all_to_all_passes: int = 4,
        horizon_steps: int = 500,
        migration_margin: float = 2.0,
        locality_weight: float = 1e-3,
        search_rounds: int = 64,
        candidates_per_round: int = 24,
        max_solves: int | None = None,
        random_starts: int = 3,
        move_tolerance: float = 0.01,
    ) -> None:
        if not isinstance(topology, Topology):
            raise ValueError(f"PlacementPlanner: `topology` must be a Topology, got {type(topology).__name__}.")
        check_shape(num_experts, topology.num_ranks, slots_per_rank, where="PlacementPlanner")
        for name, value, low in (
            ("horizon_steps", horizon_steps, 1),
            ("search_rounds", search_rounds, 0),
            ("candidates_per_round", candidates_per_round, 1),
            ("random_starts", random_starts, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"PlacementPlanner: `{name}` must be an integer >= {low}, got {value!r}.")
        if max_solves is not None and (isinstance(max_solves, bool) or not isinstance(max_solves, int) or max_solves < 0):
            raise ValueError(f"PlacementPlanner: `max_solves` must be None (automatic) or an integer >= 0, got {max_solves!r}.")
        if not np.isfinite(migration_margin) or migration_margin < 0:
            raise ValueError(f"PlacementPlanner: `migration_margin` must be a non-negative number, got {migration_margin!r}.")
        if isinstance(move_tolerance, bool) or not isinstance(move_tolerance, (int, float)) or not 0 <= move_tolerance < 1:
            raise ValueError(f"PlacementPlanner: `move_tolerance` must be a number in [0, 1), got {move_tolerance!r}.")
        if not 0 <= locality_weight <= 1:
            raise ValueError(f"PlacementPlanner: `locality_weight` must lie in [0, 1], got {locality_weight!r}.")
        self.topology = topology
        self.num_experts = num_experts
        self.slots_per_rank = slots_per_rank
        self.cost = LayerCost(
            token_bytes=token_bytes,
            seconds_per_token=seconds_per_token,
            per_expert_overhead=per_expert_overhead,
            expert_bytes=expert_bytes,
            all_to_all_passes=all_to_all_passes,
        )
        self.horizon_steps = horizon_steps
        self.migration_margin = migration_margin
        self.locality_weight = locality_weight
        self.search_rounds = search_rounds
        self.candidates_per_round = candidates_per_round
        self.max_solves = max_solves
        self.random_starts = random_starts
        self.move_tolerance = float(move_tolerance)

    @classmethod
    def from_cost(cls, topology: Topology, num_experts: int, slots_per_rank: int, cost: LayerCost, **options) -> PlacementPlanner:
        """A planner from a :class:`~lightning_moe.planning.cost_model.LayerCost` (options as in ``__init__``)."""
        return cls(
            topology,
            num_experts,
            slots_per_rank,
            token_bytes=cost.token_bytes,
            seconds_per_token=cost.seconds_per_token,
            per_expert_overhead=cost.per_expert_overhead,
            expert_bytes=cost.expert_bytes,
            all_to_all_passes=cost.all_to_all_passes,
            **options,
        )

    def _check_current(self, current: PlacementPlan | None, *, strict: bool = True) -> None:
        """``current`` fits the planner's shape and (``strict``) holds distinct replicas per rank."""
        if current is None:
            return
        if (current.num_ranks, current.num_experts, current.slots_per_rank) != (
            self.topology.num_ranks,
            self.num_experts,
            self.slots_per_rank,
        ):
            raise ValueError(
                f"PlacementPlanner: `current` has {current.num_ranks} ranks, {current.num_experts} experts and "
                f"{current.slots_per_rank} slots per rank; the planner expects {self.topology.num_ranks}, "
                f"{self.num_experts} and {self.slots_per_rank}."
            )
        if strict:
            current.validate()

    def plan(self, load: torch.Tensor | np.ndarray, current: PlacementPlan | None = None) -> PlacementPlan:
        """The placement and routing fractions for a window's load, or for several windows'.

        Args:
            load: ``[R, E]`` assignments per step from each source EP rank to each logical expert
                (a window's counts divided by its steps, summed over expert-data-parallel replicas);
                or ``[W, R, E]``, several windows: the plan then minimises the mean modelled layer
                time over them with one set of routing fractions, a plan that holds for any of the
                loads seen rather than one fitted to the last (see :mod:`~lightning_moe.planning.routing_lp`).
            current: the plan in force now; moves are then weighed against their migration cost.
        """
        load_WRE = as_windows_WRE(load, self.topology.num_ranks, self.num_experts, where="PlacementPlanner.plan")
        load_RE = load_WRE.mean(axis=0)
        self._check_current(current)
        scorer = PlacementScorer(
            load_WRE,
            self.topology,
            self.cost,
            locality_weight=self.locality_weight,
            current=None if current is None else current.experts_per_rank,
            horizon_steps=self.horizon_steps,
            migration_margin=self.migration_margin,
        )
        starts = [] if current is None else [lists_to_holds(current.experts_per_rank, self.num_experts)]
        for built in (
            initial_placement(load_RE, self.topology, self.slots_per_rank),
            balanced_placement(load_RE, self.slots_per_rank),
            PlacementPlan.default(self.num_experts, self.topology.num_ranks, self.slots_per_rank).experts_per_rank,
            *random_placements(self.num_experts, self.topology.num_ranks, self.slots_per_rank, self.random_starts),
        ):
            built = lists_to_holds(built, self.num_experts)
            if not any(np.array_equal(built, start) for start in starts):
                starts.append(built)
        # Search from the best start first; each start may use half of the LP solves left, so the
        # budget bounds the run time and small problems still search from every start.
        scored = sorted((scorer(start) for start in starts), key=lambda state: state.score)
        budget = self.max_solves
        if budget is None:
            size = program_size(scorer.load, scored[0].holds_ER)
            budget = int(np.clip(_AUTO_SEARCH_WORK / max(size, 1), _AUTO_MIN_SOLVES, _AUTO_MAX_SOLVES))
        undo_budget = (budget + 3) // 4  # on top of the search's: undoing changes is a cheaper plan, not a better one
        best: Scored | None = None
        for state in scored:
            solves_before = scorer.solves
            result = local_search(
                state,
                scorer,
                search_rounds=self.search_rounds,
                candidates_per_round=self.candidates_per_round,
                max_solves=(budget + 1) // 2,
            )
            budget -= scorer.solves - solves_before
            if best is None or result.score < best.score:
                best = result
        if current is not None and self.move_tolerance > 0:
            # Undo the slot changes the plan hardly needs (fewer bytes moved for nearly its score).
            limit = best.score + self.move_tolerance * abs(best.score)
            best = undo_small_moves(best, scorer, limit=limit, max_solves=undo_budget)
        self.last_solves = scorer.solves  # LP solves of the last call, for benchmarks
        experts_per_rank = _keep_slots(holds_to_lists(best.holds_ER), current)
        fractions = torch.tensor(best.solution.fractions_RER, dtype=torch.float64)
        plan = PlacementPlan(experts_per_rank, fractions).validate()
        if current is not None and not plan.same_as(current):
            # The search's LP leaves out the per-slot overhead: with it, the plan must not lose to
            # staying, which is the slots in force with fractions for this load (free to change).
            staying = self.route(current, load_WRE)
            if _slower(self._full_score(plan, load_WRE, current), self._full_score(staying, load_WRE, current)):
                return staying
        return plan

    def _full_score(self, plan: PlacementPlan, load_WRE: np.ndarray, current: PlacementPlan) -> float:
        """The search's score by :meth:`estimate` (overhead included): the mean layer time over the
        windows for the horizon, plus the margin times the migration from ``current``."""
        first = self.estimate(plan, load_WRE[0], current)  # the first window's time, and the move's
        times = [first.layer_seconds, *(self.estimate(plan, load_RE).layer_seconds for load_RE in load_WRE[1:])]
        return self.horizon_steps * float(np.mean(times)) + self.migration_margin * first.migration_seconds

    def route(self, plan: PlacementPlan, load: torch.Tensor | np.ndarray) -> PlacementPlan:
        """``plan``'s slots with the routing fractions that suit ``load`` best (one window ``[R, E]``
        or several ``[W, R, E]``, as in :meth:`plan`): nothing moves, only the tables change."""
        load_WRE = as_windows_WRE(load, self.topology.num_ranks, self.num_experts, where="PlacementPlanner.route")
        self._check_current(plan, strict=False)
        if (plan.slot_counts_ER() > 1).any():
            return plan  # an expert twice on one rank (a baseline's plan): the LP does not model it
        plan.validate()
        holds_ER = lists_to_holds(plan.experts_per_rank, self.num_experts)
        solution = solve_routing(load_WRE, holds_ER, self.topology, self.cost, locality_weight=self.locality_weight)
        fractions = torch.tensor(solution.fractions_RER, dtype=torch.float64)
        routed = PlacementPlan(plan.experts_per_rank, fractions).validate()
        # Not kept when slower by :meth:`estimate`: the LP leaves out the per-slot overhead. (On a tie
        # the LP's fractions win: its locality tie-break keeps more traffic on the node.)
        slower = _slower(self._full_score(routed, load_WRE, plan), self._full_score(plan, load_WRE, plan))
        return plan if slower else routed

    def estimate(
        self, plan: PlacementPlan, load_RE: torch.Tensor | np.ndarray, current: PlacementPlan | None = None
    ) -> PlanEstimate:
        """The cost model's prediction for ``plan`` under ``load_RE`` (and the move from ``current``).

        Args:
            plan: any plan of this shape (baselines' plans with colocated replicas included).
            load_RE: ``[R, E]`` assignments per step.
            current: the plan in force now, for the migration fields.
        """
        return estimate_plan(plan, load_RE, self.topology, self.cost, current)


def _keep_slots(experts_per_rank: list[list[int]], current: PlacementPlan | None) -> list[list[int]]:
    """Put every expert that stays on a rank in the slot it has now; new experts fill the freed
    slots in increasing order."""
    if current is None:
        return experts_per_rank
    ordered = []
    for experts, now in zip(experts_per_rank, current.experts_per_rank):
        staying = set(experts)
        slots = [e if e in staying else None for e in now]
        arriving = iter(sorted(set(experts) - set(now)))
        ordered.append([e if e is not None else next(arriving) for e in slots])
    return ordered


def _slower(score: float, reference: float) -> bool:
    """``score`` above ``reference`` by more than rounding (equal plans tie)."""
    return score > reference * (1 + 1e-9) + 1e-15
