"""Starting placements for the local search, built from the measured load.

:func:`initial_placement` is topology-aware, in three steps:

1. **Replica counts** (EPLB's rule): every expert gets one slot; each spare slot goes to the expert
   with the most tokens per replica. This bounds the load of every replica, which balance needs.
2. **Nodes**: an expert with at least one replica per node spreads its replicas over the nodes in
   proportion to the tokens each node sends it (D'Hondt's highest-average rule, at most one
   replica per rank), so hot experts sit on every node that uses them and each node computes its
   own tokens for them. The other experts, heaviest first, go to the node that computes the
   fewest tokens so far (ties: the node that sends the expert more tokens), which balances the
   nodes (a greedy number partition, as EPLB packs groups onto nodes).
3. **Ranks inside each node** (:func:`pack_node`): the node's replicas, heaviest first, each go to
   the least loaded rank of the node that has a free slot and does not hold the expert yet (ties:
   the rank that sends the expert the most tokens itself, whose own tokens then stay on the rank;
   then the lowest rank). This is EPLB's balanced packing with distinct replicas and source
   locality.

:func:`balanced_placement` is the locality-blind start: steps 1 and 3 over the whole group as one
node. :func:`random_placements` adds a few diverse starts from a fixed seed. The planner searches
from all of them (best first, within its budget) and keeps the best.

Everything is deterministic: ties go to the lowest index.

Shape legend: ``R`` EP ranks, ``N`` nodes, ``G`` ranks per node, ``E`` experts.
"""

from __future__ import annotations

import numpy as np

from lightning_moe.planning.plan import PlacementPlan
from lightning_moe.planning.topology import Topology


def replica_counts(load_E: np.ndarray, num_slots: int, max_replicas: int) -> np.ndarray:
    """Step 1: ``[E]`` replicas, each spare slot to the expert with the most tokens per replica
    (at most ``max_replicas`` each; ties: the lowest expert)."""
    replicas_E = np.ones(len(load_E), dtype=np.int64)
    for _ in range(num_slots - len(load_E)):
        per_replica_E = np.where(replicas_E < max_replicas, load_E / replicas_E, -np.inf)
        replicas_E[int(np.argmax(per_replica_E))] += 1
    return replicas_E


def replicas_per_node(load_RE: np.ndarray, topology: Topology, slots_per_rank: int) -> np.ndarray:
    """Steps 1 and 2: ``[N, E]`` replicas of each expert on each node, filling every slot."""
    num_nodes, local = topology.num_nodes, topology.ranks_per_node
    node_load_NE = load_RE.reshape(num_nodes, local, -1).sum(axis=1)
    load_E = node_load_NE.sum(axis=0)
    replicas_E = replica_counts(load_E, topology.num_ranks * slots_per_rank, topology.num_ranks)
    m_NE = np.zeros_like(node_load_NE, dtype=np.int64)
    free_N = np.full(num_nodes, local * slots_per_rank)
    computed_N = np.zeros(num_nodes)
    heaviest_first = np.argsort(-load_E, kind="stable")
    for expert in heaviest_first:
        if replicas_E[expert] < num_nodes:
            continue
        for _ in range(replicas_E[expert]):
            # Highest average: the node sending the most tokens per replica it would hold.
            average_N = node_load_NE[:, expert] / (m_NE[:, expert] + 1)
            _add_replica(m_NE, free_N, expert, local, preference_N=-average_N)
        computed_N += node_load_NE[:, expert]
    for expert in heaviest_first:
        for _ in range(replicas_E[expert] if replicas_E[expert] < num_nodes else 0):
            node = _add_replica(
                m_NE, free_N, expert, local, preference_N=computed_N, second_N=-node_load_NE[:, expert]
            )
            computed_N[node] += load_E[expert] / replicas_E[expert]
    return m_NE


def _add_replica(m_NE, free_N, expert, local, *, preference_N, second_N=None) -> int:
    """Add one replica of ``expert`` to the preferred node (lowest ``preference_N``, then
    ``second_N``, then index) that has a free slot and fewer than ``local`` replicas of it.

    When every node with a free slot already holds ``local`` replicas, a full node ``u`` that can
    take one first hands one of its other experts to such a node ``v`` (one always exists: ``v``
    has a free slot, so it cannot hold ``local`` replicas of everything ``u`` holds)."""
    num_nodes = len(free_N)
    second_N = np.zeros(num_nodes) if second_N is None else second_N
    order = np.lexsort((np.arange(num_nodes), second_N, preference_N))
    open_nodes = [v for v in order if free_N[v] > 0 and m_NE[v, expert] < local]
    if open_nodes:
        node = int(open_nodes[0])
    else:
        receiver = next(v for v in order if free_N[v] > 0)
        node = int(next(u for u in order if m_NE[u, expert] < local))
        handed = next(f for f in np.flatnonzero(m_NE[node]) if f != expert and m_NE[receiver, f] < local)
        m_NE[node, handed] -= 1
        m_NE[receiver, handed] += 1
        free_N[node] += 1
        free_N[receiver] -= 1
    m_NE[node, expert] += 1
    free_N[node] -= 1
    return node


def pack_node(
    replicas_E: np.ndarray, load_per_replica_E: np.ndarray, own_load_GE: np.ndarray, slots_per_rank: int
) -> list[list[int]]:
    """Step 2 of the module docstring for one node: its ``G`` ranks' experts.

    Args:
        replicas_E: replicas of each expert on the node (at most ``G`` each; they fill its slots).
        load_per_replica_E: tokens each replica is expected to compute.
        own_load_GE: tokens each rank of the node sends to each expert itself.
        slots_per_rank: slots per rank.
    """
    num_local = own_load_GE.shape[0]
    experts_per_rank: list[list[int]] = [[] for _ in range(num_local)]
    rank_load = np.zeros(num_local)
    items = [(e, load_per_replica_E[e]) for e in range(len(replicas_E)) for _ in range(int(replicas_E[e]))]
    items.sort(key=lambda item: (-item[1], item[0]))
    for expert, load in items:
        free = [g for g in range(num_local) if len(experts_per_rank[g]) < slots_per_rank]
        valid = [g for g in free if expert not in experts_per_rank[g]]
        if not valid:
            # Every rank with a free slot holds the expert already: trade places with a full rank.
            taker = free[0]
            giver = next(g for g in range(num_local) if expert not in experts_per_rank[g])
            moved = next(f for f in experts_per_rank[giver] if f not in experts_per_rank[taker])
            experts_per_rank[giver].remove(moved)
            experts_per_rank[taker].append(moved)
            rank_load[taker] += load_per_replica_E[moved]
            rank_load[giver] -= load_per_replica_E[moved]
            valid = [giver]
        rank = min(valid, key=lambda g: (rank_load[g], -own_load_GE[g, expert], g))
        experts_per_rank[rank].append(expert)
        rank_load[rank] += load
    return experts_per_rank


def initial_placement(load_RE: np.ndarray, topology: Topology, slots_per_rank: int) -> list[list[int]]:
    """The topology-aware start of the module docstring: ``R`` lists of ``slots_per_rank`` distinct experts.

    Args:
        load_RE: assignments per step from each source rank to each expert.
        topology: the EP group's nodes and links.
        slots_per_rank: slots per rank (``R * slots_per_rank >= E``).
    """
    m_NE = replicas_per_node(load_RE, topology, slots_per_rank)
    local = topology.ranks_per_node
    node_load_NE = load_RE.reshape(topology.num_nodes, local, -1).sum(axis=1)
    # Each node computes its own tokens for the experts it holds, and a share (by replicas) of the
    # tokens of nodes that hold none.
    held_NE = m_NE > 0
    orphan_E = np.where(held_NE, 0.0, node_load_NE).sum(axis=0)
    computed_NE = np.where(held_NE, node_load_NE, 0.0) + orphan_E * m_NE / m_NE.sum(axis=0)
    experts_per_rank = []
    for node in range(topology.num_nodes):
        per_replica_E = computed_NE[node] / np.maximum(m_NE[node], 1)
        own_GE = load_RE[node * local : (node + 1) * local]
        experts_per_rank += pack_node(m_NE[node], per_replica_E, own_GE, slots_per_rank)
    return experts_per_rank


def balanced_placement(load_RE: np.ndarray, slots_per_rank: int) -> list[list[int]]:
    """The locality-blind start: EPLB's replica counts, packed over the whole group as one node.

    Args:
        load_RE: assignments per step from each source rank to each expert.
        slots_per_rank: slots per rank (``R * slots_per_rank >= E``).
    """
    num_ranks = load_RE.shape[0]
    load_E = load_RE.sum(axis=0)
    replicas_E = replica_counts(load_E, num_ranks * slots_per_rank, num_ranks)
    return pack_node(replicas_E, load_E / replicas_E, load_RE, slots_per_rank)


def random_placements(num_experts: int, num_ranks: int, slots_per_rank: int, count: int) -> list[list[list[int]]]:
    """``count`` random placements from a generator with a fixed seed (the same on every call and
    every rank): the default block placement with its expert ids and its ranks shuffled, which
    keeps every expert present and the replicas on distinct ranks.

    Args:
        num_experts: ``E``.
        num_ranks: ``R``.
        slots_per_rank: ``S`` (``R * S >= E``, ``S <= E``).
        count: how many.
    """
    rng = np.random.default_rng(0)
    block = PlacementPlan.default(num_experts, num_ranks, slots_per_rank).experts_per_rank
    placements = []
    for _ in range(count):
        relabel, ranks = rng.permutation(num_experts), rng.permutation(num_ranks)
        placements.append([[int(relabel[e]) for e in block[rank]] for rank in ranks])
    return placements
