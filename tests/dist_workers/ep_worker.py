"""One rank of a multi-process test: runs a list of training scenarios under MoEStrategy, one after
another in the same process group, and writes what each rank saw to ``OUT/<scenario>/rank<r>.json``.

Started by :func:`tests.dist_workers.launch.launch` with ``LOCAL_RANK``/``MASTER_PORT`` set, so
Lightning joins the given processes instead of launching its own, or with no such variables at
world 1, where Lightning starts the process group itself. Usage::

    python ep_worker.py SCENARIOS.json OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from launch import fit_scenario, run_scenarios  # noqa: E402
from models import LateExperts, StagedExperts, TwoMoELayers, dataloader, dataset  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torch import nn  # noqa: E402

from lightning_moe import MoEStrategy, mark_expert_param  # noqa: E402
from lightning_moe.layers.aux_loss import moe_layers  # noqa: E402


class RootExpertParam(TwoMoELayers):
    """Registers an expert-tagged parameter on the root module: must be refused at setup."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stray_expert = mark_expert_param(nn.Parameter(torch.zeros(4, 2)))


class ManualAccumulation(TwoMoELayers):
    """Manual optimization that accumulates ``accumulate`` backward passes per optimizer step and
    clips by norm, as automatic optimization does with the same settings."""

    def __init__(self, *, accumulate: int, clip: float | None, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.accumulate, self.clip = accumulate, clip

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = self.loss(batch)
        self.micro_batch_losses.append(float(loss.detach()))
        self.manual_backward(loss / self.accumulate)
        if (batch_idx + 1) % self.accumulate == 0:
            if self.clip:
                self.clip_gradients(optimizer, gradient_clip_val=self.clip, gradient_clip_algorithm="norm")
            optimizer.step()
            optimizer.zero_grad()
        self.log("train_loss", loss, sync_dist=True)


class SkipsSecondLayer(TwoMoELayers):
    """The second MoE layer is left out of the forward on ``skip_on_ranks`` (a whole EP group, or
    every rank: within an EP group all ranks take part in its all-to-alls, or none does)."""

    skip_on_ranks: tuple[int, ...] = ()

    def on_train_start(self) -> None:  # the local shard, after the strategy has sharded the experts
        self.second_experts_at_start = self.blocks["second"].experts.w_in.detach().clone()

    def forward(self, x_BSD):
        if dist.get_rank() not in self.skip_on_ranks:
            return super().forward(x_BSD)
        h_BSD = self.proj_in(x_BSD)
        return self.proj_out(h_BSD + self.blocks["first"](h_BSD))


class TriesApplyPlacement(L.Callback):
    """Calls ``apply_placement`` after the first optimizer step and keeps the error it raises."""

    error: str | None = None
    tried = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1 and not self.tried:  # the batch that made the first step
            self.tried = True
            try:
                trainer.strategy.apply_placement({})
            except ValueError as error:
                self.error = str(error)


def predict_scenario(model, scenario: dict, world_size: int) -> dict:
    """``trainer.predict`` with Lightning's own distributed sampler (which does not pad): the error
    every rank raises, or ``None`` and the number of predicted batches."""
    predictor = L.Trainer(accelerator="cpu", devices=world_size, strategy=MoEStrategy(expert_parallel_size=scenario["ep"]),
                          logger=False, enable_progress_bar=False, enable_model_summary=False)
    loader = DataLoader(dataset(scenario["predict_samples"]), batch_size=1)
    try:
        predictions = predictor.predict(model, loader)
    except ValueError as error:
        return {"error": str(error)}
    return {"error": None, "batches": len(predictions)}


def run(scenario: dict, out_dir: Path, world_size: int, rank: int) -> dict:
    model_kwargs = dict(scenario.get("model", {}))
    if scenario.get("mismatch") and rank == 1:
        model_kwargs["num_experts"] = 2 * model_kwargs.get("num_experts", 4)
    model_class = RootExpertParam if scenario.get("root_expert_param") else TwoMoELayers
    if scenario.get("late_experts"):
        model_class = LateExperts
    if scenario.get("staged_experts"):
        model_class = StagedExperts
    if "skip_second_on_ranks" in scenario:
        model_class = SkipsSecondLayer
        SkipsSecondLayer.skip_on_ranks = tuple(scenario["skip_second_on_ranks"])
    if scenario.get("manual"):
        # The model accumulates and clips; the Trainer must not (Lightning refuses both in manual mode).
        model_kwargs.update(accumulate=scenario.pop("accumulate"), clip=scenario.pop("clip"))
        model_class = ManualAccumulation
    model = model_class(**model_kwargs)
    if scenario.get("predict_samples"):
        return predict_scenario(model, scenario, world_size)
    if scenario.get("compile_backend"):
        for layer in moe_layers(model):
            layer.compile(backend=scenario["compile_backend"])
    strategy = scenario.get("strategy") or MoEStrategy(
        expert_parallel_size=scenario.get("ep", 1),
        expert_placement=scenario.get("placement"),
        device_limited_routing=scenario.get("device_limited"),
        spare_expert_slots=scenario.get("spare", 0),
        find_unused_parameters=scenario.get("find_unused", False),
    )
    checkpoint_dir = out_dir / "checkpoints"
    callbacks = [ModelCheckpoint(dirpath=checkpoint_dir, save_top_k=-1, every_n_epochs=1)]
    tries = TriesApplyPlacement()
    if scenario.get("try_apply_placement"):
        callbacks.append(tries)
    trainer = L.Trainer(
        accelerator=scenario.get("accelerator", "cpu"),
        devices=world_size,
        strategy=strategy,
        max_epochs=scenario.get("max_epochs", 1),
        accumulate_grad_batches=scenario.get("accumulate", 1),
        gradient_clip_val=scenario.get("clip"),
        precision=scenario.get("precision", "32-true"),
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    batch_size = scenario["global_batch"] // world_size
    loader = dataloader(scenario["samples"], batch_size, rank=rank, world_size=world_size)
    error = fit_scenario(trainer, model, loader, scenario)
    if error is not None:
        return {"error": error}
    layers = moe_layers(model)
    dispatchers = [layer.dispatcher for layer in layers]
    extra = {"logged_loss": float(trainer.callback_metrics["train_loss"]), "backend": dist.get_backend()}
    if scenario.get("try_apply_placement"):
        extra["apply_placement_error"] = tries.error
    if isinstance(model, SkipsSecondLayer):
        # The second layer's local experts: how far they moved, and whether they have optimizer state.
        second = layers[1].experts.w_in.detach()
        extra.update(second_experts=second.tolist(),
                     second_experts_moved=float((second - model.second_experts_at_start).abs().max()),
                     second_experts_state=sorted(trainer.optimizers[0].state.get(layers[1].experts.w_in, {})))
    if scenario.get("validate"):
        # Evaluation after fit (the module keeps its shards), and a fresh module that loads the
        # final checkpoint directory outside fitting (no optimizers, no DDP wrapper).
        extra["val_loss_after_fit"] = trainer.validate(model, loader, verbose=False)[0]["val_loss"]
        fresh = TwoMoELayers(**{**model_kwargs, "seed": 123})
        evaluator = L.Trainer(accelerator="cpu", devices=world_size, strategy=MoEStrategy(
            expert_parallel_size=scenario.get("ep", 1)), logger=False, enable_progress_bar=False,
            enable_model_summary=False, use_distributed_sampler=False)
        final = sorted(checkpoint_dir.glob("epoch=*"))[-1]
        extra["val_loss_from_checkpoint"] = evaluator.validate(fresh, loader, ckpt_path=final, verbose=False)[0]["val_loss"]
    return {
        **extra,
        "losses": model.micro_batch_losses,
        "global_step": trainer.global_step,
        "local_experts": [d.placement.experts_on_rank(d.ep_rank) for d in dispatchers if hasattr(d, "placement")],
        "expert_shape": list(layers[0].experts.w_in.shape),
        "tokens_sent_per_rank": layers[0].traffic.tokens_sent_per_rank.tolist(),
        "gate_state": {k: v.tolist() for k, v in layers[0].gate.state_dict().items()},
    }


def main() -> None:
    run_scenarios(run)


if __name__ == "__main__":
    main()
