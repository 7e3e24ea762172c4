"""Expert migration: time and bytes to move k expert slots, with their Adam state, between EP ranks.

Runs ``--world-size`` CPU processes (gloo), one MoE layer sharded over all of them (EP = world size)
with AdamW state, and moves slots exactly as ``MoEStrategy.apply_placement`` does
(:mod:`lightning_moe.parallel.migration`): ``k`` columns of slots rotate one rank along, so every rank
sends ``k`` slots and receives ``k``, then rotate back; each direction is one timed migration. Bytes
are counted by the migration code itself (weights and every per-expert optimizer state tensor of
the slots that changed) and checked against the slot size.

Usage::

    python benchmarks/migration_cost.py --world-size 2
    python benchmarks/migration_cost.py --world-size 4

Prints a Markdown table (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_moe import MoELayer
from lightning_moe.parallel.mesh import build_expert_parallel_mesh
from lightning_moe.parallel.migration import move_slots, plan_slot_moves, slot_tensors
from lightning_moe.parallel.placement import ExpertPlacement
from lightning_moe.parallel.sharding import shard_layer


def rotated(placement: ExpertPlacement, columns: int) -> ExpertPlacement:
    """The first ``columns`` slots of every rank take the expert of the next rank's same slot."""
    table = placement.experts_per_rank()
    ranks = len(table)
    return ExpertPlacement([
        [table[(rank + 1) % ranks][slot] if slot < columns else table[rank][slot] for slot in range(len(table[rank]))]
        for rank in range(ranks)
    ])


def run_rank(rank: int, args: argparse.Namespace, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=args.world_size)
    mesh = build_expert_parallel_mesh(args.world_size)
    torch.manual_seed(0)
    layer = MoELayer(d_model=args.d_model, d_ff=args.d_ff, num_experts=args.num_experts, top_k=2)
    identity = ExpertPlacement.identity(args.num_experts, args.world_size)
    shard_layer(layer, placement=identity, ep_rank=mesh.ep_rank, ep_group=mesh.ep_group)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    for parameter in layer.parameters():
        parameter.grad = torch.randn_like(parameter)
    optimizer.step()  # creates exp_avg and exp_avg_sq
    tensors = slot_tensors(layer, [optimizer])
    slot_bytes = sum(t[0].numel() * t.element_size() for t in tensors)
    rows = []
    for columns in args.columns:
        target = rotated(identity, columns)
        times, sent = [], []
        for repeat in range(args.warmup + args.repeats):
            for old, new in ((identity, target), (target, identity)):
                moves = plan_slot_moves("layer", old, new)
                dist.barrier()
                start = time.perf_counter()
                report = move_slots(moves, {"layer": tensors}, ep_rank=mesh.ep_rank, global_rank_of=mesh.global_rank,
                                    ep_group=mesh.ep_group)
                dist.barrier()
                layer.dispatcher.set_placement(new)
                if repeat >= args.warmup:
                    times.append(time.perf_counter() - start)
                    sent.append(report.bytes_sent)
        assert all(b == columns * slot_bytes for b in sent), (sent, columns * slot_bytes)
        rows.append((columns, columns * args.world_size, sent[0], statistics.median(times)))
    if rank == 0:
        results["rows"] = rows
        results["slot_bytes"] = slot_bytes
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--d-ff", type=int, default=2816)
    parser.add_argument("--num-experts", type=int, default=16)
    parser.add_argument("--columns", type=int, nargs="+", default=[1, 2, 4],
                        help="slots each rank sends (and receives) per migration")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(run_rank, args=(args, port, results), nprocs=args.world_size, join=True)
    slot_bytes = results["slot_bytes"]
    print(
        f"world = EP = {args.world_size}, {args.num_experts} SwiGLU experts d_model {args.d_model} d_ff {args.d_ff}, "
        f"fp32 weights + AdamW exp_avg and exp_avg_sq: {slot_bytes / 2**20:.1f} MiB per expert slot; gloo on CPU\n"
    )
    print("| experts moved (per rank / total) | sent per rank (MiB) | time (ms, median) | per-rank rate (GB/s) |")
    print("|---:|---:|---:|---:|")
    for columns, total, sent, seconds in results["rows"]:
        print(f"| {columns} / {total} | {sent / 2**20:.1f} | {seconds * 1e3:.1f} | {sent / seconds / 1e9:.2f} |")


if __name__ == "__main__":
    main()
