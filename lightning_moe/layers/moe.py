"""The Mixture-of-Experts layer: gate + dispatcher + routed experts + optional shared experts.

Shape legend: ``T`` tokens, ``D`` model width, ``E`` experts, ``N`` assignments (token, expert).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_moe.layers.dispatch import (
    Dispatcher,
    DispatchTraffic,
    LocalDispatcher,
    drop_over_capacity,
    dropped_over_capacity,
    limit_to_capacity,
)
from lightning_moe.layers.experts import Experts, FeedForward, check_activation, to_autocast_dtype
from lightning_moe.layers.gates import AuxLoss, Gate, make_gate
from lightning_moe.layers.gates.base import Routing, check_positive_int
from lightning_moe.ops.counting import count_per_expert


class MoELayer(nn.Module):
    """A Mixture-of-Experts feed-forward layer.

    ``forward(x)`` takes ``[..., D]`` and returns the same shape. Every token is routed by the gate
    to one or more of ``num_experts`` experts; their outputs are summed with the gate's weights. With
    ``num_shared_experts > 0`` a dense FFN that every token passes through is added (DeepSeekMoE,
    Dai et al. 2024); ``shared_expert_gate=True`` scales it by ``sigmoid(x w)`` as in Qwen2-MoE.

    After each forward the layer keeps, for losses and monitoring (never in module globals):
    ``aux_losses`` (name -> :class:`AuxLoss`), ``tokens_per_expert`` (``[E]``, per logical expert,
    after capacity drops), ``dropped_tokens`` (assignments dropped), ``routed_tokens`` (assignments
    before drops), ``num_tokens`` and ``stats`` (gate statistics such as ``router_entropy``).

    Args:
        d_model: model width.
        d_ff: hidden width of each routed expert (small for fine-grained experts).
        num_experts: number of routed experts.
        gate: a gate name (``"topk"``, ``"noisy_topk"``, ``"dynamic"``, ``"expert_choice"``,
            ``"sigmoid"``) or a :class:`~lightning_moe.layers.gates.Gate` instance, which is copied.
        top_k: experts per token, for gates that take it.
        gate_kwargs: further keyword arguments of the named gate (e.g. ``{"z_loss_coef": 1e-3}``).
        activation: ``"swiglu"`` or ``"gelu"`` for routed and shared experts.
        num_shared_experts: shared experts that every token passes through (0 for none).
        shared_expert_d_ff: hidden width of the shared FFN; ``num_shared_experts * d_ff`` by default.
        shared_expert_gate: scale the shared output by a learned sigmoid gate (Qwen2-MoE).
        capacity_factor: ``None`` for dropless routing; otherwise each expert takes at most
            ``ceil(capacity_factor * assignments / num_experts)`` assignments and drops the rest.
        pad_to_capacity: with a ``capacity_factor``, run every expert on exactly its capacity of rows,
            padded with zeros (GShard; Megatron-Core's ``moe_pad_expert_input_to_capacity``): no shape
            depends on the routing, so nothing is read back to the host and a compiled layer is one
            graph, for up to ``capacity_factor`` times the dropless expert work. In one process only:
            under expert parallelism the dispatcher removes the dropped assignments either way.
        init_std: standard deviation of the normal weight initialisation.
    """

    def __init__(
        self,
        *,
        d_model: int,
        d_ff: int,
        num_experts: int,
        gate: str | Gate = "topk",
        top_k: int = 2,
        gate_kwargs: dict[str, Any] | None = None,
        activation: str = "swiglu",
        num_shared_experts: int = 0,
        shared_expert_d_ff: int | None = None,
        shared_expert_gate: bool = False,
        capacity_factor: float | None = None,
        pad_to_capacity: bool = False,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        check_positive_int("MoELayer", "d_model", d_model)
        check_positive_int("MoELayer", "d_ff", d_ff)
        check_positive_int("MoELayer", "num_experts", num_experts)
        check_positive_int("MoELayer", "top_k", top_k)
        check_activation(activation)
        if not isinstance(num_shared_experts, int) or num_shared_experts < 0:
            raise ValueError(f"`num_shared_experts` must be an integer >= 0, got {num_shared_experts!r}.")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(
                f"`capacity_factor` must be > 0, got {capacity_factor!r}. Use None for dropless routing "
                f"or a positive factor such as 1.25."
            )
        if shared_expert_gate and not (num_shared_experts > 0 or shared_expert_d_ff):
            raise ValueError(
                "`shared_expert_gate`=True scales the shared experts' output, but the layer has none. Set "
                "`num_shared_experts` (or `shared_expert_d_ff`), or leave `shared_expert_gate` false."
            )
        self.d_model, self.num_experts = d_model, num_experts
        if not isinstance(pad_to_capacity, bool) or (pad_to_capacity and capacity_factor is None):
            raise ValueError(
                f"`pad_to_capacity` must be true or false, and true only with a `capacity_factor`; got "
                f"pad_to_capacity={pad_to_capacity!r} with capacity_factor={capacity_factor!r}. Set a capacity "
                f"factor such as 1.25, or leave pad_to_capacity false."
            )
        self.capacity_factor = capacity_factor
        self.pad_to_capacity = pad_to_capacity

        gate_module = make_gate(gate, top_k=top_k, gate_kwargs=gate_kwargs)
        if isinstance(gate, Gate):
            gate_module = copy.deepcopy(gate_module)
        self.gate = gate_module.build(d_model, num_experts, init_std=init_std)
        # Losses of global scope count through the layer (its dispatcher reduces over the processes).
        self.gate.count_global_batch = self.count_global_batch
        if capacity_factor is not None and self.gate.has_own_capacity:
            raise ValueError(
                f"`capacity_factor`={capacity_factor} was set with gate {type(self.gate).__name__}, which bounds "
                f"each expert's load itself. Leave `capacity_factor` as None and set the gate's own capacity."
            )
        self.experts = Experts(
            num_experts=num_experts, d_model=d_model, d_ff=d_ff, activation=activation, init_std=init_std
        )
        self.shared_experts: FeedForward | None = None
        self.shared_expert_gate: nn.Linear | None = None
        if num_shared_experts > 0 or shared_expert_d_ff:
            self.shared_experts = FeedForward(
                d_model=d_model,
                d_ff=shared_expert_d_ff or num_shared_experts * d_ff,
                activation=activation,
                init_std=init_std,
            )
            if shared_expert_gate:
                self.shared_expert_gate = nn.Linear(d_model, 1, bias=False)
                nn.init.normal_(self.shared_expert_gate.weight, std=init_std)
        #: How the rows reach the experts and come back: a :class:`LocalDispatcher` in one process,
        #: replaced by :class:`~lightning_moe.MoEStrategy` with an expert-parallel one (same interface).
        self.dispatcher: Dispatcher = LocalDispatcher(num_experts)
        #: Whether a forward records its routing (below); off while activation checkpointing
        #: recomputes the forward in the backward, so that nothing is counted twice.
        self.record_routing = True

        self.aux_losses: dict[str, AuxLoss] = {}
        self.stats: dict[str, torch.Tensor] = {}
        self.num_tokens = 0
        #: What the last forward's dispatch moved, per destination EP rank (``None`` before one).
        self.traffic: DispatchTraffic | None = None
        self.register_buffer("tokens_per_expert", torch.zeros(num_experts, dtype=torch.long), persistent=False)
        self.register_buffer("dropped_tokens", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("routed_tokens", torch.zeros((), dtype=torch.long), persistent=False)
        # Load since the last optimizer step, for gates with aux-loss-free bias balancing.
        self.register_buffer("load_since_bias_update", torch.zeros(num_experts, dtype=torch.long), persistent=False)
        #: Whether global-batch load-balancing losses count the micro-batches since the last optimizer
        #: step too (gradient accumulation); set once something ends each global batch
        #: (:func:`~lightning_moe.layers.balancing.register_global_batch_end`), else the counts
        #: would never restart.
        self.pool_micro_batches = False
        # Assignments of every process since the last optimizer step, as global losses count them.
        self.register_buffer("global_batch_load", torch.zeros(num_experts, dtype=torch.long), persistent=False)
        # Set when a forward's router logits held a NaN or Inf; kept on the device (no host read per
        # forward) until MoEStrategy checks and clears it once per optimizer step.
        self.register_buffer("nonfinite_router_logits", torch.zeros((), dtype=torch.bool), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"MoELayer expects inputs with last dimension d_model={self.d_model}, got {tuple(x.shape)}.")
        x_TD = x.reshape(-1, self.d_model)
        num_sequences = x.shape[:-2].numel() if x.dim() >= 3 else 1

        # 1. Route: assignments (token, logical expert, weight) in priority order.
        routing = self.gate(x_TD, num_sequences=num_sequences)
        routed = routing.expert_index_N.numel() + routing.num_dropped
        dropped = routing.num_dropped  # by the gate's device-level capacity
        if self.capacity_factor is not None:
            routing = limit_to_capacity(routing, self.num_experts, self.capacity_factor)
            dropped = dropped + dropped_over_capacity(routing)  # a tensor: not read back
            if not self.pad_to_capacity:
                # Only the kept rows are computed; their number is read back to the host.
                routing = drop_over_capacity(routing)

        # 2. Permute: rows sorted by expert (and sent to the expert's rank under expert parallelism).
        # Under mixed precision the rows are cast first, so that the gather and the all-to-all move
        # 16-bit rows (the router above keeps the full-precision input).
        dispatched = self.dispatcher.dispatch(to_autocast_dtype(x_TD), routing)

        # 3. Compute: one grouped GEMM per projection over all local expert slots.
        expert_output = self.experts(dispatched.rows, dispatched.rows_per_slot)

        # 4. Un-permute and combine: y_t = sum over t's assignments of weight * expert output.
        y_TD = self.dispatcher.combine(expert_output, dispatched.context)

        if self.shared_experts is not None:
            shared_TD = self.shared_experts(x_TD)
            if self.shared_expert_gate is not None:
                gate_weight = self.shared_expert_gate.weight.to(x_TD.dtype)  # the experts' dtype rule
                shared_TD = shared_TD * torch.sigmoid(F.linear(x_TD, gate_weight))
            y_TD = y_TD + shared_TD

        if self.record_routing:
            self.traffic = dispatched.traffic
            self._record(routing, x_TD.shape[0], routed, dropped)
        return y_TD.view(x.shape)

    @torch.no_grad()
    def clear_records(self) -> None:
        """Forget what the last forward recorded (counts, statistics, traffic). A callback that adds
        up the records of each training batch clears them at the batch's start, so that a layer that
        does not run in the batch adds nothing (rather than its last forward again, or a validation
        forward's)."""
        self.tokens_per_expert.zero_()
        self.dropped_tokens.zero_()
        self.routed_tokens.zero_()
        self.stats = {}
        self.num_tokens = 0
        self.traffic = None

    @torch.no_grad()
    def _record(self, routing: Routing, num_tokens: int, routed: int, dropped: torch.Tensor | int) -> None:
        self.aux_losses = dict(routing.aux_losses)
        self.stats = {name: value.detach() for name, value in routing.stats.items()}
        self.num_tokens = num_tokens
        counts_E = count_per_expert(routing.expert_index_N, self.num_experts)
        if routing.capacity is not None:
            counts_E = counts_E.clamp(max=routing.capacity)  # what each expert kept
        self.tokens_per_expert.copy_(counts_E)
        self.dropped_tokens.fill_(dropped)
        self.routed_tokens.fill_(routed)
        if self.training and self.gate.last_logits_finite is not None:
            # Training forwards only: the strategy checks the flag at the next optimizer step (an
            # evaluation forward's NaN would stop training, blamed on that step).
            self.nonfinite_router_logits |= ~self.gate.last_logits_finite.to(self.nonfinite_router_logits.device)
        if self.training and self.gate.needs_bias_update:
            self.load_since_bias_update += counts_E

    @torch.no_grad()
    def count_global_batch(self, counts_E: torch.Tensor) -> torch.Tensor:
        """The assignments per expert of the global batch so far, from this forward's ``counts_E``:
        summed over every process that routes with this layer (the dispatcher's ``reduce_load``) and,
        with :attr:`pool_micro_batches`, over the forwards since the last optimizer step, this one
        included. Global-batch load-balancing losses count their ``f_e`` with it.

        Pooled, the ``k``-th micro-batch of an accumulation counts micro-batches ``1..k`` (the later
        ones are not routed yet), as Megatron-Core's ``global_aux_loss`` does; the last one counts the
        whole global batch.

        NOTE: an activation checkpoint's recomputation (``record_routing`` off) adds nothing: it gets
        the count its forward got, which it must rebuild exactly, and runs no collective. The pool is
        rebound to a new tensor, never added to in place: a checkpoint compiled into the graph
        recomputes from the tensor its forward read, which must still hold what it held.
        """
        if not self.pool_micro_batches:
            return self.dispatcher.reduce_load(counts_E)
        if self.record_routing:
            self.global_batch_load = self.global_batch_load + self.dispatcher.reduce_load(counts_E)
        return self.global_batch_load

    @torch.no_grad()
    def end_global_batch(self) -> None:
        """Called after each optimizer step (:func:`~lightning_moe.layers.balancing.register_global_batch_end`):
        apply the gate's aux-loss-free bias update with the load since the last call, and start
        counting the next global batch.

        The load is summed over every process that routes with this gate, so biases stay identical.
        """
        self.global_batch_load = torch.zeros_like(self.global_batch_load)
        if not self.gate.needs_bias_update:
            return
        load_E = self.dispatcher.reduce_load(self.load_since_bias_update.clone())
        self.gate.update_bias(load_E)
        self.load_since_bias_update.zero_()

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, capacity_factor={self.capacity_factor}"
