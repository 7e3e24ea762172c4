"""Expert load over a window of training steps, summed over every process, and the figures derived from it.

:class:`ExpertLoadMetric` is a torchmetrics ``Metric``: each process adds what its MoE layers saw in
each micro-batch with :meth:`~ExpertLoadMetric.update`; :meth:`~ExpertLoadMetric.compute_window` sums the
states over the default process group (every rank must call it) and returns a :class:`LoadWindow`.
:func:`summarize` turns windows into the scalars that :class:`~lightning_moe.ExpertLoadMonitor` logs.

Shape legend: ``L`` MoE layers, ``E`` experts of a layer (``M`` the most experts of any layer, the
padded width of the stacked states), ``P`` expert-parallel (EP) ranks, ``C`` counter columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torchmetrics import Metric

from lightning_moe.parallel.replica_balance import SPLITS

# Columns of the per-layer counters: assignments before capacity drops, assignments dropped, router
# entropy weighted by the tokens of its micro-batch, tokens, and the tokens that came with an entropy.
_ROUTED, _DROPPED, _ENTROPY_SUM, _TOKENS, _ENTROPY_TOKENS = range(5)
_NUM_COUNTERS = 5
_NUM_SPLITS = len(SPLITS)


@dataclass
class LoadWindow:
    """The expert load of every MoE layer over one logging window, summed over all processes.

    Attributes:
        step: the optimizer step (``trainer.global_step``) that closed the window.
        tokens_per_expert: per layer, assignments each logical expert processed (after capacity
            drops), ``[E]`` int64.
        traffic: per layer, the EP traffic matrix ``[P, P]`` int64: hidden rows sent from EP rank
            ``row`` to EP rank ``column`` (one per distinct token and destination), summed over
            expert-data-parallel replicas.
        routed: per layer, assignments the gate made (before capacity drops).
        dropped: per layer, assignments dropped by the capacity limit.
        num_tokens: per layer, tokens that entered the layer.
        router_entropy: per layer, the token-weighted mean router entropy (nats), or ``None`` when
            the gate reports none.
        rank_load: per layer, assignments ``[P]`` that each EP rank's experts processed, summed over
            expert-data-parallel replicas.
        source_load: per layer, assignments ``[P, E]`` from each source EP rank to each logical
            expert (after capacity drops), summed over expert-data-parallel replicas: what a placement
            planner needs (which ranks send tokens to which experts).
        replica_split: per layer, how many of the window's dispatches kept each split of replicated
            experts' tokens, ``[7]`` over :data:`~lightning_moe.parallel.replica_balance.SPLITS`
            (planned fractions, fit to the plan's share, fit to an even share, the two fits' local
            and node-matched twins; a window saved before the node-matched twins has ``[5]``),
            summed over processes (every process of an EP group keeps the same split); zeros without
            per-step balancing.
        steps: optimizer steps the window's counts cover (fewer than the monitor's period for a
            window cut short by a resume; ``None`` in windows saved before it was kept).
    """

    step: int
    tokens_per_expert: list[torch.Tensor]
    traffic: list[torch.Tensor]
    routed: list[int]
    dropped: list[int]
    num_tokens: list[int]
    router_entropy: list[float | None] = field(default_factory=list)
    rank_load: list[torch.Tensor] = field(default_factory=list)
    source_load: list[torch.Tensor] = field(default_factory=list)
    replica_split: list[torch.Tensor] = field(default_factory=list)
    steps: int | None = None

    @property
    def num_layers(self) -> int:
        return len(self.tokens_per_expert)

    def to_dict(self) -> dict[str, Any]:
        """Plain containers and tensors only, so that ``torch.load(weights_only=True)`` reads it back."""
        return {
            "step": self.step,
            "tokens_per_expert": [t.clone() for t in self.tokens_per_expert],
            "traffic": [t.clone() for t in self.traffic],
            "routed": list(self.routed),
            "dropped": list(self.dropped),
            "num_tokens": list(self.num_tokens),
            "router_entropy": list(self.router_entropy),
            "rank_load": [t.clone() for t in self.rank_load],
            "source_load": [t.clone() for t in self.source_load],
            "replica_split": [t.clone() for t in self.replica_split],
            "steps": self.steps,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> LoadWindow:
        return cls(**state)


class ExpertLoadMetric(Metric):
    """Per-layer expert load, EP traffic, drops and router entropy, summed over steps and processes.

    All states are sums (``dist_reduce_fx="sum"``), so :meth:`compute` gives the totals of the world.
    Layers may have different numbers of experts; the states are padded to the widest layer.

    Args:
        num_experts: the number of experts of each MoE layer, in layer order.
        ep_size: the expert-parallel size (1 without expert parallelism).
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(self, *, num_experts: Sequence[int], ep_size: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not num_experts or any(not isinstance(e, int) or e < 1 for e in num_experts):
            raise ValueError(
                f"ExpertLoadMetric: `num_experts` must be a non-empty list of positive integers (one per MoE "
                f"layer), got {num_experts!r}."
            )
        if not isinstance(ep_size, int) or ep_size < 1:
            raise ValueError(f"ExpertLoadMetric: `ep_size` must be a positive integer, got {ep_size!r}.")
        self.num_experts = list(num_experts)
        self.ep_size = ep_size
        num_layers, widest = len(self.num_experts), max(self.num_experts)
        self.add_state("tokens_per_expert_LM", torch.zeros(num_layers, widest, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("traffic_LPP", torch.zeros(num_layers, ep_size, ep_size, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("rank_load_LP", torch.zeros(num_layers, ep_size, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state(
            "source_load_LPM", torch.zeros(num_layers, ep_size, widest, dtype=torch.long), dist_reduce_fx="sum"
        )
        self.add_state("replica_split_LK", torch.zeros(num_layers, _NUM_SPLITS, dtype=torch.long), dist_reduce_fx="sum")
        # NOTE: float64 counters hold integer counts exactly up to 2**53 and the entropy sums.
        self.add_state("counters_LC", torch.zeros(num_layers, _NUM_COUNTERS, dtype=torch.float64), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(self, layers: Sequence[torch.nn.Module]) -> None:
        """Add what each MoE layer recorded in its last forward (one micro-batch on this process).

        Args:
            layers: the :class:`~lightning_moe.MoELayer` modules, in the order of ``num_experts``.
        """
        if len(layers) != len(self.num_experts):
            raise ValueError(
                f"ExpertLoadMetric was built for {len(self.num_experts)} MoE layers but got {len(layers)}. "
                f"Build a new metric when the model changes."
            )
        device = self.counters_LC.device
        on_device, on_host = [], []
        for index, layer in enumerate(layers):
            num_experts = self.num_experts[index]
            self.tokens_per_expert_LM[index, :num_experts] += layer.tokens_per_expert.to(device)
            dispatcher = layer.dispatcher
            # This rank routed these assignments: its row of the layer's [source rank, expert] load.
            self.source_load_LPM[index, dispatcher.ep_rank, :num_experts] += layer.tokens_per_expert.to(device)
            if dispatcher.ep_size != self.ep_size:
                raise ValueError(
                    f"MoE layer {index} has ep_size={dispatcher.ep_size}, the metric was built for "
                    f"ep_size={self.ep_size}. All MoE layers must share one expert-parallel size."
                )
            if layer.traffic is not None:
                self.traffic_LPP[index, dispatcher.ep_rank] += layer.traffic.tokens_sent_per_rank.to(device)
                self.rank_load_LP[index] += layer.traffic.assignments_sent_per_rank.to(device)
                if layer.traffic.replica_split is not None:
                    self.replica_split_LK[index] += layer.traffic.replica_split.to(device)
            num_tokens = float(layer.num_tokens)
            entropy = layer.stats.get("router_entropy")
            entropy_sum = (
                torch.zeros((), dtype=torch.float64, device=device)
                if entropy is None
                else entropy.to(device, torch.float64) * num_tokens
            )
            routed = layer.routed_tokens.to(device, torch.float64)
            on_device.append(torch.stack([routed, layer.dropped_tokens.to(device, torch.float64), entropy_sum]))
            on_host.append([num_tokens, 0.0 if entropy is None else num_tokens])
        # NOTE: the tensors that live on the device stay there and the Python numbers travel in one
        # copy: no host-device synchronisation per micro-batch.
        self.counters_LC[:, :_TOKENS] += torch.stack(on_device)
        self.counters_LC[:, _TOKENS:] += torch.tensor(on_host, dtype=torch.float64).to(device, non_blocking=True)

    def compute(self) -> tuple[torch.Tensor, ...]:
        """The summed states ``([L, M], [L, P, P], [L, P], [L, C], [L, P, M], [L, 3])`` on the CPU (a
        collective: call on every rank).

        NOTE: torchmetrics squeezes one-element tensors of the result (``[1, 1, 1]`` traffic of one
        layer without EP); :meth:`compute_window` restores the shapes.
        """
        return (
            self.tokens_per_expert_LM.cpu(), self.traffic_LPP.cpu(), self.rank_load_LP.cpu(), self.counters_LC.cpu(),
            self.source_load_LPM.cpu(), self.replica_split_LK.cpu(),
        )

    def compute_window(self, step: int, steps: int | None = None) -> LoadWindow:
        """The window's sums over every process, as a :class:`LoadWindow` closed at ``step`` that
        covers ``steps`` optimizer steps.

        A collective when running distributed: every rank must call it.
        """
        tokens_LM, traffic_LPP, rank_load_LP, counters_LC, source_load_LPM, replica_split_LK = self.compute()
        num_layers = len(self.num_experts)
        tokens_LM = tokens_LM.reshape(num_layers, max(self.num_experts))
        traffic_LPP = traffic_LPP.reshape(num_layers, self.ep_size, self.ep_size)
        rank_load_LP = rank_load_LP.reshape(num_layers, self.ep_size)
        counters_LC = counters_LC.reshape(num_layers, _NUM_COUNTERS)
        source_load_LPM = source_load_LPM.reshape(num_layers, self.ep_size, max(self.num_experts))
        replica_split_LK = replica_split_LK.reshape(num_layers, _NUM_SPLITS)
        entropy = []
        for row in counters_LC:
            tokens_with_entropy = row[_ENTROPY_TOKENS].item()
            entropy.append(row[_ENTROPY_SUM].item() / tokens_with_entropy if tokens_with_entropy > 0 else None)
        return LoadWindow(
            step=step,
            tokens_per_expert=[tokens_LM[index, :num].clone() for index, num in enumerate(self.num_experts)],
            traffic=[t.clone() for t in traffic_LPP],
            routed=[int(v) for v in counters_LC[:, _ROUTED].tolist()],
            dropped=[int(v) for v in counters_LC[:, _DROPPED].tolist()],
            num_tokens=[int(v) for v in counters_LC[:, _TOKENS].tolist()],
            router_entropy=entropy,
            rank_load=[t.clone() for t in rank_load_LP],
            source_load=[source_load_LPM[index, :, :num].clone() for index, num in enumerate(self.num_experts)],
            replica_split=[t.clone() for t in replica_split_LK],
            steps=steps,
        )


def max_violation(load_E: torch.Tensor) -> float:
    """MaxVio = (max_e load_e - mean load) / mean load (Wang et al. 2024, "Auxiliary-Loss-Free Load
    Balancing Strategy for Mixture-of-Experts", Sec. 4.1). 0 is perfect balance; 0.0 for no load."""
    load_E = load_E.double()
    mean = load_E.mean()
    return 0.0 if mean <= 0 else ((load_E.max() - mean) / mean).item()


def coefficient_of_variation(load_E: torch.Tensor) -> float:
    """CV = std / mean of the load (population std); Shazeer et al. 2017 (Sec. 4) penalise its square."""
    load_E = load_E.double()
    mean = load_E.mean()
    return 0.0 if mean <= 0 else (load_E.std(unbiased=False) / mean).item()


def summarize(window: LoadWindow, run_tokens_per_expert: Sequence[torch.Tensor]) -> dict[str, float]:
    """The scalars logged for one window: per layer under ``moe/layer{i}/`` and run-level under ``moe/``.

    Args:
        window: the load of the window, summed over processes.
        run_tokens_per_expert: per layer, the load since the start of training (window included),
            for the run-level MaxVio ``max_vio_run``.

    Per layer: ``max_vio``, ``max_vio_run``, ``cv``, ``dead_experts`` (experts without a token in
    the window), ``dropped_fraction`` (dropped / routed assignments), ``experts_per_token`` (routed
    assignments / tokens: ``k`` for top-k, variable for the dynamic gate), ``router_entropy`` (when
    the gate reports it) and, under expert parallelism, ``ep_max_vio`` (MaxVio of the rows each EP
    rank processed) and, with per-step replica balancing, ``replica_split_planned``,
    ``replica_split_plan_share``, ``replica_split_even_share``, ``replica_split_plan_share_local``,
    ``replica_split_even_share_local``, ``replica_split_plan_share_matched`` and
    ``replica_split_even_share_matched`` (the share of the window's dispatches that kept each
    split, :mod:`lightning_moe.parallel.replica_balance`). Run-level: the
    mean over layers of each, except ``dead_experts`` (a sum) and ``dropped_fraction`` (over all
    layers' assignments).
    """
    metrics: dict[str, float] = {}
    per_layer: dict[str, list[float]] = {}

    def put(index: int, name: str, value: float) -> None:
        metrics[f"moe/layer{index}/{name}"] = value
        per_layer.setdefault(name, []).append(value)

    for index, load_E in enumerate(window.tokens_per_expert):
        routed, dropped, tokens = window.routed[index], window.dropped[index], window.num_tokens[index]
        put(index, "max_vio", max_violation(load_E))
        put(index, "max_vio_run", max_violation(run_tokens_per_expert[index]))
        put(index, "cv", coefficient_of_variation(load_E))
        put(index, "dead_experts", float((load_E == 0).sum().item()))
        put(index, "dropped_fraction", dropped / routed if routed > 0 else 0.0)
        put(index, "experts_per_token", routed / tokens if tokens > 0 else 0.0)
        if window.router_entropy[index] is not None:
            put(index, "router_entropy", window.router_entropy[index])
        rank_load_P = window.rank_load[index]
        if rank_load_P.shape[0] > 1:
            put(index, "ep_max_vio", max_violation(rank_load_P))
        kept_K = window.replica_split[index] if window.replica_split else None
        if kept_K is not None and kept_K.sum() > 0:
            for name, share in zip(SPLITS, (kept_K.double() / kept_K.sum()).tolist()):
                put(index, f"replica_split_{name}", share)

    for name, values in per_layer.items():
        metrics[f"moe/{name}"] = sum(values) / len(values)
    metrics["moe/dead_experts"] = sum(per_layer["dead_experts"])
    total_routed = sum(window.routed)
    metrics["moe/dropped_fraction"] = sum(window.dropped) / total_routed if total_routed > 0 else 0.0
    return metrics
