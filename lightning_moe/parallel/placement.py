"""The placement table: which expert-parallel rank, and which local slot on it, holds each logical expert.

The gate speaks *logical* expert ids ``0 .. E-1``; the placement maps them to *physical* positions
``(ep rank, slot)``. Every rank holds the same table, so every rank can compute where any assignment
goes without asking. The identity placement puts logical expert ``e`` on rank ``e // L``, slot
``e % L`` (``L = E / ep_size`` slots per rank); any other table is valid as long as each rank has
exactly ``L`` experts, one per slot. Expert migration changes the table (and moves the weights with
``copy_``); nothing else in the model changes.

Shape legend: ``E`` logical experts, ``R`` expert-parallel ranks (``ep_size``), ``L`` local slots per
rank, ``P`` physical positions ``rank * L + slot`` (``P == E``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class ExpertPlacement:
    """Logical expert id -> (expert-parallel rank, local slot), identical on every rank.

    Args:
        rank_of_expert: for each logical expert, the EP rank that holds it.
        slot_of_expert: for each logical expert, its slot on that rank (``0 .. L-1``).
        ep_size: number of expert-parallel ranks.
    """

    def __init__(self, *, rank_of_expert: Sequence[int], slot_of_expert: Sequence[int], ep_size: int) -> None:
        num_experts = len(rank_of_expert)
        if len(slot_of_expert) != num_experts:
            raise ValueError(
                f"ExpertPlacement: `slot_of_expert` has {len(slot_of_expert)} entries but `rank_of_expert` has "
                f"{num_experts}. Give one rank and one slot per logical expert."
            )
        if ep_size < 1 or num_experts % ep_size:
            raise ValueError(
                f"ExpertPlacement: {num_experts} experts cannot be spread evenly over ep_size={ep_size} ranks. "
                f"Use an `ep_size` that divides the number of experts."
            )
        slots_per_rank = num_experts // ep_size
        taken = {(int(r), int(s)) for r, s in zip(rank_of_expert, slot_of_expert)}
        expected = {(r, s) for r in range(ep_size) for s in range(slots_per_rank)}
        if taken != expected:
            raise ValueError(
                f"ExpertPlacement: the table {list(zip(rank_of_expert, slot_of_expert))} must use every "
                f"(rank, slot) with rank < {ep_size} and slot < {slots_per_rank} exactly once."
            )
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.slots_per_rank = slots_per_rank
        self.rank_of_expert_E = torch.tensor([int(r) for r in rank_of_expert], dtype=torch.long)
        self.slot_of_expert_E = torch.tensor([int(s) for s in slot_of_expert], dtype=torch.long)
        # Physical position of each logical expert; sorting assignments by it groups them by
        # destination rank, and by slot inside a rank, which is the order the all-to-all sends.
        self.physical_of_expert_E = self.rank_of_expert_E * slots_per_rank + self.slot_of_expert_E
        self.expert_of_physical_P = torch.empty_like(self.physical_of_expert_E)
        self.expert_of_physical_P[self.physical_of_expert_E] = torch.arange(num_experts)

    @classmethod
    def identity(cls, num_experts: int, ep_size: int) -> ExpertPlacement:
        """Logical expert ``e`` on rank ``e // L``, slot ``e % L``."""
        if ep_size < 1 or num_experts % ep_size:
            raise ValueError(
                f"ExpertPlacement: num_experts={num_experts} is not divisible by expert_parallel_size={ep_size}. "
                f"Choose an `expert_parallel_size` that divides the number of experts."
            )
        slots = num_experts // ep_size
        return cls(
            rank_of_expert=[e // slots for e in range(num_experts)],
            slot_of_expert=[e % slots for e in range(num_experts)],
            ep_size=ep_size,
        )

    @classmethod
    def from_experts_per_rank(cls, experts_per_rank: Sequence[Sequence[int]]) -> ExpertPlacement:
        """A placement from the logical experts of each rank, in slot order: ``[[3, 0], [1, 2]]`` puts
        experts 3 and 0 in slots 0 and 1 of rank 0, experts 1 and 2 on rank 1."""
        ep_size = len(experts_per_rank)
        flat = [int(e) for experts in experts_per_rank for e in experts]
        if sorted(flat) != list(range(len(flat))):
            raise ValueError(
                f"ExpertPlacement: {experts_per_rank} must name every logical expert 0..{len(flat) - 1} exactly once."
            )
        rank_of_expert = [0] * len(flat)
        slot_of_expert = [0] * len(flat)
        for rank, experts in enumerate(experts_per_rank):
            for slot, expert in enumerate(experts):
                rank_of_expert[int(expert)], slot_of_expert[int(expert)] = rank, slot
        return cls(rank_of_expert=rank_of_expert, slot_of_expert=slot_of_expert, ep_size=ep_size)

    def experts_on_rank(self, ep_rank: int) -> list[int]:
        """The logical experts held by ``ep_rank``, in slot order."""
        start = ep_rank * self.slots_per_rank
        return self.expert_of_physical_P[start : start + self.slots_per_rank].tolist()

    def experts_per_rank(self) -> list[list[int]]:
        """The logical experts of every rank, in slot order (the inverse of :meth:`from_experts_per_rank`)."""
        return [self.experts_on_rank(rank) for rank in range(self.ep_size)]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExpertPlacement) and self.experts_per_rank() == other.experts_per_rank()

    def __repr__(self) -> str:
        return f"ExpertPlacement(experts_per_rank={self.experts_per_rank()})"
