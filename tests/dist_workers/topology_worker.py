"""One rank of the two-node topology test, started by ``torch.distributed.run`` (two launches of
``--nnodes 2 --nproc-per-node 2``, one per simulated node). A tiny Lightning fit on CPU/gloo; a
callback builds the topology from the trainer, probes the links, plans a skewed load and writes
what this rank saw to ``OUT/rank<r>.json``. Usage::

    python -m torch.distributed.run ... topology_worker.py OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

import lightning as L  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_moe import PlacementPlanner, Topology  # noqa: E402
from lightning_moe.planning import LayerCost  # noqa: E402

NUM_EXPERTS, SLOTS_PER_RANK = 8, 3


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.layer(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class PlanAtFitStart(L.Callback):
    """Every rank: topology from the trainer, measured links, and a plan for a skewed load."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir

    def on_fit_start(self, trainer, pl_module):
        topology = Topology.from_trainer(trainer, expert_parallel_size=4)
        measured = topology.measure(message_bytes=1 << 20, repetitions=3)  # a collective: every rank
        # Both nodes send most of their tokens to experts 0 and 1.
        load_RE = torch.tensor([[4000.0, 3000.0] + [200.0] * (NUM_EXPERTS - 2)] * topology.num_ranks)
        cost = LayerCost.swiglu(d_model=4096, d_ff=14336, flops_per_second=4e14)
        plan = PlacementPlanner.from_cost(topology, NUM_EXPERTS, SLOTS_PER_RANK, cost).plan(load_RE)
        record = {
            "global_rank": trainer.global_rank,
            "node_rank": trainer.node_rank,
            "env_group_rank": os.environ.get("GROUP_RANK"),
            "num_nodes": topology.num_nodes,
            "ranks_per_node": topology.ranks_per_node,
            "measured": [measured.intra_node_bandwidth, measured.inter_node_bandwidth, measured.inter_node_latency],
            "experts_per_rank": plan.experts_per_rank,
            "fractions_sum": float(plan.routing_fractions_RER.sum()),
        }
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def main(out_dir: str) -> None:
    out = Path(out_dir)
    data = DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=4)
    trainer = L.Trainer(
        num_nodes=2,
        devices=2,
        accelerator="cpu",
        strategy="ddp",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[PlanAtFitStart(out)],
    )
    trainer.fit(Tiny(), data)


if __name__ == "__main__":
    from launch import end_rank

    main(sys.argv[1])
    end_rank()
