"""Expert-parallel dispatch: bytes moved per step against the minimum, and step time, at EP 1, 2, 4.

Runs ``--world-size`` CPU processes (gloo) and, for each expert-parallel size, one MoE layer sharded
as :class:`~lightning_moe.MoEStrategy` shards it, timing forward + backward. Bytes are counted from
the routing, summed over ranks, per optimizer step (forward and backward):

- *moved*: what the all-to-alls send off-rank: one hidden vector per distinct (token, remote rank)
  pair (the dispatcher's own count), in dispatch and again in combine, and the gradients back the
  same way in backward; plus the routing metadata: per off-rank assignment an int32 pair index and
  an fp32 gate weight (and the weight's gradient in backward), and the per-step count exchange;
- *minimum*: each token's hidden vector crosses once per *remote rank* it needs (a token whose two
  experts sit on the same remote rank needs one copy, not two), each way, forward and backward.

Usage::

    python benchmarks/ep_dispatch.py --world-size 4 --tokens 2048 --steps 10
    python benchmarks/ep_dispatch.py --world-size 4 --tokens 2048 --steps 10 --load-balance-scope global

Prints a Markdown table (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_moe import MoELayer
from lightning_moe.parallel.mesh import build_expert_parallel_mesh
from lightning_moe.parallel.placement import ExpertPlacement
from lightning_moe.parallel.sharding import shard_layer


def traffic(layer: MoELayer, x_TD: torch.Tensor, placement: ExpertPlacement, ep_rank: int) -> tuple[int, int, int]:
    """Hidden rows and assignments the last dispatch sent off-rank (the layer's record of it), and
    the distinct off-rank (token, rank) pairs of the same routing (the gate is deterministic)."""
    sent = layer.traffic
    moved_rows = int(sent.tokens_sent_per_rank.sum() - sent.tokens_sent_per_rank[ep_rank])
    moved_assignments = int(sent.assignments_sent_per_rank.sum() - sent.assignments_sent_per_rank[ep_rank])
    with torch.no_grad():
        routing = layer.gate(x_TD)
    rank_N = placement.file_rank_E[routing.expert_index_N]  # no replicas: each expert's only holder
    off_rank_N = rank_N != ep_rank
    pairs = torch.unique(routing.token_index_N[off_rank_N] * placement.ep_size + rank_N[off_rank_N])
    assert moved_assignments == int(off_rank_N.sum())
    return moved_rows, moved_assignments, int(pairs.numel())


def run_rank(rank: int, args: argparse.Namespace, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=args.world_size)
    rows = []
    for ep_size in args.ep_sizes:
        mesh = build_expert_parallel_mesh(ep_size)
        torch.manual_seed(0)
        layer = MoELayer(d_model=args.d_model, d_ff=args.d_ff, num_experts=args.num_experts, top_k=args.top_k,
                         gate_kwargs={"load_balance_scope": args.load_balance_scope})
        placement = ExpertPlacement.identity(args.num_experts, ep_size)
        shard_layer(layer, placement=placement, ep_rank=mesh.ep_rank, ep_group=mesh.ep_group)
        generator = torch.Generator().manual_seed(rank)
        x_TD = torch.randn(args.tokens, args.d_model, generator=generator)
        grad_TD = torch.randn(args.tokens, args.d_model, generator=generator)
        times = []
        for step in range(args.warmup + args.steps):
            dist.barrier()
            start = time.perf_counter()
            layer(x_TD.requires_grad_()).backward(grad_TD)
            dist.barrier()
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
        moved_rows, moved_assignments, minimum_rows = traffic(layer, x_TD, placement, mesh.ep_rank)
        totals = torch.tensor([moved_rows, moved_assignments, minimum_rows], dtype=torch.float64)
        dist.all_reduce(totals)
        moved_rows, moved_assignments, minimum_rows = totals.tolist()
        row_bytes = args.d_model * x_TD.element_size()
        # Rows x4: dispatch and combine, each in forward and in backward. Metadata: an int32 pair index
        # and an fp32 weight per assignment forward, the weight's gradient backward, and each rank's
        # [ep, L + 1] int64 counts to the other ranks of its EP group.
        slots = args.num_experts // ep_size
        counts_bytes = args.world_size * (ep_size - 1) * (slots + 1) * 8
        moved = 4 * moved_rows * row_bytes + moved_assignments * (4 + 4 + 4) + counts_bytes
        minimum = 4 * minimum_rows * row_bytes
        rows.append((ep_size, moved, minimum, sorted(times)[len(times) // 2]))
    if rank == 0:
        results["rows"] = rows
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--ep-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank per step")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=512)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--load-balance-scope", choices=["local", "global"], default="local",
                        help="global: the gate's load-balancing loss counts over every rank (one more all-reduce)")
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(run_rank, args=(args, port, results), nprocs=args.world_size, join=True)
    print(
        f"world {args.world_size}, {args.tokens} tokens/rank, d_model {args.d_model}, d_ff {args.d_ff}, "
        f"{args.num_experts} experts, top-{args.top_k}, load-balancing loss {args.load_balance_scope}, fp32, gloo on CPU\n"
    )
    print("| EP | moved per step (MiB) | minimum (MiB) | moved / minimum | step time fwd+bwd (ms) |")
    print("|---:|---:|---:|---:|---:|")
    for ep_size, moved, minimum, seconds in results["rows"]:
        ratio = f"{moved / minimum:.2f}" if minimum else "-"
        print(f"| {ep_size} | {moved / 2**20:.2f} | {minimum / 2**20:.2f} | {ratio} | {seconds * 1e3:.1f} |")


if __name__ == "__main__":
    main()
