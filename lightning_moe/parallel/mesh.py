"""The 2-D device mesh ``("edp", "ep")`` of expert parallelism.

World ranks are laid out row-major on an ``[edp, ep]`` grid: rank ``g`` has EP rank ``g % ep`` and
expert-data-parallel (EDP) rank ``g // ep``. EP groups (rows) are consecutive ranks, so that an EP
group stays inside one node when it fits and the all-to-all runs on the fast links; EDP groups
(columns) hold replicas of the same expert shards, and expert gradients are reduced over them.

Example, world 4 with ``expert_parallel_size=2``: EP groups ``{0, 1}``, ``{2, 3}``; EDP groups
``{0, 2}``, ``{1, 3}``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


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
    """The mesh and this process's coordinates on it.

    Attributes:
        mesh: the ``DeviceMesh`` with dims ``("edp", "ep")``.
        ep_rank: rank inside the EP group (which expert shard this process holds).
        ep_size: processes per EP group.
        edp_rank: rank inside the EDP group (which replica of the shard).
        edp_size: replicas of each shard, ``world_size / ep_size``.
        ep_group: process group of this process's EP row.
        edp_group: process group of this process's EDP column.
    """

    mesh: DeviceMesh
    ep_rank: int
    ep_size: int
    edp_rank: int
    edp_size: int
    ep_group: dist.ProcessGroup
    edp_group: dist.ProcessGroup


def build_expert_parallel_mesh(device_type: str, expert_parallel_size: int) -> ExpertParallelMesh:
    """Build the ``("edp", "ep")`` mesh over the default process group (a collective call)."""
    world_size = dist.get_world_size()
    check_layout(world_size, expert_parallel_size)
    edp_size = world_size // expert_parallel_size
    mesh = init_device_mesh(device_type, (edp_size, expert_parallel_size), mesh_dim_names=("edp", "ep"))
    rank = dist.get_rank()
    return ExpertParallelMesh(
        mesh=mesh,
        ep_rank=rank % expert_parallel_size,
        ep_size=expert_parallel_size,
        edp_rank=rank // expert_parallel_size,
        edp_size=edp_size,
        ep_group=mesh.get_group("ep"),
        edp_group=mesh.get_group("edp"),
    )
