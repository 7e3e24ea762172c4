"""Move expert slots between expert-parallel ranks in place, with their optimizer state.

Expert migration replaces an MoE layer's slot table (:class:`~lightning_moe.parallel.placement.ExpertPlacement`)
while training runs. Only the slots whose expert changes move:

1. :func:`plan_slot_moves` compares the old and the new table: a slot that keeps its expert stays; a
   slot that gets expert ``e`` copies it from the same rank if that rank already holds ``e`` in
   another slot, otherwise from a rank that holds ``e`` (the one with the fewest sends so far, so that
   the senders share the work). The plan is a pure function of the two tables: every rank computes
   the same one without talking.
2. :func:`move_slots` sends each moving slot's rows point to point (one ``batch_isend_irecv``): the
   weights of every expert parameter and every per-expert optimizer state tensor (Adam's
   ``exp_avg``, ``exp_avg_sq``; anything whose first dimension is the slot count, see
   :mod:`lightning_moe.parallel.expert_state`). Shared state such as Adam's ``step`` is the same for
   every slot and stays. Received rows wait in buffers until every transfer of the rank completed,
   then are copied into the slots: the extra memory is the size of the slots moved, not of the
   experts. The ``Parameter`` objects and the optimizer state dicts keep their identity, so the
   optimizer, schedulers and DDP are untouched.

Every rank of an EP group takes part; each expert-data-parallel replica of the group moves its own
copies the same way.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lightning_moe.layers.moe import MoELayer
from lightning_moe.parallel.expert_state import per_expert_tensors
from lightning_moe.parallel.mesh import ExpertParallelMesh
from lightning_moe.parallel.placement import ExpertPlacement


@dataclass(frozen=True)
class SlotMove:
    """Slot ``dst_slot`` of EP rank ``dst_rank`` receives logical ``expert`` from slot ``src_slot`` of
    EP rank ``src_rank`` (the same rank for a local copy)."""

    layer: str
    expert: int
    src_rank: int
    src_slot: int
    dst_rank: int
    dst_slot: int


@dataclass
class MigrationReport:
    """What one migration did, seen from this rank.

    Attributes:
        slots_moved: slots whose expert changed, over every layer and EP rank (the same on every rank).
        slots_sent: of those, the slots this rank sent to another rank.
        slots_received: the slots this rank received from another rank.
        local_copies: the slots this rank filled from another of its own slots.
        bytes_sent: bytes this rank sent (weights and optimizer state of the slots it sent).
        bytes_received: bytes this rank received.
        seconds: wall-clock time of the transfer and the copies.
    """

    slots_moved: int = 0
    slots_sent: int = 0
    slots_received: int = 0
    local_copies: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0


def plan_slot_moves(layer: str, old: ExpertPlacement, new: ExpertPlacement) -> list[SlotMove]:
    """The slot copies that turn table ``old`` into table ``new`` (see the module docstring)."""
    if not old.same_layout(new):
        raise ValueError(
            f"MoE layer `{layer}`: the new placement has {new.num_experts} experts over {new.ep_size} ranks x "
            f"{new.slots_per_rank} slots, the current one {old.num_experts} over {old.ep_size} x "
            f"{old.slots_per_rank}. A migration keeps the experts, the ranks and the slots per rank."
        )
    sends = [0] * old.ep_size
    moves = []
    for rank in range(new.ep_size):
        for slot in range(new.slots_per_rank):
            expert = int(new.expert_of_slot_RS[rank, slot])
            if int(old.expert_of_slot_RS[rank, slot]) == expert:
                continue
            if old.holders_RE[rank, expert]:
                source = rank
            else:
                holders = old.holders_RE[:, expert].nonzero().flatten().tolist()
                source = min(holders, key=lambda r: (sends[r], r))
                sends[source] += 1
            moves.append(SlotMove(layer, expert, source, int(old.slot_of_expert_ER[expert, source]), rank, slot))
    return moves


def slot_tensors(layer: MoELayer, optimizers: Sequence[Any]) -> list[torch.Tensor]:
    """Every tensor of ``layer`` whose first dimension is the slot: each expert weight, then its
    per-expert optimizer state in every optimizer that holds it (key order), the same order on every
    rank. What a migration moves."""
    slots = layer.dispatcher.num_local_experts
    tensors = []
    for parameter in layer.experts.parameters(recurse=False):
        tensors.append(parameter.data)
        for index, optimizer in enumerate(optimizers):
            state = getattr(optimizer, "_optimizer", optimizer).state.get(parameter)
            if state:
                where = f"optimizer {index}, an expert parameter of shape {tuple(parameter.shape)}"
                tensors += [value for _, value in sorted(per_expert_tensors(state, slots, where=where).items())]
    return tensors


def _row_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t[0].numel() * t.element_size() for t in tensors)


@torch.no_grad()
def move_slots(
    moves: Sequence[SlotMove],
    tensors_of_layer: dict[str, Sequence[torch.Tensor]],
    *,
    ep_rank: int,
    global_rank_of: Callable[[int], int],
    ep_group: dist.ProcessGroup | None,
) -> MigrationReport:
    """Carry out ``moves`` on this rank's tensors (a collective over the EP group: every rank calls it
    with the same moves).

    Args:
        moves: from :func:`plan_slot_moves`, in the same order on every rank.
        tensors_of_layer: for each layer, every tensor whose first dimension is the slot: the expert
            weights and the per-expert optimizer state, in the same order on every rank.
        ep_rank: this rank's EP rank.
        global_rank_of: the global rank of an EP rank of this rank's EP group.
        ep_group: the EP process group.
    """
    start = time.perf_counter()
    report = MigrationReport(slots_moved=len(moves))
    operations: list[dist.P2POp] = []
    arriving: list[tuple[SlotMove, list[torch.Tensor]]] = []
    for move in moves:
        tensors = tensors_of_layer[move.layer]
        if move.src_rank == ep_rank and move.dst_rank != ep_rank:
            peer = global_rank_of(move.dst_rank)
            operations += [dist.P2POp(dist.isend, t[move.src_slot], peer, ep_group) for t in tensors]
            report.slots_sent += 1
            report.bytes_sent += _row_bytes(tensors)
        if move.dst_rank != ep_rank:
            continue
        if move.src_rank == ep_rank:
            # A copy: the source slot may itself be overwritten by another move of this migration.
            arriving.append((move, [t[move.src_slot].clone() for t in tensors]))
            report.local_copies += 1
        else:
            buffers = [torch.empty_like(t[move.dst_slot]) for t in tensors]
            operations += [dist.P2POp(dist.irecv, b, global_rank_of(move.src_rank), ep_group) for b in buffers]
            arriving.append((move, buffers))
            report.slots_received += 1
            report.bytes_received += _row_bytes(tensors)
    if moves and ep_group is not None:
        # NCCL: a batch of point-to-point operations that is the group's first collective must involve
        # every rank of the group (torch's `batch_isend_irecv` docs), and a rank with no move calls
        # none. A migration before any forward would be that first one: every rank meets here first.
        dist.barrier(group=ep_group)
    if operations:
        for request in dist.batch_isend_irecv(operations):
            request.wait()
    # Only now, with every send of this rank done, may its slots be overwritten.
    for move, rows in arriving:
        for tensor, row in zip(tensors_of_layer[move.layer], rows):
            tensor[move.dst_slot].copy_(row)
    report.seconds = time.perf_counter() - start
    return report


def migrate_layers(
    module: torch.nn.Module,
    placements: Mapping[str, ExpertPlacement | Sequence[Sequence[int]]],
    *,
    optimizers: Sequence[Any],
    mesh: ExpertParallelMesh,
    all_gather: Callable[[Any], list[Any]],
    on_switch: Callable[[MoELayer], None],
    check_table: Callable[[MoELayer, ExpertPlacement], None] = lambda layer, placement: None,
) -> MigrationReport:
    """Switch the named MoE layers of ``module`` to new tables, moving the changed slots (the body of
    :meth:`~lightning_moe.MoEStrategy.apply_placement`; a collective: every rank calls it).

    The tables are checked (their shape, and ``check_table(layer, placement)``, which raises
    ``ValueError`` for a table the layer cannot route with) and compared across ranks first (one
    all-gather): a bad or differing table raises ``ValueError`` on every rank, before anything
    moves. After the transfer each layer switches to its new table, ``on_switch(layer)`` refreshes
    what derives from it (the gate's device groups), and the layer's expert gradients are dropped
    (consumed by the last step, and in the old slot order).
    """
    layers = {name: layer for name, layer in module.named_modules() if isinstance(layer, MoELayer)}
    new: dict[str, ExpertPlacement] = {}
    problem = None
    for name, table in placements.items():
        current = getattr(layers.get(name), "dispatcher", None)
        if not hasattr(current, "placement"):
            problem = f"MoEStrategy.apply_placement: `{name}` is not a sharded MoE layer of the model ({sorted(layers)})."
            break
        try:  # a table that is bad on one rank only must raise on every rank, not leave them waiting
            placement = table if isinstance(table, ExpertPlacement) else ExpertPlacement(table)
            if placement.same_layout(current.placement):
                check_table(layers[name], placement)
        except Exception as error:  # noqa: BLE001 (whatever it is, every rank must hear of it)
            problem = f"MoEStrategy.apply_placement: the table for `{name}`: {type(error).__name__}: {error}"
            break
        if not placement.same_layout(current.placement):
            problem = (
                f"MoEStrategy.apply_placement: the table for `{name}` has {placement.num_experts} experts over "
                f"{placement.ep_size} ranks x {placement.slots_per_rank} slots; the layer has "
                f"{current.placement.num_experts} over {current.placement.ep_size} x "
                f"{current.placement.slots_per_rank}."
            )
            break
        new[name] = placement
    # The fractions are compared by digest: [R, E, R] per layer would make the all-gather heavy.
    signature = problem or [(name, p.experts_per_rank(), _digest(p)) for name, p in sorted(new.items())]
    gathered = all_gather(signature)
    if any(isinstance(entry, str) for entry in gathered):
        raise ValueError(next(entry for entry in gathered if isinstance(entry, str)))
    if any(entry != gathered[0] for entry in gathered):
        raise ValueError(
            "MoEStrategy.apply_placement was called with different tables on different ranks. Every rank must "
            "pass the same tables (compute them from values that are the same on every rank)."
        )

    # In name order on every rank, as checked: `move_slots` pairs each send with a receive by position.
    new = dict(sorted(new.items()))
    moves, tensors_of_layer = [], {}
    for name, placement in new.items():
        layer_moves = plan_slot_moves(name, layers[name].dispatcher.placement, placement)
        if layer_moves:
            moves += layer_moves
            tensors_of_layer[name] = slot_tensors(layers[name], optimizers)
    report = move_slots(moves, tensors_of_layer, ep_rank=mesh.ep_rank, global_rank_of=mesh.global_rank,
                        ep_group=mesh.ep_group)
    for name, placement in new.items():
        layer = layers[name]
        layer.dispatcher.set_placement(placement)
        on_switch(layer)
        for parameter in layer.experts.parameters(recurse=False):
            parameter.grad = None
    return report


def _digest(placement: ExpertPlacement) -> str:
    """SHA-256 of a table's routing fractions, planned load shares and prices of an assignment."""
    digest = hashlib.sha256(placement.routing_fractions_RER.contiguous().numpy().tobytes())
    digest.update(placement.load_share_R.contiguous().numpy().tobytes())
    digest.update(placement.assignment_seconds.contiguous().numpy().tobytes())
    return digest.hexdigest()
