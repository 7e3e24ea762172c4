"""The best routing fractions for a fixed placement: a linear program, solved by an interior-point method.

Given which ranks hold each expert (``holds_ER``), choose the flows ``x[r, e, d] >= 0`` (tokens of
source ``r`` for expert ``e`` computed on holder ``d``) that minimise the planner objective

    max_d compute[d] + passes * max_{r, k} link[r, k]
        + locality_weight * passes / R * sum_{r, k} link[r, k]

with ``compute`` and ``link`` the linear functions of ``x`` defined in
:mod:`lightning_moe.planning.cost_model` (per-slot overhead and latency are constants here and left
out). The first two terms are the modelled layer time; the last breaks its ties: where the slowest
rank hides the rest, it keeps every other rank's traffic as local as it can, at a cost of at most
``locality_weight`` of the layer time (the mean link load is at most the largest).

Given several windows of load (``[W, R, E]``), one set of fractions is chosen for all of them and
the objective is the mean over the windows of the objective above: the fractions must hold for the
next window, which is not known, so they are fitted to the loads seen rather than to the last one
alone (a scenario average, as in stochastic programming). The flows are then those of the mean
load, and window ``w`` sees ``x[r, e, d] * load_w[r, e] / mean load[r, e]``.

As a linear program in standard form (all variables non-negative): ``sum_d x[r, e, d] = load[r, e]``
for every source and expert with load (the block rows ``B``), and for every rank ``d`` and link
load ``(q, k)`` a coupling row ``compute[d] - c + s = 0`` or ``link[q, k] - a + s = 0`` (the rows
``G``, ``K`` of them, with slacks ``s``); the objective is ``c + passes * a`` plus the tie-break.
With ``W`` windows every window has its own coupling rows and its own ``c`` and ``a``, and the
objective is their mean.

It is solved with Mehrotra's predictor-corrector interior-point method (Nocedal & Wright,
*Numerical Optimization*, 2nd ed., algorithm 14.3) on the normal equations ``A D A^T dy = h``.
Every flow variable sits in exactly one block row, so ``B D B^T`` is diagonal and the Schur
complement ``G D G^T - G D B^T (B D B^T)^-1 B D G^T`` is a dense ``K x K`` matrix with
``K <= 5 R W`` whatever the number of experts. Each variable touches at most three coupling rows
per window (the compute of its destination, the outgoing link of its source, the incoming link of
its destination), so that matrix is assembled in ``O(W^2 * sum over blocks of holders^2)``.

The dual prices give the reduced cost ``price[r, d] - pi[r, e]`` of sending a token of ``(r, e)``
to any rank ``d``, held or not; the local search uses them to guess which slot changes pay.

Shape legend: ``W`` windows of load, ``R`` EP ranks, ``E`` experts, ``N`` flow variables, ``M``
block rows (sources and experts with load), ``K`` coupling rows, ``C`` coupling rows of one flow.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from lightning_moe.planning.cost_model import OUT_INTER, OUT_INTRA, IN_INTER, IN_INTRA, LayerCost, link_seconds_RK, traffic_RR
from lightning_moe.planning.topology import Topology

_MAX_ITERATIONS = 200
_TOLERANCE = 1e-8
# Fractions below this share of their source's tokens are rounded to zero after the solve.
_FRACTION_FLOOR = 1e-7


@dataclass
class RoutingSolution:
    """The routing fractions of a placement and what the search needs from them.

    Attributes:
        fractions_RER: ``[R, E, R]`` routing fractions (rows sum to one, only on holders).
        objective: the planner objective of these fractions, in seconds.
        price_RR: seconds per token of sending from ``r`` to ``d`` at the optimum's dual prices.
        pi_RE: seconds per token of the cheapest holder of ``e`` for source ``r`` at those prices.
    """

    fractions_RER: np.ndarray
    objective: float
    price_RR: np.ndarray
    pi_RE: np.ndarray


def planner_objective(
    load: np.ndarray, fractions_RER: np.ndarray, topology: Topology, cost: LayerCost, locality_weight: float
) -> float:
    """The objective of the module docstring, in seconds, for any fractions: of one window's load
    ``[R, E]``, or the mean over windows ``[W, R, E]``."""
    if load.ndim == 3:
        return float(np.mean([planner_objective(window, fractions_RER, topology, cost, locality_weight) for window in load]))
    traffic = traffic_RR(load, fractions_RER)
    link_RK = link_seconds_RK(traffic, topology, cost.token_bytes)
    passes = cost.all_to_all_passes
    return float(
        cost.seconds_per_token * traffic.sum(axis=0).max()
        + passes * link_RK.max()
        + locality_weight * passes / topology.num_ranks * link_RK.sum()
    )


def nearest_holder_fractions(holds_ER: np.ndarray, topology: Topology, weight_ER: np.ndarray | None = None) -> np.ndarray:
    """``[R, E, R]`` fractions that send each source's tokens to its nearest holders of each expert
    (itself, else its node, else anywhere), split in proportion to ``weight_ER`` (evenly where it
    is zero or not given)."""
    num_experts, num_ranks = holds_ER.shape
    same_RR = topology.same_node()
    # Distance class of d from r: 0 itself, 1 same node, 2 another node.
    distance_RR = np.where(np.eye(num_ranks, dtype=bool), 0, np.where(same_RR, 1, 2))
    big = 3
    distance_RER = np.where(holds_ER[None, :, :], distance_RR[:, None, :], big)
    nearest_RER = distance_RER == distance_RER.min(axis=2, keepdims=True)
    weight = np.ones_like(holds_ER, dtype=np.float64) if weight_ER is None else weight_ER
    weighted_RER = nearest_RER * weight[None, :, :]
    sums_RE = weighted_RER.sum(axis=2, keepdims=True)
    even_RER = nearest_RER / nearest_RER.sum(axis=2, keepdims=True)
    return np.where(sums_RE > 0, weighted_RER / np.where(sums_RE > 0, sums_RE, 1.0), even_RER)


class _RoutingProgram:
    """The standard-form program for one placement; see the module docstring."""

    def __init__(self, load_WRE, holds_ER, topology: Topology, cost: LayerCost, locality_weight: float) -> None:
        num_windows, num_ranks, num_experts = load_WRE.shape
        self.num_ranks, self.num_experts, self.num_windows = num_ranks, num_experts, num_windows
        load_RE = load_WRE.mean(axis=0)
        passes = cost.all_to_all_passes
        # Units: tokens in `unit` (the mean assignments per rank), time in `time_unit` (the larger
        # of a balanced rank's compute and of its traffic over the slowest link), so values are O(1).
        self.unit = load_RE.sum() / num_ranks
        bandwidths = [topology.intra_node_bandwidth] if topology.ranks_per_node > 1 else []
        bandwidths += [topology.inter_node_bandwidth] if topology.num_nodes > 1 else []
        self.time_unit = self.unit * max(cost.seconds_per_token, passes * cost.token_bytes / min(bandwidths))

        # Link rows present: intra loads when a node has several ranks, inter loads when several nodes.
        classes = ([OUT_INTRA, IN_INTRA] if topology.ranks_per_node > 1 else []) + (
            [OUT_INTER, IN_INTER] if topology.num_nodes > 1 else []
        )
        link_row_RK = np.full((num_ranks, 4), -1, dtype=np.int64)
        for index, (rank, kind) in enumerate((r, k) for r in range(num_ranks) for k in sorted(classes)):
            link_row_RK[rank, kind] = num_ranks + index
        self.rows_per_window = num_ranks + len(classes) * num_ranks
        self.num_rows = num_windows * self.rows_per_window  # K

        # Coefficients of one token sent r -> d, per coupling row of a window (compute, out link, in link).
        same_RR = topology.same_node()
        compute_coef = cost.seconds_per_token * self.unit / self.time_unit
        link_coef_RR = np.where(same_RR, 1 / topology.intra_node_bandwidth, 1 / topology.inter_node_bandwidth)
        link_coef_RR = link_coef_RR * cost.token_bytes * self.unit / self.time_unit
        np.fill_diagonal(link_coef_RR, 0.0)
        out_kind_RR = np.where(same_RR, OUT_INTRA, OUT_INTER)
        in_kind_RR = np.where(same_RR, IN_INTRA, IN_INTER)
        ranks = np.arange(num_ranks)
        self.rows_RR3 = np.stack(
            [
                np.broadcast_to(ranks[None, :], (num_ranks, num_ranks)),
                np.where(link_coef_RR > 0, link_row_RK[ranks[:, None], out_kind_RR], 0),
                np.where(link_coef_RR > 0, link_row_RK[ranks[None, :], in_kind_RR], 0),
            ],
            axis=2,
        )
        self.coefs_RR3 = np.stack(
            [np.full((num_ranks, num_ranks), compute_coef), link_coef_RR, link_coef_RR], axis=2
        )
        # Tie-break: locality_weight * passes / R per unit of link load, on both ends of a transfer.
        self.locality_RR = locality_weight * passes / num_ranks * 2 * link_coef_RR
        self.passes = passes

        # Flow variables: one per (source, expert with load in some window, holder), ordered by
        # source, expert, holder; in mean-load tokens.
        source_M, expert_M = np.nonzero(load_RE > 0)
        holders_M = holds_ER[expert_M]  # [M, R]
        block_N, destination_N = np.nonzero(holders_M)
        self.source_N, self.expert_N, self.destination_N = source_M[block_N], expert_M[block_N], destination_N
        self.block_N = block_N
        self.num_blocks = len(source_M)
        self.num_flows = len(block_N)
        self.source_M, self.expert_M = source_M, expert_M
        self.demand_M = load_RE[source_M, expert_M] / self.unit
        # Window w scales a block's flows by its load there over the mean; each window has its own rows.
        ratio_WM = load_WRE[:, source_M, expert_M] / load_RE[source_M, expert_M]
        rows_N3 = self.rows_RR3[self.source_N, self.destination_N]
        coefs_N3 = self.coefs_RR3[self.source_N, self.destination_N]
        self.flow_rows_NC = np.concatenate([rows_N3 + w * self.rows_per_window for w in range(num_windows)], axis=1)
        self.flow_coefs_NC = np.concatenate([coefs_N3 * ratio_WM[w, block_N, None] for w in range(num_windows)], axis=1)
        width = self.flow_rows_NC.shape[1]

        # Ordered pairs of flows inside one block: the support of the Schur complement.
        size_M = np.bincount(block_N, minlength=self.num_blocks)
        start_M = np.cumsum(size_M) - size_M
        repeat_N = size_M[block_N]
        pair_a = np.repeat(np.arange(self.num_flows), repeat_N)
        within = np.arange(repeat_N.sum()) - np.repeat(np.cumsum(repeat_N) - repeat_N, repeat_N)
        pair_b = start_M[block_N[pair_a]] + within
        self.pair_a, self.pair_b, self.pair_block = pair_a, pair_b, block_N[pair_a]
        self.pair_diagonal = pair_a == pair_b
        rows_a, rows_b = self.flow_rows_NC[pair_a], self.flow_rows_NC[pair_b]
        self.pair_flat = (rows_a[:, :, None] * self.num_rows + rows_b[:, None, :]).reshape(len(pair_a), width**2)
        self.pair_coef = (self.flow_coefs_NC[pair_a][:, :, None] * self.flow_coefs_NC[pair_b][:, None, :]).reshape(
            len(pair_a), width**2
        )

        # Variable layout: flows, then c and a of each window, then one slack per coupling row.
        # bound_K: the variable (c or a of its window) each coupling row is bounded by.
        window_K = np.repeat(np.arange(num_windows), self.rows_per_window)
        self.is_compute_K = np.tile(np.arange(self.rows_per_window) < num_ranks, num_windows)
        self.bound_K = self.num_flows + 2 * window_K + np.where(self.is_compute_K, 0, 1)
        self.num_bounds = 2 * num_windows
        self.slack_start = self.num_flows + self.num_bounds
        self.num_variables = self.slack_start + self.num_rows
        self.objective_V = np.zeros(self.num_variables)
        self.objective_V[: self.num_flows] = self.locality_RR[self.source_N, self.destination_N]
        self.objective_V[self.num_flows : self.slack_start : 2] = 1.0 / num_windows
        self.objective_V[self.num_flows + 1 : self.slack_start : 2] = passes / num_windows

    # A v, split into the block part and the coupling part.
    def multiply(self, v):
        flows = v[: self.num_flows]
        block_part = np.bincount(self.block_N, flows, minlength=self.num_blocks)
        coupling = np.bincount(
            self.flow_rows_NC.ravel(), (self.flow_coefs_NC * flows[:, None]).ravel(), minlength=self.num_rows
        )
        coupling -= v[self.bound_K]
        coupling += v[self.slack_start :]
        return block_part, coupling

    # A^T (y_block, y_coupling).
    def transpose_multiply(self, y_block, y_coupling):
        out = np.empty(self.num_variables)
        out[: self.num_flows] = y_block[self.block_N] + (self.flow_coefs_NC * y_coupling[self.flow_rows_NC]).sum(axis=1)
        out[self.num_flows : self.slack_start] = -np.bincount(
            self.bound_K - self.num_flows, y_coupling, minlength=self.num_bounds
        )
        out[self.slack_start :] = y_coupling
        return out

    def normal_solver(self, d):
        """A solver of ``A diag(d) A^T dy = h`` through the Schur complement on the block rows."""
        d_flows = d[: self.num_flows]
        block_weight = np.bincount(self.block_N, d_flows, minlength=self.num_blocks)
        pair_weight = np.where(self.pair_diagonal, d_flows[self.pair_a], 0.0) - (
            d_flows[self.pair_a] * d_flows[self.pair_b] / block_weight[self.pair_block]
        )
        k = self.num_rows
        schur = np.bincount(self.pair_flat.ravel(), (self.pair_coef * pair_weight[:, None]).ravel(), minlength=k * k)
        schur = schur.reshape(k, k)
        schur += np.where(self.bound_K[:, None] == self.bound_K[None, :], d[self.bound_K][:, None], 0.0)
        schur[np.diag_indices(k)] += d[self.slack_start :] + 1e-13 * (1.0 + np.trace(schur) / k)
        # torch's LAPACK on one thread: its blocked factorisations add in an order that depends on the
        # thread count, and every rank must compute the same plan to the byte (whatever its threads).
        schur_t = torch.from_numpy(schur)
        with _one_thread():
            factor, info = torch.linalg.cholesky_ex(schur_t)

        def solve_schur(rhs):
            with _one_thread():
                if int(info) == 0:
                    return torch.cholesky_solve(torch.from_numpy(rhs)[:, None], factor)[:, 0].numpy()
                return torch.linalg.lstsq(schur_t, torch.from_numpy(rhs)[:, None]).solution[:, 0].numpy()

        def solve(h_block, h_coupling):
            scaled = d_flows * h_block[self.block_N] / block_weight[self.block_N]
            rhs = h_coupling - np.bincount(
                self.flow_rows_NC.ravel(), (self.flow_coefs_NC * scaled[:, None]).ravel(), minlength=k
            )
            dy_coupling = solve_schur(rhs)
            along = (self.flow_coefs_NC * dy_coupling[self.flow_rows_NC]).sum(axis=1)
            dy_block = (h_block - np.bincount(self.block_N, d_flows * along, minlength=self.num_blocks)) / block_weight
            return dy_block, dy_coupling

        return solve

    def initial_point(self):
        """A strictly feasible primal point (even split, slacks above the largest load) and unit duals."""
        x = np.zeros(self.num_variables)
        size_M = np.bincount(self.block_N, minlength=self.num_blocks)
        x[: self.num_flows] = self.demand_M[self.block_N] / size_M[self.block_N]
        _, loads_K = self.multiply(x)  # x holds only the flows yet: these are the rows' loads
        largest = np.full(self.num_bounds, -np.inf)
        np.maximum.at(largest, self.bound_K - self.num_flows, loads_K)
        x[self.num_flows : self.slack_start] = 1.1 * largest + 0.1
        x[self.slack_start :] = x[self.bound_K] - loads_K
        return x, np.zeros(self.num_blocks), np.zeros(self.num_rows), np.ones(self.num_variables)

    def prices_RR(self, y_coupling):
        """Seconds per token of sending from ``r`` to ``d`` at the duals ``y_coupling``, summed over
        the windows (the windows' ratios taken as one, a first-order guess for the search)."""
        price_RR = self.locality_RR.copy()
        for window in range(self.num_windows):
            rows_RR3 = self.rows_RR3 + window * self.rows_per_window
            price_RR -= (self.coefs_RR3 * y_coupling[rows_RR3]).sum(axis=2)
        return price_RR * self.time_unit / self.unit

    def solve(self):
        """Mehrotra predictor-corrector; returns the primal flows and the duals."""
        x, y_block, y_coupling, z = self.initial_point()
        b_block = self.demand_M
        scale_b = 1.0 + np.abs(b_block).max()
        scale_c = 1.0 + np.abs(self.objective_V).max()
        n = self.num_variables
        for _ in range(_MAX_ITERATIONS):
            ax_block, ax_coupling = self.multiply(x)
            rp_block, rp_coupling = b_block - ax_block, -ax_coupling
            rd = self.objective_V - self.transpose_multiply(y_block, y_coupling) - z
            primal_value = self.objective_V @ x
            gap = abs(primal_value - b_block @ y_block) / (1.0 + abs(primal_value))
            infeasibility = max(np.abs(rp_block).max(initial=0.0), np.abs(rp_coupling).max()) / scale_b
            mu = x @ z / n
            converged = infeasibility < _TOLERANCE and np.abs(rd).max() / scale_c < _TOLERANCE and gap < _TOLERANCE
            # Past mu ~ 1e-13 the normal equations are too ill-conditioned to gain anything more.
            if converged or mu < 1e-13:
                break
            d = x / z
            solve = self.normal_solver(d)

            def direction(rc):
                h_block_x, h_coupling_x = self.multiply(d * rd - rc / z)
                dy_block, dy_coupling = solve(rp_block + h_block_x, rp_coupling + h_coupling_x)
                dz = rd - self.transpose_multiply(dy_block, dy_coupling)
                return rc / z - d * dz, dy_block, dy_coupling, dz

            dx, _, _, dz = direction(-x * z)
            step_p, step_d = _max_step(x, dx), _max_step(z, dz)
            mu_affine = (x + step_p * dx) @ (z + step_d * dz) / n
            sigma = (mu_affine / mu) ** 3
            dx, dy_block, dy_coupling, dz = direction(sigma * mu - x * z - dx * dz)
            step_p, step_d = min(1.0, 0.995 * _max_step(x, dx)), min(1.0, 0.995 * _max_step(z, dz))
            x += step_p * dx
            y_block += step_d * dy_block
            y_coupling += step_d * dy_coupling
            z += step_d * dz
        return x[: self.num_flows], y_block, y_coupling


def _max_step(v, dv):
    """The largest step ``t`` with ``v + t * dv >= 0``."""
    ratios = np.divide(-v, dv, out=np.full_like(v, np.inf), where=dv < 0)
    return float(ratios.min())


def solve_routing(
    load: np.ndarray, holds_ER: np.ndarray, topology: Topology, cost: LayerCost, *, locality_weight: float = 1e-3
) -> RoutingSolution:
    """The optimal routing fractions of the placement ``holds_ER`` (``[E, R]`` bool, every expert held).

    Args:
        load: assignments per step from each source rank to each expert: one window ``[R, E]``, or
            several ``[W, R, E]`` (the fractions then minimise the mean objective over them).
        holds_ER: whether rank ``d`` holds expert ``e``.
        topology: the EP group's nodes and links.
        cost: the layer's constants.
        locality_weight: weight of the mean link load in the objective (see the module docstring).
    """
    load_WRE = load[None] if load.ndim == 2 else load
    load_RE = load_WRE.mean(axis=0)
    num_ranks, num_experts = load_RE.shape
    if num_ranks == 1 or load_RE.sum() == 0:
        fractions = nearest_holder_fractions(holds_ER, topology)
        objective = planner_objective(load_WRE, fractions, topology, cost, locality_weight)
        return RoutingSolution(fractions, objective, np.zeros((num_ranks, num_ranks)), np.zeros((num_ranks, num_experts)))
    program = _RoutingProgram(load_WRE, holds_ER, topology, cost, locality_weight)
    flows, _, y_coupling = program.solve()

    # Fractions from the flows; shares too small to matter are dropped so plans stay sparse.
    fractions = np.zeros((num_ranks, num_experts, num_ranks))
    share = np.maximum(flows, 0.0) / program.demand_M[program.block_N]
    share = np.where(share < _FRACTION_FLOOR, 0.0, share)
    fractions[program.source_N, program.expert_N, program.destination_N] = share
    sums = fractions.sum(axis=2, keepdims=True)
    fractions /= np.where(sums > 0, sums, 1.0)
    # Sources without tokens for an expert still need a row: its nearest holders, weighted by
    # what each computes of that expert.
    empty_experts = np.flatnonzero((sums[:, :, 0] == 0).any(axis=0))
    if empty_experts.size:
        processed_ER = np.einsum("re,red->ed", load_RE[:, empty_experts], fractions[:, empty_experts])
        filler = nearest_holder_fractions(holds_ER[empty_experts], topology, processed_ER)
        empty = sums[:, empty_experts] == 0
        fractions[:, empty_experts] = np.where(empty, filler, fractions[:, empty_experts])

    # Prices: price[r, d] = tie-break cost - g(r, d)^T y (seconds per token); pi = cheapest holder.
    price_RR = program.prices_RR(y_coupling)
    pi_RE = np.where(holds_ER[None, :, :], price_RR[:, None, :], np.inf).min(axis=2)
    objective = planner_objective(load_WRE, fractions, topology, cost, locality_weight)
    return RoutingSolution(fractions, objective, price_RR, pi_RE)


def program_size(load: np.ndarray, holds_ER: np.ndarray) -> int:
    """Flow variables plus within-block pairs of the routing LP, each times the coupling rows it
    touches per window: its cost per iteration grows with this (``load`` as in :func:`solve_routing`)."""
    windows = 1 if load.ndim == 2 else load.shape[0]
    load_RE = load if load.ndim == 2 else load.mean(axis=0)
    replicas_E = holds_ER.sum(axis=1)
    sources_E = (load_RE > 0).sum(axis=0)
    return int((sources_E * (windows * replicas_E + windows**2 * replicas_E**2)).sum())


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """torch's intra-op thread pool at one thread inside the block (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
