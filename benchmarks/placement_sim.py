"""Expert placement policies on a simulated cluster, judged by the planner's cost model.

For every cluster (nodes x GPUs), link bandwidths (intra / inter GB/s), layer and workload, a run
draws ``--windows`` windows of routing load. At each window boundary every policy re-plans from
the load of the window that just ended (what the expert-load monitor measured) and is judged on
the next window's load:

- ``static``: the block placement, never moved (:meth:`PlacementPlan.default`);
- ``eplb``: DeepSeek's EPLB re-run from scratch (hierarchical by node when the layer has expert
  groups, as DeepSeek-V3's 8 do), tokens split evenly over replicas;
- ``eplb_balanced``: the same plans, judged with the per-step split over replicas that ``ours`` gets
  (below; aiming at an even share of load per rank, EPLB's own aim): the baseline with our
  dispatcher, so that ``ours`` against it measures the placement alone;
- ``smartmoe``: the SmartMoE-style greedy, swapping slots of the current placement;
- ``planner``: :class:`~lightning_moe.PlacementPlanner` with the current placement (migration-aware),
  every plan taken;
- ``ours``: what :class:`~lightning_moe.ExpertMigration` does: the planner's plan for the last
  windows (up to four, when a backtest says the history helps), taken only when
  :class:`~lightning_moe.planning.trigger.MigrationTrigger` (the callback's rule, its defaults)
  accepts it: a predicted gain of at least 2% over the slots in force with fresh routing fractions,
  that pays twice for the move over the window; those fresh fractions otherwise (they move
  nothing); and the static placement
  in place of the plan when a plan made from the window before loses to it on the measured window
  (a load that cannot be followed). The plan's slots are judged with the split over replicas the
  dispatcher makes at every step (``MoEStrategy(balance_replicas=True)``, the default: of the
  planned fractions, those fractions scaled per rank until the step's counts reach the plan's share
  or an even share of load per rank, the two fits with each source's tokens sent to the nearest
  replicas first, and the two with each node's replicas given about what its sources send them, the
  one the cost model prices lowest on the step's counts,
  :mod:`lightning_moe.parallel.replica_balance`), modelled on the window's mean load; the one small
  all-reduce of counts it costs per layer and step is not modelled;
- ``ours_fixed``: the same plans with their fixed planned fractions (``balance_replicas=False``);
- ``oracle``: the planner on the window's own load, moving for free.

The layers: ``mixtral`` (E=8, k=2, d=4096, f=14336) and ``deepseek`` (E=256, k=8, d=7168,
f=2048); or ``ExKxDxF`` for any shape. Expert compute assumes the GEMMs reach ``--tflops``
(forward + backward = 3 x 2 x 3 x d x f FLOPs per assignment); a hidden row is ``2 d`` bytes (bf16);
a slot moves ``14 x 3 d f`` bytes (bf16 weight, fp32 master weight and two fp32 Adam moments).
Every rank has ``ceil(E / R) + --spare-slots`` slots.

Workloads (each source rank draws its top-k experts per token, without replacement, from a
softmax over per-source logits; the window's load is Poisson around the expected counts of
``--tokens-per-rank`` tokens per step over ``--steps-per-window`` steps, per step):

- ``zipfS``: expert popularity ``1 / rank^S`` over a random order that drifts: every window, each
  pair of neighbours in the order trades places with probability ``--drift``;
- ``rotating``: an eighth of the experts is 8x hotter, and that hot block moves by a sixteenth of
  the experts every window (at least one: with E=8 the one hot expert is another one every window,
  which no plan made from the window before can follow);
- ``hot_source``: popularity ``1 / rank^0.5`` everywhere, but source rank 0's tokens go 16x more
  to a sixteenth of the experts (at least two), a set that drifts by one expert a window.

Printed per configuration and policy (means over the judged windows): the modelled layer time
(forward + backward, one MoE layer), the busiest rank's load over the mean, the bytes that cross
nodes per step, the bytes moved per re-plan, and the planner's run time; then how often per-step
balancing kept each of its candidate splits for ``ours``. The goals of the issue are checked at the
end for the configurations that have them.

One draw of windows is one sample of the drift: ``--seeds N`` draws every configuration N times
(seeds ``--seed`` to ``--seed + N - 1``) and prints the means over the draws, with each draw's value
next to every goal.

Usage::

    python benchmarks/placement_sim.py                                   # everything (~30 min)
    python benchmarks/placement_sim.py --clusters 2x8 --bandwidths 160/50 --workloads zipf1
    python benchmarks/placement_sim.py --clusters 2x8 --bandwidths 160/50 --workloads zipf1 --seeds 10
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from lightning_moe.parallel.replica_balance import ReplicaBalancer
from lightning_moe.planning import LayerCost, PlacementPlan, PlacementPlanner, Topology
from lightning_moe.planning.baselines import eplb_plan, oracle_plan, smartmoe_greedy_plan, static_plan
from lightning_moe.planning.cost_model import assignment_seconds, estimate_plan, migration_transfers, planned_load_share
from lightning_moe.planning.trigger import MigrationTrigger

POLICIES = ("static", "eplb", "eplb_balanced", "smartmoe", "planner", "ours", "ours_fixed", "oracle")
#: The splits per-step balancing may keep, as printed, in the order of ``replica_balance.SPLITS``.
SPLITS = ("planned", "plan's share", "even share", "local plan's share", "local even share", "matched plan's share",
          "matched even share")


@dataclass(frozen=True)
class Layer:
    """A MoE layer shape: experts, experts per token, model width, expert hidden width, groups."""

    name: str
    num_experts: int
    top_k: int
    d_model: int
    d_ff: int
    num_groups: int | None = None

    @classmethod
    def parse(cls, text: str) -> Layer:
        if text in LAYERS:
            return LAYERS[text]
        try:
            experts, top_k, d_model, d_ff = (int(part) for part in text.split("x"))
        except ValueError:
            raise ValueError(f"--models: {text!r} is neither {sorted(LAYERS)} nor ExKxDxF (e.g. 8x2x256x512)") from None
        if min(experts, top_k, d_model, d_ff) < 1 or top_k > experts:
            raise ValueError(f"--models: {text!r} needs positive sizes and k <= E")
        return cls(text, experts, top_k, d_model, d_ff)


LAYERS = {
    "mixtral": Layer("mixtral", 8, 2, 4096, 14336),
    "deepseek": Layer("deepseek", 256, 8, 7168, 2048, num_groups=8),
}


def parse_pairs(text: str, separator: str, flag: str) -> list[tuple[float, float]]:
    pairs = []
    for item in text.split(","):
        try:
            first, second = (float(part) for part in item.split(separator))
        except ValueError:
            raise ValueError(f"{flag}: {item!r} is not A{separator}B") from None
        pairs.append((first, second))
    return pairs


def inclusion_probabilities(logits_E: np.ndarray, top_k: int, samples: int, rng: np.random.Generator) -> np.ndarray:
    """Chance that a token picks each expert among its top-k, drawing experts without replacement
    from ``softmax(logits)`` (Gumbel top-k), by Monte Carlo."""
    scores = logits_E[None, :] + rng.gumbel(size=(samples, len(logits_E)))
    chosen = np.argpartition(-scores, top_k - 1, axis=1)[:, :top_k]
    return np.bincount(chosen.ravel(), minlength=len(logits_E)) / samples


class Workload:
    """Per-window, per-source expert logits of one workload (see the module docstring)."""

    def __init__(self, name: str, num_experts: int, num_ranks: int, drift: float, rng: np.random.Generator) -> None:
        self.name, self.num_experts, self.num_ranks, self.rng = name, num_experts, num_ranks, rng
        self.drift = drift
        self.order = rng.permutation(num_experts)  # popularity rank of each expert
        if name.startswith("zipf"):
            self.exponent = float(name[4:])
        elif name not in ("rotating", "hot_source"):
            raise ValueError(f"--workloads: unknown workload {name!r}; use zipfS, rotating or hot_source")

    def logits(self, window: int) -> np.ndarray:
        """``[R, E]`` logits of every source rank in ``window``."""
        experts = self.num_experts
        if self.name.startswith("zipf"):
            if window > 0:  # drift: each pair of neighbours in the popularity order may trade places
                for i in np.flatnonzero(self.rng.random(experts - 1) < self.drift):
                    swap = (self.order == i) | (self.order == i + 1)
                    self.order[swap] = self.order[swap][::-1]
            logits_E = -self.exponent * np.log1p(self.order)
            return np.tile(logits_E, (self.num_ranks, 1))
        if self.name == "rotating":
            hot = max(1, experts // 8)
            start = (window * max(1, experts // 16)) % experts
            logits_E = np.zeros(experts)
            logits_E[(start + np.arange(hot)) % experts] = np.log(8.0)
            return np.tile(logits_E, (self.num_ranks, 1))
        logits_RE = np.tile(-0.5 * np.log1p(self.order), (self.num_ranks, 1))
        favourites = (window + np.arange(max(2, experts // 16))) % experts
        logits_RE[0, favourites] += np.log(16.0)
        return logits_RE


def window_loads(workload, layer, windows, tokens_per_rank, steps, samples, rng) -> list[np.ndarray]:
    """``windows`` loads ``[R, E]``: assignments per step, averaged over a window of ``steps`` steps.
    Inclusion probabilities are estimated once per distinct set of logits, whatever their order, and
    permuted to it (they follow the logits' permutation exactly): the Monte Carlo error must not pass
    for drift, and a drifting Zipf order permutes the same logits every window."""
    loads, cache = [], {}
    for window in range(windows):
        logits_RE = workload.logits(window)
        unique, inverse = np.unique(logits_RE, axis=0, return_inverse=True)
        probabilities_UE = []
        for row in unique:
            order = np.argsort(row, kind="stable")
            key = row[order].tobytes()
            if key not in cache:
                cache[key] = inclusion_probabilities(row[order], layer.top_k, samples, rng)
            probabilities_E = np.empty_like(cache[key])
            probabilities_E[order] = cache[key]
            probabilities_UE.append(probabilities_E)
        probabilities_UE = np.stack(probabilities_UE)
        expected_RE = probabilities_UE[inverse.ravel()] * tokens_per_rank * steps
        loads.append(rng.poisson(expected_RE) / steps)
    return loads


@dataclass
class Tally:
    """Sums over the judged windows of one policy."""

    layer_seconds: list[float] = field(default_factory=list)
    max_over_mean: list[float] = field(default_factory=list)
    cross_node_bytes: list[float] = field(default_factory=list)
    moved_bytes: list[float] = field(default_factory=list)
    plan_seconds: list[float] = field(default_factory=list)

    def row(self) -> dict[str, float]:
        mean = lambda values: float(np.mean(values)) if values else float("nan")  # noqa: E731
        return {
            "layer_ms": 1e3 * mean(self.layer_seconds),
            "max_over_mean": mean(self.max_over_mean),
            "cross_gb": mean(self.cross_node_bytes) / 1e9,
            "moved_gb": mean(self.moved_bytes) / 1e9,
            "plan_s": mean(self.plan_seconds),
        }


def simulate(layer, num_nodes, gpus, intra, inter, workload_name, args) -> dict[str, dict[str, float]]:
    """Run every policy over the windows of one configuration; return each policy's means."""
    topology = Topology(num_nodes, gpus, intra * 1e9, inter * 1e9)
    num_ranks = topology.num_ranks
    slots = math.ceil(layer.num_experts / num_ranks) + args.spare_slots
    cost = LayerCost.swiglu(d_model=layer.d_model, d_ff=layer.d_ff, flops_per_second=args.tflops * 1e12)
    rng = np.random.default_rng([args.seed, layer.num_experts, num_ranks])
    workload = Workload(workload_name, layer.num_experts, num_ranks, args.drift, rng)
    loads = window_loads(workload, layer, args.windows, args.tokens_per_rank, args.steps_per_window, args.mc_samples, rng)
    planner = PlacementPlanner.from_cost(topology, layer.num_experts, slots, cost, horizon_steps=args.steps_per_window)
    trigger = MigrationTrigger(horizon_steps=args.steps_per_window)
    static = static_plan(layer.num_experts, num_ranks, slots)
    node_of_rank = torch.arange(num_ranks) // gpus
    prices = assignment_seconds(cost, topology)  # what the callback's tables carry
    ours_share = None  # the static table's: an even share
    current = {policy: static for policy in POLICIES}
    tallies = {policy: Tally() for policy in POLICIES}
    kept = dict.fromkeys(SPLITS, 0)  # which split ours kept, per judged window
    for window in range(1, args.windows):
        measured, upcoming = loads[window - 1], loads[window]
        judged = window > args.warmup_replans  # the first re-plans leave the static placement
        for policy in POLICIES:
            start = time.perf_counter()
            if policy == "static":
                plan = static
            elif policy == "eplb":
                plan = eplb_plan(measured, num_ranks, slots, num_nodes=num_nodes, num_groups=layer.num_groups)
            elif policy == "eplb_balanced":
                plan = current["eplb"]  # the plan EPLB made just above
            elif policy == "smartmoe":
                plan = smartmoe_greedy_plan(measured, current[policy])
            elif policy == "planner":
                plan = planner.plan(measured, current=current[policy])
            elif policy == "ours":
                weighed = loads[max(window - trigger.history_windows - 1, 0) : window][::-1]  # the measured window first
                plan = trigger.choose(current[policy], weighed, planner)
            elif policy == "ours_fixed":
                plan = current["ours"]  # the same slots and planned fractions, chosen just above
            else:
                plan = oracle_plan(planner, upcoming)
            elapsed = time.perf_counter() - start
            routed = plan
            if policy in ("ours", "eplb_balanced"):  # the dispatcher splits replicated experts from the step's counts
                share = None  # EPLB aims at an even share of load per rank
                if policy == "ours":
                    if plan is not current[policy]:  # the callback's new table carries the plan's load shares (and prices)
                        ours_share = planned_load_share(plan, measured)
                    share = ours_share
                balancer = ReplicaBalancer(plan.routing_fractions_RER, holders_RE(plan), node_of_rank, share, prices)
                choice, fitted = balancer.choose(torch.from_numpy(upcoming))
                routed = PlacementPlan(plan.experts_per_rank, fitted)
                if judged and policy == "ours":
                    kept[SPLITS[int(balancer.split_of_candidate[choice])]] += 1
            estimate = estimate_plan(routed, upcoming, topology, cost)
            moved = migration_transfers(current[policy].experts_per_rank, plan.experts_per_rank, topology)
            current[policy] = plan
            if not judged:
                continue
            tally = tallies[policy]
            tally.layer_seconds.append(estimate.layer_seconds)
            tally.max_over_mean.append(estimate.max_over_mean)
            tally.cross_node_bytes.append(estimate.cross_node_bytes)
            tally.moved_bytes.append(len(moved) * cost.expert_bytes)
            if policy in ("planner", "ours", "oracle"):
                tally.plan_seconds.append(elapsed)
    rows = {policy: tally.row() for policy, tally in tallies.items()}
    floor = np.mean([cross_node_floor(load, topology, slots) for load in loads[1 + args.warmup_replans :]])
    rows["floor"] = {"cross_gb": floor * cost.token_bytes * cost.all_to_all_passes / 1e9}
    expert_loads = [load.sum(axis=0) for load in loads]
    rows["splits"] = kept
    rows["drift"] = {
        "cosine": float(np.mean([a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(expert_loads, expert_loads[1:])]))
    }
    return rows


def holders_RE(plan: PlacementPlan) -> torch.Tensor:
    """``[R, E]`` booleans: which ranks hold which expert."""
    return torch.from_numpy(plan.slot_counts_ER().T > 0)


def cross_node_floor(load_RE: np.ndarray, topology: Topology, slots_per_rank: int) -> float:
    """Assignments per step that must cross nodes whatever the placement: a relaxation that gives
    each expert one node (the one that sends it most) and then the spare slots, one (node, expert)
    membership each, to the largest demands still crossing; node capacity and balance are ignored."""
    node_load_NE = load_RE.reshape(topology.num_nodes, topology.ranks_per_node, -1).sum(axis=1)
    first_choice_NE = np.arange(topology.num_nodes)[:, None] == node_load_NE.argmax(axis=0)[None, :]
    crossing_NE = np.where(first_choice_NE, 0.0, node_load_NE)
    spare = topology.num_ranks * slots_per_rank - load_RE.shape[1]
    return max(float(crossing_NE.sum() - np.sort(crossing_NE.ravel())[::-1][:spare].sum()), 0.0)


def print_table(title: str, rows: dict[str, dict[str, float]]) -> None:
    print(f"\n{title} (cosine similarity of consecutive windows' expert loads: {rows['drift']['cosine']:.4f})\n")
    print("| policy | layer ms | vs static | max/mean | cross-node GB/step | moved GB/re-plan | plan s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    static_ms = rows["static"]["layer_ms"]
    for policy in POLICIES:
        row = rows[policy]
        plan_s = f"{row['plan_s']:.2f}" if not math.isnan(row["plan_s"]) else "-"
        print(
            f"| {policy} | {row['layer_ms']:.2f} | {static_ms / row['layer_ms']:.2f}x | {row['max_over_mean']:.3f} | "
            f"{row['cross_gb']:.3f} | {row['moved_gb']:.2f} | {plan_s} |"
        )
    print(f"| floor (no placement crosses less) | | | | {rows['floor']['cross_gb']:.3f} | | |")
    print("\nours' per-step split, judged windows: " + ", ".join(f"{name} {count}" for name, count in rows["splits"].items()))
    sys.stdout.flush()


def mean_rows(per_seed: list[dict]) -> dict:
    """The rows of several seeds' runs of one configuration: each figure's mean over the seeds (the
    split counts summed)."""
    if len(per_seed) == 1:
        return per_seed[0]
    rows = {name: {field: float(np.mean([seed[name][field] for seed in per_seed])) for field in row}
            for name, row in per_seed[0].items() if name != "splits"}
    rows["splits"] = {split: sum(seed["splits"][split] for seed in per_seed) for split in per_seed[0]["splits"]}
    return rows


def goal_ratios(rows) -> list[float]:
    """Ours against static and EPLB in layer time, and EPLB over ours in cross-node bytes and in
    bytes moved per re-plan: the four figures of the goals."""
    ours, static, eplb = rows["ours"], rows["static"], rows["eplb"]
    cross = eplb["cross_gb"] / ours["cross_gb"] if ours["cross_gb"] > 0 else math.inf
    moved = eplb["moved_gb"] / ours["moved_gb"] if ours["moved_gb"] > 0 else math.inf
    return [static["layer_ms"] / ours["layer_ms"], eplb["layer_ms"] / ours["layer_ms"], cross, moved]


def check_goals(key, rows, per_seed=()) -> list[str]:
    """The issue's goals at 2x8, 160/50 GB/s, one spare slot, Zipf s=1, on ``rows`` (the means over
    the seeds), with each seed's own value when there are several."""
    ours, eplb = rows["ours"], rows["eplb"]
    names = ["ours vs static, layer time", "ours vs EPLB, layer time", "EPLB / ours, cross-node bytes",
             "EPLB / ours, bytes moved per re-plan"]
    seeds = [goal_ratios(seed) for seed in per_seed]
    lines = []
    for index, (name, value, goal) in enumerate(zip(names, goal_ratios(rows), (1.3, 1.1, 3.0, 5.0))):
        line = f"{key}: {name} {value:.2f}x (goal >= {goal}x) {'met' if value >= goal else 'NOT MET'}"
        if seeds:
            line += " (per seed: " + ", ".join(f"{seed[index]:.2f}x" for seed in seeds) + ")"
        lines.append(line)
    balanced = rows["eplb_balanced"]["layer_ms"] / ours["layer_ms"]
    line = f"{key}: ours vs EPLB with the same per-step balancing, layer time {balanced:.2f}x (the placement alone)"
    if per_seed:
        line += " (per seed: " + ", ".join(f"{s['eplb_balanced']['layer_ms'] / s['ours']['layer_ms']:.2f}x" for s in per_seed) + ")"
    lines.append(line)
    floor = rows["floor"]["cross_gb"]
    if floor > 1e-9:
        lines.append(f"{key}: EPLB / floor, cross-node bytes {eplb['cross_gb'] / floor:.2f}x (no placement crosses less than the floor)")
    else:
        lines.append(f"{key}: the cross-node floor is 0 (every node can hold every expert it uses)")
    balance = "met" if ours["max_over_mean"] <= eplb["max_over_mean"] + 1e-9 else "NOT MET"
    line = f"{key}: balance, max/mean ours {ours['max_over_mean']:.3f} vs EPLB {eplb['max_over_mean']:.3f} (goal: equal or better) {balance}"
    if per_seed:
        line += " (per seed: " + ", ".join(f"{s['ours']['max_over_mean']:.3f} vs {s['eplb']['max_over_mean']:.3f}" for s in per_seed) + ")"
    lines.append(line)
    return lines


def cpu_name() -> str:
    """The CPU's model name (as ``lscpu`` prints it) where Linux tells, else the architecture."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clusters", default="2x8,4x8", help="nodes x GPUs per node, comma-separated")
    parser.add_argument("--bandwidths", default="160/50,450/50,450/12.5", help="intra/inter GB/s, comma-separated")
    parser.add_argument("--models", default="mixtral,deepseek", help="mixtral, deepseek or ExKxDxF, comma-separated")
    parser.add_argument("--workloads", default="zipf0.5,zipf1,zipf1.5,rotating,hot_source")
    parser.add_argument("--windows", type=int, default=7, help="windows drawn; a plan made from each is judged on the next")
    parser.add_argument("--warmup-replans", type=int, default=1, help="first re-plans (leaving static) not judged")
    parser.add_argument("--steps-per-window", type=int, default=500, help="steps between re-plans (the horizon)")
    parser.add_argument("--tokens-per-rank", type=int, default=4096, help="tokens per rank per step")
    parser.add_argument("--spare-slots", type=int, default=1, help="slots per rank beyond ceil(E / R)")
    parser.add_argument("--tflops", type=float, default=400.0, help="TFLOP/s the expert GEMMs reach")
    parser.add_argument("--mc-samples", type=int, default=16384, help="Monte Carlo tokens per routing distribution")
    parser.add_argument("--drift", type=float, default=0.05, help="chance that two neighbours in a Zipf order swap per window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--seeds", type=int, default=1,
        help="draw every configuration with seeds seed .. seed + N - 1; tables give the means over them, the goals each seed's value too",
    )
    args = parser.parse_args(argv)
    args.clusters = [tuple(int(v) for v in pair) for pair in parse_pairs(args.clusters, "x", "--clusters")]
    args.bandwidths = parse_pairs(args.bandwidths, "/", "--bandwidths")
    args.models = [Layer.parse(text) for text in args.models.split(",")]
    args.workloads = args.workloads.split(",")
    if args.windows < 2 + args.warmup_replans:
        parser.error("--windows must exceed --warmup-replans + 1 (the first window is only measured)")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    print(
        f"# Expert placement on a simulated cluster ({cpu_name()}, one thread, "
        f"torch {torch.__version__}, numpy {np.__version__}): {args.windows} windows of {args.steps_per_window} steps, "
        f"{args.tokens_per_rank} tokens per rank per step, {args.spare_slots} spare slot(s) per rank, "
        f"expert GEMMs at {args.tflops:g} TFLOP/s, "
        f"{f'seed {args.seed}' if args.seeds == 1 else f'means over seeds {args.seed} to {args.seed + args.seeds - 1}'}.\n"
        "Layer time: one MoE layer, forward + backward, per step; bytes per step count all four all-to-alls."
    )
    results, goals = {}, []
    for layer in args.models:
        for num_nodes, gpus in args.clusters:
            for intra, inter in args.bandwidths:
                for workload in args.workloads:
                    key = f"{layer.name} {num_nodes}x{gpus} {intra:g}/{inter:g} GB/s {workload}"
                    per_seed = [
                        simulate(layer, num_nodes, gpus, intra, inter, workload, argparse.Namespace(**{**vars(args), "seed": seed}))
                        for seed in range(args.seed, args.seed + args.seeds)
                    ]
                    rows = mean_rows(per_seed)
                    results[key] = rows
                    print_table(key, rows)
                    if (num_nodes, gpus, intra, inter, workload, args.spare_slots) == (2, 8, 160, 50, "zipf1", 1):
                        goals += check_goals(key, rows, per_seed if args.seeds > 1 else ())
    print_summary(results)
    if goals:
        print("\n## Goals (2x8, 160/50 GB/s, one spare slot per rank, Zipf s=1)\n")
        print("\n".join(goals))
    return results


def print_summary(results: dict[str, dict[str, dict[str, float]]]) -> None:
    """One line per configuration: ours against each policy, and the figures behind the goals."""
    print("\n## Summary\n")
    print(
        "| configuration | ours vs static | ours vs EPLB | ours vs oracle | max/mean ours / EPLB | "
        "cross-node GB ours / EPLB / floor | moved GB ours / EPLB | plan s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for key, rows in results.items():
        ours, eplb = rows["ours"], rows["eplb"]
        print(
            f"| {key} | {rows['static']['layer_ms'] / ours['layer_ms']:.2f}x | {eplb['layer_ms'] / ours['layer_ms']:.2f}x | "
            f"{rows['oracle']['layer_ms'] / ours['layer_ms']:.2f}x | {ours['max_over_mean']:.3f} / {eplb['max_over_mean']:.3f} | "
            f"{ours['cross_gb']:.2f} / {eplb['cross_gb']:.2f} / {rows['floor']['cross_gb']:.2f} | "
            f"{ours['moved_gb']:.1f} / {eplb['moved_gb']:.1f} | {ours['plan_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
