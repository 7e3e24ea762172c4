"""One rank of the drop-in tests: Lightning's DDPStrategy behaviours, run with DDPStrategy and with
MoEStrategy in its place, on a dense model and on an MoE model. Each scenario writes what the rank saw
to ``OUT/<scenario>/rank<r>.json`` (and tensors to ``rank<r>.pt``).

Usage: ``python dropin_worker.py SCENARIOS.json OUT_DIR`` (started by tests/dist_workers/launch.py).
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)

import lightning as L  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.fabric.plugins import TorchCheckpointIO  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import Logger  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402
from launch import fit_scenario, run_scenarios  # noqa: E402
from models import D_MODEL, TwoMoELayers, dataloader  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState  # noqa: E402
from torch.distributed.optim import ZeroRedundancyOptimizer  # noqa: E402

from lightning_moe import MoEStrategy, MoETransformer, load_from_checkpoint  # noqa: E402
from lightning_moe.checkpoint import is_sharded_checkpoint, read_full_checkpoint  # noqa: E402
from lightning_moe.parallel.averaging import ExpertAwareModelAverager  # noqa: E402

GLOBAL_BATCH, SAMPLES = 8, 80


class Dense(L.LightningModule):
    """No MoE layer at all: MoEStrategy must behave exactly like DDPStrategy on it."""

    def __init__(self, *, lr: float = 0.05, zero: bool = False, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(D_MODEL, 32), nn.ReLU(), nn.Linear(32, D_MODEL))
        self.norm = nn.BatchNorm1d(D_MODEL)  # buffers DDP broadcasts
        self.micro_batch_losses: list[float] = []

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return self.norm(self.net(x_BSD).flatten(0, 1)).view_as(x_BSD)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.micro_batch_losses.append(float(loss.detach()))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        if self.hparams.zero:
            return ZeroRedundancyOptimizer(self.parameters(), optimizer_class=torch.optim.AdamW, lr=self.hparams.lr)
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


class RankTagged(Dense):
    """A user's module that keeps a per-rank parameter and buffer out of DDP's sync, the documented way."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        rank = dist.get_rank()
        self.rank_weight = nn.Parameter(torch.full((2,), float(rank)), requires_grad=False)
        self.register_buffer("rank_tag", torch.tensor([float(rank)]))
        self._ddp_params_and_buffers_to_ignore = ["rank_weight", "rank_tag"]


class ZeroMoE(TwoMoELayers):
    def configure_optimizers(self):
        return ZeroRedundancyOptimizer(self.parameters(), optimizer_class=torch.optim.AdamW, lr=self.hparams.lr)


class CountingIO(TorchCheckpointIO):
    def __init__(self) -> None:
        super().__init__()
        self.saved: list[str] = []

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        self.saved.append(Path(str(path)).name)
        super().save_checkpoint(checkpoint, path, storage_options)


class UploadingLogger(Logger):
    """Stands for W&B / MLflow with ``log_model=True`` (they keep the flag as ``_log_model``)."""

    def __init__(self) -> None:
        super().__init__()
        self._log_model = True

    name = "uploading"
    version = 0

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def strategy_for(scenario: dict, checkpoint_io=None):
    kind = scenario.get("strategy", "moe")
    kwargs = dict(scenario.get("strategy_kwargs", {}))
    if scenario.get("post_local_sgd"):
        kwargs.update(ddp_comm_state=PostLocalSGDState(process_group=None, subgroup=dist.group.WORLD,
                                                       start_localSGD_iter=2), model_averaging_period=2)
    if kind == "ddp":
        return DDPStrategy(checkpoint_io=checkpoint_io, **kwargs)
    return MoEStrategy(expert_parallel_size=scenario.get("ep", 1), checkpoint_io=checkpoint_io, **kwargs)


def trainer_for(scenario: dict, out_dir: Path, world_size: int, **overrides) -> L.Trainer:
    checkpoint_dir = str(out_dir / "checkpoints")
    kwargs = dict(
        accelerator="cpu", devices=world_size, max_epochs=scenario.get("max_epochs", 1),
        accumulate_grad_batches=2, gradient_clip_val=scenario.get("clip", 0.05),
        callbacks=[ModelCheckpoint(dirpath=checkpoint_dir, save_top_k=-1, every_n_epochs=1)],
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def build_model(scenario: dict):
    kind = scenario.get("model", "dense")
    if kind == "dense":
        return Dense(zero=scenario.get("zero", False))
    if kind == "rank_tagged":
        return RankTagged()
    model_class = ZeroMoE if scenario.get("zero") else TwoMoELayers
    return model_class(**scenario.get("model_kwargs", {"num_experts": 4}))


def run(scenario: dict, out_dir: Path, world_size: int, rank: int) -> dict:
    loader = dataloader(SAMPLES, GLOBAL_BATCH // world_size, rank=rank, world_size=world_size)
    name = scenario["name"]
    if name == "averager":
        return averager_check(world_size, rank)
    if name == "val_ppl":
        return val_ppl_check(out_dir, world_size, rank)

    model = build_model(scenario)
    io = CountingIO() if scenario.get("counting_io") else None
    loggers = [UploadingLogger()] if scenario.get("uploading_logger") else False
    strategy = strategy_for(scenario, io)
    trainer = trainer_for(scenario, out_dir, world_size, logger=loggers, strategy=strategy)
    groups_before = len(dist.distributed_c10d._world.pg_map) if dist.is_initialized() else None
    error = fit_scenario(trainer, model, loader, scenario)
    if error is not None:
        return {"error": error}
    result = {
        "losses": model.micro_batch_losses,
        "global_step": trainer.global_step,
        "groups_before": groups_before,
        "groups_after": len(dist.distributed_c10d._world.pg_map),
        "saved_through_io": io.saved if io is not None else None,
        "model_averager": type(trainer.strategy._model_averager).__name__,
    }
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out_dir / f"rank{rank}.pt")
    if scenario.get("save_to_url"):
        # Straight to the strategy: ModelCheckpoint itself turns `file://` URLs into relative paths.
        trainer.save_checkpoint(scenario["save_to_url"])
    checkpoint = sorted(Path(trainer.checkpoint_callback.dirpath).glob("epoch=*"))[-1]
    result["checkpoint_is_directory"] = is_sharded_checkpoint(checkpoint)
    if scenario.get("model", "dense") != "moe":
        # The calls users know: a LightningModule's classmethod and torch.load, with no special helper.
        restored = type(model).load_from_checkpoint(checkpoint)
        result["restored_matches"] = all(
            torch.equal(a, b) for a, b in zip(restored.state_dict().values(), model.state_dict().values())
        )
        result["torch_load_keys"] = sorted(torch.load(checkpoint, weights_only=True))
    else:
        restored = load_from_checkpoint(TwoMoELayers, checkpoint)
        full = read_full_checkpoint(checkpoint)["state_dict"]
        result["restored_matches"] = all(torch.equal(restored.state_dict()[k], full[k]) for k in full)
    if scenario.get("model") == "rank_tagged":
        result["rank_tag"] = model.rank_tag.tolist()
        result["rank_weight"] = model.rank_weight.tolist()
        evaluator = L.Trainer(accelerator="cpu", devices=world_size, strategy=strategy_for(scenario),
                              logger=False, enable_progress_bar=False, enable_model_summary=False,
                              use_distributed_sampler=False)
        evaluator.validate(model, loader, verbose=False)  # outside fit: states synced by hand
        result["rank_tag_after_validate"] = model.rank_tag.tolist()
    return result


def averager_check(world_size: int, rank: int) -> dict:
    """Post-local SGD averaging at world 4, EP 2: dense over the world, experts over EDP only."""
    from lightning_moe.layers.experts import mark_expert_param
    from lightning_moe.parallel.mesh import build_expert_parallel_mesh

    mesh = build_expert_parallel_mesh(2)
    dense = nn.Parameter(torch.full((3,), float(rank)))
    expert = mark_expert_param(nn.Parameter(torch.full((2,), float(rank))))
    averager = ExpertAwareModelAverager(period=2, warmup_steps=1, edp_group=mesh.edp_group)
    averager.average_parameters([dense, expert])  # step 0: warm-up, nothing averaged
    before = (dense.tolist(), expert.tolist())
    averager.average_parameters([dense, expert])  # step 1: averaged
    result = {"before": before, "dense": dense.tolist(), "expert": expert.tolist(), "edp_rank": mesh.edp_rank}
    return result


def val_ppl_check(out_dir: Path, world_size: int, rank: int) -> dict:
    """Ranks evaluate different numbers of tokens (padding masked with -100) with different losses:
    val_loss must be the token-weighted mean over the world, and val_ppl its exp. (Every rank runs the same number
    of batches: under expert parallelism each forward is a collective.)"""
    torch.manual_seed(0)
    model = MoETransformer(d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16, num_experts=4,
                           vocab_size=32)
    generator = torch.Generator().manual_seed(10 + rank)
    inputs = torch.randint(0, 32, (3, 8), generator=generator)
    targets = torch.randint(0, 32, (3, 8), generator=generator)
    targets[:, : 1 + rank * 6] = -100  # 7 tokens per sequence on rank 0, 1 on rank 1
    batches = [(inputs[i : i + 1], targets[i : i + 1]) for i in range(len(inputs))]
    trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy=MoEStrategy(expert_parallel_size=2),
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)
    metrics = trainer.validate(model, DataLoader(batches, batch_size=None), verbose=False)[0]
    loss_sum, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in batches:
            loss, count = model.language_model_loss(batch)
            loss_sum += float(loss) * count
            tokens += count
    return {"val_ppl": metrics["val_ppl"], "val_loss": metrics["val_loss"], "loss_sum": loss_sum, "tokens": tokens}


def main() -> None:
    # Joined before Lightning, which then uses this group: PostLocalSGDState needs a group at construction.
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    run_scenarios(run)


if __name__ == "__main__":
    main()
