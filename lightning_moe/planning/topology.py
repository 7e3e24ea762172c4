"""Where the ranks of one expert-parallel group sit, and how fast the links between them are.

An expert-parallel (EP) group has ``R = num_nodes * ranks_per_node`` ranks. EP groups are
consecutive global ranks (``lightning_moe.parallel.mesh``), so EP rank ``r`` sits on node
``r // ranks_per_node`` of the group. Two ranks on one node talk over the intra-node link
(NVLink-class), two ranks on different nodes over the inter-node link (InfiniBand-class, one NIC
per GPU). Bandwidths are bytes per second in one direction, per rank; latencies are seconds.

Shape legend: ``R`` EP ranks of the group.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

# Defaults for a DGX-class H100 node: the rate one GPU reaches in an NVLink all-to-all (well below
# the 450 GB/s peak per direction), and one 400 Gb/s InfiniBand NIC per GPU.
DEFAULT_INTRA_NODE_BANDWIDTH = 160e9
DEFAULT_INTER_NODE_BANDWIDTH = 50e9


@dataclass(frozen=True)
class Topology:
    """The nodes and links of one expert-parallel group.

    Args:
        num_nodes: nodes the EP group spans.
        ranks_per_node: EP ranks on each node (the group has ``num_nodes * ranks_per_node``).
        intra_node_bandwidth: bytes/s one rank sends (or receives) to ranks of its own node.
        inter_node_bandwidth: bytes/s one rank sends (or receives) to ranks of other nodes.
        intra_node_latency: seconds added to a transfer inside a node.
        inter_node_latency: seconds added to a transfer across nodes.
    """

    num_nodes: int
    ranks_per_node: int
    intra_node_bandwidth: float = DEFAULT_INTRA_NODE_BANDWIDTH
    inter_node_bandwidth: float = DEFAULT_INTER_NODE_BANDWIDTH
    intra_node_latency: float = 0.0
    inter_node_latency: float = 0.0

    def __post_init__(self) -> None:
        for name in ("num_nodes", "ranks_per_node"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"Topology: `{name}` must be a positive integer, got {value!r}.")
        for name in ("intra_node_bandwidth", "inter_node_bandwidth"):
            value = getattr(self, name)
            if not np.isfinite(value) or value <= 0:
                raise ValueError(
                    f"Topology: `{name}` must be a positive, finite number of bytes per second, got {value!r} "
                    f"(e.g. 160e9 for NVLink-class, 50e9 for a 400 Gb/s NIC)."
                )
        for name in ("intra_node_latency", "inter_node_latency"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"Topology: `{name}` must be a non-negative number of seconds, got {value!r}.")

    @property
    def num_ranks(self) -> int:
        """EP ranks of the group."""
        return self.num_nodes * self.ranks_per_node

    def node_of_rank(self) -> np.ndarray:
        """The node of each EP rank, ``[R]`` int64."""
        return np.arange(self.num_ranks) // self.ranks_per_node

    def same_node(self) -> np.ndarray:
        """``[R, R]`` bool: whether two EP ranks share a node (the diagonal is True)."""
        node_R = self.node_of_rank()
        return node_R[:, None] == node_R[None, :]

    # ----------------------------------------------------------------------------- constructors

    @classmethod
    def from_trainer(cls, trainer: Any, expert_parallel_size: int, **links: float) -> Topology:
        """The topology of one EP group of a Lightning trainer: ``trainer.num_nodes`` nodes of
        ``trainer.num_devices`` processes each.

        An EP group of ``ep <= devices`` ranks is one node of ``ep`` ranks; a larger one spans
        ``ep / devices`` whole nodes.

        Args:
            trainer: a ``lightning.pytorch.Trainer`` (anything with ``num_nodes`` and ``num_devices``).
            expert_parallel_size: ranks of one EP group.
            **links: bandwidths and latencies (the other fields of :class:`Topology`) to use instead
                of the defaults.
        """
        return cls._from_shape(
            expert_parallel_size,
            devices_per_node=int(trainer.num_devices),
            world_size=int(trainer.num_nodes) * int(trainer.num_devices),
            source="the trainer",
            **links,
        )

    @classmethod
    def from_environment(
        cls, expert_parallel_size: int, environ: Mapping[str, str] | None = None, **links: float
    ) -> Topology:
        """The topology of one EP group from the launcher's variables: ``LOCAL_WORLD_SIZE`` and
        ``WORLD_SIZE`` (torchrun), else ``SLURM_NTASKS_PER_NODE`` and ``SLURM_NTASKS`` (srun).

        Args:
            expert_parallel_size: ranks of one EP group.
            environ: the variables to read (default ``os.environ``).
            **links: bandwidths and latencies to use instead of the defaults.
        """
        environ = os.environ if environ is None else environ
        for local_name, world_name in (("LOCAL_WORLD_SIZE", "WORLD_SIZE"), ("SLURM_NTASKS_PER_NODE", "SLURM_NTASKS")):
            if local_name in environ and world_name in environ:
                try:
                    devices, world = int(environ[local_name]), int(environ[world_name])
                except ValueError:
                    raise ValueError(
                        f"Topology.from_environment: {local_name}={environ[local_name]!r} and "
                        f"{world_name}={environ[world_name]!r} must be integers."
                    ) from None
                return cls._from_shape(
                    expert_parallel_size, devices_per_node=devices, world_size=world, source=f"{local_name}/{world_name}", **links
                )
        raise ValueError(
            "Topology.from_environment: found neither LOCAL_WORLD_SIZE and WORLD_SIZE (torchrun) nor "
            "SLURM_NTASKS_PER_NODE and SLURM_NTASKS (srun). Build the Topology yourself or use Topology.from_trainer."
        )

    @classmethod
    def _from_shape(
        cls, expert_parallel_size: int, *, devices_per_node: int, world_size: int, source: str, **links: float
    ) -> Topology:
        ep = expert_parallel_size
        if devices_per_node < 1 or world_size < devices_per_node or world_size % devices_per_node:
            raise ValueError(
                f"Topology: {source} reports {devices_per_node} processes per node and a world of {world_size}; "
                f"the world must be a whole number of nodes."
            )
        if isinstance(ep, bool) or not isinstance(ep, (int, np.integer)) or ep < 1 or world_size % ep:
            raise ValueError(
                f"Topology: expert_parallel_size={ep!r} must be a positive divisor of the world size {world_size}."
            )
        if ep <= devices_per_node:
            if devices_per_node % ep:
                raise ValueError(
                    f"Topology: an EP group of {ep} ranks would straddle nodes of {devices_per_node} processes "
                    f"(EP groups are consecutive ranks). Use an expert_parallel_size that divides {devices_per_node}."
                )
            return cls(num_nodes=1, ranks_per_node=ep, **links)
        if ep % devices_per_node:
            raise ValueError(
                f"Topology: an EP group of {ep} ranks does not cover whole nodes of {devices_per_node} processes. "
                f"Use an expert_parallel_size that is a multiple of {devices_per_node}."
            )
        return cls(num_nodes=ep // devices_per_node, ranks_per_node=devices_per_node, **links)

    def measure(self, **probe_options: Any) -> Topology:
        """This topology with its bandwidths and latencies measured on the real links (its shape is
        kept; a level it does not have, no second node or one rank per node, keeps its figures).

        A collective: every rank of the process group must call it. See
        :func:`lightning_moe.parallel.link_probe.measure_links` for the options and the method.
        """
        from lightning_moe.parallel.link_probe import measure_links  # collectives live in parallel/

        return dataclasses.replace(self, **measure_links(self.num_nodes, self.ranks_per_node, **probe_options))
