"""A plain user LightningModule with two MoE layers, its data, and a single-process reference loop.

Shared by the multi-process workers (which train it under MoEStrategy) and the tests (which run the
reference in-process and compare). Shape legend: ``B`` batch, ``S`` sequence, ``D`` width.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_moe import MoELayer, collect_aux_loss
from lightning_moe.layers import moe_layers, register_global_batch_end

D_MODEL, D_FF, SEQ = 16, 8, 4


class TwoMoELayers(L.LightningModule):
    """Not an MoETransformer: a user's own module with two MoE layers somewhere inside it."""

    def __init__(
        self,
        *,
        num_experts: int = 4,
        gate: str = "topk",
        top_k: int = 2,
        gate_kwargs: dict[str, Any] | None = None,
        capacity_factor: float | None = None,
        pad_to_capacity: bool = False,
        lr: float = 1e-2,
        seed: int = 0,
        d_ff: int = D_FF,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        common = dict(d_model=D_MODEL, d_ff=d_ff, num_experts=num_experts, gate=gate, top_k=top_k,
                      gate_kwargs=gate_kwargs, capacity_factor=capacity_factor, pad_to_capacity=pad_to_capacity,
                      init_std=0.2)
        self.proj_in = nn.Linear(D_MODEL, D_MODEL)
        self.blocks = nn.ModuleDict({"first": MoELayer(**common), "second": MoELayer(**common)})
        self.proj_out = nn.Linear(D_MODEL, D_MODEL)
        self.micro_batch_losses: list[float] = []

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        h_BSD = self.proj_in(x_BSD)
        h_BSD = h_BSD + self.blocks["first"](h_BSD)
        h_BSD = h_BSD + self.blocks["second"](torch.tanh(h_BSD))
        return self.proj_out(h_BSD)

    def loss(self, batch: Any) -> torch.Tensor:
        x_BSD, y_BSD = batch
        return F.mse_loss(self(x_BSD).float(), y_BSD) + collect_aux_loss(self)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.micro_batch_losses.append(float(loss.detach()))
        self.log("train_loss", loss, sync_dist=True, prog_bar=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x_BSD, y_BSD = batch
        self.log("val_loss", F.mse_loss(self(x_BSD).float(), y_BSD), sync_dist=True)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)


class LateExperts(TwoMoELayers):
    """Creates its MoE layers in ``configure_model``, as a model too large for one process would."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        del self.blocks  # built again, later

    def configure_model(self) -> None:
        if hasattr(self, "blocks"):
            return
        torch.manual_seed(self.hparams.seed + 1)
        common = dict(d_model=D_MODEL, d_ff=self.hparams.d_ff, num_experts=self.hparams.num_experts,
                      gate=self.hparams.gate, top_k=self.hparams.top_k, gate_kwargs=self.hparams.gate_kwargs,
                      capacity_factor=self.hparams.capacity_factor, init_std=0.2)
        self.blocks = nn.ModuleDict({"first": MoELayer(**common), "second": MoELayer(**common)})


class StagedExperts(TwoMoELayers):
    """Staged fine-tuning: the first layer's experts start frozen and train from optimizer step
    ``UNFREEZE_AT`` on (the dense weights and the second layer's experts train throughout)."""

    UNFREEZE_AT = 2

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.blocks["first"].experts.requires_grad_(False)

    def at_step(self, step: int) -> None:
        if step >= self.UNFREEZE_AT:
            self.blocks["first"].experts.requires_grad_(True)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.at_step(self.global_step)


def dataset(num_samples: int, seed: int = 1) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, SEQ, D_MODEL, generator=generator)
    y = torch.sin(x.flip(-1) * 2) + 0.1 * torch.randn(num_samples, SEQ, D_MODEL, generator=generator)
    return TensorDataset(x, y)


def dataloader(num_samples: int, batch_size: int, *, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Rank ``r`` reads samples ``r, r + W, r + 2W, ...`` in order (pass ``use_distributed_sampler=False``
    to the Trainer: the reference below relies on this exact split)."""
    return DataLoader(dataset(num_samples), batch_size=batch_size, sampler=list(range(rank, num_samples, world_size)))


def reference_run(
    model_kwargs: dict[str, Any],
    *,
    world_size: int,
    batch_size: int,
    accumulate: int,
    steps: int,
    clip: float | None,
    num_samples: int,
    device_groups: tuple[list[int], int] | None = None,
    model_class: type[TwoMoELayers] | None = None,
    pool_micro_batches: bool = True,
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """What ``world_size`` DDP ranks with per-rank batches ``batch_size`` compute, in one process.

    Rank ``r`` reads samples ``r, r + W, ...`` (see :func:`dataloader`); each rank's
    micro-batch loss (task + its own aux losses) is averaged over ranks and micro-batches, as DDP
    and Lightning's accumulation do. Returns the per-step losses and the final state dict. Steps
    wrap around the data like epochs do. ``pool_micro_batches=False``: global-batch load-balancing
    losses count each micro-batch alone instead of every one since the optimizer step.
    """
    model = (model_class or TwoMoELayers)(**model_kwargs)
    model.configure_model()
    if device_groups is not None:
        for layer in (model.blocks["first"], model.blocks["second"]):
            layer.gate.set_expert_groups(torch.tensor(device_groups[0]), device_groups[1])
    data = dataset(num_samples)
    optimizer = model.configure_optimizers()
    register_global_batch_end(optimizer, model)  # as MoEStrategy does: bias updates, pooled global counts
    for layer in moe_layers(model):
        layer.pool_micro_batches = pool_micro_batches
    per_epoch = num_samples // (world_size * batch_size * accumulate)
    losses = []
    for step in range(steps):
        if hasattr(model, "at_step"):
            model.at_step(step)
        optimizer.zero_grad()
        step_losses = []
        for micro in range(accumulate):
            global_micro = (step % per_epoch) * accumulate + micro
            for rank in range(world_size):
                index = [rank + world_size * (global_micro * batch_size + j) for j in range(batch_size)]
                loss = model.loss(data[index])
                (loss / (world_size * accumulate)).backward()
                step_losses.append(float(loss.detach()))
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        losses.append(sum(step_losses) / len(step_losses))
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}
