"""ExpertLoadMonitor in one process: what reaches TensorBoard and the other loggers, the window sums,
the formulas, and checkpoint/resume of the callback's state."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_moe import ExpertLoadMonitor, MoELayer, collect_aux_loss
from lightning_moe.callbacks.load_metrics import LoadWindow, summarize

D_MODEL, SEQ, BATCH = 8, 5, 4
PER_LAYER = ("max_vio", "max_vio_run", "cv", "dead_experts", "dropped_fraction", "experts_per_token", "router_entropy")


class TinyMoE(L.LightningModule):
    """Two residual MoE layers and a regression head, small enough for a CPU test."""

    def __init__(self, layer_kwargs=({"num_experts": 4, "top_k": 2}, {"num_experts": 6, "top_k": 1}), lr=0.1):
        super().__init__()
        self.blocks = nn.ModuleList(MoELayer(d_model=D_MODEL, d_ff=16, **kwargs) for kwargs in layer_kwargs)
        self.head = nn.Linear(D_MODEL, 1)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x_BSD, y_BS = batch
        for block in self.blocks:
            x_BSD = x_BSD + block(x_BSD)
        return nn.functional.mse_loss(self.head(x_BSD).squeeze(-1), y_BS) + collect_aux_loss(self)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loader(num_samples=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(num_samples, SEQ, D_MODEL, generator=generator), torch.randn(num_samples, SEQ))
    return DataLoader(data, batch_size=BATCH)


def trainer(tmp_path, monitor, *, max_steps, logger=None, **kwargs):
    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=logger if logger is not None else False,
        callbacks=[monitor, *kwargs.pop("callbacks", [])],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


class RecordLoad(L.Callback):
    """Reference: the layers' own per-micro-batch counts, summed per optimizer step (numbered from 1)."""

    def __init__(self):
        self.per_step: dict[int, list[torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        layers = [m for m in pl_module.modules() if isinstance(m, MoELayer)]
        counts = [layer.tokens_per_expert.clone() for layer in layers]
        step = batch_idx // trainer.accumulate_grad_batches + 1
        if step in self.per_step:
            self.per_step[step] = [a + b for a, b in zip(self.per_step[step], counts)]
        else:
            self.per_step[step] = counts


def test_event_files_hold_scalars_histograms_and_images_for_every_layer(tmp_path):
    torch.manual_seed(0)
    monitor = ExpertLoadMonitor(every_n_steps=2, image_every_n_steps=2)
    loggers = [TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")]
    trainer(tmp_path, monitor, max_steps=4, logger=loggers).fit(TinyMoE(), loader())

    events = EventAccumulator(loggers[0].log_dir, size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    for layer in range(2):
        for name in PER_LAYER:
            assert [e.step for e in events.Scalars(f"moe/layer{layer}/{name}")] == [2, 4]
        histograms = events.Histograms(f"moe/layer{layer}/tokens_per_expert")
        assert [h.step for h in histograms] == [2, 4]
        for histogram, (step, load_E) in zip(histograms, monitor.load_history(layer)):
            # One bucket per expert holding its token count: the x axis of the histogram is the expert id.
            assert histogram.histogram_value.bucket == load_E.tolist()
            assert histogram.histogram_value.bucket_limit == [e + 1.0 for e in range(load_E.numel())]
    for name in ("max_vio", "max_vio_run", "cv", "dead_experts", "dropped_fraction", "experts_per_token"):
        assert f"moe/{name}" in tags["scalars"]
    images = events.Images("moe/load_heatmap")
    assert [i.step for i in images] == [2, 4]
    assert images[-1].encoded_image_string.startswith(b"\x89PNG")
    assert "moe/ep_traffic" not in tags["images"]  # no expert parallelism: see the distributed test
    assert events.Scalars("moe/layer0/max_vio")[-1].value == pytest.approx(monitor.latest_metrics["moe/layer0/max_vio"])

    # Other loggers receive the same scalars.
    with open(Path(loggers[1].log_dir) / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row.get("moe/layer1/cv")]
    assert [int(row["step"]) for row in rows] == [2, 4]
    assert float(rows[-1]["moe/layer1/cv"]) == pytest.approx(monitor.latest_metrics["moe/layer1/cv"])


def test_dropless_counts_of_a_step_sum_to_tokens_times_k(tmp_path):
    torch.manual_seed(1)
    monitor, reference = ExpertLoadMonitor(every_n_steps=1, log_images=False), RecordLoad()
    # Two micro-batches per optimizer step: a window holds both.
    trainer(tmp_path, monitor, max_steps=3, accumulate_grad_batches=2, callbacks=[reference]).fit(TinyMoE(), loader())

    assert [window.step for window in monitor.history] == [1, 2, 3]
    tokens_per_step = 2 * BATCH * SEQ
    for layer, top_k in ((0, 2), (1, 1)):
        for step, load_E in monitor.load_history(layer):
            assert int(load_E.sum()) == tokens_per_step * top_k
            assert torch.equal(load_E, reference.per_step[step][layer])
        assert torch.equal(monitor.run_load(layer), sum(load for _, load in monitor.load_history(layer)))
        window = monitor.history[-1]
        assert window.routed[layer] == tokens_per_step * top_k and window.dropped[layer] == 0
        assert window.num_tokens[layer] == tokens_per_step
        # Without expert parallelism every token and all its assignments stay on the only EP rank.
        assert monitor.traffic(layer).tolist() == [[tokens_per_step]]
        assert monitor.rank_load(layer).tolist() == [tokens_per_step * top_k]
        assert monitor.latest_metrics[f"moe/layer{layer}/experts_per_token"] == top_k
        assert monitor.latest_metrics[f"moe/layer{layer}/dropped_fraction"] == 0.0
    assert torch.equal(monitor.latest_load(0), monitor.history[-1].tokens_per_expert[0])
    assert monitor.traffic().tolist() == [[tokens_per_step * 2]]


def test_capacity_drops_are_counted(tmp_path):
    torch.manual_seed(2)
    monitor = ExpertLoadMonitor(every_n_steps=2, log_images=False)
    model = TinyMoE(layer_kwargs=({"num_experts": 4, "top_k": 2, "capacity_factor": 0.5},))
    trainer(tmp_path, monitor, max_steps=2).fit(model, loader())

    window = monitor.history[-1]
    assigned = 2 * BATCH * SEQ * 2
    assert window.routed[0] == assigned
    assert window.dropped[0] > 0
    assert int(window.tokens_per_expert[0].sum()) + window.dropped[0] == assigned
    assert monitor.latest_metrics["moe/layer0/dropped_fraction"] == pytest.approx(window.dropped[0] / assigned)
    assert monitor.latest_metrics["moe/dropped_fraction"] == pytest.approx(window.dropped[0] / assigned)


def test_summary_formulas():
    window = LoadWindow(
        step=7,
        tokens_per_expert=[torch.tensor([0, 10, 30, 0]), torch.tensor([5, 5])],
        traffic=[torch.tensor([[5, 8], [12, 10]]), torch.tensor([[10, 0], [0, 0]])],
        routed=[50, 10],
        dropped=[10, 0],
        num_tokens=[25, 10],
        router_entropy=[None, 0.5],
        rank_load=[torch.tensor([20, 20]), torch.tensor([10, 0])],
        replica_split=[torch.tensor([2, 1, 0, 0, 1]), torch.tensor([0, 0, 0, 0, 0])],
    )
    run = [torch.tensor([10, 10, 40, 20]), torch.tensor([6, 4])]
    metrics = summarize(window, run)
    assert metrics["moe/layer0/max_vio"] == pytest.approx((30 - 10) / 10)
    assert metrics["moe/layer0/cv"] == pytest.approx(math.sqrt((100 + 0 + 400 + 100) / 4) / 10)
    assert metrics["moe/layer0/dead_experts"] == 2
    assert metrics["moe/layer0/dropped_fraction"] == pytest.approx(0.2)
    assert metrics["moe/layer0/experts_per_token"] == pytest.approx(2.0)
    assert metrics["moe/layer0/max_vio_run"] == pytest.approx((40 - 20) / 20)
    assert "moe/layer0/router_entropy" not in metrics  # the gate reported none
    assert metrics["moe/layer0/ep_max_vio"] == pytest.approx(0.0)  # ranks received 20 and 20
    assert metrics["moe/layer1/ep_max_vio"] == pytest.approx(1.0)  # ranks received 10 and 0
    assert metrics["moe/layer1/max_vio"] == 0.0
    assert metrics["moe/max_vio"] == pytest.approx(1.0)
    assert metrics["moe/dead_experts"] == 2
    assert metrics["moe/dropped_fraction"] == pytest.approx(10 / 60)
    assert metrics["moe/router_entropy"] == pytest.approx(0.5)
    # Per-step replica balancing kept the planned split in 2 of layer 0's 4 dispatches, the fit to
    # the plan's share in one and the even fit's local twin in one; layer 1 has no replicas to split
    # (nothing logged), so the run-level share is layer 0's.
    assert metrics["moe/layer0/replica_split_planned"] == pytest.approx(0.5)
    assert metrics["moe/layer0/replica_split_plan_share"] == pytest.approx(0.25)
    assert metrics["moe/layer0/replica_split_even_share"] == 0.0
    assert metrics["moe/layer0/replica_split_plan_share_local"] == 0.0
    assert metrics["moe/layer0/replica_split_even_share_local"] == pytest.approx(0.25)
    assert "moe/layer1/replica_split_planned" not in metrics
    assert metrics["moe/replica_split_planned"] == pytest.approx(0.5)


def test_resume_restores_the_callback_state(tmp_path):
    torch.manual_seed(3)
    first = ExpertLoadMonitor(every_n_steps=2, log_images=False)
    fit = trainer(tmp_path, first, max_steps=4)
    fit.fit(TinyMoE(), loader())
    checkpoint = tmp_path / "step4.ckpt"
    fit.save_checkpoint(checkpoint)

    # What is saved is plain tensors and containers: it loads with weights_only=True.
    saved = torch.load(checkpoint, weights_only=True)["callbacks"][first.state_key]
    assert [window["step"] for window in saved["history"]] == [2, 4]

    resumed = ExpertLoadMonitor(every_n_steps=2, log_images=False)
    trainer(tmp_path, resumed, max_steps=6).fit(TinyMoE(), loader(), ckpt_path=checkpoint)

    assert [window.step for window in resumed.history] == [2, 4, 6]
    for layer in range(2):
        for (step, before), (step_after, after) in zip(first.load_history(layer), resumed.load_history(layer)):
            assert step == step_after and torch.equal(before, after)
        assert torch.equal(resumed.run_load(layer), first.run_load(layer) + resumed.latest_load(layer))
    # The run-level MaxVio covers the steps before the checkpoint too.
    expected = (resumed.run_load(0).max() - resumed.run_load(0).float().mean()) / resumed.run_load(0).float().mean()
    assert resumed.latest_metrics["moe/layer0/max_vio_run"] == pytest.approx(expected.item())


def test_two_monitors_keep_their_own_state(tmp_path):
    """A frequent monitor and a long one in one Trainer (Lightning refused two callbacks with one
    state key); each restores its own windows, and a checkpoint from before the keys named the
    settings (the class name alone) still restores."""
    torch.manual_seed(3)
    frequent = ExpertLoadMonitor(every_n_steps=1, log_images=False, log_histograms=False)
    long = ExpertLoadMonitor(every_n_steps=2, log_images=False, log_histograms=False)
    fit = trainer(tmp_path, frequent, max_steps=4, callbacks=[long])
    fit.fit(TinyMoE(), loader())
    checkpoint = tmp_path / "step4.ckpt"
    fit.save_checkpoint(checkpoint)
    resumed = [ExpertLoadMonitor(every_n_steps=n, log_images=False, log_histograms=False) for n in (1, 2)]
    trainer(tmp_path, resumed[0], max_steps=4, callbacks=[resumed[1]]).fit(TinyMoE(), loader(), ckpt_path=checkpoint)
    assert [w.step for w in resumed[0].history] == [1, 2, 3, 4] and [w.step for w in resumed[1].history] == [2, 4]

    legacy = torch.load(checkpoint, weights_only=True)
    legacy["callbacks"] = {"ExpertLoadMonitor": legacy["callbacks"][long.state_key]}
    torch.save(legacy, tmp_path / "legacy.ckpt")
    old = ExpertLoadMonitor(every_n_steps=2, log_images=False, log_histograms=False)
    trainer(tmp_path, old, max_steps=4).fit(TinyMoE(), loader(), ckpt_path=tmp_path / "legacy.ckpt")
    assert [w.step for w in old.history] == [2, 4]


def test_a_monitor_resumed_with_another_cadence_keeps_the_saved_state(tmp_path):
    """The state key names the settings: resumed with another `every_n_steps`, the checkpoint's one
    monitor is restored into the new one (with a warning), not dropped."""
    torch.manual_seed(3)
    first = ExpertLoadMonitor(every_n_steps=2, log_images=False, log_histograms=False)
    fit = trainer(tmp_path, first, max_steps=4)
    fit.fit(TinyMoE(), loader())
    fit.save_checkpoint(tmp_path / "step4.ckpt")
    resumed = ExpertLoadMonitor(every_n_steps=3, log_images=False, log_histograms=False)
    with pytest.warns(UserWarning, match="restoring its history and run totals"):
        trainer(tmp_path, resumed, max_steps=6).fit(TinyMoE(), loader(), ckpt_path=tmp_path / "step4.ckpt")
    assert [window.step for window in resumed.history] == [2, 4, 6]
    assert torch.equal(resumed.run_load(0), first.run_load(0) + resumed.latest_load(0))


def test_run_load_is_a_copy(tmp_path):
    """What a caller keeps of `run_load` does not move with later windows, and editing it does not
    edit the monitor's totals."""
    monitor = ExpertLoadMonitor(every_n_steps=1, log_images=False, log_histograms=False)

    class KeepRunLoad(L.Callback):
        kept: list[torch.Tensor] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.kept.append(monitor.run_load(0))

    keep = KeepRunLoad()
    trainer(tmp_path, monitor, max_steps=3, callbacks=[keep]).fit(TinyMoE(), loader())
    per_step = [int(kept.sum()) for kept in keep.kept]
    assert per_step == [BATCH * SEQ * 2 * step for step in (1, 2, 3)]  # top-2: two assignments a token
    keep.kept[-1].zero_()
    assert int(monitor.run_load(0).sum()) == 3 * BATCH * SEQ * 2


class SometimesSecondLayer(TinyMoE):
    """The second MoE layer runs in odd training batches only, and in validation."""

    def training_step(self, batch, batch_idx):
        x_BSD, y_BS = batch
        x_BSD = x_BSD + self.blocks[0](x_BSD)
        if batch_idx % 2:
            x_BSD = x_BSD + self.blocks[1](x_BSD)
        return nn.functional.mse_loss(self.head(x_BSD).squeeze(-1), y_BS)

    def validation_step(self, batch, batch_idx):
        x_BSD, _ = batch
        self.blocks[1](x_BSD + self.blocks[0](x_BSD))


def test_a_layer_that_skips_a_batch_adds_nothing_for_it(tmp_path):
    """A layer that does not run in a training batch used to add its last forward again, a
    validation forward's included (60 and 140 tokens in windows that hold 40)."""
    monitor = ExpertLoadMonitor(every_n_steps=4, log_images=False, log_histograms=False)
    validation = DataLoader(TensorDataset(torch.randn(16, SEQ, D_MODEL), torch.randn(16, SEQ)), batch_size=16)
    trainer(tmp_path, monitor, max_steps=8, val_check_interval=4, limit_val_batches=1,
            num_sanity_val_steps=0).fit(SometimesSecondLayer(), loader(), validation)
    tokens = BATCH * SEQ
    assert [(w.step, w.num_tokens) for w in monitor.history] == [(4, [4 * tokens, 2 * tokens]), (8, [4 * tokens, 2 * tokens])]
    assert [int(w.tokens_per_expert[1].sum()) for w in monitor.history] == [2 * tokens, 2 * tokens]  # top-1


def test_resume_with_another_model_is_refused(tmp_path):
    monitor = ExpertLoadMonitor(every_n_steps=1)
    monitor.load_state_dict(
        {"run_tokens_per_expert": [torch.zeros(3, dtype=torch.long)], "history": [], "layer_names": [], "latest_metrics": {}}
    )
    with pytest.raises(ValueError, match="experts per layer"):
        trainer(tmp_path, monitor, max_steps=1).fit(TinyMoE(), loader())


def test_history_is_bounded(tmp_path):
    monitor = ExpertLoadMonitor(every_n_steps=1, history_size=2, log_images=False, log_histograms=False)
    trainer(tmp_path, monitor, max_steps=5).fit(TinyMoE(), loader())
    assert [window.step for window in monitor.history] == [4, 5]
    assert int(monitor.run_load(0).sum()) == 5 * BATCH * SEQ * 2  # the run totals keep every window


def test_image_cadence_defaults_to_a_multiple_of_every_n_steps_of_at_least_50():
    assert ExpertLoadMonitor(every_n_steps=1).image_every_n_steps == 50
    assert ExpertLoadMonitor(every_n_steps=30).image_every_n_steps == 60
    assert ExpertLoadMonitor(every_n_steps=200).image_every_n_steps == 200
    assert ExpertLoadMonitor(every_n_steps=2, image_every_n_steps=4).image_every_n_steps == 4


def test_images_only_every_n_steps(tmp_path):
    monitor = ExpertLoadMonitor(every_n_steps=1, image_every_n_steps=2)
    logger = TensorBoardLogger(tmp_path)
    trainer(tmp_path, monitor, max_steps=4, logger=logger).fit(TinyMoE(), loader())
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("moe/max_vio")] == [1, 2, 3, 4]
    assert [i.step for i in events.Images("moe/load_heatmap")] == [2, 4]
    assert [h.step for h in events.Histograms("moe/layer0/tokens_per_expert")] == [1, 2, 3, 4]


class TwoOptimizers(TinyMoE):
    """Manual optimization with two optimizers: `global_step` moves by 2 a batch."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        optimizers = self.optimizers()
        for optimizer in optimizers:
            optimizer.zero_grad()
        self.manual_backward(loss)
        for optimizer in optimizers:
            optimizer.step()

    def configure_optimizers(self):
        gates = [p for name, p in self.named_parameters() if ".gate." in name]
        rest = [p for name, p in self.named_parameters() if ".gate." not in name]
        return torch.optim.SGD(gates, lr=self.lr), torch.optim.SGD(rest, lr=self.lr)


def test_images_when_a_step_that_moves_by_two_crosses_a_multiple(tmp_path):
    """Windows end at steps 4, 6, 10, 12, 16, 18 (each the first past a multiple of 3); an image
    goes with each window that crossed a multiple of 9: 10 and 18 (it went with those that landed
    on one only: 18)."""
    monitor = ExpertLoadMonitor(every_n_steps=3, image_every_n_steps=9, log_histograms=False)
    logger = TensorBoardLogger(tmp_path)
    trainer(tmp_path, monitor, max_steps=18, logger=logger).fit(TwoOptimizers(), loader())
    assert [window.step for window in monitor.history] == [4, 6, 10, 12, 16, 18]
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert [i.step for i in events.Images("moe/load_heatmap")] == [10, 18]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"history_size": -1}, "history_size"),
        ({"every_n_steps": 4, "image_every_n_steps": 6}, "image_every_n_steps"),
    ],
)
def test_bad_arguments_are_refused(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ExpertLoadMonitor(**kwargs)


def test_model_without_moe_layers_warns(tmp_path):
    class Dense(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(D_MODEL, 1)

        def training_step(self, batch, batch_idx):
            return self.linear(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    monitor = ExpertLoadMonitor(every_n_steps=1)
    with pytest.warns(UserWarning, match="no MoELayer"):
        trainer(tmp_path, monitor, max_steps=2).fit(Dense(), loader())
    assert monitor.history == []


def test_with_moe_transformer_and_validation(tmp_path):
    from lightning_moe import MoETransformer

    torch.manual_seed(4)
    model = MoETransformer(
        vocab_size=32, d_model=16, n_layers=3, n_heads=2, d_ff=32, max_seq_len=8, num_experts=4, top_k=2,
        first_k_dense=1, warmup_steps=1,
    )
    tokens = torch.randint(0, 32, (24, 9))
    data = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=3)
    monitor, reference = ExpertLoadMonitor(every_n_steps=2, log_images=False), RecordLoad()
    trainer(
        tmp_path, monitor, max_steps=4, callbacks=[reference], val_check_interval=2, limit_val_batches=2,
        num_sanity_val_steps=0,
    ).fit(model, data, data)

    assert monitor.layer_names == ["blocks.1.ffn", "blocks.2.ffn"]  # the first block is dense
    assert monitor.num_layers == 2
    for layer in range(2):
        for step, load_E in monitor.load_history(layer):
            # Training micro-batches only: validation forwards between them are not counted.
            assert torch.equal(load_E, reference.per_step[step - 1][layer] + reference.per_step[step][layer])
            assert int(load_E.sum()) == 2 * 3 * 8 * 2
