"""Improve a placement one slot change at a time, guided by the routing LP's dual prices.

The score of a placement is the planner objective of its optimal routing (the LP of
:mod:`~lightning_moe.planning.routing_lp`), times ``horizon_steps``, plus the time to migrate to it
from the current placement (when there is one) and a small tie-break on the bytes moved:

    score = horizon_steps * objective + migration_margin * (migration_seconds + locality_weight * sum(copy seconds))

The margin (2 by default) asks a move to pay for itself twice over: the load of the next window
is a forecast, and a copy stalls training for certain.

Three kinds of move change the slots:

- **replace**: rank ``d`` drops one replica of ``e_old`` (which keeps another) and takes ``e_new``;
- **swap**: ranks ``d1`` and ``d2`` exchange one expert each;
- **exchange**: ranks ``d1`` and ``d2`` trade all their experts (a set of experts that suits one
  rank's sources, or one node, better than another's: single swaps cannot get there without
  passing through a worse placement).

Scoring every move exactly would solve one LP per move (tens of thousands for 256 experts), so the
moves are ranked first by a first-order estimate from the LP's dual prices: ``price[r, d]`` is the
marginal objective of one more token from ``r`` computed on ``d`` (its compute and link rows), and
``pi[r, e]`` the price of ``r``'s cheapest holder of ``e``.

- A slot that moves from rank ``a`` to ``b`` takes its flow with it: ``sum_r flow[r] * (price[r, b]
  - price[r, a])``. A swap is two such relocations, an exchange one per slot that changes rank.
- A replace drops ``e_old`` from ``d`` (its flow goes to each source's next cheapest holder:
  ``sum_r flow[r] * (price there - price[r, d])``) and adds ``e_new``, which saves
  ``sum_r load[r, e_new] * max(0, pi[r, e_new] - price[r, d])``, scaled down to the tokens ``d`` can
  take: those ``e_old`` freed plus its slack below the busiest rank.

A migration penalty is added: one copy over the link it would use for every (rank, expert) the
move adds that ``current`` lacks, minus the same for those it drops. The best ``candidates_per_round`` moves are then scored exactly in that order
and the first that lowers the score by more than a relative ``1e-6`` is taken (so noise never
moves a slot). The search stops when a round finds none (a local optimum for these moves), after
``search_rounds`` moves, or after ``max_solves`` LP solves: a deterministic bound on its run time.
Single slot changes cannot reach an optimum that needs several coordinated changes; the planner
therefore searches from several starting placements.

Shape legend: ``R`` EP ranks, ``E`` experts, ``Z`` slots of the whole group (``R * S``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lightning_moe.planning.cost_model import LayerCost, link_seconds_RK, migration_seconds, migration_transfers
from lightning_moe.planning.routing_lp import RoutingSolution, solve_routing
from lightning_moe.planning.topology import Topology

_RELATIVE_IMPROVEMENT = 1e-6


def holds_to_lists(holds_ER: np.ndarray) -> list[list[int]]:
    """The experts of each rank, in increasing order, from ``[E, R]`` membership."""
    return [np.flatnonzero(holds_ER[:, rank]).tolist() for rank in range(holds_ER.shape[1])]


def lists_to_holds(experts_per_rank: list[list[int]], num_experts: int) -> np.ndarray:
    """``[E, R]`` membership from the experts of each rank."""
    holds_ER = np.zeros((num_experts, len(experts_per_rank)), dtype=bool)
    for rank, experts in enumerate(experts_per_rank):
        holds_ER[np.asarray(experts, dtype=np.int64), rank] = True
    return holds_ER


@dataclass
class Scored:
    """A placement, its optimal routing and its score."""

    holds_ER: np.ndarray
    solution: RoutingSolution
    score: float


class PlacementScorer:
    """Scores placements as the module docstring says.

    Args:
        load: assignments per step from each source rank to each expert: one window ``[R, E]`` or
            several ``[W, R, E]`` (the routing then minimises the mean over them).
        topology: the EP group's nodes and links.
        cost: the layer's constants.
        locality_weight: tie-break weight (routing traffic and migration copies).
        current: the placement in force now, or ``None`` when moving costs nothing.
        horizon_steps: steps the plan will run before the next re-plan.
        migration_margin: factor on the migration time in the score.
    """

    def __init__(
        self,
        load: np.ndarray,
        topology: Topology,
        cost: LayerCost,
        *,
        locality_weight: float,
        current: list[list[int]] | None,
        horizon_steps: int,
        migration_margin: float = 1.0,
    ) -> None:
        self.load, self.topology, self.cost = load, topology, cost
        self.load_RE = load if load.ndim == 2 else load.mean(axis=0)  # what the move estimates use
        self.locality_weight = locality_weight
        self.current = current
        self.horizon = float(horizon_steps) if current is not None else 1.0
        self.margin = migration_margin
        self.solves = 0

    def migration(self, holds_ER: np.ndarray) -> float:
        if self.current is None:
            return 0.0
        transfers = migration_transfers(self.current, holds_to_lists(holds_ER), self.topology)
        if not transfers:
            return 0.0
        count_RR = np.zeros((self.topology.num_ranks,) * 2)
        for source, destination, _ in transfers:
            count_RR[source, destination] += 1
        each = link_seconds_RK(count_RR, self.topology, self.cost.expert_bytes).sum() / 2  # out + in of one copy
        seconds = migration_seconds(transfers, self.topology, self.cost.expert_bytes)
        return self.margin * (seconds + self.locality_weight * each)

    def __call__(self, holds_ER: np.ndarray) -> Scored:
        self.solves += 1
        solution = solve_routing(self.load, holds_ER, self.topology, self.cost, locality_weight=self.locality_weight)
        return Scored(holds_ER, solution, self.horizon * solution.objective + self.migration(holds_ER))

    def copy_penalty_ER(self) -> np.ndarray:
        """``[E, R]`` estimated seconds of copying ``e`` to ``d`` (0 where ``current`` has it there)."""
        num_experts, num_ranks = self.load_RE.shape[1], self.topology.num_ranks
        if self.current is None:
            return np.zeros((num_experts, num_ranks))
        current_ER = lists_to_holds(self.current, num_experts)
        node_R = self.topology.node_of_rank()
        on_node_EN = np.zeros((num_experts, self.topology.num_nodes), dtype=bool)
        for node in range(self.topology.num_nodes):
            on_node_EN[:, node] = current_ER[:, node_R == node].any(axis=1)
        bandwidth_ER = np.where(on_node_EN[:, node_R], self.topology.intra_node_bandwidth, self.topology.inter_node_bandwidth)
        seconds_ER = self.margin * self.cost.expert_bytes / bandwidth_ER
        return np.where(current_ER, 0.0, seconds_ER)


def _move_estimates(state: Scored, load_RE: np.ndarray, scorer: PlacementScorer):
    """First-order score changes (lower is better) of every replace, swap and exchange move."""
    holds_ER = state.holds_ER
    num_experts, num_ranks = holds_ER.shape
    price_RR, pi_RE = state.solution.price_RR, state.solution.pi_RE
    flow_RER = load_RE[:, :, None] * state.solution.fractions_RER
    count_E = holds_ER.sum(axis=1)
    ranks = np.arange(num_ranks)
    # Slots: (rank, expert) pairs in rank-then-expert order.
    slot_rank_Z, slot_expert_Z = np.nonzero(holds_ER.T)
    slot_flow_RZ = flow_RER[:, slot_expert_Z, slot_rank_Z]  # what each slot computes, by source
    scale = scorer.horizon
    penalty_ER = scorer.copy_penalty_ER()

    # Replace (slot z on rank d: e_old -> e_new). Dropping e_old sends its flow to each source's
    # next cheapest holder; e_new takes the sources that save most by coming to d, up to the
    # tokens d frees plus its slack (the duals alone would price a whole expert onto an idle rank).
    holder_price_RER = np.where(holds_ER[None], price_RR[:, None, :], np.inf)
    first_RE = holder_price_RER.argmin(axis=2)
    np.put_along_axis(holder_price_RER, first_RE[:, :, None], np.inf, axis=2)
    second_RE = holder_price_RER.min(axis=2)
    alternative_RZ = np.where(first_RE[:, slot_expert_Z] == slot_rank_Z[None, :], second_RE[:, slot_expert_Z], pi_RE[:, slot_expert_Z])
    extra_RZ = np.where(slot_flow_RZ > 0, alternative_RZ - price_RR[:, slot_rank_Z], 0.0)
    loss_remove_Z = np.where(count_E[slot_expert_Z] >= 2, (slot_flow_RZ * extra_RZ).sum(axis=0), np.inf)
    saving_RER = np.maximum(pi_RE[:, :, None] - price_RR[:, None, :], 0.0)
    gain_ED = (load_RE[:, :, None] * saving_RER).sum(axis=0)
    willing_ED = (load_RE[:, :, None] * (saving_RER > 0)).sum(axis=0)
    processed_R = flow_RER.sum(axis=(0, 1))
    slack_R = processed_R.max() - processed_R
    capacity_Z = slot_flow_RZ.sum(axis=0) + slack_R[slot_rank_Z]
    # Relocation of slot z to rank d, the better of two readings: its flow, unchanged, pays d's
    # prices; or (when the expert has another replica) it is dropped and re-added at d as below.
    carry_ZR = slot_flow_RZ.T @ price_RR - (slot_flow_RZ * price_RR[:, slot_rank_Z]).sum(axis=0)[:, None]
    readd_ZR = loss_remove_Z[:, None] - gain_ED[slot_expert_Z] * np.minimum(
        1.0, (slot_flow_RZ.sum(axis=0)[:, None] + slack_R[None, :]) / np.maximum(willing_ED[slot_expert_Z], 1e-30)
    )
    moved_ZR = penalty_ER[slot_expert_Z] - penalty_ER[slot_expert_Z, slot_rank_Z][:, None]
    stays_ZR = holds_ER[slot_expert_Z]  # the expert is on that rank already: nothing moves
    carry_ZR = np.where(stays_ZR, 0.0, scale * carry_ZR + moved_ZR)
    best_ZR = np.where(stays_ZR, 0.0, scale * np.minimum(carry_ZR, readd_ZR) + moved_ZR)

    # Swap (slot a, slot b on different ranks): each slot relocates to the other's rank.
    invalid = (
        (slot_rank_Z[:, None] >= slot_rank_Z[None, :])
        | holds_ER[slot_expert_Z[:, None], slot_rank_Z[None, :]]
        | holds_ER[slot_expert_Z[None, :], slot_rank_Z[:, None]]
    )
    # Carried flows that push a rank past the busiest one raise the layer's compute: the duals
    # price a token at the rank's current margin only.
    slot_tokens_Z = slot_flow_RZ.sum(axis=0)
    into_b_ZZ = slot_tokens_Z[:, None] - slot_tokens_Z[None, :]  # net tokens rank of b gains
    overflow_ZZ = np.maximum(into_b_ZZ - slack_R[slot_rank_Z][None, :], 0.0) + np.maximum(
        -into_b_ZZ - slack_R[slot_rank_Z][:, None], 0.0
    )
    overflow_ZZ *= scale * scorer.cost.seconds_per_token
    swaps = [
        np.where(invalid, np.inf, relocate_ZR[:, slot_rank_Z] + relocate_ZR[:, slot_rank_Z].T + overflow_ZZ)
        for relocate_ZR in (carry_ZR, best_ZR)
    ]

    # Exchange (ranks a < b trade all their experts): every slot not on both carries its flow.
    on_rank_RZ = (slot_rank_Z[None, :] == ranks[:, None]).astype(np.float64)
    exchange_RR = on_rank_RZ @ carry_ZR
    exchange_RR = exchange_RR + exchange_RR.T
    tokens_R = on_rank_RZ @ slot_tokens_Z
    into_RR = tokens_R[:, None] - tokens_R[None, :]  # net tokens rank b gains from a
    exchange_RR += (
        scale
        * scorer.cost.seconds_per_token
        * (np.maximum(into_RR - slack_R[None, :], 0.0) + np.maximum(-into_RR - slack_R[:, None], 0.0))
    )
    exchange_RR = np.where(ranks[:, None] < ranks[None, :], exchange_RR, np.inf)
    exchange_RR = np.where((holds_ER[:, :, None] == holds_ER[:, None, :]).all(axis=0), np.inf, exchange_RR)

    gain_ZE = gain_ED.T[slot_rank_Z] * np.minimum(1.0, capacity_Z[:, None] / np.maximum(willing_ED.T[slot_rank_Z], 1e-30))
    replace_ZE = (
        scale * (loss_remove_Z[:, None] - gain_ZE)
        + penalty_ER.T[slot_rank_Z]
        - penalty_ER[slot_expert_Z, slot_rank_Z][:, None]
    )
    replace_ZE = np.where(holds_ER.T[slot_rank_Z], np.inf, replace_ZE)
    return slot_rank_Z, slot_expert_Z, [replace_ZE, *swaps, exchange_RR]


def _candidate_moves(state: Scored, load_RE: np.ndarray, scorer: PlacementScorer, count: int) -> list[np.ndarray]:
    """Up to ``count`` placements, taken in turn from the best-estimated replaces, swaps (flows
    carried), swaps (better reading) and exchanges, so no one estimate crowds out the others."""
    slot_rank_Z, slot_expert_Z, estimates = _move_estimates(state, load_RE, scorer)
    orders = []
    for kind, estimate in enumerate(estimates):
        flat = estimate.ravel()
        order = np.argsort(flat, kind="stable")
        orders.append([(kind, int(i)) for i in order[np.isfinite(flat[order])][:count]])
    picked, seen = [], set()
    for position in range(count):
        for order in orders:
            if position < len(order) and len(picked) < count:
                kind, index = order[position]
                holds_ER = _apply(state.holds_ER, kind, index, estimates[kind].shape, slot_rank_Z, slot_expert_Z)
                key = holds_ER.tobytes()
                if key not in seen:
                    seen.add(key)
                    picked.append(holds_ER)
    return picked


def _apply(holds_ER, kind, index, shape, slot_rank_Z, slot_expert_Z) -> np.ndarray:
    """The placement after move ``index`` of estimate array ``kind`` (replace, swap, swap, exchange)."""
    holds_ER = holds_ER.copy()
    a, b = divmod(index, shape[1])
    if kind == 0:  # replace: slot a takes expert b
        holds_ER[slot_expert_Z[a], slot_rank_Z[a]] = False
        holds_ER[b, slot_rank_Z[a]] = True
    elif kind in (1, 2):  # swap slots a and b
        holds_ER[slot_expert_Z[a], slot_rank_Z[a]] = False
        holds_ER[slot_expert_Z[b], slot_rank_Z[b]] = False
        holds_ER[slot_expert_Z[a], slot_rank_Z[b]] = True
        holds_ER[slot_expert_Z[b], slot_rank_Z[a]] = True
    else:  # exchange ranks a and b
        holds_ER[:, [a, b]] = holds_ER[:, [b, a]]
    return holds_ER


def local_search(
    start: Scored,
    scorer: PlacementScorer,
    *,
    search_rounds: int,
    candidates_per_round: int,
    max_solves: int,
    on_round: Callable[[Scored], None] | None = None,
) -> Scored:
    """Take improving slot changes until none of the best-estimated ones improves (module docstring).

    Args:
        start: the scored placement to improve.
        scorer: scores placements.
        search_rounds: most moves taken.
        candidates_per_round: moves scored exactly per round, in order of their estimate.
        max_solves: most moves scored exactly in the whole search.
        on_round: called with the new state after each move (for tracing).
    """
    state = start
    budget = max_solves
    for _ in range(search_rounds):
        threshold = state.score - _RELATIVE_IMPROVEMENT * abs(state.score)
        for holds_ER in _candidate_moves(state, scorer.load_RE, scorer, min(candidates_per_round, budget)):
            budget -= 1
            trial = scorer(holds_ER)
            if trial.score < threshold:
                state = trial
                if on_round is not None:
                    on_round(state)
                break
        else:
            return state
    return state


def cross_node_tokens(state: Scored, scorer: PlacementScorer) -> float:
    """Assignments per step that ``state``'s routing sends to another node (mean over the windows)."""
    crossing_RR = ~scorer.topology.same_node()
    return float((scorer.load_RE[:, :, None] * state.solution.fractions_RER * crossing_RR[:, None, :]).sum())


def off_rank_tokens(state: Scored, scorer: PlacementScorer) -> float:
    """Assignments per step that ``state``'s routing sends to another rank (mean over the windows)."""
    elsewhere_RR = ~np.eye(scorer.topology.num_ranks, dtype=bool)
    return float((scorer.load_RE[:, :, None] * state.solution.fractions_RER * elsewhere_RR[:, None, :]).sum())


def undo_small_moves(state: Scored, scorer: PlacementScorer, *, limit: float, max_solves: int) -> Scored:
    """Undo the slot changes from ``scorer.current`` that ``state`` hardly needs: fewer bytes moved,
    for a score that stays at most ``limit``.

    The search weighs a copy by its time, and copies over distinct links overlap, so a plan may
    reshuffle many slots to gain a fraction of a percent: nine slots moved where four give nearly
    all of the gain. Each changed slot (rank ``d`` took ``e_new`` in place of ``e_old``) is tried
    back in ``current``'s state, the slots carrying the fewest tokens first, in two forms (see
    :func:`_undos`): alone, and with the changes that close its chain (a swap's other half, the
    rest of a rotation), which leaves every expert with the replica count it had. An undo is kept
    while the score stays at most ``limit`` (one bound for all, so undone slots never add up past
    it), no more tokens cross nodes than in ``state``, and the tokens that leave their source rank
    grow by at most the same share of all tokens as ``limit`` allows the score (fewer bytes moved is
    not bought with locality: link speeds are the cost model's least certain figures, and a plan
    that balances the ranks by sending tokens over fast-looking links is only as good as they are).
    Passes repeat while one keeps an undo; at most ``max_solves`` undos are scored (one
    routing LP each), in a deterministic order. Every placement tried holds each expert at least
    once and no expert twice on a rank.
    """
    if scorer.current is None or max_solves <= 0:
        return state
    current_ER = lists_to_holds(scorer.current, state.holds_ER.shape[0])
    tokens_ER = (scorer.load_RE[:, :, None] * state.solution.fractions_RER).sum(axis=0)
    changes = sorted(
        (float(tokens_ER[new, rank]), rank, int(new))
        for new, rank in zip(*np.nonzero(state.holds_ER & ~current_ER))
    )
    best, solves, tried = state, 0, set()
    crossing = cross_node_tokens(state, scorer)
    share = (limit - state.score) / state.score if state.score > 0 else 0.0  # the score's tolerance
    leaving = off_rank_tokens(state, scorer) + share * float(scorer.load_RE.sum())
    kept = True
    while kept and solves < max_solves:
        kept = False
        for _, rank, new in changes:
            if not best.holds_ER[new, rank]:
                continue  # undone already (in another change's chain)
            for holds_ER in _undos(best.holds_ER, current_ER, rank, new):
                key = holds_ER.tobytes()
                if key in tried or solves >= max_solves:
                    continue
                tried.add(key)
                solves += 1
                trial = scorer(holds_ER)
                if (
                    trial.score <= limit
                    and cross_node_tokens(trial, scorer) <= crossing * (1 + 1e-9)
                    and off_rank_tokens(trial, scorer) <= leaving * (1 + 1e-9) + 1e-9
                ):
                    best, kept = trial, True
                    break
    return best


def _undos(holds_ER: np.ndarray, current_ER: np.ndarray, rank: int, new: int) -> list[np.ndarray]:
    """The placements that take slot ``(rank, new)`` back to ``current_ER``, valid ones only.

    ``rank`` gets back one expert it held in ``current_ER`` and lost (the lowest such). That alone
    is the first undo, when ``new`` keeps a replica elsewhere. The second closes the chain: ``new``
    goes back to a rank that held it in ``current_ER`` and took another expert in its place (the
    lowest such rank), that expert goes back in turn, and so on, until the chain reaches the expert
    ``rank`` got back (every replica count is as in ``holds_ER``) or finds no rank to continue.
    """
    old = int(np.flatnonzero(current_ER[:, rank] & ~holds_ER[:, rank])[0])
    single = holds_ER.copy()
    single[new, rank], single[old, rank] = False, True
    undos = [single] if single[new].any() else []
    chain, missing, visited = single.copy(), new, {rank}
    while missing != old:
        ranks = [
            r for r in np.flatnonzero(current_ER[missing] & ~chain[missing])
            if r not in visited and (chain[:, r] & ~current_ER[:, r]).any()
        ]
        if not ranks:
            break
        other = int(ranks[0])
        taken = np.flatnonzero(chain[:, other] & ~current_ER[:, other])
        given = int(old if old in taken else taken[0])  # close the chain when it can
        chain[given, other], chain[missing, other] = False, True
        visited.add(other)
        missing = given
    if chain.any(axis=1).all() and not np.array_equal(chain, single):
        undos.append(chain)
    return undos
