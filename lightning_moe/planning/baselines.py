"""Placements to compare the planner against: static, EPLB, a SmartMoE-style greedy, a per-window oracle.

- **Static**: :meth:`PlacementPlan.default` (block placement, tokens split evenly over replicas).
- **EPLB** (DeepSeek's expert-parallel load balancer), written from its public description:
  (1) give every spare slot to the expert with the highest load per replica; (2) pack the
  replicas onto GPUs with a balanced greedy: heaviest replica first, onto the least loaded GPU
  that still has a free slot, so every GPU gets the same number of replicas; (3) when the experts
  form groups and the number of groups is a multiple of the number of nodes, do it hierarchically:
  first pack whole groups onto nodes with the same greedy (equal groups per node), then replicate
  and pack inside each node. It looks at the total load per expert only: it ignores bandwidth,
  where tokens come from and the current placement, and nothing stops two replicas of one expert
  from landing on one GPU (reproduced here: such plans validate only with
  ``allow_colocated_replicas=True``). Tokens split evenly over replicas.
- **SmartMoE-style greedy** (Zhai et al., ATC 2023, re-place every few iterations by a greedy on
  the current placement): starting from the plan in force, repeatedly swap one slot of the
  busiest rank with one slot of another rank, choosing the swap that lowers the larger of the two
  ranks' loads most, until no swap lowers the busiest rank. It keeps the replica counts of the
  current placement (its spare slots too), is topology-blind and splits tokens evenly.
- **Oracle**: the planner run on the window's own load with no migration cost: what the optimiser
  finds when it knows the future and moving is free.

Shape legend: ``R`` EP ranks, ``E`` logical experts, ``N`` nodes.
"""

from __future__ import annotations

import numpy as np
import torch

from lightning_moe.planning.plan import PlacementPlan, check_shape
from lightning_moe.planning.planner import PlacementPlanner


def static_plan(num_experts: int, num_ranks: int, slots_per_rank: int) -> PlacementPlan:
    """The default block placement with an even split (see :meth:`PlacementPlan.default`).

    Args:
        num_experts: ``E``.
        num_ranks: ``R``.
        slots_per_rank: ``S``.
    """
    return PlacementPlan.default(num_experts, num_ranks, slots_per_rank)


def _balanced_packing(weights: np.ndarray, num_packs: int) -> list[list[int]]:
    """EPLB's packing: items heaviest first onto the lightest pack not yet full; every pack gets
    ``len(weights) / num_packs`` items (ties: lower item, lower pack)."""
    per_pack = len(weights) // num_packs
    packs: list[list[int]] = [[] for _ in range(num_packs)]
    pack_load = np.zeros(num_packs)
    for item in np.lexsort((np.arange(len(weights)), -weights)):
        open_packs = [p for p in range(num_packs) if len(packs[p]) < per_pack]
        pack = min(open_packs, key=lambda p: (pack_load[p], p))
        packs[pack].append(int(item))
        pack_load[pack] += weights[item]
    return packs


def _replicate(load_E: np.ndarray, num_slots: int) -> np.ndarray:
    """EPLB's replication: each spare slot to the expert with the highest load per replica."""
    replicas_E = np.ones(len(load_E), dtype=np.int64)
    for _ in range(num_slots - len(load_E)):
        replicas_E[int(np.argmax(load_E / replicas_E))] += 1
    return replicas_E


def eplb_plan(
    load_E: np.ndarray | torch.Tensor,
    num_ranks: int,
    slots_per_rank: int,
    *,
    num_nodes: int = 1,
    num_groups: int | None = None,
) -> PlacementPlan:
    """DeepSeek's EPLB (module docstring), from the total load per expert.

    Args:
        load_E: ``[E]`` load of each logical expert (or ``[R, E]``, summed over sources).
        num_ranks: ``R`` GPUs of the EP group.
        slots_per_rank: replicas per GPU.
        num_nodes: nodes the GPUs span (used by the hierarchical mode).
        num_groups: expert groups (consecutive ids); hierarchical when it is a multiple of ``num_nodes``.
    """
    load_E = np.asarray(load_E.detach().cpu() if isinstance(load_E, torch.Tensor) else load_E, dtype=np.float64)
    if load_E.ndim == 2:
        load_E = load_E.sum(axis=0)
    num_experts = len(load_E)
    check_shape(num_experts, num_ranks, slots_per_rank, where="eplb_plan")
    hierarchical = (
        num_groups is not None
        and num_nodes > 1
        and num_groups % num_nodes == 0
        and num_experts % num_groups == 0
        and num_ranks % num_nodes == 0
        and (num_ranks * slots_per_rank) % num_nodes == 0
    )
    if not hierarchical:
        num_nodes, num_groups = 1, 1
    group_size = num_experts // num_groups
    group_load = load_E.reshape(num_groups, group_size).sum(axis=1)
    ranks_per_node = num_ranks // num_nodes
    experts_per_rank: list[list[int]] = []
    for groups in _balanced_packing(group_load, num_nodes):
        experts = np.concatenate([np.arange(g * group_size, (g + 1) * group_size) for g in sorted(groups)])
        replicas = _replicate(load_E[experts], ranks_per_node * slots_per_rank)
        items = np.repeat(experts, replicas)
        weights = np.repeat(load_E[experts] / replicas, replicas)
        for pack in _balanced_packing(weights, ranks_per_node):
            experts_per_rank.append([int(items[i]) for i in pack])
    return PlacementPlan.even_split(experts_per_rank, num_experts)


def smartmoe_greedy_plan(load_E: np.ndarray | torch.Tensor, current: PlacementPlan, *, max_swaps: int = 1000) -> PlacementPlan:
    """The SmartMoE-style greedy of the module docstring, from the total load per expert.

    Args:
        load_E: ``[E]`` load of each logical expert (or ``[R, E]``, summed over sources).
        current: the plan in force; its slots are swapped, never re-counted.
        max_swaps: most swaps per re-plan.
    """
    load_E = np.asarray(load_E.detach().cpu() if isinstance(load_E, torch.Tensor) else load_E, dtype=np.float64)
    if load_E.ndim == 2:
        load_E = load_E.sum(axis=0)
    experts_per_rank = [list(experts) for experts in current.experts_per_rank]
    replicas_E = current.replica_counts()
    share_E = load_E / replicas_E
    rank_load = np.array([share_E[experts].sum() for experts in experts_per_rank])
    for _ in range(max_swaps):
        busiest = int(np.argmax(rank_load))
        best = (rank_load[busiest], None)
        for slot_a, expert_a in enumerate(experts_per_rank[busiest]):
            for other, experts in enumerate(experts_per_rank):
                if other == busiest or expert_a in experts:
                    continue
                for slot_b, expert_b in enumerate(experts):
                    if expert_b in experts_per_rank[busiest]:
                        continue
                    delta = share_E[expert_b] - share_E[expert_a]
                    worse = max(rank_load[busiest] + delta, rank_load[other] - delta)
                    if worse < best[0] - 1e-12:
                        best = (worse, (slot_a, other, slot_b, delta))
        if best[1] is None:
            break
        slot_a, other, slot_b, delta = best[1]
        a, b = experts_per_rank[busiest][slot_a], experts_per_rank[other][slot_b]
        experts_per_rank[busiest][slot_a], experts_per_rank[other][slot_b] = b, a
        rank_load[busiest] += delta
        rank_load[other] -= delta
    return PlacementPlan.even_split(experts_per_rank, current.num_experts)


def oracle_plan(planner: PlacementPlanner, window_load_RE: np.ndarray | torch.Tensor) -> PlacementPlan:
    """The planner's plan for the window's own load, moving for free (``current=None``).

    Args:
        planner: the planner (its topology and cost constants).
        window_load_RE: ``[R, E]`` the load the plan will be evaluated on.
    """
    return planner.plan(window_load_RE, current=None)
