"""The slot table of one MoE layer: which logical expert each physical slot holds, replicas, and
how each rank splits its tokens over an expert's replicas.

The gate speaks *logical* expert ids ``0 .. E-1``. Each of the ``R`` expert-parallel ranks holds
``S`` *slots* (``S >= E / R``; the slots beyond ``E / R`` are spare); each slot holds one logical
expert, every expert is in at least one slot, and the replicas of an expert sit on distinct ranks.
Every replica holds the same weights (and optimizer state), so a token may go to any of them:
``routing_fractions_RER[r, e, d]`` is the share of source rank ``r``'s assignments to expert ``e``
that go to rank ``d`` (each row sums to 1, and is 0 where ``d`` does not hold ``e``; by default the
share is even). Every rank holds the same table, so every rank can compute where any assignment
goes without asking; expert migration replaces the table and moves the weights
(:mod:`lightning_moe.parallel.migration`), nothing else in the model changes.

Shape legend: ``E`` logical experts, ``R`` expert-parallel ranks, ``S`` slots per rank, ``P``
physical positions ``rank * S + slot``.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch

#: The prices of one assignment (computed, sent to a rank of the same node, sent to another node) of
#: a table that sets none: compute, and a transfer at a millionth of it. Splits of the same compute
#: (a fit and its local twin in per-step replica balancing, :mod:`lightning_moe.parallel.replica_balance`)
#: would otherwise tie up to rounding; the transfers break the tie towards fewer assignments on the
#: busiest link, and move no other choice by more than a millionth of the step.
DEFAULT_ASSIGNMENT_SECONDS = (1.0, 1e-6, 1e-6)


class ExpertPlacement:
    """The slot table of one MoE layer, identical on every rank.

    Args:
        experts_per_rank: for each of the ``R`` EP ranks, the logical expert of each of its ``S``
            slots, e.g. ``[[0, 1, 2], [2, 3, 0]]`` (experts 0 and 2 have a replica on each rank).
        routing_fractions_RER: ``[R, E, R]``: the share of source rank ``r``'s assignments to expert
            ``e`` sent to rank ``d``; ``None`` splits evenly over the replicas.
        load_share_R: ``[R]``, the share of the EP group's assignments each rank is meant to receive
            (the plan's, which may trade a little balance for fewer bytes across nodes); one of the
            fits of per-step replica balancing aims at it (:mod:`~lightning_moe.parallel.replica_balance`).
            ``None`` gives every rank an even share.
        assignment_seconds: ``[3]``, the seconds one assignment costs when computed, when sent to a
            rank of the same node and when sent to another node (over the step's all-to-alls), the
            prices per-step replica balancing weighs its candidates with. ``None``:
            :data:`DEFAULT_ASSIGNMENT_SECONDS` (compute; transfers only break ties).
    """

    def __init__(
        self,
        experts_per_rank: Sequence[Sequence[int]],
        routing_fractions_RER: torch.Tensor | None = None,
        load_share_R: torch.Tensor | None = None,
        assignment_seconds: torch.Tensor | None = None,
    ) -> None:
        try:  # integers only: int() would take 2.5 as expert 2
            table = [[operator.index(e) for e in experts] for experts in experts_per_rank]
        except TypeError as error:
            raise ValueError(f"ExpertPlacement: {experts_per_rank} must hold integer expert ids ({error}).") from None
        num_ranks = len(table)
        if num_ranks == 0 or any(len(experts) != len(table[0]) for experts in table) or not table[0]:
            raise ValueError(
                f"ExpertPlacement: {experts_per_rank} must give every EP rank the same, non-zero number of slots."
            )
        slots = len(table[0])
        flat = [e for experts in table for e in experts]
        num_experts = max(flat) + 1 if flat and min(flat) >= 0 else 0
        # Ids in [0, max] name every expert 0..max when there are max + 1 distinct ones.
        if min(flat) < 0 or len(set(flat)) != num_experts:
            named = f"0..{num_experts - 1}" if num_experts else "from 0 up"
            raise ValueError(
                f"ExpertPlacement: {experts_per_rank} must name every logical expert {named} at least once, and "
                f"nothing else."
            )
        for rank, experts in enumerate(table):
            if len(set(experts)) != len(experts):
                raise ValueError(
                    f"ExpertPlacement: rank {rank} holds {experts}, an expert twice. Replicas of an expert must sit "
                    f"on distinct ranks (a second copy on the same rank would add no capacity)."
                )
        self.num_experts, self.ep_size, self.slots_per_rank = num_experts, num_ranks, slots
        self.expert_of_slot_RS = torch.tensor(table, dtype=torch.long)
        holders_RE = torch.zeros(num_ranks, num_experts, dtype=torch.bool)
        holders_RE[torch.arange(num_ranks).repeat_interleave(slots), self.expert_of_slot_RS.reshape(-1)] = True
        self.holders_RE = holders_RE
        #: Slot of expert ``e`` on rank ``d``, or -1 where ``d`` does not hold ``e``.
        self.slot_of_expert_ER = torch.full((num_experts, num_ranks), -1, dtype=torch.long)
        ranks_RS = torch.arange(num_ranks).unsqueeze(1).expand(num_ranks, slots)
        self.slot_of_expert_ER[self.expert_of_slot_RS, ranks_RS] = torch.arange(slots).expand(num_ranks, slots)
        self.replicas_E = holders_RE.sum(dim=0)
        #: Whether some expert has several holders (a plain bool: the dispatcher asks at every step).
        self.has_replicas = bool((self.replicas_E > 1).any())
        self._on_device: dict[tuple, object] = {}  # tables copied to a device, once each (on_device)
        #: The rank whose checkpoint file stores each expert: its first holder, so each is stored once.
        self.file_rank_E = holders_RE.int().argmax(dim=0)
        self.routing_fractions_RER = self._fractions(routing_fractions_RER)
        self.load_share_R = self._load_share(load_share_R)
        self.assignment_seconds = self._assignment_seconds(assignment_seconds)
        # Cumulative fractions over destination ranks, for the replica choice of the dispatcher.
        self.cumulative_fractions_RER = self.routing_fractions_RER.cumsum(dim=-1).float()
        self.cumulative_fractions_RER[..., -1] = 1.0  # no assignment may fall past the last replica

    def _fractions(self, routing_fractions_RER: torch.Tensor | None) -> torch.Tensor:
        even_ER = self.holders_RE.t().double() / self.replicas_E.double().unsqueeze(1)
        if routing_fractions_RER is None:
            return even_ER.unsqueeze(0).expand(self.ep_size, -1, -1).contiguous()
        fractions = torch.as_tensor(routing_fractions_RER, dtype=torch.float64)
        expected = (self.ep_size, self.num_experts, self.ep_size)
        if tuple(fractions.shape) != expected:
            raise ValueError(
                f"ExpertPlacement: `routing_fractions_RER` must have shape [R_src, E, R_dst] = {list(expected)}, got "
                f"{list(fractions.shape)}."
            )
        if (fractions < 0).any() or not torch.isfinite(fractions).all():
            raise ValueError("ExpertPlacement: `routing_fractions_RER` must be finite and non-negative.")
        if (fractions * ~self.holders_RE.t().unsqueeze(0)).abs().max() > 0:
            raise ValueError(
                "ExpertPlacement: `routing_fractions_RER` sends tokens of an expert to a rank that does not hold it. "
                "Give a non-zero share only to ranks whose slots hold the expert."
            )
        if not torch.allclose(fractions.sum(dim=-1), torch.ones(self.ep_size, self.num_experts, dtype=torch.float64),
                              atol=1e-6):
            raise ValueError(
                "ExpertPlacement: every row of `routing_fractions_RER` (a source rank and an expert) must sum to 1."
            )
        return fractions / fractions.sum(dim=-1, keepdim=True)

    def _load_share(self, load_share_R: torch.Tensor | None) -> torch.Tensor:
        if load_share_R is None:
            return torch.full((self.ep_size,), 1.0 / self.ep_size, dtype=torch.float64)
        share = _checked_weights(
            load_share_R, self.ep_size, "load_share_R",
            f"{self.ep_size} finite, non-negative shares with a positive sum (one per EP rank)",
        )
        return share / share.sum()

    @staticmethod
    def _assignment_seconds(assignment_seconds: torch.Tensor | None) -> torch.Tensor:
        if assignment_seconds is None:
            return torch.tensor(DEFAULT_ASSIGNMENT_SECONDS, dtype=torch.float64)
        return _checked_weights(
            assignment_seconds, 3, "assignment_seconds",
            "3 finite, non-negative prices with a positive sum (computing one assignment, sending it within a "
            "node, sending it across nodes)",
        )

    # ----------------------------------------------------------------------------------- constructors

    @classmethod
    def identity(cls, num_experts: int, ep_size: int, spare_slots: int = 0) -> ExpertPlacement:
        """Logical expert ``e`` on rank ``e // L``, slot ``e % L`` (``L = E / R``), then ``spare_slots``
        replicas per rank: rank ``r``'s ``j``-th spare slot holds expert ``(r + 1) * L + j`` (mod ``E``),
        the experts that follow its own block, so that every rank gets other experts' replicas and the
        replicas spread evenly over the experts. Even split over replicas."""
        if ep_size < 1 or num_experts % ep_size:
            raise ValueError(
                f"ExpertPlacement: num_experts={num_experts} is not divisible by expert_parallel_size={ep_size}. "
                f"Choose an `expert_parallel_size` that divides the number of experts."
            )
        local = num_experts // ep_size
        if spare_slots < 0 or local + spare_slots > num_experts:
            raise ValueError(
                f"ExpertPlacement: spare_expert_slots={spare_slots} does not fit: each of the {ep_size} ranks holds "
                f"{local} experts and at most {num_experts - local} replicas of the others. Use a value between 0 "
                f"and {num_experts - local}."
            )
        table = [
            [r * local + s for s in range(local)] + [((r + 1) * local + j) % num_experts for j in range(spare_slots)]
            for r in range(ep_size)
        ]
        return cls(table)

    @classmethod
    def from_experts_per_rank(
        cls,
        experts_per_rank: Sequence[Sequence[int]],
        routing_fractions_RER: torch.Tensor | None = None,
        load_share_R: torch.Tensor | None = None,
        assignment_seconds: torch.Tensor | None = None,
    ) -> ExpertPlacement:
        """A placement from the logical experts of each rank, in slot order."""
        return cls(experts_per_rank, routing_fractions_RER, load_share_R, assignment_seconds)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> ExpertPlacement:
        """The inverse of :meth:`to_dict` (what checkpoints store)."""
        return cls(
            state["experts_per_rank"], state.get("routing_fractions_RER"), state.get("load_share_R"),
            state.get("assignment_seconds"),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and a tensor: ``torch.load(weights_only=True)`` reads it back."""
        return {
            "experts_per_rank": self.experts_per_rank(),
            "routing_fractions_RER": self.routing_fractions_RER.clone(),
            "load_share_R": self.load_share_R.clone(),
            "assignment_seconds": self.assignment_seconds.clone(),
        }

    # ----------------------------------------------------------------------------------- views

    def experts_on_rank(self, ep_rank: int) -> list[int]:
        """The logical experts held by ``ep_rank``, in slot order."""
        return self.expert_of_slot_RS[ep_rank].tolist()

    def experts_per_rank(self) -> list[list[int]]:
        """The logical experts of every rank, in slot order."""
        return self.expert_of_slot_RS.tolist()

    def on_device(self, table: str, device: torch.device) -> torch.Tensor:
        """The table named ``table`` (``"slot_of_expert_ER"``, ``"holders_RE"``, ...) on ``device``,
        copied there once. The tables live on the host; on a GPU every copy from the host waits for
        the kernels queued before it, so the dispatcher and the gradient hooks, which need them at
        every step, take them from here."""
        key = (table, torch.device(device))
        if key not in self._on_device:
            self._on_device[key] = getattr(self, table).to(device)
        return self._on_device[key]

    def replicated_slots(self, ep_rank: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The local slots of ``ep_rank`` whose expert has replicas, each one's row in a buffer with one
        row per replicated expert (in logical order, the same on every rank), and the number of rows:
        what summing a gradient over the replicas needs (:mod:`~lightning_moe.parallel.grad_sync`). On
        ``device``, computed once."""
        key = ("replicated_slots", ep_rank, torch.device(device))
        if key not in self._on_device:
            replicated_X = (self.replicas_E > 1).nonzero().flatten()  # X: replicated experts
            row_of_expert_E = torch.full((self.num_experts,), -1, dtype=torch.long)
            row_of_expert_E[replicated_X] = torch.arange(replicated_X.numel())
            row_of_slot_S = row_of_expert_E[self.expert_of_slot_RS[ep_rank]]
            slots = (row_of_slot_S >= 0).nonzero().flatten()
            self._on_device[key] = (slots.to(device), row_of_slot_S[slots].to(device), replicated_X.numel())
        return self._on_device[key]

    def rank_share_ER(self, source_rank: int) -> torch.Tensor:
        """``[E, R]``: the share of source rank ``source_rank``'s assignments to each expert that each
        rank receives (what device-level balance counts)."""
        return self.routing_fractions_RER[source_rank]

    def same_layout(self, other: ExpertPlacement) -> bool:
        """Whether ``other`` fits the same experts, ranks and slots per rank (so it can replace this one)."""
        return (self.num_experts, self.ep_size, self.slots_per_rank) == (
            other.num_experts, other.ep_size, other.slots_per_rank
        )

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ExpertPlacement)
            and self.experts_per_rank() == other.experts_per_rank()
            and torch.equal(self.routing_fractions_RER, other.routing_fractions_RER)
            and torch.equal(self.load_share_R, other.load_share_R)
            and torch.equal(self.assignment_seconds, other.assignment_seconds)
        )

    def __repr__(self) -> str:
        fractions = "" if not self.has_replicas else ", routing_fractions_RER=..."
        return f"ExpertPlacement(experts_per_rank={self.experts_per_rank()}{fractions})"


def _checked_weights(values: Any, length: int, field: str, expected: str) -> torch.Tensor:
    """``values`` as a float64 vector of ``length`` finite, non-negative numbers with a positive sum, or
    a ``ValueError`` naming ``field`` and what it ``expected``."""
    vector = torch.as_tensor(values, dtype=torch.float64).clone()
    if tuple(vector.shape) != (length,) or (vector < 0).any() or not torch.isfinite(vector).all() or vector.sum() <= 0:
        raise ValueError(f"ExpertPlacement: `{field}` must be {expected}, got {vector.tolist()}.")
    return vector
