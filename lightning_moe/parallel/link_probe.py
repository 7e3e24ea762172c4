"""Measure the links of an expert-parallel group with timed transfers (behind
:meth:`lightning_moe.Topology.measure`).

Method: EP rank 0 of the first EP group ping-pongs a message with EP rank 1 (same node) and with EP
rank ``ranks_per_node`` (the first rank of the next node): it sends ``message_bytes``, the peer
sends them back, and half the round trip is one one-way transfer. The same with an 8-byte message
gives the latency; the bandwidth is ``message_bytes / (one_way_time - latency)``. Each figure is the
median of ``repetitions`` round trips after one warm-up. EP rank 0 then broadcasts the figures so
every rank returns the same figures (plans computed from them stay identical on every rank).

Only the group's shape comes in and only numbers go out, so this module, which holds the
collectives, needs nothing from :mod:`lightning_moe.planning`.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

_LATENCY_BYTES = 8


def measure_links(
    num_nodes: int,
    ranks_per_node: int,
    *,
    group: dist.ProcessGroup | None = None,
    message_bytes: int = 1 << 26,
    repetitions: int = 5,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Time point-to-point transfers inside a node and across nodes.

    A collective: every rank of ``group`` must call it (ranks outside the probed pairs only wait
    for the result).

    Returns:
        The measured figures, as :class:`~lightning_moe.planning.topology.Topology` fields:
        ``intra_node_bandwidth`` and ``intra_node_latency`` when a node holds two ranks or more,
        ``inter_node_bandwidth`` and ``inter_node_latency`` when the group spans two nodes or more
        (a level the group does not have is not measured, and not returned).

    Args:
        num_nodes: nodes the EP group spans.
        ranks_per_node: EP ranks on each node.
        group: the process group whose first ``num_nodes * ranks_per_node`` ranks form the EP group
            to probe (default: the world).
        message_bytes: bytes of the bandwidth message (64 MiB by default; a few MiB is enough on CPU).
        repetitions: timed round trips per figure; the median is taken.
        device: where the messages live (default: the current CUDA device under NCCL, else CPU).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("Topology.measure: torch.distributed is not initialized; call it inside a running job.")
    check_probe_options("Topology.measure", message_bytes=message_bytes, repetitions=repetitions)
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    if len(ranks) < num_nodes * ranks_per_node:
        raise ValueError(
            f"Topology.measure: the process group has {len(ranks)} ranks, fewer than the {num_nodes * ranks_per_node} "
            f"of the topology ({num_nodes} nodes x {ranks_per_node})."
        )
    if device is None:
        on_nccl = dist.get_backend(group) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if on_nccl else torch.device("cpu")
    device = torch.device(device)
    me = dist.get_rank()

    levels = probed_levels(num_nodes, ranks_per_node)
    # Bandwidth and latency of each level, in the order of `levels` (a fixed size, so that a group
    # with no level still broadcasts something); every rank returns what EP rank 0 measured.
    figures = torch.zeros(4, dtype=torch.float64, device=device)
    for index, level in enumerate(levels):
        # EP rank 0 with EP rank 1 (its node) or with EP rank `ranks_per_node` (the next node).
        first, peer = ranks[0], ranks[1] if level == "intra_node" else ranks[ranks_per_node]
        latency = _one_way_seconds(first, peer, me, _LATENCY_BYTES, repetitions, device, group)
        one_way = _one_way_seconds(first, peer, me, message_bytes, repetitions, device, group)
        if me == first:
            # The message's transfer time is its one-way time less the latency; timing noise can make
            # that difference vanish (a small message, one repetition), and a link would look almost
            # free. At least half the one-way time is counted as transfer: a bound, not a blow-up.
            figures[2 * index] = message_bytes / max(one_way - latency, 0.5 * one_way, 1e-9)
            figures[2 * index + 1] = latency
    dist.broadcast(figures, src=ranks[0], group=group)
    values = figures.tolist()
    return {
        f"{level}_{figure}": values[2 * index + offset]
        for index, level in enumerate(levels) for offset, figure in enumerate(("bandwidth", "latency"))
    }


def probed_levels(num_nodes: int, ranks_per_node: int) -> tuple[str, ...]:
    """The levels of link a group of this shape has, which :func:`measure_links` measures:
    ``"intra_node"`` with two ranks or more on a node, ``"inter_node"`` with two nodes or more."""
    return tuple(level for level, present in (("intra_node", ranks_per_node > 1), ("inter_node", num_nodes > 1)) if present)


def check_probe_options(where: str, **options: object) -> None:
    """Fail, naming ``where``, unless ``options`` are integer ``message_bytes`` (at least 1024) and
    ``repetitions`` (at least 1), either of them left out. Local; no collective: a caller checks
    its options before training starts."""
    lowest = {"message_bytes": 1024, "repetitions": 1}
    for name, value in options.items():
        if name not in lowest:
            raise ValueError(f"{where}: unknown link probe option `{name}`; the options are `message_bytes` and `repetitions`.")
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest[name]:
            raise ValueError(f"{where}: `{name}` must be an integer >= {lowest[name]}, got {value!r}.")


def _one_way_seconds(
    first: int, peer: int, me: int, num_bytes: int, repetitions: int, device: torch.device, group
) -> float:
    """Median half round trip of ``num_bytes`` between global ranks ``first`` and ``peer``; every rank
    of the group enters the barriers, only the two ends transfer (others return 0)."""
    buffer = torch.zeros(max(num_bytes // 4, 1), dtype=torch.float32, device=device)
    samples = []
    for repetition in range(repetitions + 1):
        dist.barrier(group=group)
        if me not in (first, peer):
            continue
        _synchronize(device)
        start = time.perf_counter()
        if me == first:
            dist.send(buffer, dst=peer, group=group)
            dist.recv(buffer, src=peer, group=group)
        else:
            dist.recv(buffer, src=first, group=group)
            dist.send(buffer, dst=first, group=group)
        _synchronize(device)
        if repetition > 0:  # the first round trip warms up the connection
            samples.append((time.perf_counter() - start) / 2)
    dist.barrier(group=group)
    return statistics.median(samples) if samples else 0.0


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
