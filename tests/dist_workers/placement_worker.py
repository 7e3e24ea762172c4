"""One rank of the placement tests: training with forced migrations (random tables with replicas, per
layer, random routing fractions) against the same run with a static placement, a migration followed by
its inverse, migration bytes, the mid-accumulation error, and resume with a saved placement.
Each scenario writes what the rank saw to ``OUT/<scenario>/rank<r>.json``.

Usage: ``python placement_worker.py SCENARIOS.json OUT_DIR`` (started by tests/dist_workers/launch.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from launch import run_scenarios  # noqa: E402
from models import TwoMoELayers, dataloader  # noqa: E402

from lightning_moe import MoEStrategy  # noqa: E402
from lightning_moe.parallel.placement import ExpertPlacement  # noqa: E402

GLOBAL_BATCH, SAMPLES, ACCUMULATE = 8, 80, 2
LAYERS = ("blocks.first", "blocks.second")


def random_placement(num_experts: int, ep_size: int, slots: int, generator: torch.Generator) -> ExpertPlacement:
    """A random valid table: every expert once, dealt to random ranks, then the remaining slots filled
    with replicas of random experts not yet on that rank; random routing fractions over the replicas."""
    order = torch.randperm(num_experts, generator=generator).tolist()
    table: list[list[int]] = [[] for _ in range(ep_size)]
    for index, expert in enumerate(order):
        table[index % ep_size].append(expert)
    for experts in table:
        while len(experts) < slots:
            candidates = [e for e in range(num_experts) if e not in experts]
            experts.append(candidates[int(torch.randint(len(candidates), (1,), generator=generator))])
        shuffled = torch.randperm(len(experts), generator=generator).tolist()
        experts[:] = [experts[i] for i in shuffled]
    holders_RE = torch.zeros(ep_size, num_experts)
    for rank, experts in enumerate(table):
        holders_RE[rank, experts] = 1.0
    weights_RER = torch.rand(ep_size, num_experts, ep_size, generator=generator, dtype=torch.float64) + 0.05
    weights_RER = weights_RER * holders_RE.t().unsqueeze(0).double()
    return ExpertPlacement(table, weights_RER / weights_RER.sum(dim=-1, keepdim=True))


def local_tensors(trainer, pl_module) -> list[torch.Tensor]:
    """Clones of this rank's expert weights and every optimizer state tensor of them."""
    tensors = []
    optimizer = trainer.optimizers[0]
    for name in LAYERS:
        experts = pl_module.get_submodule(name).experts
        for parameter in (experts.w_in, experts.w_out):
            tensors.append(parameter.detach().clone())
            state = optimizer.state.get(parameter, {})
            tensors += [state[key].clone() for key in sorted(state)]
    return tensors


class ForcedMigrations(Callback):
    """After the optimizer steps in ``steps``, every MoE layer gets its own random table (the same on
    every rank: a generator seeded by the step)."""

    def __init__(
        self, steps: list[int], *, inverse_at: int | None, mid_accumulation_at: int | None, differing_at: int | None = None,
        unroutable_at: int | None = None,
    ) -> None:
        self.steps, self.inverse_at, self.mid_accumulation_at = steps, inverse_at, mid_accumulation_at
        self.differing_at, self.unroutable_at = differing_at, unroutable_at
        self.unroutable_error: str | None = None
        self.reports: list[dict] = []
        self.inverse_bitwise: bool | None = None
        self.mid_accumulation_error: str | None = None
        self.differing_error: str | None = None
        self.invalid_error: str | None = None
        self.unchanged_after_refusal: bool | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        strategy = trainer.strategy
        if (batch_idx + 1) % ACCUMULATE:
            if trainer.global_step == self.mid_accumulation_at and self.mid_accumulation_error is None:
                try:
                    strategy.apply_placement({})
                except RuntimeError as error:
                    self.mid_accumulation_error = str(error)
            return
        step = trainer.global_step
        if step == self.inverse_at:
            before = local_tensors(trainer, pl_module)
            original = strategy.placements()
            generator = torch.Generator().manual_seed(1000 + step)
            strategy.apply_placement({name: random_placement(4, original[name].ep_size, original[name].slots_per_rank,
                                                             generator) for name in LAYERS})
            strategy.apply_placement(original)
            after = local_tensors(trainer, pl_module)
            self.inverse_bitwise = len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))
        if step == self.differing_at:
            # Global rank 0 tilts the routing fractions of one layer (same slots): the tables differ
            # across ranks only in their fractions, and every rank must refuse them.
            before = strategy.placements()
            table = before[LAYERS[0]]
            fractions = table.routing_fractions_RER.clone()
            if trainer.global_rank == 0:
                fractions[..., 0] *= 3.0
                fractions = fractions / fractions.sum(dim=-1, keepdim=True)
            try:
                strategy.apply_placement({LAYERS[0]: ExpertPlacement(table.experts_per_rank(), fractions)})
            except ValueError as error:
                self.differing_error = str(error)
            # A table that is invalid on rank 1 only (an expert twice on one rank): every rank raises.
            invalid = table.experts_per_rank()
            if trainer.global_rank == 1:
                invalid[0] = [invalid[0][0]] * len(invalid[0])
            try:
                strategy.apply_placement({LAYERS[0]: invalid})
            except ValueError as error:
                self.invalid_error = str(error)
            # Not even a table of integers on rank 1 (a TypeError there): every rank raises too.
            malformed = table.experts_per_rank()
            if trainer.global_rank == 1:
                malformed[0][0] = None
            try:
                strategy.apply_placement({LAYERS[0]: malformed})
            except ValueError as error:
                self.invalid_error += " | " + str(error)
            self.unchanged_after_refusal = all(strategy.placements()[name] == before[name] for name in LAYERS)
        if step == self.unroutable_at:
            # Ranks 0 and 1 both hold experts {0, 1}: a token limited to them could not reach top_k=3.
            before = strategy.placements()
            try:
                strategy.apply_placement({name: [[0, 1], [1, 0], [2, 3], [3, 2]] for name in LAYERS})
            except ValueError as error:
                self.unroutable_error = str(error)
            self.unchanged_after_refusal = all(strategy.placements()[name] == before[name] for name in LAYERS)
        if step not in self.steps:
            return
        old = strategy.placements()
        generator = torch.Generator().manual_seed(step)
        new = {name: random_placement(4, old[name].ep_size, old[name].slots_per_rank, generator) for name in LAYERS}
        if trainer.global_rank % 2:  # the same tables in another order: the moves must not pair across layers
            new = dict(reversed(new.items()))
        report = strategy.apply_placement(new)
        self.reports.append({
            "step": step,
            "old": {name: old[name].experts_per_rank() for name in LAYERS},
            "new": {name: new[name].experts_per_rank() for name in LAYERS},
            "bytes_sent": report.bytes_sent, "bytes_received": report.bytes_received,
            "slots_moved": report.slots_moved, "slots_sent": report.slots_sent, "local_copies": report.local_copies,
        })


def run(scenario: dict, out_dir: Path, world_size: int, rank: int) -> dict:
    torch.manual_seed(0)
    model = TwoMoELayers(**scenario.get("model", {"num_experts": 4}))
    if scenario.get("compile_backend"):
        for name in LAYERS:
            model.get_submodule(name).compile(backend=scenario["compile_backend"])
    migrations = ForcedMigrations(scenario.get("migrate_at", []), inverse_at=scenario.get("inverse_at"),
                                  mid_accumulation_at=scenario.get("mid_accumulation_at"),
                                  differing_at=scenario.get("differing_at"), unroutable_at=scenario.get("unroutable_at"))
    strategy = MoEStrategy(expert_parallel_size=scenario["ep"], spare_expert_slots=scenario.get("spare", 1),
                           device_limited_routing=scenario.get("device_limit"))
    trainer = L.Trainer(
        accelerator="cpu", devices=world_size, strategy=strategy, max_steps=scenario.get("steps", 20),
        accumulate_grad_batches=ACCUMULATE, gradient_clip_val=0.05,
        callbacks=[migrations, ModelCheckpoint(dirpath=out_dir / "checkpoints", save_top_k=-1, every_n_train_steps=10)],
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        use_distributed_sampler=False, default_root_dir=out_dir,
    )
    loader = dataloader(SAMPLES, GLOBAL_BATCH // world_size, rank=rank, world_size=world_size)
    reinstated = {}

    class RecordStart(Callback):
        def on_train_start(self, trainer, pl_module):
            reinstated.update({name: p.experts_per_rank() for name, p in trainer.strategy.placements().items()})

    trainer.callbacks.append(RecordStart())
    trainer.fit(model, loader, ckpt_path=scenario.get("resume_from"))
    trainer.save_checkpoint(out_dir / "final.ckpt")
    layers = [model.get_submodule(name) for name in LAYERS]
    return {
        "aux_losses": sorted({name for layer in layers for name in layer.aux_losses}),
        "sent_per_rank": [layer.traffic.assignments_sent_per_rank.tolist() for layer in layers],
        "balance_replicas": [layer.dispatcher.balance_replicas for layer in layers],
        "routed": [int(layer.routed_tokens) for layer in layers],
        "dropped": [int(layer.dropped_tokens) for layer in layers],
        "losses": model.micro_batch_losses,
        "global_step": trainer.global_step,
        "reports": migrations.reports,
        "inverse_bitwise": migrations.inverse_bitwise,
        "mid_accumulation_error": migrations.mid_accumulation_error,
        "differing_error": migrations.differing_error,
        "invalid_error": migrations.invalid_error,
        "unroutable_error": migrations.unroutable_error,
        "unchanged_after_refusal": migrations.unchanged_after_refusal,
        "placements_at_start": reinstated,
        "placements_at_end": {name: p.experts_per_rank() for name, p in trainer.strategy.placements().items()},
        "compiled_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
        "graph_break_reasons": sorted(reason.split("\n")[0] for reason in torch._dynamo.utils.counters["graph_break"]),
    }


def main() -> None:
    run_scenarios(run)


if __name__ == "__main__":
    main()
