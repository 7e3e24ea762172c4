"""One rank of the ExpertMigration tests: training on a skewed load (the sigmoid gate's selection bias
sends most tokens to EP rank 0's experts) with and without the callback. Writes what the rank saw to
``OUT/<scenario>/rank<r>.json``.

Usage: ``python migration_worker.py SCENARIOS.json OUT_DIR`` (started by tests/dist_workers/launch.py).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)

import lightning as L  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from launch import run_scenarios  # noqa: E402
from models import TwoMoELayers, dataloader  # noqa: E402

from lightning_moe import ExpertLoadMonitor, ExpertMigration, MoEStrategy  # noqa: E402
from lightning_moe.planning.trigger import MigrationTrigger  # noqa: E402

GLOBAL_BATCH, SAMPLES = 8, 80
SKEW = [0.2, 0.6, -0.3, 0.0]  # selection bias: expert 1 (EP rank 0, no replica elsewhere) takes most tokens


def skewed_model() -> TwoMoELayers:
    model = TwoMoELayers(num_experts=4, gate="sigmoid", top_k=1,
                         gate_kwargs={"bias_update_rate": 0.0, "load_balance_coef": 0.0})
    with torch.no_grad():
        for block in model.blocks.values():
            block.gate.expert_bias.copy_(torch.tensor(SKEW))
    return model


class CountingTrigger(MigrationTrigger):
    """The callback's trigger, counting the layers this rank plans."""

    calls = 0
    fail_on_rank: int | None = None

    def choose(self, now, loads, planner):
        CountingTrigger.calls += 1
        if torch.distributed.get_rank() == CountingTrigger.fail_on_rank:
            raise ValueError("the planner broke here")
        return super().choose(now, loads, planner)


def run(scenario: dict, out_dir: Path, world_size: int, rank: int) -> dict:
    torch.manual_seed(0)
    CountingTrigger.calls, CountingTrigger.fail_on_rank = 0, scenario.get("fail_on_rank")
    model = skewed_model()
    callbacks = []
    migration = monitor = None
    if scenario.get("monitor"):
        monitor = ExpertLoadMonitor(every_n_steps=2, log_histograms=False, image_every_n_steps=2)
        callbacks.append(monitor)
    if scenario.get("migrate"):
        migration = ExpertMigration(every_n_steps=scenario.get("every", 4), measure_links=scenario.get("measure_links", False))
        migration.trigger = CountingTrigger(**vars(migration.trigger))
        callbacks.append(migration)
    trainer = L.Trainer(
        accelerator="cpu", devices=world_size, max_steps=scenario.get("steps", 12), accumulate_grad_batches=2,
        gradient_clip_val=0.05, strategy=MoEStrategy(expert_parallel_size=2, spare_expert_slots=1),
        callbacks=callbacks, logger=TensorBoardLogger(out_dir, name="tb", version=0), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False,
    )
    try:
        trainer.fit(model, dataloader(SAMPLES, GLOBAL_BATCH // world_size, rank=rank, world_size=world_size))
    except RuntimeError as error:
        if scenario.get("fail_on_rank") is None:
            raise
        return {"error": str(error)}
    return {
        "losses": model.micro_batch_losses,
        "history": migration.history if migration is not None else [],
        "layers_planned_here": CountingTrigger.calls,
        "placements": {name: p.experts_per_rank() for name, p in trainer.strategy.placements().items()},
        "load_shares": {name: p.load_share_R.tolist() for name, p in trainer.strategy.placements().items()},
        "assignment_seconds": {name: p.assignment_seconds.tolist() for name, p in trainer.strategy.placements().items()},
        "topology": dataclasses.asdict(migration.topology) if migration is not None else None,
        "replica_split": [[kept.tolist() for kept in window.replica_split] for window in monitor.history] if monitor else [],
    }


def main() -> None:
    run_scenarios(run)


if __name__ == "__main__":
    main()
