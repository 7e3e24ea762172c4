"""One rank of the ExpertMigration tests: training on a skewed load (the sigmoid gate's selection bias
sends most tokens to EP rank 0's experts) with and without the callback. Writes what the rank saw to
``OUT/<scenario>/rank<r>.json``.

Usage: ``python migration_worker.py SCENARIOS.json OUT_DIR`` (started by tests/dist_workers/launch.py).
"""

from __future__ import annotations

import dataclasses
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from launch import run_scenarios  # noqa: E402
from models import TwoMoELayers, dataloader, dataset  # noqa: E402

from lightning_moe import ExpertLoadMonitor, ExpertMigration, MoEStrategy, ResumableDataLoader  # noqa: E402
from lightning_moe.planning.plan import PlacementPlan  # noqa: E402
from lightning_moe.planning.trigger import MigrationTrigger  # noqa: E402

GLOBAL_BATCH, SAMPLES = 8, 80
SKEW = [0.2, 0.6, -0.3, 0.0]  # selection bias: expert 1 (EP rank 0, no replica elsewhere) takes most tokens


class SlowValidation(TwoMoELayers):
    """Validation that takes ``validation_seconds`` per batch: none of it is a training step's time."""

    validation_seconds = 0.0

    def validation_step(self, batch, batch_idx):
        time.sleep(self.validation_seconds)
        return super().validation_step(batch, batch_idx)


class SecondLayerInOddBatches(SlowValidation):
    """The second MoE layer runs in the odd training batches only (and in validation)."""

    def training_step(self, batch, batch_idx):
        self.skip_second = batch_idx % 2 == 0
        return super().training_step(batch, batch_idx)

    def forward(self, x_BSD):
        if not (self.training and self.skip_second):
            return super().forward(x_BSD)
        h_BSD = self.proj_in(x_BSD)
        return self.proj_out(h_BSD + self.blocks["first"](h_BSD))


def skewed_model(model_class: type[TwoMoELayers] = SlowValidation) -> TwoMoELayers:
    model = model_class(num_experts=4, gate="sigmoid", top_k=1,
                        gate_kwargs={"bias_update_rate": 0.0, "load_balance_coef": 0.0})
    with torch.no_grad():
        for block in model.blocks.values():
            block.gate.expert_bias.copy_(torch.tensor(SKEW))
    return model


class CountingTrigger(MigrationTrigger):
    """The callback's trigger, counting the layers this rank plans."""

    calls = 0
    fail_on_rank: int | None = None
    loads: list = []  # the latest window's [R, E] load of each layer this rank planned

    def choose(self, now, loads, planner):
        CountingTrigger.calls += 1
        CountingTrigger.loads.append(loads[0].tolist())
        if torch.distributed.get_rank() == CountingTrigger.fail_on_rank:
            raise ValueError("the planner broke here")
        return super().choose(now, loads, planner)


class UnroutablePlanTrigger(CountingTrigger):
    """Plans that device-limited routing to 2 of 3 EP ranks cannot use with top-3 of 3 experts:
    ranks 0 and 1 together hold experts 0 and 1 only."""

    def choose(self, now, loads, planner):
        super().choose(now, loads, planner)
        return PlacementPlan.even_split([[0, 1], [0, 1], [2, 0]], 3)


def run(scenario: dict, out_dir: Path, world_size: int, rank: int) -> dict:
    torch.manual_seed(0)
    CountingTrigger.calls, CountingTrigger.fail_on_rank, CountingTrigger.loads = 0, scenario.get("fail_on_rank"), []
    if scenario.get("unroutable_plan"):  # EP 3, device-limited to 2 ranks, every token on all 3 experts
        model = TwoMoELayers(num_experts=3, top_k=3)
    elif scenario.get("second_layer_in_odd_batches"):
        model = skewed_model(SecondLayerInOddBatches)
    else:
        model = skewed_model()
    SlowValidation.validation_seconds = scenario.get("validation_seconds", 0.0)
    callbacks = []
    migration = monitor = None
    if scenario.get("monitor"):
        monitor = ExpertLoadMonitor(every_n_steps=scenario.get("monitor_every", 2), log_histograms=False,
                                    image_every_n_steps=2, history_size=scenario.get("history_size", 100))
        callbacks.append(monitor)
    if scenario.get("migrate"):
        migration = ExpertMigration(every_n_steps=scenario.get("every", 4), measure_links=scenario.get("measure_links", False))
        trigger = UnroutablePlanTrigger if scenario.get("unroutable_plan") else CountingTrigger
        migration.trigger = trigger(**vars(migration.trigger))
        callbacks.append(migration)
    if scenario.get("checkpoint_every"):
        callbacks.append(ModelCheckpoint(dirpath=out_dir.parent / scenario["checkpoints"], save_top_k=-1,
                                         every_n_train_steps=scenario["checkpoint_every"]))
    batch_size = GLOBAL_BATCH // world_size
    validation = None
    if scenario.get("validation_seconds"):
        validation = dataloader(batch_size, batch_size, rank=rank, world_size=world_size)
    trainer = L.Trainer(
        accelerator="cpu", devices=world_size, max_steps=scenario.get("steps", 12), accumulate_grad_batches=2,
        gradient_clip_val=0.05, strategy=MoEStrategy(expert_parallel_size=scenario.get("ep", 2), spare_expert_slots=1,
                                                     device_limited_routing=scenario.get("device_limit"),
                                                     find_unused_parameters=bool(scenario.get("second_layer_in_odd_batches"))),
        callbacks=callbacks, logger=TensorBoardLogger(out_dir, name="tb", version=0),
        enable_checkpointing=bool(scenario.get("checkpoint_every")), enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False,
        val_check_interval=scenario.get("validate_every_batches"), limit_val_batches=1,
    )
    # Resumable, so that a run resumed from a checkpoint reads the batches the full run read next.
    # Every rank the same number of batches (world 3 does not divide SAMPLES).
    samples = SAMPLES - SAMPLES % (world_size * batch_size)
    loader = ResumableDataLoader(dataset(SAMPLES), batch_size=batch_size, sampler=list(range(rank, samples, world_size)))
    resume_from = scenario.get("resume_from")
    if resume_from is not None:
        (resume_from,) = (out_dir.parent / scenario["checkpoints"]).glob(f"*-step={resume_from}.ckpt")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(model, loader, validation, ckpt_path=resume_from)
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
        "planned_loads": CountingTrigger.loads,
        "migration_warnings": [str(w.message) for w in caught if "ExpertMigration" in str(w.message)],
    }


def main() -> None:
    run_scenarios(run)


if __name__ == "__main__":
    main()
