"""The ``[edp, ep]`` grid of expert parallelism and its process groups.

World ranks are laid out row-major on an ``[edp, ep]`` grid: rank ``g`` has EP rank ``g % ep`` and
expert-data-parallel (EDP) rank ``g // ep``. EP groups (rows) are consecutive ranks, so that an EP
group stays inside one node when it fits and the all-to-all runs on the fast links; EDP groups
(columns) hold replicas of the same expert shards, and expert gradients are reduced over them.

Example, world 4 with ``expert_parallel_size=2``: EP groups ``{0, 1}``, ``{2, 3}``; EDP groups
``{0, 2}``, ``{1, 3}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist


def check_layout(world_size: int, expert_parallel_size: int) -> None:
    """Raise a ``ValueError`` naming the fix when ``expert_parallel_size`` does not fit ``world_size``."""
    if not isinstance(expert_parallel_size, int) or expert_parallel_size < 1:
        raise ValueError(
            f"`expert_parallel_size` must be a positive integer, got {expert_parallel_size!r}. Use 1 for no "
            f"expert parallelism."
        )
    if world_size % expert_parallel_size:
        raise ValueError(
            f"The world size {world_size} is not divisible by expert_parallel_size={expert_parallel_size}. "
            f"Use an `expert_parallel_size` that divides the number of processes (devices x nodes), or change "
            f"the number of devices."
        )


@dataclass
class ExpertParallelMesh:
    """This process's coordinates on the ``[edp, ep]`` grid and its two process groups.

    Attributes:
        ep_rank: rank inside the EP group (which expert shard this process holds).
        ep_size: processes per EP group.
        edp_rank: rank inside the EDP group (which replica of the shard).
        edp_size: replicas of each shard, ``world_size / ep_size``.
        ep_group: process group of this process's EP row.
        edp_group: process group of this process's EDP column.
    """

    ep_rank: int
    ep_size: int
    edp_rank: int
    edp_size: int
    ep_group: dist.ProcessGroup
    edp_group: dist.ProcessGroup

    def global_rank(self, ep_rank: int) -> int:
        """The global rank of EP rank ``ep_rank`` in this process's EP group."""
        return self.edp_rank * self.ep_size + ep_rank


#: The mesh of each EP size, built once per process and default group: process groups live as long
#: as the default group, so every fit, validate or test (and a save after fit) reuses them instead
#: of creating new ones each time.
_MESHES: dict[int, tuple[dist.ProcessGroup, ExpertParallelMesh]] = {}


def expert_parallel_mesh(expert_parallel_size: int, *, timeout: timedelta | None = None) -> ExpertParallelMesh:
    """The ``[edp, ep]`` mesh of ``expert_parallel_size`` over the current default group, built on first
    use (a collective: every rank calls it, in the same order) and reused afterwards."""
    world = dist.group.WORLD
    cached = _MESHES.get(expert_parallel_size)
    if cached is not None and cached[0] is world:
        return cached[1]
    mesh = build_expert_parallel_mesh(expert_parallel_size, timeout=timeout)
    _MESHES[expert_parallel_size] = (world, mesh)
    return mesh


def build_expert_parallel_mesh(expert_parallel_size: int, *, timeout: timedelta | None = None) -> ExpertParallelMesh:
    """Create the EP and EDP groups over the default process group (a collective: every rank calls it)."""
    world_size, rank = dist.get_world_size(), dist.get_rank()
    check_layout(world_size, expert_parallel_size)
    ep_size = expert_parallel_size
    edp_size = world_size // ep_size
    rows = [[row * ep_size + column for column in range(ep_size)] for row in range(edp_size)]
    columns = [[row * ep_size + column for row in range(edp_size)] for column in range(ep_size)]
    # Every rank creates every group, in the same order (new_group is collective over the world).
    ep_group, _ = dist.new_subgroups_by_enumeration(rows, timeout=timeout)
    edp_group, _ = dist.new_subgroups_by_enumeration(columns, timeout=timeout)
    return ExpertParallelMesh(
        ep_rank=rank % ep_size,
        ep_size=ep_size,
        edp_rank=rank // ep_size,
        edp_size=edp_size,
        ep_group=ep_group,
        edp_group=edp_group,
    )
