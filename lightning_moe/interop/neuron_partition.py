"""Partitions of a feed-forward layer's hidden neurons into equal-size experts (for dense-to-MoE splitting).

LLaMA-MoE (Zhu et al. 2024) builds experts from disjoint groups of a dense FFN's neurons, grouped
at random or by clustering. Our clustered partition is a balanced spherical k-means over each
neuron's weights: neuron ``i`` is described by its ``gate_proj`` and ``up_proj`` rows (the two
vectors that decide how strongly it fires for a token), each scaled to unit length, and neurons
whose rows point the same way share an expert (as MoEfication, Zhang et al. 2022, groups neurons
by their first-layer weights).

Shape legend: ``I`` neurons (the FFN width), ``E`` experts, ``M = I / E`` neurons per expert,
``F`` feature width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PARTITIONS = ("random", "clustered")


def random_partition(width: int, num_experts: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random split of ``range(width)`` into ``num_experts`` equal groups, each sorted.

    Args:
        width: neurons ``I``; divisible by ``num_experts``.
        num_experts: groups ``E``.
        generator: the source of randomness (seeded by the caller).

    Returns:
        ``[E, M]`` neuron indices.
    """
    order_I = torch.randperm(width, generator=generator)
    return order_I.view(num_experts, width // num_experts).sort(dim=1).values


def balanced_assignment(scores_IE: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign every row to a column, each column taking exactly ``capacity`` rows, preferring high scores.

    Rounds of proposals: each unassigned row proposes to its best column that still has room; a
    column keeps its best proposals up to its room and turns the rest away. A round either
    fills a column or places every proposer, so at most ``E + 1`` rounds run.

    Args:
        scores_IE: affinity of each row (neuron) to each column (expert).
        capacity: rows per column; ``capacity * E`` must equal ``I``.

    Returns:
        ``[I]`` the column of each row.
    """
    num_rows, num_columns = scores_IE.shape
    if capacity * num_columns != num_rows:
        raise ValueError(f"capacity {capacity} x {num_columns} columns must equal the {num_rows} rows.")
    assignment_I = torch.full((num_rows,), -1, dtype=torch.long)
    room_E = torch.full((num_columns,), capacity, dtype=torch.long)
    while (pending_P := (assignment_I < 0).nonzero().squeeze(1)).numel():
        scores_PE = scores_IE[pending_P].masked_fill(room_E == 0, float("-inf"))
        best_P, choice_P = scores_PE.max(dim=1)
        # Group the proposals by column, best first within a column (two stable sorts).
        order = torch.argsort(best_P, descending=True, stable=True)
        order = order[torch.argsort(choice_P[order], stable=True)]
        column = choice_P[order]
        proposals_E = torch.bincount(column, minlength=num_columns)
        rank = torch.arange(len(order)) - (torch.cumsum(proposals_E, 0) - proposals_E)[column]
        accepted = rank < room_E[column]
        assignment_I[pending_P[order[accepted]]] = column[accepted]
        room_E -= torch.bincount(column[accepted], minlength=num_columns)
    return assignment_I


def clustered_partition(
    features_IF: torch.Tensor, num_experts: int, generator: torch.Generator, *, iterations: int = 30
) -> torch.Tensor:
    """Balanced spherical k-means of the rows of ``features_IF`` into ``num_experts`` equal groups.

    Starts from ``num_experts`` rows drawn with ``generator``; each iteration assigns rows to the
    centroids by cosine similarity under the equal-size constraint (:func:`balanced_assignment`)
    and moves each centroid to the normalised mean of its rows, until the assignment repeats.

    Args:
        features_IF: one feature vector per neuron.
        num_experts: groups ``E``; must divide ``I``.
        generator: seeds the starting centroids.
        iterations: at most this many assignment rounds.

    Returns:
        ``[E, M]`` neuron indices, each row sorted.
    """
    width = features_IF.shape[0]
    capacity = width // num_experts
    unit_IF = F.normalize(features_IF.float(), dim=1)
    centroids_EF = unit_IF[torch.randperm(width, generator=generator)[:num_experts]]
    assignment_I = None
    for _ in range(iterations):
        updated_I = balanced_assignment(unit_IF @ centroids_EF.T, capacity)
        if assignment_I is not None and torch.equal(updated_I, assignment_I):
            break
        assignment_I = updated_I
        sums_EF = torch.zeros_like(centroids_EF).index_add_(0, assignment_I, unit_IF)
        centroids_EF = F.normalize(sums_EF, dim=1)
    # Each expert's neurons in increasing order (argsort by (expert, neuron)).
    return torch.argsort(assignment_I * width + torch.arange(width)).view(num_experts, capacity)


def neuron_features(gate_proj_ID: torch.Tensor, up_proj_ID: torch.Tensor) -> torch.Tensor:
    """``[I, 2D]``: each neuron's unit-length ``gate_proj`` row next to its unit-length ``up_proj`` row."""
    return torch.cat([F.normalize(gate_proj_ID.float(), dim=1), F.normalize(up_proj_ID.float(), dim=1)], dim=1)
