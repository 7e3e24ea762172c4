"""A placement plan: which logical experts each EP rank holds, and where each source sends its tokens.

The runtime slot table is built from exactly these two fields:

- ``experts_per_rank``: ``R`` lists of ``slots_per_rank`` logical expert ids (every slot filled).
  An expert may appear on several ranks (replicas); each replica is a full copy of its weights.
- ``routing_fractions_RER``: ``[R_src, E, R_dst]`` float64; entry ``[r, e, d]`` is the share of the
  assignments for expert ``e`` made on source rank ``r`` that rank ``d`` computes. Each ``[r, e, :]``
  row sums to 1 and is non-zero only on ranks that hold ``e``.

Plans of the planner never put two replicas of one expert on one rank. The EPLB baseline may (its
packing does not prevent it), so :meth:`PlacementPlan.validate` accepts that only when asked.

Shape legend: ``R`` EP ranks, ``E`` logical experts, ``S`` slots per rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# Rows of the routing fractions must sum to one within this tolerance.
_ROW_SUM_TOLERANCE = 1e-6


@dataclass
class PlacementPlan:
    """Expert slots per EP rank and the routing fractions that go with them.

    Args:
        experts_per_rank: ``R`` lists of ``slots_per_rank`` logical expert ids, in slot order.
        routing_fractions_RER: ``[R, E, R]`` float64 shares of source rank ``r``'s assignments for
            expert ``e`` computed on rank ``d``.
    """

    experts_per_rank: list[list[int]]
    routing_fractions_RER: torch.Tensor

    @property
    def num_ranks(self) -> int:
        return len(self.experts_per_rank)

    @property
    def num_experts(self) -> int:
        return int(self.routing_fractions_RER.shape[1])

    @property
    def slots_per_rank(self) -> int:
        return len(self.experts_per_rank[0]) if self.experts_per_rank else 0

    def slot_counts_ER(self) -> np.ndarray:
        """``[E, R]`` int64: slots holding expert ``e`` on rank ``d`` (0 or 1 in planner plans)."""
        counts_ER = np.zeros((self.num_experts, self.num_ranks), dtype=np.int64)
        for rank, experts in enumerate(self.experts_per_rank):
            np.add.at(counts_ER[:, rank], np.asarray(experts, dtype=np.int64), 1)
        return counts_ER

    def replica_counts(self) -> np.ndarray:
        """``[E]`` int64: slots holding each expert over all ranks."""
        return self.slot_counts_ER().sum(axis=1)

    def validate(self, *, allow_colocated_replicas: bool = False) -> PlacementPlan:
        """Check every convention of the module docstring; raise ``ValueError`` naming the broken one.

        Args:
            allow_colocated_replicas: accept two slots of one expert on one rank (only the EPLB
                baseline produces that).

        Returns:
            The plan itself, so that ``plan = PlacementPlan(...).validate()`` reads naturally.
        """
        fractions = self.routing_fractions_RER
        if not isinstance(fractions, torch.Tensor) or fractions.dtype != torch.float64 or fractions.dim() != 3:
            raise ValueError(
                f"PlacementPlan: routing_fractions_RER must be a float64 tensor [R, E, R], got "
                f"{getattr(fractions, 'dtype', type(fractions))} of shape {tuple(getattr(fractions, 'shape', ()))}."
            )
        num_ranks, num_experts, num_destinations = fractions.shape
        if len(self.experts_per_rank) != num_ranks or num_destinations != num_ranks:
            raise ValueError(
                f"PlacementPlan: experts_per_rank has {len(self.experts_per_rank)} ranks but routing_fractions_RER has "
                f"shape {tuple(fractions.shape)}; both must describe the same R ranks."
            )
        slots = {len(experts) for experts in self.experts_per_rank}
        if len(slots) != 1 or 0 in slots:
            raise ValueError(
                f"PlacementPlan: every rank must fill the same number of slots (at least one), got slot counts "
                f"{[len(experts) for experts in self.experts_per_rank]}."
            )
        for rank, experts in enumerate(self.experts_per_rank):
            for expert in experts:
                if isinstance(expert, bool) or not isinstance(expert, (int, np.integer)) or not 0 <= expert < num_experts:
                    raise ValueError(
                        f"PlacementPlan: rank {rank} holds {expert!r}; expert ids must be integers in [0, {num_experts})."
                    )
            if not allow_colocated_replicas and len(set(experts)) != len(experts):
                raise ValueError(
                    f"PlacementPlan: rank {rank} holds two replicas of one expert ({list(experts)}); put replicas of an "
                    f"expert on distinct ranks."
                )
        counts_ER = self.slot_counts_ER()
        missing = np.flatnonzero(counts_ER.sum(axis=1) == 0)
        if missing.size:
            raise ValueError(
                f"PlacementPlan: experts {missing.tolist()} are held by no rank; every expert needs at least one slot."
            )
        values = fractions.numpy()
        if not np.isfinite(values).all() or (values < 0).any():
            raise ValueError("PlacementPlan: routing_fractions_RER must be finite and non-negative.")
        off_holder = (values > 0) & (counts_ER[None, :, :] == 0)
        if off_holder.any():
            source, expert, rank = np.argwhere(off_holder)[0].tolist()
            raise ValueError(
                f"PlacementPlan: routing_fractions_RER[{source}, {expert}, {rank}] = {values[source, expert, rank]:.3g} "
                f"sends tokens of expert {expert} to rank {rank}, which does not hold it."
            )
        row_sums_RE = values.sum(axis=2)
        bad = np.abs(row_sums_RE - 1.0) > _ROW_SUM_TOLERANCE
        if bad.any():
            source, expert = np.argwhere(bad)[0].tolist()
            raise ValueError(
                f"PlacementPlan: routing_fractions_RER[{source}, {expert}, :] sums to {row_sums_RE[source, expert]:.6f}; "
                f"every row must sum to 1."
            )
        return self

    def same_as(self, other: PlacementPlan, atol: float = 1e-9) -> bool:
        """Whether ``other`` holds the same experts in the same slots and routes the same fractions
        (within ``atol``): moving from one to the other would change nothing."""
        return self.experts_per_rank == other.experts_per_rank and torch.allclose(
            self.routing_fractions_RER, other.routing_fractions_RER, atol=atol
        )

    @classmethod
    def even_split(cls, experts_per_rank: Sequence[Sequence[int]], num_experts: int) -> PlacementPlan:
        """A plan whose sources split each expert's tokens evenly over its slots (two slots of an
        expert on one rank give that rank two shares).

        Args:
            experts_per_rank: ``R`` lists of logical expert ids, one per slot.
            num_experts: ``E``.
        """
        experts_per_rank = [[int(e) for e in experts] for experts in experts_per_rank]
        counts_ER = np.zeros((num_experts, len(experts_per_rank)), dtype=np.float64)
        for rank, experts in enumerate(experts_per_rank):
            for expert in experts:
                if not 0 <= expert < num_experts:
                    raise ValueError(f"PlacementPlan: rank {rank} holds expert {expert}, outside [0, {num_experts}).")
                counts_ER[expert, rank] += 1
        totals_E = counts_ER.sum(axis=1, keepdims=True)
        if (totals_E == 0).any():
            raise ValueError(
                f"PlacementPlan: experts {np.flatnonzero(totals_E[:, 0] == 0).tolist()} are held by no rank; every "
                f"expert needs at least one slot."
            )
        share_ER = counts_ER / totals_E
        fractions_RER = np.broadcast_to(share_ER[None], (len(experts_per_rank), num_experts, len(experts_per_rank)))
        return cls(experts_per_rank, torch.tensor(np.ascontiguousarray(fractions_RER), dtype=torch.float64))

    @classmethod
    def default(cls, num_experts: int, num_ranks: int, slots_per_rank: int) -> PlacementPlan:
        """The static placement: rank ``r`` holds the ``slots_per_rank`` consecutive experts starting
        at ``floor(r * E / R)`` (modulo ``E``), tokens split evenly over replicas.

        When ``R`` divides ``E`` and ``slots_per_rank == E / R`` this is the identity block placement
        (rank ``r`` holds ``r*L .. r*L+L-1``); a spare slot holds the next rank's first expert, so the
        replicas go to every ``L``-th expert; with fewer experts than ranks, consecutive ranks share
        experts.

        Args:
            num_experts: ``E`` logical experts.
            num_ranks: ``R`` EP ranks.
            slots_per_rank: ``S`` slots per rank, with ``R * S >= E`` and ``S <= E``.
        """
        check_shape(num_experts, num_ranks, slots_per_rank, where="PlacementPlan.default")
        experts_per_rank = [
            [(rank * num_experts // num_ranks + slot) % num_experts for slot in range(slots_per_rank)]
            for rank in range(num_ranks)
        ]
        return cls.even_split(experts_per_rank, num_experts)


def check_shape(num_experts: int, num_ranks: int, slots_per_rank: int, *, where: str) -> None:
    """Raise ``ValueError`` unless ``E`` experts fit ``R`` ranks of ``S`` distinct slots."""
    for name, value in (("num_experts", num_experts), ("num_ranks", num_ranks), ("slots_per_rank", slots_per_rank)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{where}: `{name}` must be a positive integer, got {value!r}.")
    if num_ranks * slots_per_rank < num_experts:
        raise ValueError(
            f"{where}: {num_ranks} ranks x {slots_per_rank} slots cannot hold {num_experts} experts; raise "
            f"slots_per_rank to at least {-(-num_experts // num_ranks)}."
        )
    if slots_per_rank > num_experts:
        raise ValueError(
            f"{where}: slots_per_rank={slots_per_rank} exceeds num_experts={num_experts}; a rank would hold two "
            f"replicas of one expert. Use at most {num_experts} slots per rank."
        )
