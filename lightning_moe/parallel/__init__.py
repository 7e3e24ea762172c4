"""Expert parallelism: the device mesh, the placement table, all-to-all dispatch, sharding and
gradient reduction. Every collective of lightning_moe lives here or in the strategy."""

from lightning_moe.parallel.dispatch import AllToAllDispatcher
from lightning_moe.parallel.mesh import ExpertParallelMesh, build_expert_parallel_mesh
from lightning_moe.parallel.placement import ExpertPlacement

__all__ = ["AllToAllDispatcher", "ExpertParallelMesh", "ExpertPlacement", "build_expert_parallel_mesh"]
