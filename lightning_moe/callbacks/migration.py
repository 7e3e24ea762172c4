"""ExpertMigration: re-place experts from the measured load, topology-aware, while training runs.

Every ``every_n_steps`` optimizer steps the callback takes the load of the window (tokens from each
source EP rank to each logical expert, ``[R, E]`` per layer: from an :class:`ExpertLoadMonitor` when
there is one, otherwise counted here), asks a :class:`~lightning_moe.planning.PlacementPlanner` per
MoE layer for a plan (slots with replicas and routing fractions) that lowers the modelled layer time
on the cluster's :class:`~lightning_moe.planning.Topology` over the last windows, and moves only the
layers whose predicted gain pays for the move (:class:`~lightning_moe.planning.trigger.MigrationTrigger`):

    gain = layer_time(kept) - layer_time(plan)  >  min_gain * layer_time(kept)          (hysteresis)
    gain * horizon_steps                         >  migration_margin * migration_time  (cost of moving)

averaged over the windows planned for, with ``kept`` the slots in force with fresh routing fractions:
what the layer gets without moving (fractions cost nothing to change, so a layer that does not move
still gets them, except where the load cannot be followed, below). The windows planned for are
the last ``history_windows`` unless fractions fitted to them predicted the last window worse, by
more than half the hysteresis, than fractions fitted to one window (a load that drifts away from its past);
then the last window alone. When a plan made from the window
before loses to the default placement on the window that ended (a hot spot that moves on every
window), the load cannot be followed: the default placement is weighed instead.

The move is :meth:`~lightning_moe.MoEStrategy.apply_placement`, between an optimizer step and the
next forward. The cost model's compute constant is fitted to the measured step times as windows go by
(``step ~ other + seconds_per_token * sum over layers of the busiest rank's tokens + all-to-alls``).

Every rank sees the same loads (summed over the world) and step times (their maximum over the world);
the layers are planned in turns (layer ``i`` by rank ``i % world``) and the decisions gathered, so
every rank applies the same tables. The planner is deterministic too. See docs/migration.md.

Shape legend: ``R`` EP ranks, ``E`` logical experts, ``S`` slots per rank.
"""

from __future__ import annotations

import inspect
import time
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_moe.callbacks.expert_load import ExpertLoadMonitor, _tensorboard_writers
from lightning_moe.callbacks.load_metrics import ExpertLoadMetric
from lightning_moe.callbacks.plots import render_placement
from lightning_moe.layers import MoELayer
from lightning_moe.parallel.link_probe import check_probe_options, probed_levels
from lightning_moe.parallel.migration import slot_tensors
from lightning_moe.parallel.placement import ExpertPlacement
from lightning_moe.planning import LayerCost, PlacementPlanner, Topology
from lightning_moe.planning.cost_model import assignment_seconds, planned_load_share
from lightning_moe.planning.plan import PlacementPlan
from lightning_moe.planning.trigger import MigrationTrigger

#: Key of a rank's failed planning in the gathered decisions (not a module name).
_FAILED = "<planning failed>"

#: Expert GEMM throughput assumed before the first measured windows (FLOP/s), per device type.
_DEFAULT_FLOPS = {"cuda": 4e14, "cpu": 5e10}

#: The PlacementPlanner arguments the callback sets itself (from the model, the trainer and its own).
_SET_BY_CALLBACK = (
    "self", "topology", "num_experts", "slots_per_rank", "token_bytes", "seconds_per_token", "expert_bytes",
    "horizon_steps", "migration_margin",
)


class ExpertMigration(Callback):
    """Move experts between expert-parallel ranks when the measured load makes it pay.

    Needs :class:`~lightning_moe.MoEStrategy` with ``expert_parallel_size > 1``; give it
    ``spare_expert_slots`` so that hot experts can be replicated (a permutation alone rarely
    balances a skewed load).

    Logs, at each re-plan, ``moe/migration/...``: ``layers_moved``, ``layers_rerouted`` (new routing
    fractions, same slots), ``experts_moved`` (slots that changed, over all layers), ``bytes`` (sent over the world), ``seconds`` (the move),
    ``predicted_layer_seconds_before`` / ``_after`` (sum over layers, cost model),
    ``predicted_max_over_mean_before`` / ``_after`` (mean over layers), ``cross_node_share_before`` /
    ``_after``, ``plan_seconds`` (counting, planning and deciding), ``measured_step_seconds`` (the window's mean
    step time, the slowest rank's: the time of a step's batches, from their start to their end, so
    that data loading, validation and checkpointing between them are left out) and, at
    the first re-plan after a move, ``measured_step_seconds_after`` next to the ``_before`` logged
    with the move; and a placement image per layer (``moe/layer{i}/placement``) to TensorBoard.

    Args:
        every_n_steps: optimizer steps between re-plans (the window of load each plan reads).
        topology: the cluster as the planner sees one EP group; ``None`` builds it from the trainer's
            nodes and devices (:meth:`Topology.from_trainer`, default link bandwidths).
        measure_links: probe the real links when training starts (:meth:`Topology.measure`: timed
            transfers inside a node and across nodes, the same figures on every rank) and plan
            with the measured bandwidths and latencies instead of the declared ones (logged as
            ``moe/migration/{intra,inter}_node_{bandwidth,latency}``, bytes/s and seconds, for the
            levels the group has).
            ``True`` probes with the defaults (64 MiB messages); a dict passes ``message_bytes``
            and ``repetitions``.
        horizon_steps: steps a new plan is expected to stay in force, over which its gain is
            counted; ``None`` is ``every_n_steps``.
        migration_margin: the gain over the horizon must exceed this many times the move's time.
        min_gain: the predicted layer time must drop by at least this share (of the time the slots
            in force reach with fresh fractions) before a layer moves, so that noise in the load
            does not make placements oscillate; it also sets how much a load must be predictable to
            be followed (see :class:`~lightning_moe.planning.trigger.MigrationTrigger`).
        history_windows: most windows of load a plan is made for (see above); 1 plans for the last
            window alone.
        flops_per_second: expert GEMM throughput assumed before the step times calibrate it;
            ``None`` picks a default for the device type.
        calibrate: fit the cost model's compute constant to the measured step times.
        log_images: write a placement image per layer to TensorBoard at each move.
        planner_options: further :class:`PlacementPlanner` arguments (``search_rounds``, ...).
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        *,
        topology: Topology | None = None,
        measure_links: bool | dict[str, int] = False,
        horizon_steps: int | None = None,
        migration_margin: float = 2.0,
        min_gain: float = 0.02,
        history_windows: int = 4,
        flops_per_second: float | None = None,
        calibrate: bool = True,
        log_images: bool = True,
        planner_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("every_n_steps", every_n_steps), ("horizon_steps", 1 if horizon_steps is None else horizon_steps),
            ("history_windows", history_windows),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ExpertMigration: `{name}` must be a positive integer, got {value!r}.")
        for name, value in (("migration_margin", migration_margin), ("min_gain", min_gain)):
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
                raise ValueError(f"ExpertMigration: `{name}` must be a finite number >= 0, got {value!r}.")
        if flops_per_second is not None and not flops_per_second > 0:
            raise ValueError(f"ExpertMigration: `flops_per_second` must be > 0, got {flops_per_second!r}.")
        self.every_n_steps = every_n_steps
        self.topology = topology
        self.link_probe_options = _link_probe_options(measure_links)
        self.horizon_steps = horizon_steps or every_n_steps
        self.migration_margin = float(migration_margin)
        self.min_gain = float(min_gain)
        self.trigger = MigrationTrigger(self.horizon_steps, self.migration_margin, self.min_gain, history_windows)
        self.flops_per_second = flops_per_second
        self.calibrate = calibrate
        self.log_images = log_images
        self.planner_options = _checked_planner_options(planner_options)

        #: One dict per re-plan: step, layers and slots moved, bytes, seconds, predicted and measured times.
        self.history: list[dict[str, Any]] = []
        self.seconds_per_token: float | None = None
        self._samples: list[tuple[float, float, float]] = []  # (busiest tokens, all-to-all s, step s)
        # Per layer, the [R, E] loads of the windows before the last, newest first (the trigger's history).
        self._previous_loads: dict[str, list[np.ndarray]] = {}
        # The schedule: the step of the last re-plan (or of the start), saved in checkpoints.
        self._last_plan_step = 0
        # A window closed by an optimizer step and not yet planned from: its step time (the world's)
        # and, when the callback counts itself, its loads. Saved in checkpoints: Lightning writes
        # them after the step that closes a window and before the next batch, where the re-plan runs.
        self._pending: dict[str, Any] | None = None
        self._restored = False
        # (world size, EP size) of the run that saved the restored state (None: not restored, or older).
        self._saved_layout: tuple[int, int] | None = None
        self._layers: list[tuple[str, MoELayer]] = []
        self._metric: ExpertLoadMetric | None = None
        self._counted_from = 0  # the step after which the callback's own counts start
        self._monitor: ExpertLoadMonitor | None = None
        self._due = False
        self._seen_step = 0  # global_step at the last batch end
        self._batch_started: float | None = None
        self._step_elapsed = 0.0  # the current step's batches so far, in seconds
        self._step_seconds: list[float] = []
        self._moved_at: int | None = None

    # ------------------------------------------------------------------------------ Lightning hooks

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = trainer.strategy
        layers = [
            (name, module) for name, module in pl_module.named_modules()
            if isinstance(module, MoELayer) and getattr(module.dispatcher, "ep_size", 1) > 1
        ]
        if not hasattr(strategy, "apply_placement") or not layers:
            rank_zero_warn(
                "ExpertMigration: no MoE layer is sharded over more than one EP rank (use MoEStrategy with "
                "expert_parallel_size > 1); there is nothing to migrate."
            )
            self._layers = []
            return
        self._layers = layers
        ep_size = layers[0][1].dispatcher.ep_size
        if self.topology is None:
            self.topology = Topology.from_trainer(trainer, ep_size)
        elif self.topology.num_ranks != ep_size:
            raise ValueError(
                f"ExpertMigration: `topology` has {self.topology.num_ranks} ranks but the EP groups have {ep_size}. "
                f"Describe one EP group: num_nodes * ranks_per_node = expert_parallel_size."
            )
        if self.link_probe_options is not None:
            # A collective over the world (the first EP group's links are probed, every rank gets
            # the same figures), on every rank: on_train_start runs on all of them.
            self.topology = self.topology.measure(**self.link_probe_options)
            rank_zero_info(f"ExpertMigration: measured links: {self.topology}")
            measured = {
                f"moe/migration/{level}_{figure}": float(getattr(self.topology, f"{level}_{figure}"))
                for level in probed_levels(self.topology.num_nodes, self.topology.ranks_per_node)
                for figure in ("bandwidth", "latency")
            }
            for logger in trainer.loggers:  # loggers write on rank 0 only
                logger.log_metrics(measured, step=trainer.global_step)
        monitors = [c for c in trainer.callbacks if isinstance(c, ExpertLoadMonitor)]
        # A monitor serves when its windows tile ours and its history keeps a whole window of ours.
        self._monitor = next(
            (m for m in monitors
             if self.every_n_steps % m.every_n_steps == 0 and m.history_size * m.every_n_steps >= self.every_n_steps),
            None,
        )
        if self._monitor is None:
            self._metric = ExpertLoadMetric(
                num_experts=[layer.num_experts for _, layer in layers], ep_size=ep_size
            ).to(pl_module.device)
        step = trainer.global_step
        self._seen_step = self._counted_from = step
        self._step_elapsed, self._step_seconds = 0.0, []
        if not self._restored:
            self._last_plan_step, self._pending = step, None
        elif self._saved_layout is not None and self._saved_layout != _layout(ep_size):
            # Resumed at another world or EP size: the saved window (and the monitor's windows before
            # now) counted other ranks, or world sums that another number of EP groups shared. The
            # next window is measured afresh, from here; so are the windows the trigger weighs.
            self._last_plan_step, self._pending, self._previous_loads = step, None, {}
        # Resumed from a checkpoint written after a window closed: its re-plan runs at the first batch.
        self._due = self._pending is not None
        if not self._due and step - self._last_plan_step >= self.every_n_steps:
            self._last_plan_step = step  # a window whose counts the checkpoint does not hold: count anew
        self._restored = False  # a later fit without a checkpoint starts afresh

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._layers:
            return
        if self._metric is not None:
            self._metric.update([layer for _, layer in self._layers])
        now = time.perf_counter()
        self._step_elapsed += now - (self._batch_started or now)
        step = trainer.global_step
        if step == self._seen_step:  # a micro-batch of gradient accumulation: the step goes on
            return
        self._seen_step = step
        self._step_seconds.append(self._step_elapsed)
        self._step_elapsed = 0.0
        if step - self._last_plan_step >= self.every_n_steps:
            # NOTE: re-planned at the next batch's start: after every hook of this batch (the monitor
            # closes its window here too) and before the next forward, where slots may move. What
            # the window measured is closed here (collectives, on every rank), so that a checkpoint
            # written in between holds it.
            device = pl_module.device
            self._pending = {
                "step_seconds": _world_max(float(np.mean(self._step_seconds)), device),
                "loads": self._counted_loads(step) if self._metric is not None else None,
            }
            self._step_seconds = []
            self._due = True

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._due:
            self._due = False
            self.replan(trainer, pl_module)
        if self._metric is not None:  # counting itself: a layer that does not run in this batch adds nothing
            for _, layer in self._layers:
                layer.clear_records()
        self._batch_started = time.perf_counter()  # a step's time is its batches' (not the re-plan's)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [dict(entry) for entry in self.history],
            "seconds_per_token": self.seconds_per_token,
            "samples": [list(sample) for sample in self._samples],
            "last_plan_step": self._last_plan_step,
            "previous_loads": {name: [load.tolist() for load in loads] for name, loads in self._previous_loads.items()},
            "pending": None if self._pending is None else {
                "step_seconds": self._pending["step_seconds"],
                "loads": None if self._pending["loads"] is None else {
                    name: load.tolist() for name, load in self._pending["loads"].items()
                },
            },
            "moved_at": self._moved_at,
            "layout": None if not self._layers else list(_layout(self._layers[0][1].dispatcher.ep_size)),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(entry) for entry in state_dict["history"]]
        self.seconds_per_token = state_dict["seconds_per_token"]
        self._samples = [tuple(sample) for sample in state_dict["samples"]]
        self._last_plan_step = int(state_dict["last_plan_step"])
        self._restored = True
        pending = state_dict.get("pending")  # absent in checkpoints from before it was kept
        self._pending = None if pending is None else {
            "step_seconds": float(pending["step_seconds"]),
            "loads": None if pending["loads"] is None else {
                name: np.asarray(load, dtype=np.float64) for name, load in pending["loads"].items()
            },
        }
        self._moved_at = state_dict.get("moved_at")
        layout = state_dict.get("layout")  # absent in checkpoints from before it was kept
        self._saved_layout = None if layout is None else tuple(layout)
        previous = state_dict.get("previous_loads", {})  # absent in checkpoints from before it was kept
        # One [R, E] window per layer in checkpoints from before several were kept.
        self._previous_loads = {
            name: list(np.asarray(loads, dtype=np.float64).reshape(-1, *np.shape(loads)[-2:]))
            for name, loads in previous.items()
        }

    # ------------------------------------------------------------------------------ re-planning

    def replan(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Plan every layer from the window's load and move those whose gain pays (a collective: every
        rank calls it, between an optimizer step and the next forward). Returns the history entry."""
        step = trainer.global_step
        planning_started = time.perf_counter()
        device = pl_module.device  # collectives on the process group's device (NCCL: the GPU)
        pending, self._pending = self._pending, None
        if pending is None:  # called outside the schedule: close the window now
            steps = self._step_seconds
            pending = {"step_seconds": _world_max(float(np.mean(steps)) if steps else 0.0, device), "loads": None}
            self._step_seconds = []
        step_seconds = pending["step_seconds"]
        loads = pending["loads"]
        if loads is None:
            loads = self._counted_loads(step) if self._metric is not None else self._monitor_loads(step)
        self._last_plan_step = step
        strategy = trainer.strategy
        current = strategy.placements()
        planners = {name: self._planner(layer, trainer) for name, layer in self._layers}
        if self.calibrate and step_seconds > 0 and self._add_sample(loads, current, planners, step_seconds):
            planners = {name: self._planner(layer, trainer) for name, layer in self._layers}  # the new constant

        tables, entry = {}, {"step": step, "measured_step_seconds": step_seconds}
        before, after, balance_before, balance_after, cross_before, cross_after = 0.0, 0.0, [], [], [], []
        plans, layers = {}, dict(self._layers)
        for name, (plan, estimate_now, chosen) in self._decide(loads, current, planners).items():
            if plan is not None:  # new slots, or new fractions for the same slots (nothing moves then)
                table = ExpertPlacement(
                    plan.experts_per_rank, plan.routing_fractions_RER, planned_load_share(plan, loads[name]),
                    assignment_seconds(planners[name].cost, planners[name].topology),
                )
                try:  # the same plan on every rank: every rank keeps or drops it alike
                    strategy.check_placement(layers[name], table)
                except ValueError as error:
                    rank_zero_warn(f"ExpertMigration: step {step}: `{name}` keeps its placement: {error}")
                    chosen = estimate_now
                else:
                    tables[name] = table
                    if plan.experts_per_rank != current[name].experts_per_rank():
                        plans[name] = (plan, loads[name])
            before += estimate_now.layer_seconds
            after += chosen.layer_seconds
            balance_before.append(estimate_now.max_over_mean)
            balance_after.append(chosen.max_over_mean)
            cross_before.append(estimate_now.cross_node_share)
            cross_after.append(chosen.cross_node_share)
        entry.update(
            predicted_layer_seconds_before=before, predicted_layer_seconds_after=after,
            predicted_max_over_mean_before=float(np.mean(balance_before)),
            predicted_max_over_mean_after=float(np.mean(balance_after)),
            cross_node_share_before=float(np.mean(cross_before)), cross_node_share_after=float(np.mean(cross_after)),
            layers_moved=len(plans), layers_rerouted=len(tables) - len(plans), experts_moved=0, bytes=0, seconds=0.0,
        )
        if self._moved_at is not None:
            entry["measured_step_seconds_after"] = step_seconds
            self._moved_at = None
        entry["plan_seconds"] = _world_max(time.perf_counter() - planning_started, device)
        if tables:
            if dist.is_available() and dist.is_initialized():
                dist.barrier()
            start = time.perf_counter()
            report = strategy.apply_placement(tables)
            sent = torch.tensor([float(report.bytes_sent)], dtype=torch.float64, device=device)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(sent)
            entry.update(experts_moved=report.slots_moved, bytes=int(sent.item()),
                         seconds=_world_max(time.perf_counter() - start, device),
                         measured_step_seconds_before=step_seconds)
            self._moved_at = step
        # The trigger weighs the latest window and up to `history_windows` before it (its backtest).
        keep = self.trigger.history_windows
        self._previous_loads = {name: [load, *self._previous_loads.get(name, [])][:keep] for name, load in loads.items()}
        self.history.append(entry)
        self._log(trainer, entry, plans, step)
        return entry

    def _decide(self, loads, current, planners) -> dict[str, tuple[PlacementPlan | None, Any, Any]]:
        """Per layer: the trigger's plan (``None``: keep the plan in force) and the cost model's
        estimates of the plan in force and of the one chosen, on the window's load.

        The layers are shared out over the ranks (layer ``i`` is planned by rank ``i % world``), and
        the decisions gathered, so that a re-plan takes one layer's planning time per rank rather
        than every layer's; every rank then applies the same tables, by construction.
        """
        world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_available() and dist.is_initialized() else (1, 0)
        mine: dict[str, Any] = {}
        for index, (name, _) in enumerate(self._layers):
            if index % world != rank:
                continue
            planner, load_RE = planners[name], loads[name]
            now = _as_plan(current[name])
            known = [w for w in self._previous_loads.get(name, []) if w.shape == load_RE.shape and w.sum() > 0]
            try:
                plan = self.trigger.choose(now, [load_RE, *known], planner)
                estimates = planner.estimate(now, load_RE), planner.estimate(plan, load_RE, now)
            except Exception as error:  # reported on every rank below: none may wait in the gather
                mine = {_FAILED: f"rank {rank}, layer {name!r}: {type(error).__name__}: {error}"}
                if world == 1:
                    raise
                break
            mine[name] = (None if plan is now else plan, *estimates)
        if world == 1:
            return mine
        gathered: list[dict] = [{} for _ in range(world)]
        dist.all_gather_object(gathered, mine)
        failures = [part[_FAILED] for part in gathered if _FAILED in part]
        if failures:
            raise RuntimeError(f"ExpertMigration: planning failed ({'; '.join(failures)}); no layer was moved.")
        decisions = {name: decision for part in gathered for name, decision in part.items()}
        return {name: decisions[name] for name, _ in self._layers}

    def _counted_loads(self, step: int) -> dict[str, np.ndarray]:
        """The window of the callback's own counts, closed at ``step`` (a collective), per step."""
        assert self._metric is not None
        window = self._metric.compute_window(step)
        self._metric.reset()
        steps, self._counted_from = step - self._counted_from, step
        return self._per_step(window.source_load, steps)

    def _monitor_loads(self, step: int) -> dict[str, np.ndarray]:
        """The monitor's windows since the last re-plan, per step (no collective: every rank's
        monitor holds the same world sums)."""
        assert self._monitor is not None
        windows = [w for w in self._monitor.history if self._last_plan_step < w.step <= step and w.source_load]
        if not windows:
            return self._per_step([torch.zeros(l.dispatcher.ep_size, l.num_experts) for _, l in self._layers], 1)
        source = [sum(w.source_load[index] for w in windows) for index in range(len(self._layers))]
        # A window cut short by a resume covers fewer steps; windows saved before they kept it, all.
        steps = sum(w.steps if w.steps is not None else self._monitor.every_n_steps for w in windows)
        return self._per_step(source, steps)

    def _per_step(self, source_load: list[torch.Tensor], steps: int) -> dict[str, np.ndarray]:
        """Per layer, ``[R, E]`` assignments per step and per EP group: the world's counts over
        ``steps`` divided by the steps and by the expert-data-parallel replicas."""
        edp_size = max(1, (dist.get_world_size() if dist.is_initialized() else 1) // self._layers[0][1].dispatcher.ep_size)
        return {
            name: load.double().numpy() / max(steps, 1) / edp_size for (name, _), load in zip(self._layers, source_load)
        }

    def _planner(self, layer: MoELayer, trainer: pl.Trainer) -> PlacementPlanner:
        placement = layer.dispatcher.placement
        experts = layer.experts
        parameter = experts.w_in
        autocast_bytes = 2 if str(trainer.precision).startswith(("bf16", "16")) else parameter.element_size()
        # Bytes a slot moves: each tensor whose first dimension is the slot (weights, optimizer state).
        expert_bytes = sum(t[0].numel() * t.element_size() for t in slot_tensors(layer, trainer.optimizers))
        if self.seconds_per_token is None:
            flops = self.flops_per_second or _DEFAULT_FLOPS.get(parameter.device.type, _DEFAULT_FLOPS["cpu"])
            prior = LayerCost.swiglu(d_model=experts.d_model, d_ff=experts.d_ff, flops_per_second=flops)
            self.seconds_per_token = prior.seconds_per_token
        return PlacementPlanner(
            self.topology, placement.num_experts, placement.slots_per_rank,
            token_bytes=float(experts.d_model * autocast_bytes), seconds_per_token=self.seconds_per_token,
            expert_bytes=float(expert_bytes), horizon_steps=self.horizon_steps,
            migration_margin=self.migration_margin, **self.planner_options,
        )

    def _add_sample(self, loads, current, planners, step_seconds: float) -> bool:
        """Fit ``seconds_per_token`` to the measured step times: each window gives
        ``step = other + a * sum_layers busiest_tokens + sum_layers all_to_all`` (least squares over
        windows, ``a`` and ``other`` non-negative; kept at its prior until the windows differ).
        Returns whether the constant changed."""
        busiest, all_to_all = 0.0, 0.0
        for name, _ in self._layers:
            estimate = planners[name].estimate(_as_plan(current[name]), loads[name])
            busiest += estimate.max_compute_load
            all_to_all += estimate.layer_seconds - estimate.compute_seconds
        self._samples.append((busiest, all_to_all, step_seconds))
        samples = np.array(self._samples[-32:])
        if len(samples) < 2 or np.ptp(samples[:, 0]) <= 1e-9 * max(samples[:, 0].max(), 1.0):
            return False
        tokens, compute = samples[:, 0], samples[:, 2] - samples[:, 1]
        columns = np.stack([tokens, np.ones(len(samples))], axis=1)
        (per_token, other), *_ = np.linalg.lstsq(columns, compute, rcond=None)
        if other < 0:  # the non-negative least squares optimum then lies on other = 0
            per_token = float(tokens @ compute / (tokens @ tokens))
        if per_token > 0 and per_token != self.seconds_per_token:
            self.seconds_per_token = float(per_token)
            return True
        return False

    def _log(self, trainer: pl.Trainer, entry: dict[str, Any], plans: dict, step: int) -> None:
        metrics = {f"moe/migration/{key}": float(value) for key, value in entry.items() if key != "step"}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if not (self.log_images and plans and trainer.is_global_zero):
            return
        names = [name for name, _ in self._layers]
        for experiment in _tensorboard_writers(trainer):
            for name, (plan, load_RE) in plans.items():
                processed_RE = np.einsum("re,red->de", load_RE, plan.routing_fractions_RER.numpy())
                holders_RE = plan.slot_counts_ER().T > 0
                index = names.index(name)
                image = render_placement(processed_RE, holders_RE, step=step, title=f"MoE layer {index} placement")
                experiment.add_image(f"moe/layer{index}/placement", image, global_step=step, dataformats="HWC")


def _as_plan(placement: ExpertPlacement) -> PlacementPlan:
    return PlacementPlan(placement.experts_per_rank(), placement.routing_fractions_RER.clone())


def _layout(ep_size: int) -> tuple[int, int]:
    """(world size, EP size): what the saved windows' shapes and per-group scale depend on."""
    return (dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1), ep_size


def _world_max(value: float, device: torch.device) -> float:
    """The maximum of ``value`` over every rank (the same float on every rank)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def _checked_planner_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """``planner_options`` checked before training starts: names the planner takes and the callback
    does not set, with values the planner accepts."""
    options = dict(options or {})
    accepted = [name for name in inspect.signature(PlacementPlanner.__init__).parameters if name not in _SET_BY_CALLBACK]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"ExpertMigration: `planner_options` has {unknown}, which the callback sets itself or the planner does not "
            f"take. It takes {accepted}."
        )
    try:  # the planner checks its values; a one-rank, one-expert planner is enough for that
        PlacementPlanner(Topology(1, 1), 1, 1, token_bytes=1.0, seconds_per_token=1.0, **options)
    except ValueError as error:
        raise ValueError(f"ExpertMigration: `planner_options`: {error}") from None
    return options


def _link_probe_options(measure_links: bool | dict[str, int]) -> dict[str, int] | None:
    """The options of :meth:`Topology.measure` that ``measure_links`` asks for (``None``: no probe),
    checked before training starts."""
    if isinstance(measure_links, bool):
        return {} if measure_links else None
    if not isinstance(measure_links, dict):
        raise ValueError(
            f"ExpertMigration: `measure_links` must be true, false, or a dict of `message_bytes` and `repetitions` "
            f"for Topology.measure, got {measure_links!r}."
        )
    check_probe_options("ExpertMigration: `measure_links`", **measure_links)
    return dict(measure_links)
