"""ExpertLoadMonitor: how tokens spread over experts and EP ranks, logged while training runs.

Every training micro-batch, each process adds the load its MoE layers recorded to an
:class:`~lightning_moe.callbacks.load_metrics.ExpertLoadMetric`; every ``every_n_steps`` optimizer
steps the window is summed over all processes (a collective on every rank), kept in the history
that other callbacks read, and written: scalars to every logger, histograms and heatmap images to
TensorBoard (rank 0 only).

Shape legend: ``E`` experts of a layer, ``P`` expert-parallel ranks.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_moe.callbacks.load_metrics import ExpertLoadMetric, LoadWindow, summarize
from lightning_moe.callbacks.plots import render_load_heatmap, render_traffic
from lightning_moe.layers import MoELayer


# Steps between images (and histograms) at least, unless `image_every_n_steps` says otherwise.
_DEFAULT_IMAGE_EVERY = 50


class ExpertLoadMonitor(Callback):
    """Log expert load, balance, drops, router entropy and EP traffic of every MoE layer.

    Over the optimizer steps since its last log and over all processes, for each
    :class:`~lightning_moe.MoELayer` (indexed in ``model.modules()`` order) the monitor logs:

    - scalars ``moe/layer{i}/max_vio`` ((max - mean) / mean tokens per expert, Wang et al. 2024),
      ``max_vio_run`` (the same over the whole run), ``cv`` (std / mean), ``dead_experts`` (no token
      in the window), ``dropped_fraction``, ``router_entropy``, ``experts_per_token`` and, under
      expert parallelism, ``ep_max_vio`` (MaxVio of the load per EP rank); run-level means
      ``moe/max_vio``, ``moe/cv``, ... (``moe/dead_experts`` is a sum). Every logger receives them.
    - TensorBoard histograms ``moe/layer{i}/tokens_per_expert`` (x: expert id, height: tokens)
      and, every ``image_every_n_steps``, an image ``moe/load_heatmap`` (layers x experts, load /
      layer mean) and, under expert parallelism, an image ``moe/ep_traffic`` (source x destination
      EP rank, all layers).

    API for other callbacks (e.g. expert migration); layer indices follow ``model.modules()``:

    - ``history``: list of :class:`~lightning_moe.callbacks.load_metrics.LoadWindow`, oldest first,
      at most ``history_size``; each holds per layer the world-summed ``tokens_per_expert`` ``[E]``,
      ``traffic`` ``[P, P]`` (hidden rows sent, row: source EP rank, column: destination),
      ``rank_load`` ``[P]``, ``routed``, ``dropped``, ``num_tokens`` and ``router_entropy`` of one
      window, and the ``step`` that closed it.
    - ``latest_load(i)`` -> ``[E]`` tokens per expert of the last window (``None`` before the first).
    - ``load_history(i)`` -> ``[(step, [E]), ...]``; ``run_load(i)`` -> ``[E]`` since training began.
    - ``traffic(i)`` -> ``[P, P]`` of the last window (``traffic()`` sums the layers);
      ``rank_load(i)`` -> ``[P]`` assignments processed by each EP rank's experts.
    - ``source_load(i)`` -> ``[P, E]`` assignments from each source EP rank to each logical expert in
      the last window (``source_load_history(i)`` for every window kept): the load a placement
      planner needs. Each window keeps ``L x P x E`` int64 counts: lower ``history_size`` for very
      large models.
    - ``latest_metrics``: the scalars of the last log, by tag.

    Every rank holds the same, world-summed values. The run totals and history are saved in
    checkpoints and restored on resume; the micro-batches of an unfinished window are not.

    Args:
        every_n_steps: log every this many optimizer steps (``trainer.global_step``).
        log_histograms: write the tokens-per-expert histograms to TensorBoard.
        log_images: write the heatmap and traffic images to TensorBoard.
        image_every_n_steps: write the images every this many steps (a multiple of
            ``every_n_steps``). ``None``: the first multiple of ``every_n_steps`` that is at least
            50, because rendering the two images takes 0.1-0.3 s on a CPU core, more than a small
            model's step (see docs/benchmarks.md, "Monitoring cost").
        history_size: windows kept in ``history`` (and in checkpoints).
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        *,
        log_histograms: bool = True,
        log_images: bool = True,
        image_every_n_steps: int | None = None,
        history_size: int = 100,
    ) -> None:
        super().__init__()
        for name, value in (("every_n_steps", every_n_steps), ("history_size", history_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ExpertLoadMonitor: `{name}` must be a positive integer, got {value!r}.")
        if image_every_n_steps is not None and (
            not isinstance(image_every_n_steps, int)
            or image_every_n_steps < 1
            or image_every_n_steps % every_n_steps != 0
        ):
            raise ValueError(
                f"ExpertLoadMonitor: `image_every_n_steps` must be a positive multiple of `every_n_steps` "
                f"({every_n_steps}), got {image_every_n_steps!r}. Use None for the first multiple that is >= 50."
            )
        self.every_n_steps = every_n_steps
        self.log_histograms = log_histograms
        self.log_images = log_images
        self.image_every_n_steps = image_every_n_steps or every_n_steps * -(-_DEFAULT_IMAGE_EVERY // every_n_steps)
        self.history_size = history_size

        self.history: list[LoadWindow] = []
        self.latest_metrics: dict[str, float] = {}
        self.layer_names: list[str] = []
        self._run_tokens_per_expert: list[torch.Tensor] = []
        self._layers: list[MoELayer] = []
        self._metric: ExpertLoadMetric | None = None
        self._last_step: int = 0
        self._window_opened: int = 0  # the step after which the open window's counts start

    # ----------------------------------------------------------------- API for other callbacks

    @property
    def num_layers(self) -> int:
        return len(self._run_tokens_per_expert)

    def latest_load(self, layer_index: int) -> torch.Tensor | None:
        """Tokens per expert ``[E]`` of layer ``layer_index`` in the last window, summed over ranks."""
        return self.history[-1].tokens_per_expert[layer_index] if self.history else None

    def load_history(self, layer_index: int) -> list[tuple[int, torch.Tensor]]:
        """``(step, tokens per expert [E])`` of layer ``layer_index`` for each window kept, oldest first."""
        return [(window.step, window.tokens_per_expert[layer_index]) for window in self.history]

    def run_load(self, layer_index: int) -> torch.Tensor:
        """Tokens per expert ``[E]`` of layer ``layer_index`` since training began (up to the last log);
        a copy, which later windows do not change."""
        return self._run_tokens_per_expert[layer_index].clone()

    def traffic(self, layer_index: int | None = None) -> torch.Tensor | None:
        """The ``[P, P]`` EP traffic of the last window (rows: source, columns: destination EP rank)
        of one layer, or summed over layers when ``layer_index`` is ``None``."""
        if not self.history:
            return None
        window = self.history[-1]
        if layer_index is None:
            return torch.stack(window.traffic).sum(dim=0)
        return window.traffic[layer_index]

    def traffic_history(self, layer_index: int) -> list[tuple[int, torch.Tensor]]:
        """``(step, traffic [P, P])`` of layer ``layer_index`` for each window kept, oldest first."""
        return [(window.step, window.traffic[layer_index]) for window in self.history]

    def source_load(self, layer_index: int) -> torch.Tensor | None:
        """Assignments ``[P, E]`` from each source EP rank to each logical expert in the last window."""
        return self.history[-1].source_load[layer_index] if self.history else None

    def source_load_history(self, layer_index: int) -> list[tuple[int, torch.Tensor]]:
        """``(step, source load [P, E])`` of layer ``layer_index`` for each window kept, oldest first."""
        return [(window.step, window.source_load[layer_index]) for window in self.history if window.source_load]

    def rank_load(self, layer_index: int) -> torch.Tensor | None:
        """Assignments ``[P]`` that each EP rank's experts processed in the last window."""
        return self.history[-1].rank_load[layer_index] if self.history else None

    # ----------------------------------------------------------------- Lightning hooks

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # NOTE: layers are looked up here, not in `setup`: `configure_model` and the strategy (which
        # swaps the dispatchers) have run by now.
        named = [(name, module) for name, module in pl_module.named_modules() if isinstance(module, MoELayer)]
        self.layer_names = [name for name, _ in named]
        self._layers = [module for _, module in named]
        if not self._layers:
            rank_zero_warn("ExpertLoadMonitor: the model has no MoELayer; nothing will be logged.")
            self._metric = None
            return
        num_experts = [layer.num_experts for layer in self._layers]
        if self._run_tokens_per_expert and [t.numel() for t in self._run_tokens_per_expert] != num_experts:
            raise ValueError(
                f"ExpertLoadMonitor: the restored state has experts per layer "
                f"{[t.numel() for t in self._run_tokens_per_expert]}, the model has {num_experts}. Resume with "
                f"the model the checkpoint was trained with, or use a fresh ExpertLoadMonitor."
            )
        if not self._run_tokens_per_expert:
            self._run_tokens_per_expert = [torch.zeros(num, dtype=torch.long) for num in num_experts]
        ep_size = self._layers[0].dispatcher.ep_size
        self._metric = ExpertLoadMetric(num_experts=num_experts, ep_size=ep_size).to(pl_module.device)
        self._last_step = self._window_opened = trainer.global_step

    @property
    @override
    def state_key(self) -> str:
        # Several monitors in one Trainer (say, a frequent one and a long one) each keep their state.
        return self._generate_state_key(every_n_steps=self.every_n_steps, history_size=self.history_size)

    @property
    @override
    def _legacy_state_key(self) -> str:  # type: ignore[override]
        # The key of checkpoints written before the key above: Lightning falls back to it on load.
        return type(self).__qualname__

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Resumed with other settings, the key differs from the checkpoint's: the one monitor saved
        # there is this one, with a new cadence (Lightning restores by key, after this hook).
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states or self._legacy_state_key in states:
            return
        saved = [key for key in states if isinstance(key, str) and key.startswith(type(self).__qualname__)]
        monitors = [c for c in trainer.callbacks if isinstance(c, ExpertLoadMonitor)]
        if len(saved) == 1 and len(monitors) == 1:
            rank_zero_warn(
                f"ExpertLoadMonitor: the checkpoint's monitor was saved as {saved[0]}; restoring its history and "
                f"run totals into this one ({self.state_key})."
            )
            self.load_state_dict(states[saved[0]])

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        for layer in self._layers:  # a layer that does not run in this batch must add nothing
            layer.clear_records()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._metric is None:
            return
        self._metric.update(self._layers)
        step = trainer.global_step
        # Log when this batch's optimizer step crossed a multiple of `every_n_steps` (with gradient
        # accumulation, only the last micro-batch of a step moves `global_step`).
        crossed = step // self.every_n_steps > self._last_step // self.every_n_steps
        self._last_step = step
        if crossed:
            self._log_window(trainer, step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "run_tokens_per_expert": [t.clone() for t in self._run_tokens_per_expert],
            "history": [window.to_dict() for window in self.history],
            "layer_names": list(self.layer_names),
            "latest_metrics": dict(self.latest_metrics),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._run_tokens_per_expert = [t.clone() for t in state_dict["run_tokens_per_expert"]]
        self.history = [LoadWindow.from_dict(window) for window in state_dict["history"]]
        self.layer_names = list(state_dict["layer_names"])
        self.latest_metrics = dict(state_dict["latest_metrics"])

    # ----------------------------------------------------------------- logging

    def _log_window(self, trainer: pl.Trainer, step: int) -> None:
        assert self._metric is not None
        # Collective: every rank sums the window over the world, never only rank 0.
        window = self._metric.compute_window(step, steps=step - self._window_opened)
        self._metric.reset()
        previous, self._window_opened = self._window_opened, step
        for index, load_E in enumerate(window.tokens_per_expert):
            self._run_tokens_per_expert[index] += load_E
        self.history.append(window)
        del self.history[: -self.history_size]
        self.latest_metrics = summarize(window, self._run_tokens_per_expert)

        # Lightning's loggers write on rank 0 only (`log_metrics` is rank-zero-only).
        for logger in trainer.loggers:
            logger.log_metrics(self.latest_metrics, step=step)
        if trainer.is_global_zero:
            for experiment in _tensorboard_writers(trainer):
                self._write_tensorboard(experiment, window, step, previous)

    def _write_tensorboard(self, experiment: Any, window: LoadWindow, step: int, previous: int) -> None:
        if self.log_histograms:
            for index, load_E in enumerate(window.tokens_per_expert):
                write_expert_histogram(experiment, f"moe/layer{index}/tokens_per_expert", load_E, step)
        # When the window crossed a multiple of `image_every_n_steps` (a step that moves by more than
        # one, as with two optimizers under manual optimization, need not land on one).
        if self.log_images and step // self.image_every_n_steps > previous // self.image_every_n_steps:
            heatmap = render_load_heatmap(window.tokens_per_expert, step=step)
            experiment.add_image("moe/load_heatmap", heatmap, global_step=step, dataformats="HWC")
            traffic_PP = torch.stack(window.traffic).sum(dim=0)
            if traffic_PP.shape[0] > 1:  # without expert parallelism it is one number: the rows routed
                traffic = render_traffic(traffic_PP, step=step, title="EP token traffic, all layers")
                experiment.add_image("moe/ep_traffic", traffic, global_step=step, dataformats="HWC")


def _tensorboard_writers(trainer: pl.Trainer) -> list[Any]:
    """The ``SummaryWriter``-like experiments of the trainer's loggers (TensorBoard's, or any with
    ``add_image`` and ``add_histogram_raw``)."""
    writers = []
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image") and hasattr(experiment, "add_histogram_raw"):
            writers.append(experiment)
    return writers


def write_expert_histogram(experiment: Any, tag: str, tokens_per_expert_E: torch.Tensor, step: int) -> None:
    """Write tokens per expert as a TensorBoard histogram whose x axis is the expert id.

    One bucket per expert, ``[e, e + 1)``, holding that expert's token count: TensorBoard draws
    expert ``e`` between ``e`` and ``e + 1`` (a tick at ``e + 0.5`` is its middle), and the stacked
    steps show which experts run hot over time. TensorBoard drops empty buckets at both ends and
    uses ``min``/``max`` as the outer edges, so they are the edges of the first and last expert with
    tokens.
    """
    counts = tokens_per_expert_E.double().cpu().numpy()
    used = np.flatnonzero(counts)
    if used.size == 0:
        return
    expert_ids = np.arange(counts.size, dtype=np.float64)
    experiment.add_histogram_raw(
        tag,
        min=float(used[0]),
        max=float(used[-1]) + 1.0,
        num=float(counts.sum()),
        sum=float((expert_ids * counts).sum()),
        sum_squares=float((expert_ids**2 * counts).sum()),
        bucket_limits=(expert_ids + 1.0).tolist(),
        bucket_counts=counts.tolist(),
        global_step=step,
    )
