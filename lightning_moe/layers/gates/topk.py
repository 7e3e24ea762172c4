"""Softmax top-k routing: Switch (k=1), GShard and Mixtral (k=2), Qwen-MoE."""

from __future__ import annotations

import torch

from lightning_moe.layers.gates.base import (
    check_at_most_experts,
    AuxLoss,
    LinearRouterGate,
    Routing,
    check_non_negative,
    check_positive_int,
    routing_from_topk,
    router_entropy,
)
from lightning_moe.layers.gates.losses import router_z_loss, switch_load_balance_loss


class TopKGate(LinearRouterGate):
    """Softmax over all experts in fp32, then the ``top_k`` most probable experts.

    With ``normalize=True`` the ``k`` kept probabilities are renormalised to sum to one (Mixtral,
    Qwen with ``norm_topk_prob``); with ``top_k=1`` and ``normalize=False`` the expert's output is
    scaled by its probability as in Switch Transformer (Fedus et al. 2021, Sec. 2.1).

    Args:
        top_k: experts per token.
        normalize: renormalise the kept probabilities.
        load_balance_coef: coefficient of the Switch load-balancing loss (Fedus et al. 2021, eq. 4).
        z_loss_coef: coefficient of the router z-loss (Zoph et al. 2022, eq. 5).
    """

    def __init__(
        self,
        *,
        top_k: int = 2,
        normalize: bool = True,
        load_balance_coef: float = 0.01,
        z_loss_coef: float = 0.0,
    ) -> None:
        super().__init__()
        check_positive_int(type(self).__name__, "top_k", top_k)
        check_non_negative(type(self).__name__, "load_balance_coef", load_balance_coef)
        check_non_negative(type(self).__name__, "z_loss_coef", z_loss_coef)
        self.top_k = top_k
        self.normalize = normalize
        self.load_balance_coef = load_balance_coef
        self.z_loss_coef = z_loss_coef

    def _build(self, d_model: int, num_experts: int) -> None:
        check_at_most_experts(type(self).__name__, "top_k", self.top_k, num_experts)
        super()._build(d_model, num_experts)

    def forward(self, x_TD: torch.Tensor, *, num_sequences: int = 1) -> Routing:
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        # Device-limited routing (a no-op unless MoEStrategy set expert groups): the chosen experts
        # are the top-k of the allowed ones; their weights are their unmasked probabilities.
        topk_ids_TK = torch.topk(self.limit_to_expert_groups(probs_TE), self.top_k, dim=-1).indices
        topk_probs_TK = probs_TE.gather(1, topk_ids_TK)
        if self.normalize:
            topk_probs_TK = topk_probs_TK / topk_probs_TK.sum(dim=-1, keepdim=True)
        routing = routing_from_topk(topk_ids_TK, topk_probs_TK)
        if self.load_balance_coef > 0:
            loss = switch_load_balance_loss(probs_TE, routing.expert_index_N, self.num_experts)
            routing.aux_losses["load_balance_loss"] = AuxLoss(loss, self.load_balance_coef)
        if self.z_loss_coef > 0:
            routing.aux_losses["z_loss"] = AuxLoss(router_z_loss(logits_TE), self.z_loss_coef)
        routing.stats["router_entropy"] = router_entropy(probs_TE.detach())
        return routing
