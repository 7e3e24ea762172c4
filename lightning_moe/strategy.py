"""MoEStrategy: expert parallelism x data parallelism for any LightningModule that holds ``MoELayer``s.

The world is an ``[edp, ep]`` grid (:mod:`lightning_moe.parallel.mesh`). Every rank holds the dense
parameters (DDP averages their gradients) and ``E / ep`` experts of every MoE layer, fed by an
all-to-all dispatcher (:mod:`lightning_moe.parallel.dispatch`); expert gradients are reduced by
:mod:`lightning_moe.parallel.grad_sync`; checkpoints are written per logical expert
(:mod:`lightning_moe.checkpoint`) so that they can be resumed at any layout. See docs/parallelism.md.
"""

from __future__ import annotations

from datetime import timedelta
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import _StrategyRegistry
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies.ddp import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.amp import GradScaler
from torch.nn import Module
from torch.nn.parallel.distributed import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

import lightning.pytorch as pl
from lightning_moe.checkpoint import (
    CheckpointError,
    SavedCheckpoint,
    committed_directory,
    load_local_checkpoint,
    save_sharded_checkpoint,
)
from lightning_moe.checkpoint.layout import save_beside_then_swap, synchronous
from lightning_moe.layers.balancing import register_global_batch_end
from lightning_moe.layers.experts import is_expert_param
from lightning_moe.layers.gates.device_balance import ExpertDevices
from lightning_moe.layers.moe import MoELayer
from lightning_moe.parallel.amp import WorldSyncedGradScaler
from lightning_moe.parallel.checks import check_loggers, check_optimizers, placement_problem
from lightning_moe.parallel.averaging import ExpertAwareModelAverager
from lightning_moe.parallel.dispatch import AllToAllDispatcher
from lightning_moe.parallel.finite import raise_if_nonfinite_in
from lightning_moe.parallel.grad_sync import (
    clip_grad_norm_global,
    reduce_expert_grads_on_arrival,
    replica_counts_of_slots,
    sync_expert_grads,
)
from lightning_moe.parallel.mesh import ExpertParallelMesh, check_layout, expert_parallel_mesh
from lightning_moe.parallel.migration import MigrationReport, migrate_layers
from lightning_moe.parallel.placement import ExpertPlacement
from lightning_moe.parallel.sharding import (
    ddp_ignored_names,
    reinstate_placements,
    describe_signature_mismatch,
    expert_param_problem,
    moe_signature,
    named_moe_layers,
    shard_layer,
    sharded_expert_params,
)


class MoEStrategy(DDPStrategy):
    """Data parallelism for dense parameters and expert parallelism for the experts of every ``MoELayer``.

    ``Trainer(strategy=MoEStrategy(expert_parallel_size=4), devices=8)`` splits 8 processes into 2
    expert-data-parallel replicas of 4 consecutive ranks; each rank of a group of 4 holds a quarter of
    the experts of every MoE layer, and tokens travel to their experts by all-to-all. With
    ``expert_parallel_size=1`` it is plain DDP (every rank holds every expert). ``strategy="moe"``
    works once ``lightning_moe`` is imported.

    Args:
        expert_parallel_size: ranks that share the experts of a layer (``ep``); must divide the world
            size and every layer's ``num_experts``.
        device_limited_routing: if set to ``M``, each token's experts may span at most ``M`` EP ranks
            (DeepSeek-V2, Sec. 2.1.3): the gate keeps the ``M`` ranks whose best expert scores highest
            and picks its top-k there. Applies to the ``topk`` and ``sigmoid`` gates.
        expert_placement: the logical experts of each EP rank in slot order, e.g. ``[[3, 0], [1, 2]]``,
            the starting table of every MoE layer (an expert may appear on several ranks: replicas);
            ``None`` is the identity (rank ``r`` holds experts ``r*L .. r*L+L-1``) plus the spare
            slots below. Tables can change per layer while training runs: :meth:`apply_placement`.
        spare_expert_slots: slots each EP rank holds in every MoE layer beyond ``E / expert_parallel_size``,
            for replicas of busy experts. They start as replicas of the experts that follow the
            rank's own block (:meth:`ExpertPlacement.identity`) until a placement says otherwise.
        balance_replicas: split each replicated expert's tokens over its replicas from every step's
            counts (one all-reduce of ``[ep, E]`` integers per MoE layer per step): of the placement's
            routing fractions, those fractions scaled per rank until each rank receives the table's
            planned share of the step's load or an even share, those two fits with each source's
            tokens sent to the nearest replicas first, and those two with each node's replicas
            given about what its sources send them, the split the table's prices make cheapest
            (:mod:`lightning_moe.parallel.replica_balance`). ``False`` keeps the placement's
            fixed fractions. Nothing changes without replicas.
        check_finite: once per optimizer step, stop every rank with an error naming the step and the
            MoE layer when a loss or a router's logits held a NaN or Inf on some rank (one small
            all-reduce per step).
        accelerator: see :class:`~lightning.pytorch.strategies.DDPStrategy`.
        parallel_devices: see :class:`~lightning.pytorch.strategies.DDPStrategy`.
        cluster_environment: see :class:`~lightning.pytorch.strategies.DDPStrategy`.
        checkpoint_io: reads and writes every checkpoint file (each file of a checkpoint directory too),
            and removes old checkpoints.
        precision_plugin: see :class:`~lightning.pytorch.strategies.DDPStrategy`.
        process_group_backend: ``"gloo"`` or ``"nccl"``; by default picked from the device.
        timeout: timeout of collectives.
        start_method: how Lightning launches processes (``"popen"`` runs the script again per rank).
        **ddp_kwargs: passed on to ``DistributedDataParallel`` (e.g. ``find_unused_parameters``).
    """

    strategy_name = "moe"
    #: A model built on the meta device (``MoETransformer(pretrained=...)``) reads its weights after
    #: sharding, each rank only its own experts (see :meth:`model_to_device`).
    reads_local_experts = True

    def __init__(
        self,
        *,
        expert_parallel_size: int = 1,
        device_limited_routing: int | None = None,
        expert_placement: list[list[int]] | None = None,
        spare_expert_slots: int = 0,
        balance_replicas: bool = True,
        check_finite: bool = True,
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        **ddp_kwargs: Any,
    ) -> None:
        if not isinstance(expert_parallel_size, int) or isinstance(expert_parallel_size, bool) or expert_parallel_size < 1:
            raise ValueError(
                f"MoEStrategy: `expert_parallel_size` must be a positive integer, got {expert_parallel_size!r}. "
                f"Use 1 for no expert parallelism."
            )
        if device_limited_routing is not None and (
            not isinstance(device_limited_routing, int) or device_limited_routing < 1
        ):
            raise ValueError(
                f"MoEStrategy: `device_limited_routing` must be None or a positive integer, got "
                f"{device_limited_routing!r}. Use None for no limit, or the number of EP ranks a token may reach."
            )
        if not isinstance(spare_expert_slots, int) or isinstance(spare_expert_slots, bool) or spare_expert_slots < 0:
            raise ValueError(
                f"MoEStrategy: `spare_expert_slots` must be an integer >= 0, got {spare_expert_slots!r}. Use 0 for "
                f"no replicas."
            )
        if spare_expert_slots and expert_parallel_size == 1:
            raise ValueError(
                f"MoEStrategy: spare_expert_slots={spare_expert_slots} needs expert_parallel_size > 1: a replica "
                f"sits on another EP rank than its expert. Set expert_parallel_size, or spare_expert_slots=0."
            )
        if expert_placement is not None and len(expert_placement) != expert_parallel_size:
            raise ValueError(
                f"MoEStrategy: `expert_placement` lists {len(expert_placement)} ranks but expert_parallel_size="
                f"{expert_parallel_size}. Give the logical experts of each of the {expert_parallel_size} EP ranks."
            )
        if expert_placement is not None and expert_parallel_size == 1 and list(expert_placement[0]) != sorted(
            expert_placement[0]
        ):
            raise ValueError(
                f"MoEStrategy: expert_placement={expert_placement} reorders the experts at expert_parallel_size=1, "
                f"where they are not sharded and checkpoints are DDP's single file, in logical order. Remove "
                f"`expert_placement`, or set expert_parallel_size > 1."
            )
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            **ddp_kwargs,
        )
        self.expert_parallel_size = expert_parallel_size
        self.device_limited_routing = device_limited_routing
        self.expert_placement = expert_placement
        self.spare_expert_slots = spare_expert_slots
        self.balance_replicas = bool(balance_replicas)
        self.check_finite = check_finite
        #: What this rank read when the model's weights were loaded after sharding (bytes, tensors).
        self.pretrained_load_report: Any = None
        #: A backward ran whose gradients no optimizer step consumed yet (mid-accumulation).
        self._pending_backward = False
        #: MoE layers with frozen expert parameters, hooked for gradient sync once they train.
        self._frozen_expert_layers: list[MoELayer] = []
        self.expert_mesh: ExpertParallelMesh | None = None
        self._loss_nonfinite: Tensor | None = None

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        # Checkpoints are read after sharding: each rank then loads only its own experts.
        return True

    @property
    def experts_sharded(self) -> bool:
        """Whether some MoE layer's experts are split over more than one EP rank (then checkpoints are
        directories, clipping and fp16 loss scaling are expert-aware)."""
        module = self.lightning_module
        return module is not None and bool(_sharded_layers(module))

    @override
    def model_to_device(self) -> None:
        # NOTE: DDPStrategy.setup calls this after the precision conversion and before it wraps the
        # model in DDP and creates the optimizers, which is where experts must be sharded: DDP must be
        # told which parameters to ignore, and the optimizers must hold the local shards only.
        module = self.lightning_module
        assert module is not None
        if _meta_tensors(module):
            self._load_local_weights(module)
        super().model_to_device()
        self.parallelize(module)

    def _load_local_weights(self, module: Module) -> None:
        """A model on the meta device: shard it there (free), then let it read its weights, each rank
        only the experts its slots hold (``module.load_pretrained_weights(local_experts)``)."""
        self.parallelize(module)
        loader = getattr(module, "load_pretrained_weights", None)
        if callable(loader) and getattr(module, "_pretrained_source", None) is not None:
            self.pretrained_load_report = loader(local_experts={
                name: layer.dispatcher.placement.experts_on_rank(layer.dispatcher.ep_rank)
                for name, layer in named_moe_layers(module)
            })
        left = _meta_tensors(module)
        if left:
            raise ValueError(
                f"MoEStrategy: {left[:5]}{' ...' if len(left) > 5 else ''} are still on the meta device at setup. "
                f"Create them in `configure_model`, or give the module a `load_pretrained_weights(local_experts)` "
                f"that fills them (MoETransformer(pretrained=...) does)."
            )

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.model is not None
        if self.expert_parallel_size > 1 and named_moe_layers(self.model):
            check_loggers(trainer.loggers, self.expert_parallel_size)
        # DDP's own setup, whole (precision conversion, layer sync, DDP wrapper, optimizers, comm
        # hooks, post-local SGD): only the hooks it calls are overridden here.
        super().setup(trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            if self.experts_sharded:
                check_optimizers(self.optimizers, self.expert_parallel_size)
            # Every optimizer step ends a global batch: bias updates, fresh global-batch counts.
            for optimizer in self.optimizers:
                register_global_batch_end(optimizer, self.lightning_module)
        if self.experts_sharded:
            self._make_precision_expert_aware()

    def parallelize(self, module: Module) -> None:
        """Check ``module`` on every rank, build the EP/EDP groups and shard the experts of every MoE layer.

        Idempotent: layers already sharded (e.g. by an earlier ``fit`` of the same module) keep their
        shards and are attached to this strategy's groups. Raises ``ValueError`` on every rank, before
        any step, for a layout or model that cannot work.
        """
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        check_layout(world_size, self.expert_parallel_size)
        problem = expert_param_problem(module, self.expert_parallel_size)
        if problem is None:
            problem = placement_problem(module, self.expert_parallel_size, self._placement_for)
        # All ranks take part in one gather before anyone raises, so that a problem seen by one
        # rank stops every rank instead of leaving the others waiting in a collective.
        gathered = self._all_gather_object((moe_signature(module), problem))
        problems = [p for _, p in gathered if p is not None]
        if problems:
            raise ValueError(problems[0])
        mismatch = describe_signature_mismatch([signature for signature, _ in gathered])
        if mismatch is not None:
            raise ValueError(mismatch)

        layers = named_moe_layers(module)
        if not layers:
            rank_zero_warn("MoEStrategy found no `MoELayer` in the model; it trains like DDPStrategy.")
        if self.expert_mesh is None:
            self.expert_mesh = expert_parallel_mesh(self.expert_parallel_size, timeout=self._timeout)
        mesh = self.expert_mesh
        for _, layer in layers:
            if not isinstance(layer.dispatcher, AllToAllDispatcher):
                shard_layer(layer, placement=self._placement_for(layer.num_experts), ep_rank=mesh.ep_rank,
                            ep_group=mesh.ep_group)
            elif layer.dispatcher.ep_size != mesh.ep_size:
                raise ValueError(
                    f"An MoE layer is already sharded over {layer.dispatcher.ep_size} EP ranks, but this strategy "
                    f"uses expert_parallel_size={mesh.ep_size}. Build a fresh model, or load a checkpoint into it."
                )
            layer.dispatcher.configure_replica_balance(self.balance_replicas, self._node_of_ep_rank(mesh))
            self._set_expert_groups(layer)
            # On the parameters in place now (loading a meta model replaces them); once per parameter.
            if not reduce_expert_grads_on_arrival(layer, ep_size=mesh.ep_size, ep_group=mesh.ep_group):
                self._frozen_expert_layers.append(layer)
        # DDP (and the states sync outside fitting) must leave the experts and per-forward counters
        # alone; a user's own list of ignored names is kept.
        user_ignored = [name for name in getattr(module, "_ddp_params_and_buffers_to_ignore", [])]
        ours = [name for name in ddp_ignored_names(module) if name not in user_ignored]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, user_ignored + ours)

    def _node_of_ep_rank(self, mesh: ExpertParallelMesh) -> torch.Tensor:
        """``[ep]``: the node of each rank of this rank's EP group (consecutive global ranks)."""
        devices_per_node = len(self.parallel_devices or []) or 1
        first = (dist.get_rank() if dist.is_initialized() else 0) - mesh.ep_rank
        return torch.div(first + torch.arange(mesh.ep_size), devices_per_node, rounding_mode="floor")

    def _placement_for(self, num_experts: int) -> ExpertPlacement:
        if self.expert_placement is None:
            return ExpertPlacement.identity(num_experts, self.expert_parallel_size, self.spare_expert_slots)
        placement = ExpertPlacement.from_experts_per_rank(self.expert_placement)
        slots = num_experts // self.expert_parallel_size + self.spare_expert_slots
        if self.spare_expert_slots and placement.slots_per_rank != slots:
            raise ValueError(
                f"`expert_placement` gives each rank {placement.slots_per_rank} slots, but spare_expert_slots="
                f"{self.spare_expert_slots} asks for {slots}. The table sets the slots: leave spare_expert_slots "
                f"at 0, or give a table with {slots} experts per rank."
            )
        return placement

    def _set_expert_groups(self, layer: MoELayer) -> None:
        """Give the gate the devices of its experts under the table in force: the groups of
        device-limited routing, and what device-level balance and capacity count over."""
        placement, rank = layer.dispatcher.placement, layer.dispatcher.ep_rank
        holders = placement.holders_RE if self.device_limited_routing else None
        layer.gate.set_expert_groups(holders, self.device_limited_routing)
        devices = None
        if placement.ep_size > 1:
            # On the gate's device, copied once here rather than from the host at every forward.
            device = next(layer.parameters()).device
            devices = ExpertDevices(
                share_GE=placement.routing_fractions_RER[rank].t().float().contiguous().to(device),
                cumulative_EG=placement.on_device("cumulative_fractions_RER", device)[rank],
                holders_GE=placement.on_device("holders_RE", device),
            )
        layer.gate.set_expert_devices(devices)

    # ------------------------------------------------------------------ placement while training runs

    def placements(self) -> dict[str, ExpertPlacement]:
        """The slot table in force of every MoE layer, by module name."""
        assert self.lightning_module is not None
        return {name: layer.dispatcher.placement for name, layer in named_moe_layers(self.lightning_module)
                if isinstance(layer.dispatcher, AllToAllDispatcher)}

    def apply_placement(
        self, placements: Mapping[str, ExpertPlacement | Sequence[Sequence[int]]]
    ) -> MigrationReport:
        """Switch MoE layers to new slot tables, moving only the slots that change, in place.

        Call it on every rank with the same tables, between ``optimizer.step()`` and the next forward
        (e.g. in a callback's ``on_train_batch_end`` after a step). Each changed slot's weights and
        per-expert optimizer state travel point to point from a rank that holds the expert; then every
        rank switches to the new tables at once. Parameter objects keep their identity, so the
        optimizer and schedulers are untouched. See :mod:`lightning_moe.parallel.migration`.

        Args:
            placements: by MoE layer name (``dict(model.named_modules())`` names), the new table: an
                :class:`ExpertPlacement`, or the experts of each rank (even split over replicas).
                Layers not named keep theirs.

        Returns:
            What this rank moved (slots, bytes, seconds).

        Raises:
            RuntimeError: mid-accumulation (a backward's gradients are still in the old slot order).
            ValueError: expert_parallel_size=1, an unknown layer, a table that does not fit, or tables that
                differ across ranks (raised on every rank).
        """
        module, mesh = self.lightning_module, self.expert_mesh
        if module is None or mesh is None:
            raise RuntimeError("MoEStrategy.apply_placement: call it while the strategy is set up (during fit).")
        if mesh.ep_size == 1:  # the same on every rank: every rank raises
            raise ValueError(
                "MoEStrategy.apply_placement needs expert_parallel_size > 1: with one EP rank every expert is on "
                "it, and checkpoints of unsharded experts (DDP's single file) keep them in logical order."
            )
        if self._pending_backward:
            raise RuntimeError(
                "MoEStrategy.apply_placement was called mid-accumulation: a backward ran whose gradients no "
                "optimizer step consumed yet, and they are in the old slot order. Call it after "
                "`optimizer.step()` (e.g. in `on_train_batch_end` of the last micro-batch of a step)."
            )
        return migrate_layers(
            module, placements, optimizers=self.optimizers, mesh=mesh, all_gather=self._all_gather_object,
            on_switch=self._set_expert_groups, check_table=self.check_placement,
        )

    def check_placement(self, layer: MoELayer, placement: ExpertPlacement) -> None:
        """Raise ``ValueError`` when ``layer`` cannot route under ``placement``: with
        ``device_limited_routing``, when the ranks a token may keep could hold fewer than its gate's
        top_k experts (replicas of one expert on several ranks count once). :meth:`apply_placement`
        checks every table with it before anything moves."""
        if self.device_limited_routing:
            layer.gate.check_group_limit(placement.holders_RE.bool().cpu(), self.device_limited_routing)

    def _make_precision_expert_aware(self) -> None:
        plugin = self.precision_plugin
        scaler = getattr(plugin, "scaler", None)
        if isinstance(scaler, GradScaler) and not isinstance(scaler, WorldSyncedGradScaler):
            # fp16: the inf check must be the same on every rank (see lightning_moe.parallel.amp).
            plugin.scaler = WorldSyncedGradScaler.replacing(scaler)
        # NOTE: Lightning clips through the precision plugin; its norm would only see this rank's
        # expert shards. Route norm clipping through the global norm instead.
        plugin.clip_grad_by_norm = self._clip_grad_by_global_norm  # type: ignore[method-assign]

    @override
    def _enable_model_averaging(self) -> None:
        super()._enable_model_averaging()
        mesh = self.expert_mesh
        if mesh is not None and mesh.ep_size > 1 and self._model_averager is not None:
            # Averaging over the world would mix different experts: experts average over EDP only.
            self._model_averager = ExpertAwareModelAverager(
                period=self._model_averager.period,
                warmup_steps=self._model_averager.warmup_steps,
                edp_group=mesh.edp_group,
            )

    @override
    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        self._pending_backward = False  # the step consumed the gradients (or skipped them: fp16 overflow)
        return output

    @override
    def pre_backward(self, closure_loss: Tensor) -> None:
        super().pre_backward(closure_loss)
        mesh = self.expert_mesh
        if self._frozen_expert_layers and mesh is not None:
            # Experts frozen at set-up and unfrozen since (staged fine-tuning) get their hook now.
            self._frozen_expert_layers = [
                layer for layer in self._frozen_expert_layers
                if not reduce_expert_grads_on_arrival(layer, ep_size=mesh.ep_size, ep_group=mesh.ep_group)
            ]

    @override
    def post_backward(self, closure_loss: Tensor) -> None:
        super().post_backward(closure_loss)
        self._pending_backward = True
        if self.check_finite:
            finite = torch.isfinite(closure_loss.detach()).all()
            self._loss_nonfinite = ~finite if self._loss_nonfinite is None else self._loss_nonfinite | ~finite
        # Under `no_sync` (accumulation micro-batches) DDP does not reduce; neither do we.
        if isinstance(self.model, DistributedDataParallel) and not self.model.require_backward_grad_sync:
            return
        mesh = self.expert_mesh
        if mesh is None or self.lightning_module is None:
            return
        experts = [p for p in self.lightning_module.parameters() if is_expert_param(p) and p.requires_grad]
        sync_expert_grads(experts, edp_group=mesh.edp_group, edp_size=mesh.edp_size)
        if self.check_finite:
            self._raise_if_nonfinite()

    def _raise_if_nonfinite(self) -> None:
        """One small all-reduce per optimizer step: stop every rank together on a NaN/Inf loss or router."""
        module = self.lightning_module
        assert module is not None and self._loss_nonfinite is not None
        loss_nonfinite, self._loss_nonfinite = self._loss_nonfinite, None
        step = module.trainer.global_step if module._trainer is not None else 0
        raise_if_nonfinite_in(named_moe_layers(module), loss_nonfinite, step=step)

    def _clip_grad_by_global_norm(self, optimizer: Optimizer, clip_val: float) -> None:
        mesh = self.expert_mesh
        parameters = list(self.precision_plugin.main_params(optimizer))
        clip_grad_norm_global(
            parameters,
            float(clip_val),
            ep_group=mesh.ep_group if mesh is not None else None,
            ep_size=mesh.ep_size if mesh is not None else 1,
            replicas_of_slots=replica_counts_of_slots(_sharded_layers(self.lightning_module)),
        )

    @override
    def process_dataloader(self, dataloader: object) -> object:
        dataloader = super().process_dataloader(dataloader)
        self._check_equal_batches(dataloader)
        return dataloader

    def _check_equal_batches(self, dataloader: object) -> None:
        """Raise ``ValueError`` on every rank when the ranks would run different numbers of batches.

        Under expert parallelism every MoE forward is an all-to-all over the EP group, so a rank with
        one more batch would wait for its partners forever. Lightning's ``DistributedSampler`` gives
        equal shares for training, validation and test, but not for ``predict``, whose sampler does not
        repeat samples (9 samples over 4 ranks: 3, 2, 2, 2).
        """
        mesh = self.expert_mesh
        if mesh is None or mesh.ep_size == 1 or not dist.is_initialized():
            return
        try:
            batches = len(dataloader)  # type: ignore[arg-type]
        except TypeError:  # an iterable without a length: its shares are the user's
            return
        per_rank = self._all_gather_object(batches)
        if len(set(per_rank)) == 1:
            return
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        stage = trainer.state.stage if trainer is not None else None
        prefix = stage.dataloader_prefix if stage is not None else None
        limit = getattr(trainer, f"limit_{prefix}_batches", None) if prefix else None
        if isinstance(limit, int) and limit <= min(per_rank):
            return  # the limit runs the same number everywhere
        raise ValueError(
            f"MoEStrategy: the {prefix or 'current'} dataloader gives the ranks different numbers of batches "
            f"({per_rank}). Under expert parallelism every MoE forward is a collective of the expert-parallel "
            f"group, so a rank with more batches would wait forever. Give every rank the same number of "
            f"batches: a dataset size that is a multiple of world size x batch size (Lightning's `predict` "
            f"sampler does not pad), or a sampler of your own with `use_distributed_sampler=False`."
        )

    def _all_gather_object(self, obj: Any) -> list[Any]:
        if not dist.is_initialized():
            return [obj]
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered

    def _agree(self, problem: str | None) -> None:
        """Raise the first problem of any rank on every rank (after one gather that all ranks join)."""
        problems = [p for p in self._all_gather_object(problem) if p]
        if problems:
            raise CheckpointError(problems[0])

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """Without sharded experts: DDP's single file (rank 0, through ``checkpoint_io``). With them: a
        checkpoint *directory*, committed atomically, holding the dense state and training state from
        rank 0 and each logical expert once (see :mod:`lightning_moe.checkpoint`)."""
        path = self.broadcast(str(filepath))
        if not self.experts_sharded:
            if self.is_global_zero and committed_directory(path) is not None:
                # A directory saved by an earlier expert-parallel run of the same path: the file is
                # written beside it and swapped in, so a failed save keeps the directory.
                save_beside_then_swap(
                    path, lambda staged: synchronous(self.checkpoint_io).save_checkpoint(checkpoint, staged, storage_options)
                )
                return
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        if storage_options is not None:
            raise TypeError(
                f"`{type(self).__name__}.save_checkpoint(..., storage_options=...)` is not supported with sharded "
                f"experts: each file of the checkpoint directory is written by `checkpoint_io`."
            )
        mesh = self.expert_mesh
        assert self.lightning_module is not None and mesh is not None
        save_sharded_checkpoint(
            checkpoint,
            path,
            expert_params=sharded_expert_params(self.lightning_module),
            optimizers=self.optimizers,
            module=self.lightning_module,
            global_rank=self.global_rank,
            writes_experts=mesh.edp_rank == 0,
            ep_rank=mesh.ep_rank,
            checkpoint_io=self.checkpoint_io,
            broadcast=self.broadcast,
            all_gather=self._all_gather_object,
            placements={name: placement.to_dict() for name, placement in self.placements().items()},
        )

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Read a checkpoint directory (or a single-file one, e.g. consolidated) saved at any layout, and
        return it in this rank's local form, which Lightning's default loading then applies.

        Loads with ``weights_only=True`` unless the caller passes ``False`` for a file it trusts. A
        missing, damaged or mismatched checkpoint raises the same error on every rank.
        """
        weights_only = True if weights_only is None else weights_only
        path = self.broadcast(str(checkpoint_path))
        module = self.lightning_module
        assert module is not None
        if not self.experts_sharded and committed_directory(path) is None:
            return super().load_checkpoint(path, weights_only=weights_only)
        problem, checkpoint = None, {}
        try:
            source = SavedCheckpoint(path, weights_only=weights_only, checkpoint_io=self.checkpoint_io)
            # The tables first: they decide which logical experts this rank's slots load.
            self._reinstate_placements(source.placements)
            checkpoint = load_local_checkpoint(
                path,
                expert_params=sharded_expert_params(module),
                optimizers=self.optimizers,
                module=module,
                source=source,
            )
        except Exception as error:  # each rank reads other files: agree before anyone raises
            problem = f"rank {self.global_rank}: {error}"
        self._agree(problem)
        return checkpoint

    def _reinstate_placements(self, saved: dict[str, Any]) -> None:
        """Put back each MoE layer's saved table when it fits this run's layout; otherwise keep the
        default table and say so once."""
        assert self.lightning_module is not None
        misfits = reinstate_placements(self.lightning_module, saved, on_switch=self._set_expert_groups)
        if misfits:
            sample = next(iter(self.placements().values()), None)
            layout = f"{sample.ep_size} ranks x {sample.slots_per_rank} slots" if sample else "no sharded experts"
            rank_zero_info(
                f"MoEStrategy: the checkpoint's expert placement ({misfits[0]}) does not fit this run ({layout}); "
                f"the run starts from the default placement."
            )

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        strategy_registry.register(
            cls.strategy_name,
            cls,
            description="Expert-parallel x data-parallel training of MoE models (lightning_moe)",
            override=True,
        )


def register_moe_strategy() -> None:
    """Register ``strategy="moe"`` in Lightning's ``StrategyRegistry`` (done on ``import lightning_moe``)."""
    from lightning.pytorch.strategies import StrategyRegistry

    if MoEStrategy.strategy_name not in StrategyRegistry:
        MoEStrategy.register_strategies(StrategyRegistry)


def _sharded_layers(module: Module) -> list[MoELayer]:
    """The MoE layers whose experts are split over more than one EP rank."""
    return [
        layer for _, layer in named_moe_layers(module)
        if isinstance(layer.dispatcher, AllToAllDispatcher) and layer.dispatcher.ep_size > 1
    ]


def _meta_tensors(module: Module) -> list[str]:
    """Names of the parameters and buffers of ``module`` on the meta device."""
    return [name for name, tensor in [*module.named_parameters(), *module.named_buffers()] if tensor.is_meta]
