"""The gate (router) interface shared by every routing rule.

A gate maps tokens to experts. It returns a :class:`Routing`: a flat list of *assignments*
(token, expert, weight), so that token-choice gates (each token picks ``k`` experts), dynamic gates
(each token picks a variable number) and expert-choice gates (each expert picks tokens) all feed the
same dispatcher.

Shape legend: ``T`` tokens, ``D`` model width, ``E`` experts (logical ids), ``K`` experts per token,
``N`` assignments.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from lightning_moe.validation import check_non_negative, check_positive_int


class AuxLoss(NamedTuple):
    """An auxiliary loss of one forward: its raw value and the coefficient it enters the loss with."""

    value: torch.Tensor
    coefficient: float

    @property
    def weighted(self) -> torch.Tensor:
        return self.value * self.coefficient


@dataclass
class Routing:
    """What a gate decided for one batch of tokens.

    Attributes:
        token_index_N: the token of each assignment, ``[N]`` (int64).
        expert_index_N: the logical expert of each assignment, ``[N]`` (int64).
        weight_N: the weight the expert's output is combined with, ``[N]`` (float32).
        num_tokens: ``T``.
        aux_losses: auxiliary losses by name (e.g. ``"load_balance_loss"``).
        stats: detached per-batch statistics by name (e.g. ``"router_entropy"``).
        device_index_N: the EP rank each assignment goes to, when the gate chose it (device-level
            capacity needs the replica choice); ``None`` lets the dispatcher choose.
        num_dropped: assignments the gate itself dropped (device-level capacity).
        allowed_devices_TG: ``[T, G]`` booleans, the EP ranks each token may reach under
            device-limited routing (``None``: any). An expert with replicas is then served by a
            replica on one of its token's ranks, so the bound on fan-out holds with replicas too.
        capacity: assignments each expert takes at most (a layer's ``capacity_factor``), set with
            ``position_in_expert_N`` by :func:`~lightning_moe.layers.dispatch.limit_to_capacity`;
            the dispatcher drops the assignments at positions ``>= capacity``. ``None``: dropless.
        position_in_expert_N: each assignment's position among its expert's, in priority order.

    NOTE: assignments are in *priority order*: when a capacity limit drops assignments, the later
    ones go first. Token-choice gates list all first choices, then all second choices, and so on,
    as GShard (Lepikhin et al. 2020, Sec. 2.2) does.
    """

    token_index_N: torch.Tensor
    expert_index_N: torch.Tensor
    weight_N: torch.Tensor
    num_tokens: int
    aux_losses: dict[str, AuxLoss] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    device_index_N: torch.Tensor | None = None
    num_dropped: int = 0
    allowed_devices_TG: torch.Tensor | None = None
    capacity: int | None = None
    position_in_expert_N: torch.Tensor | None = None

    def subset(self, keep_N: torch.Tensor, *, device_index_N: torch.Tensor | None = None) -> Routing:
        """The assignments where ``keep_N`` is true (priority order kept), the others counted as dropped;
        ``device_index_N`` (for every assignment) replaces the chosen devices."""
        devices_N = self.device_index_N if device_index_N is None else device_index_N
        return Routing(
            token_index_N=self.token_index_N[keep_N],
            expert_index_N=self.expert_index_N[keep_N],
            weight_N=self.weight_N[keep_N],
            num_tokens=self.num_tokens,
            aux_losses=self.aux_losses,
            stats=self.stats,
            device_index_N=None if devices_N is None else devices_N[keep_N],
            num_dropped=self.num_dropped + int(keep_N.numel() - keep_N.sum()),
            allowed_devices_TG=self.allowed_devices_TG,
        )


def routing_from_topk(topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor) -> Routing:
    """Flatten token-choice ``[T, K]`` routing into assignments in k-major (priority) order."""
    num_tokens, top_k = topk_ids_TK.shape
    token_index_KT = torch.arange(num_tokens, device=topk_ids_TK.device).expand(top_k, num_tokens)
    return Routing(
        token_index_N=token_index_KT.reshape(-1),
        expert_index_N=topk_ids_TK.t().reshape(-1),
        weight_N=topk_weights_TK.t().reshape(-1).float(),
        num_tokens=num_tokens,
    )


#: Up to this many choices of groups, :func:`fewest_experts_in_groups` tries every one.
_EXACT_GROUP_CHOICES = 5_000


def fewest_experts_in_groups(holders_GE: torch.Tensor, max_groups: int) -> int:
    """The fewest distinct experts that ``max_groups`` of the groups ``holders_GE`` (``[G, E]``
    booleans) can hold together: what a token limited to them is sure to reach.

    Groups that share experts (replicas) hold fewer together than their sizes add up to. Every choice
    is tried when there are at most ``_EXACT_GROUP_CHOICES``; beyond, a lower bound: one chosen
    group's experts plus, for each other one, the experts that no other group holds.
    """
    # NOTE: a migration checks each new table up to three times (ExpertMigration, apply_placement,
    # then the switch itself); the search runs once per table.
    held_G = tuple(sum(1 << expert for expert in row.nonzero().flatten().tolist()) for row in holders_GE.bool())
    return _fewest_experts(held_G, max_groups)


@functools.lru_cache(maxsize=256)
def _fewest_experts(held_G: tuple[int, ...], max_groups: int) -> int:
    """:func:`fewest_experts_in_groups` of the groups' expert sets as bit masks."""
    num_groups = len(held_G)
    take = min(max_groups, num_groups)
    if math.comb(num_groups, take) <= _EXACT_GROUP_CHOICES:
        return min(
            functools.reduce(operator.or_, (held_G[group] for group in chosen)).bit_count()
            for chosen in itertools.combinations(range(num_groups), take)
        )
    holders = [sum(held >> expert & 1 for held in held_G) for expert in range(max(held_G).bit_length())]
    private_G = [sum(1 for expert in range(held.bit_length()) if held >> expert & 1 and holders[expert] == 1)
                 for held in held_G]
    return min(held.bit_count() for held in held_G) + (take - 1) * min(private_G)


def mean_over_tokens(values_T: torch.Tensor) -> torch.Tensor:
    """The mean over dimension 0 (the tokens), 0 (not NaN) for a batch of no tokens: a rank or a
    micro-batch that routed nothing must not make the loss NaN."""
    return values_T.sum(dim=0) / max(values_T.shape[0], 1)


def router_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the per-token routing distribution: low means confident routing."""
    return mean_over_tokens(-(probs_TE * torch.log(probs_TE.clamp_min(1e-20))).sum(-1))


def check_at_most_experts(owner: str, name: str, value: int, num_experts: int) -> None:
    """A gate cannot pick more experts per token than the layer has."""
    if value > num_experts:
        raise ValueError(
            f"{owner}: `{name}` ({value}) must not exceed `num_experts` ({num_experts}). "
            f"Lower `{name}` or raise `num_experts`."
        )


class Gate(nn.Module):
    """Base class of every routing rule.

    A gate is constructed with its own hyper-parameters only (so that a YAML ``class_path`` can
    name it), then :meth:`build` gives it the layer's width and number of experts and creates its
    parameters. :class:`~lightning_moe.MoELayer` calls :meth:`build`; a gate is never shared
    between layers.

    Subclasses implement :meth:`_build` and :meth:`forward`, and may set ``needs_bias_update`` with
    :meth:`update_bias` (aux-loss-free balancing).
    """

    #: Whether :meth:`update_bias` must be called after every optimizer step.
    needs_bias_update: bool = False
    #: Whether the gate bounds each expert's load itself (expert choice), so that a layer-level
    #: ``capacity_factor`` would be a second, conflicting limit.
    has_own_capacity: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.d_model: int | None = None
        self.num_experts: int | None = None
        #: Device-limited routing: at most this many expert groups per token (see set_expert_groups).
        self.expert_group_limit: int | None = None
        #: Whether the router logits of the last forward were all finite (a 0-d bool tensor, on the
        #: logits' device; ``None`` for a gate that does not report it). Read by ``MoELayer``.
        self.last_logits_finite: torch.Tensor | None = None
        #: Turns a forward's per-expert counts into the global batch's so far (summed over every
        #: process that routes with this gate, and over the micro-batches of gradient accumulation):
        #: :meth:`MoELayer.count_global_batch <lightning_moe.MoELayer.count_global_batch>`, set by
        #: the layer. Losses of ``load_balance_scope="global"`` count through it.
        self.count_global_batch: Callable[[torch.Tensor], torch.Tensor] | None = None

    def build(self, d_model: int, num_experts: int, *, init_std: float = 0.02) -> Gate:
        """Create this gate's parameters for a layer of width ``d_model`` with ``num_experts`` experts,
        initialised by :meth:`reset_parameters` with ``init_std`` (the layer's ``init_std``)."""
        if self.num_experts is not None:
            raise RuntimeError(f"{type(self).__name__} is already built; give each MoELayer its own gate.")
        owner = type(self).__name__
        check_positive_int(owner, "d_model", d_model)
        check_positive_int(owner, "num_experts", num_experts)
        check_non_negative(owner, "init_std", init_std)
        self.d_model, self.num_experts = d_model, num_experts
        self._build(d_model, num_experts)
        self.reset_parameters(init_std)
        return self

    def _build(self, d_model: int, num_experts: int) -> None:
        """Validate hyper-parameters against ``num_experts`` and create parameters (uninitialised:
        :meth:`build` calls :meth:`reset_parameters` next)."""
        raise NotImplementedError

    def forward(self, x_TD: torch.Tensor, *, num_sequences: int = 1) -> Routing:
        """Route ``T`` tokens. ``num_sequences`` splits them into equal consecutive sequences (for
        sequence-level losses)."""
        raise NotImplementedError

    def counts_reducer(self, scope: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """What a load-balancing loss of ``scope`` sums its counts with: :attr:`count_global_batch`
        for ``"global"`` in training, nothing otherwise.

        NOTE: only in training, where every rank runs the same forwards. An evaluation or generation
        forward that one rank runs alone (a callback on rank 0) must not wait for the others in a
        collective; its loss is not trained on."""
        return self.count_global_batch if scope == "global" and self.training else None

    def update_bias(self, tokens_per_expert_E: torch.Tensor) -> None:
        """Adjust selection biases from the load seen since the last optimizer step."""

    def set_expert_groups(self, groups: torch.Tensor | None, max_groups: int | None) -> None:
        """Limit each token to experts of at most ``max_groups`` groups (``None`` lifts the limit).

        Device-limited routing (DeepSeek-V2, Dai et al. 2024, Sec. 2.1.3): with groups = the
        expert-parallel ranks that hold the experts, a token's experts span at most ``max_groups``
        ranks, which bounds its all-to-all traffic. Set by :class:`~lightning_moe.MoEStrategy` from the
        placement in force; token-choice gates apply it with :meth:`limit_to_expert_groups` before top-k.

        Args:
            groups: ``[E]``, the group of each expert; or ``[G, E]`` booleans, which groups hold which
                expert (an expert with replicas is in several groups).
            max_groups: groups a token may use.
        """
        if groups is None or max_groups is None:
            self.expert_group_limit = None
            return
        check_positive_int(type(self).__name__, "max_groups", max_groups)
        groups = torch.as_tensor(groups)
        if groups.dim() == 1 and groups.shape == (self.num_experts,):
            groups = torch.nn.functional.one_hot(groups.long().cpu(), int(groups.max()) + 1).t().bool()
        if groups.dim() != 2 or groups.shape[1] != self.num_experts:
            raise ValueError(
                f"{type(self).__name__}.set_expert_groups: `groups` must have shape ({self.num_experts},) or "
                f"(groups, {self.num_experts}), got {tuple(groups.shape)}. Give each expert's group, or which "
                f"groups hold each expert."
            )
        holders_GE = groups.bool().cpu()
        if not holders_GE.any(dim=0).all():
            raise ValueError(f"{type(self).__name__}.set_expert_groups: every expert must be in some group.")
        self.check_group_limit(holders_GE, max_groups)
        device = next((t.device for t in self.parameters()), None)
        if device is not None and device.type == "meta":
            device = None  # no data there; the model's move to its device carries the buffer along
        # (group, expert) pairs: one column per expert a group holds.
        self.register_buffer("expert_group", holders_GE.nonzero().t().contiguous().to(device), persistent=False)
        self.expert_group_count = holders_GE.shape[0]
        self.expert_group_limit = max_groups

    def check_group_limit(self, holders_GE: torch.Tensor, max_groups: int) -> None:
        """Raise ``ValueError`` when a token limited to ``max_groups`` of the groups ``holders_GE``
        (``[G, E]`` booleans) could be left fewer than ``top_k`` experts."""
        top_k = getattr(self, "top_k", 1)
        fewest = fewest_experts_in_groups(holders_GE, max_groups)
        if fewest < top_k:
            raise ValueError(
                f"{type(self).__name__}: device-limited routing to {max_groups} group(s) can leave a token "
                f"{fewest} distinct expert(s), fewer than top_k={top_k} (groups of "
                f"{int(holders_GE.sum(dim=1).min())} or more experts, replicas counted once). Raise the limit "
                f"(`device_limited_routing`), lower `top_k`, or place fewer replicas of one expert together."
            )

    def set_expert_devices(self, devices: Any) -> None:
        """Give a gate with device-level options (:class:`~lightning_moe.layers.gates.device_balance.DeviceBalance`)
        the devices of its experts under the placement in force; ``None`` without expert parallelism."""
        balance = getattr(self, "device_balance", None)
        if balance is not None:
            balance.devices = devices

    def limit_to_expert_groups(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """``scores_TE`` with the experts outside each token's ``max_groups`` best groups set to -inf.

        A group's affinity is the best score of the experts it holds (DeepSeek-V2 Sec. 2.1.3); the
        allowed experts are those held by a kept group. Without a limit (or when it allows every
        group) the scores are returned unchanged. :meth:`limit_and_keep_groups` also returns the
        kept groups.
        """
        return self.limit_and_keep_groups(scores_TE)[0]

    def limit_and_keep_groups(self, scores_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`limit_to_expert_groups`, and ``[T, G]`` booleans of each token's kept groups
        (``None`` without a limit): the gate puts them in :attr:`Routing.allowed_devices_TG`, so that
        replicas are chosen among them."""
        max_groups = self.expert_group_limit
        if max_groups is None or max_groups >= self.expert_group_count:
            return scores_TE, None
        pair_group_P, pair_expert_P = self.expert_group.to(scores_TE.device)
        num_tokens = scores_TE.shape[0]
        group_score_TG = scores_TE.new_full((num_tokens, self.expert_group_count), float("-inf")).scatter_reduce(
            1, pair_group_P.expand(num_tokens, -1), scores_TE[:, pair_expert_P], reduce="amax"
        )
        kept_group_TG = torch.zeros_like(group_score_TG)
        kept_group_TG.scatter_(1, group_score_TG.topk(max_groups, dim=-1).indices, 1.0)
        allowed_TE = torch.zeros_like(scores_TE).scatter_reduce(
            1, pair_expert_P.expand(num_tokens, -1), kept_group_TG[:, pair_group_P], reduce="amax"
        )
        return scores_TE.masked_fill(allowed_TE == 0, float("-inf")), kept_group_TG.bool()

    def reset_parameters(self, init_std: float) -> None:
        """(Re-)initialise the routing weights with a normal of standard deviation ``init_std``.
        Override it in a gate whose parameters need another initialisation."""
        for parameter in self.parameters(recurse=False):
            nn.init.normal_(parameter, std=init_std)


class LinearRouterGate(Gate):
    """A gate whose scores come from one linear map ``x W^T``, ``W: [E, D]``, computed in fp32."""

    def _build(self, d_model: int, num_experts: int) -> None:
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))  # initialised by `reset_parameters`

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        # NOTE: routing in fp32 (as DeepSeek-V3 and Megatron's `moe_router_dtype=fp32`): bf16 logits
        # flip near-tied top-k choices between runs and between EP layouts.
        logits_TE = torch.nn.functional.linear(x_TD.float(), self.weight.float())  # (T, E)
        self.last_logits_finite = torch.isfinite(logits_TE).all().detach()
        return logits_TE
