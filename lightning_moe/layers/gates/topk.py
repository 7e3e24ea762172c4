"""Softmax top-k routing: Switch (k=1), GShard and Mixtral (k=2), Qwen-MoE."""

from __future__ import annotations

import torch

from lightning_moe.layers.gates.base import (
    LinearRouterGate,
    Routing,
    check_at_most_experts,
    check_non_negative,
    check_positive_int,
    routing_from_topk,
)
from lightning_moe.layers.gates.device_balance import DeviceBalance, DeviceBalanceOptions
from lightning_moe.layers.gates.losses import add_softmax_router_losses, check_load_balance_scope


class TopKGate(DeviceBalanceOptions, LinearRouterGate):
    """Softmax over all experts in fp32, then the ``top_k`` most probable experts.

    With ``normalize=True`` the ``k`` kept probabilities are renormalised to sum to one (Mixtral,
    Qwen with ``norm_topk_prob``); with ``normalize=False`` each expert's output is scaled by its
    probability, as in Switch Transformer (Fedus et al. 2021, Sec. 2.1: ``y = p_i(x) E_i(x)``).

    NOTE: with ``top_k=1``, renormalising makes every weight exactly 1, so the task loss gives the
    router no gradient at all (only the aux losses would train it). That is why the default
    renormalises only when ``top_k > 1``.

    Args:
        top_k: experts per token.
        normalize: renormalise the kept probabilities; ``None`` (default) does so when ``top_k > 1``
            (Mixtral, GShard) and not for ``top_k=1`` (Switch).
        load_balance_coef: coefficient of the Switch load-balancing loss (Fedus et al. 2021, eq. 4).
        load_balance_scope: where the load-balancing loss counts each expert's share of the
            assignments: ``"local"``, this process's micro-batch (Switch); ``"global"``, the
            global batch: every data-parallel rank's micro-batch, and those accumulated since the
            optimizer step (Qiu et al. 2025; one all-reduce of ``E`` counts per layer and forward,
            under :class:`~lightning_moe.MoEStrategy`).
        z_loss_coef: coefficient of the router z-loss (Zoph et al. 2022, eq. 5).
        device_balance_coef: coefficient of DeepSeek-V2's device-level balance loss over the
            expert-parallel ranks (:mod:`~lightning_moe.layers.gates.device_balance`).
        communication_balance_coef: coefficient of DeepSeek-V2's communication balance loss.
        device_capacity_factor: each EP rank takes at most this factor times its even share of a
            rank's assignments, dropping those of lowest probability (DeepSeek-V2); ``None``: no drop.
    """

    def __init__(
        self,
        *,
        top_k: int = 2,
        normalize: bool | None = None,
        load_balance_coef: float = 0.01,
        load_balance_scope: str = "local",
        z_loss_coef: float = 0.0,
        device_balance_coef: float = 0.0,
        communication_balance_coef: float = 0.0,
        device_capacity_factor: float | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(type(self).__name__, "top_k", top_k)
        check_non_negative(type(self).__name__, "load_balance_coef", load_balance_coef)
        check_non_negative(type(self).__name__, "z_loss_coef", z_loss_coef)
        check_load_balance_scope(type(self).__name__, load_balance_scope)
        self.top_k = top_k
        self.normalize = top_k > 1 if normalize is None else bool(normalize)
        self.load_balance_coef = load_balance_coef
        self.load_balance_scope = load_balance_scope
        self.z_loss_coef = z_loss_coef
        self.device_balance = DeviceBalance(
            type(self).__name__,
            device_balance_coef=device_balance_coef,
            communication_balance_coef=communication_balance_coef,
            device_capacity_factor=device_capacity_factor,
        )

    def _build(self, d_model: int, num_experts: int) -> None:
        check_at_most_experts(type(self).__name__, "top_k", self.top_k, num_experts)
        super()._build(d_model, num_experts)

    def forward(self, x_TD: torch.Tensor, *, num_sequences: int = 1) -> Routing:
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        # Device-limited routing (a no-op unless MoEStrategy set expert groups): the chosen experts
        # are the top-k of the allowed ones; their weights are their unmasked probabilities.
        allowed_TE, kept_groups_TG = self.limit_and_keep_groups(probs_TE)
        topk_ids_TK = torch.topk(allowed_TE, self.top_k, dim=-1).indices
        topk_probs_TK = probs_TE.gather(1, topk_ids_TK)
        if self.normalize:
            topk_probs_TK = topk_probs_TK / topk_probs_TK.sum(dim=-1, keepdim=True)
        routing = routing_from_topk(topk_ids_TK, topk_probs_TK)
        routing.allowed_devices_TG = kept_groups_TG
        add_softmax_router_losses(
            routing, logits_TE, probs_TE, load_balance_coef=self.load_balance_coef, z_loss_coef=self.z_loss_coef,
            reduce_counts=self.counts_reducer(self.load_balance_scope),
        )
        return self.device_balance.apply(routing, probs_TE, topk_ids_TK, self.expert_group_limit)
