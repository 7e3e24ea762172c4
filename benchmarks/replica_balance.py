"""What per-step replica balancing costs: the time to choose one rank's routing fractions for a
step's counts (:class:`~lightning_moe.parallel.replica_balance.ReplicaBalancer`), per MoE layer and step.

For each EP size and expert count, the default table with one spare slot per rank (so ``ep``
experts have a replica), an uneven planned share of load (so both fits run, as after a re-plan of
``ExpertMigration``), Poisson counts around a random skew; the fits, their local and (on several
nodes) node-matched twins, the pricing of the candidates and the choice for rank 0's row, timed
over ``--repeats`` calls after a warm-up (the all-reduce of the counts before it is not included).
Prints the median per call, in ms, and the tensor operations one call runs that compute something
(views aside): on a GPU each is a kernel launch, whatever the sizes, so their number is what the
balancer costs there when the tensors are small.

With ``--compile``, the choice is compiled with ``torch.compile`` first (as it is inside a block of
``MoETransformer(compile_blocks=True)``), the compilation not timed; the operations are counted on the
uncompiled choice.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/replica_balance.py
    OMP_NUM_THREADS=1 python benchmarks/replica_balance.py --compile
    python benchmarks/replica_balance.py --device cuda      # where a GPU is lent
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_moe.ops.tensor_operations import TensorOperations
from lightning_moe.parallel.placement import ExpertPlacement
from lightning_moe.parallel.replica_balance import ReplicaBalancer


def time_choice(
    ep_size: int, num_experts: int, repeats: int, device: torch.device, ranks_per_node: int, compiled: bool = False
) -> tuple[float, int]:
    """Median seconds of one choice of rank 0's fractions (two fits, their local and, on several nodes,
    node-matched twins, every candidate priced), and the tensor operations it runs."""
    placement = ExpertPlacement.identity(num_experts, ep_size, spare_slots=1)
    nodes = torch.arange(ep_size) // ranks_per_node
    share_R = torch.linspace(0.9, 1.1, ep_size)  # an uneven plan share: the fit runs twice, as after a re-plan
    prices = torch.tensor([1.0, 0.3, 1.2])
    balancer = ReplicaBalancer(placement.routing_fractions_RER, placement.holders_RE, nodes, share_R, prices).to(device)
    generator = torch.Generator().manual_seed(0)
    skew_E = torch.rand(num_experts, generator=generator) ** 3 * 200 + 1
    counts_RE = torch.poisson(skew_E.expand(ep_size, -1).contiguous(), generator=generator).long().to(device)
    with TensorOperations() as operations:
        balancer.fractions(counts_RE, source_rank=0)
    choose = torch.compile(balancer.fractions) if compiled else balancer.fractions
    choose(counts_RE, source_rank=0)
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        choose(counts_RE, source_rank=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), operations.count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="2x8,8x64,16x256,64x256", help="EP size x experts, comma-separated")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--ranks-per-node", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="time the choice compiled with torch.compile")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"Per-step replica balancing on {device} (torch {torch.__version__}, {torch.get_num_threads()} thread(s)): "
          f"one choice of one rank's fractions{', compiled' if args.compile else ''}, median of {args.repeats}\n")
    print("| EP size | experts | nodes | replicated experts | per call (ms) | tensor operations |")
    print("|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes.split(","):
        ep_size, num_experts = (int(v) for v in size.split("x"))
        seconds, operations = time_choice(ep_size, num_experts, args.repeats, device, args.ranks_per_node, args.compile)
        nodes = -(-ep_size // args.ranks_per_node)
        print(f"| {ep_size} | {num_experts} | {nodes} | {min(ep_size, num_experts)} | {seconds * 1e3:.2f} | {operations} |")


if __name__ == "__main__":
    main()
