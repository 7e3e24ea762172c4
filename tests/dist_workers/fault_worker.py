"""One rank of the fault tests: fp16 overflow on one rank, NaN routers and losses, damaged, tampered
and mismatched checkpoints, a save that fails half-way, and a run whose rank is killed then resumed.
Each scenario writes what the rank saw to ``OUT/<scenario>/rank<r>.json``.

Usage: ``python fault_worker.py SCENARIOS.json OUT_DIR`` (started by tests/dist_workers/launch.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)

import lightning as L  # noqa: E402
from lightning.fabric.plugins import TorchCheckpointIO  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402
from launch import run_scenarios  # noqa: E402
from models import TwoMoELayers, dataset  # noqa: E402
from torch.amp import GradScaler  # noqa: E402

from lightning_moe import ExpertLoadMonitor, MoEStrategy, ResumableDataLoader  # noqa: E402
from lightning_moe.checkpoint import committed_directory, read_full_checkpoint  # noqa: E402
from lightning_moe.checkpoint.layout import CheckpointError  # noqa: E402
from lightning_moe.parallel.finite import NonFiniteError  # noqa: E402

GLOBAL_BATCH, SAMPLES = 8, 80


class Scheduled(TwoMoELayers):
    """TwoMoELayers with a learning-rate schedule (warm-up), so that resuming must restore it too."""

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 8))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class FusedAdamW(Scheduled):
    """AdamW with its fused kernel: the gradient scaler hands it the inf flag instead of skipping its step."""

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01, fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 8))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Recorder(Callback):
    """Per optimizer step: the loss scale, the dense weights' checksum and Adam's step count."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        optimizer = trainer.optimizers[0]
        adam_step = optimizer.state[pl_module.proj_in.weight].get("step")
        self.steps.append({
            "step": trainer.global_step,
            "scale": float(scaler.get_scale()) if scaler is not None else None,
            "dense_sum": float(pl_module.proj_in.weight.detach().double().sum()),
            "adam_step": float(adam_step) if adam_step is not None else None,
            "bias": pl_module.blocks["first"].gate.state_dict().get("expert_bias", torch.zeros(0)).tolist(),
        })


class InjectInf(Callback):
    """An fp16 overflow in one rank's expert gradient, at one step (before the scaler unscales)."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.blocks["first"].experts.w_in.grad[0, 0, 0] = float("inf")


class InjectNaN(Callback):
    """From ``step`` on, rank ``rank`` feeds NaN into ``target``: the router of MoE layer `blocks.second`,
    or the loss."""

    def __init__(self, rank: int, step: int, target: str) -> None:
        self.rank, self.step, self.target = rank, step, target

    def setup(self, trainer, pl_module, stage):
        def poison(module, args):
            if trainer.global_rank == self.rank and trainer.global_step >= self.step:
                return (args[0] * float("nan"),)
            return None

        if self.target == "router":
            pl_module.blocks["second"].gate.register_forward_pre_hook(poison)
        else:
            pl_module.proj_out.register_forward_pre_hook(poison)


class NaNInValidation(Callback):
    """Rank 1 feeds NaN into the router of `blocks.second` in validation only: training stays finite."""

    def setup(self, trainer, pl_module, stage):
        def poison(module, args):
            return (args[0] * float("nan"),) if trainer.validating and trainer.global_rank == 1 else None

        pl_module.blocks["second"].gate.register_forward_pre_hook(poison)


class KillAt(Callback):
    """SIGKILL this process (no clean-up at all) when training reaches ``step`` on rank ``rank``."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class FailingIO(TorchCheckpointIO):
    """Fails like a full disk on rank ``rank`` from its ``fail_from``-th file on."""

    def __init__(self, rank: int, fail_from: int) -> None:
        super().__init__()
        self.rank, self.fail_from, self.calls = rank, fail_from, 0

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        self.calls += 1
        if dist.get_rank() == self.rank and self.calls >= self.fail_from:
            raise OSError(28, "No space left on device")
        super().save_checkpoint(checkpoint, path, storage_options)


class RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def loader(rank: int, world_size: int) -> ResumableDataLoader:
    """Rank ``r`` reads samples ``r, r + W, ...`` in order; resumable mid-epoch."""
    return ResumableDataLoader(dataset(SAMPLES), batch_size=GLOBAL_BATCH // world_size,
                               sampler=list(range(rank, SAMPLES, world_size)))


def fit(scenario: dict, out_dir: Path, world_size: int, rank: int, *, model=None, callbacks=(), **trainer_kwargs):
    model = model or Scheduled(**scenario.get("model", {"num_experts": 4}))
    recorder = Recorder()
    strategy = MoEStrategy(expert_parallel_size=scenario.get("ep", 2), timeout=timedelta(seconds=60),
                           checkpoint_io=trainer_kwargs.pop("checkpoint_io", None))
    kwargs = dict(
        accelerator="cpu", devices=world_size, strategy=strategy, max_epochs=scenario.get("max_epochs", 1),
        max_steps=scenario.get("max_steps", -1), accumulate_grad_batches=2, gradient_clip_val=0.05,
        callbacks=[recorder, *callbacks], logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, use_distributed_sampler=False, default_root_dir=out_dir,
    )
    kwargs.update(trainer_kwargs)
    trainer = L.Trainer(**kwargs)
    error = None
    validation = loader(rank, world_size) if scenario.get("validate_every") else None
    try:
        trainer.fit(model, loader(rank, world_size), validation, ckpt_path=scenario.get("resume_from"))
    except (NonFiniteError, CheckpointError, ValueError) as caught:
        error = f"{type(caught).__name__}: {caught}"
    return model, trainer, recorder, error


def run(scenario: dict, out_dir: Path, world_size: int, rank: int) -> dict:
    name = scenario["name"]
    if name in ("fp16_inf", "fp16_inf_fused"):
        plugin = MixedPrecision("16-mixed", "cpu", scaler=GradScaler("cpu", init_scale=2.0**8, growth_interval=1000))
        # The sigmoid gate's bias update is a collective after each optimizer step: a step taken on one
        # rank only would leave it waiting.
        module_class = FusedAdamW if name == "fp16_inf_fused" else Scheduled
        model = module_class(num_experts=4, gate="sigmoid", gate_kwargs={"bias_update_rate": 0.01})
        # Lightning refuses to clip the gradients of a fused optimizer (it unscales them itself).
        clip = {"gradient_clip_val": None} if name == "fp16_inf_fused" else {}
        model, trainer, recorder, error = fit(scenario, out_dir, world_size, rank, model=model,
                                              callbacks=[InjectInf(1, 2)], plugins=[plugin], **clip)
        return {"error": error, "steps": recorder.steps, "bias": model.blocks["first"].gate.expert_bias.tolist()}
    if name in ("nan_router", "nan_loss"):
        target = "router" if name == "nan_router" else "loss"
        *_, error = fit(scenario, out_dir, world_size, rank, callbacks=[InjectNaN(1 if target == "router" else 0, 3,
                                                                                  target)])
        return {"error": error}
    if name == "nan_in_validation":
        model, trainer, recorder, error = fit(scenario, out_dir, world_size, rank, callbacks=[NaNInValidation()],
                                              val_check_interval=scenario["validate_every"], limit_val_batches=1)
        return {"error": error, "global_step": trainer.global_step}
    if name == "base":
        checkpoints = ModelCheckpoint(dirpath=out_dir / "checkpoints", save_top_k=-1, every_n_epochs=1)
        model, trainer, recorder, error = fit(scenario, out_dir, world_size, rank, callbacks=[checkpoints])
        return {"error": error, "global_step": trainer.global_step}
    if name in ("tampered", "truncated", "mismatch_experts", "mismatch_width"):
        return damaged(scenario, out_dir, world_size, rank)
    if name == "save_fails":
        checkpoints = ModelCheckpoint(dirpath=out_dir / "checkpoints", save_top_k=-1, every_n_train_steps=2,
                                      save_last=True)
        # Each trigger saves `epoch=..-step=N.ckpt` and `last.ckpt`: rank 1's third file is at step 4.
        *_, error = fit(scenario, out_dir, world_size, rank, callbacks=[checkpoints],
                        checkpoint_io=FailingIO(rank=1, fail_from=3))
        last = out_dir / "checkpoints" / "last.ckpt"
        return {"error": error, "last_step": int(read_full_checkpoint(last)["global_step"])}
    if name in ("uninterrupted", "killed", "resumed"):
        return killed_rank(scenario, out_dir, world_size, rank)
    raise ValueError(f"unknown scenario {name}")


def damaged(scenario: dict, out_dir: Path, world_size: int, rank: int) -> dict:
    """Break a copy of the base checkpoint (rank 0 only), then resume from it on every rank."""
    name = scenario["name"]
    base = Path(scenario["base"])
    broken = out_dir / "broken.ckpt"
    marker = out_dir / "code-ran"
    if rank == 0:
        shutil.copytree(base, broken)
        version = Path(committed_directory(broken))
        if name == "tampered":
            meta = torch.load(version / "meta.pt", weights_only=True)
            meta["payload"] = RunsCode(str(marker))
            torch.save(meta, version / "meta.pt")
        if name == "truncated":
            data = (version / "experts-ep00001.pt").read_bytes()
            (version / "experts-ep00001.pt").write_bytes(data[: len(data) // 3])
    dist.barrier()
    model_kwargs = {"num_experts": 4}
    if name == "mismatch_experts":
        model_kwargs = {"num_experts": 8}
    if name == "mismatch_width":
        model_kwargs = {"num_experts": 4, "d_ff": 12}
    scenario = {**scenario, "resume_from": str(broken), "model": model_kwargs, "max_epochs": 2}
    *_, error = fit(scenario, out_dir, world_size, rank)
    return {"error": error, "code_ran": marker.exists()}


def killed_rank(scenario: dict, out_dir: Path, world_size: int, rank: int) -> dict:
    """World 4, EP 2: checkpoints every 3 steps (mid-epoch: 5 steps per epoch), a sigmoid gate whose
    biases balance, a warm-up schedule, the load monitor; rank 2 is killed at step 7 in "killed"."""
    callbacks = [ExpertLoadMonitor(every_n_steps=2, log_histograms=False, log_images=False),
                 ModelCheckpoint(dirpath=scenario["checkpoint_dir"], save_top_k=-1, every_n_train_steps=3,
                                 save_last=True)]
    if scenario["name"] == "killed":
        callbacks.append(KillAt(rank=2, step=7))
    model = Scheduled(num_experts=4, gate="sigmoid", gate_kwargs={"bias_update_rate": 0.01})
    model, trainer, recorder, error = fit(
        {**scenario, "max_steps": 12, "max_epochs": -1}, out_dir, world_size, rank, model=model, callbacks=callbacks
    )
    monitor = callbacks[0]
    trainer.save_checkpoint(out_dir / "final.ckpt")  # every rank: the experts of each EP rank
    return {
        "error": error,
        "global_step": trainer.global_step,
        "losses": model.micro_batch_losses,
        "lr": trainer.optimizers[0].param_groups[0]["lr"],
        "bias": model.blocks["second"].gate.expert_bias.tolist(),
        "monitor_steps": [window.step for window in monitor.history],
        "monitor_load": [window.tokens_per_expert[1].tolist() for window in monitor.history],
    }


def main() -> None:
    run_scenarios(run)


if __name__ == "__main__":
    main()
