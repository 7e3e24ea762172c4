"""Threshold (top-p) routing: each token takes as many experts as its routing confidence needs
(Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models").

Shape legend: ``T`` tokens, ``D`` model width, ``E`` experts, ``K`` candidate slots per token
(``max_k``), ``N`` assignments.
"""

from __future__ import annotations

import math

import torch

from lightning_moe.layers.gates.base import (
    AuxLoss,
    LinearRouterGate,
    Routing,
    check_at_most_experts,
    check_non_negative,
    check_positive_int,
    router_entropy,
)
from lightning_moe.layers.gates.losses import add_softmax_router_losses, check_load_balance_scope


class DynamicGate(LinearRouterGate):
    """Top-p routing: a token takes experts in order of probability until their mass reaches ``threshold``.

    With ``P = softmax(x W)`` in fp32 and the experts sorted by ``P``, a token takes the smallest prefix
    whose cumulative probability is ``>= threshold`` (Huang et al. 2024, Sec. 3.1), capped at
    ``max_k`` experts. A confident token (top probability ``>= threshold``) takes one expert, an
    uncertain one two or more. The output is ``sum_{e in S} P_e * expert_e(x)``: the weights are the
    kept probabilities, NOT renormalised, as in the paper (so they sum to less than one; the
    paper's threshold is ``p = 0.4``).

    Assignments are listed in priority order: every token's first choice, then the second choices of
    the tokens that take two or more, and so on (as :func:`~lightning_moe.layers.gates.base.routing_from_topk`).

    Aux losses: ``"load_balance_loss"`` (Switch, Fedus et al. 2021, eq. 4, over the assignments that
    were made), ``"z_loss"`` (Zoph et al. 2022, eq. 5) and ``"entropy_loss"``, the paper's dynamic
    loss ``mean_t -sum_e P_te log P_te`` (Sec. 3.2) that keeps the router from spreading its mass
    thin to activate many experts. Stats: ``"experts_per_token"`` (mean experts a token took) and
    ``"router_entropy"``.

    Args:
        threshold: cumulative probability ``p`` in ``(0, 1]`` a token's experts must reach.
        max_k: most experts one token may take.
        load_balance_coef: coefficient of the Switch load-balancing loss.
        load_balance_scope: where the load-balancing loss counts each expert's share of the
            assignments: ``"local"``, this process's micro-batch (Switch); ``"global"``, the
            global batch: every data-parallel rank's micro-batch, and those accumulated since the
            optimizer step (Qiu et al. 2025; one all-reduce of ``E`` counts per layer and forward,
            under :class:`~lightning_moe.MoEStrategy`).
        z_loss_coef: coefficient of the router z-loss.
        entropy_loss_coef: coefficient of the paper's dynamic (entropy) loss.
    """

    def __init__(
        self,
        *,
        threshold: float = 0.5,
        max_k: int = 2,
        load_balance_coef: float = 0.01,
        load_balance_scope: str = "local",
        z_loss_coef: float = 0.0,
        entropy_loss_coef: float = 0.0,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if (
            not isinstance(threshold, (int, float))
            or isinstance(threshold, bool)
            or not math.isfinite(threshold)
            or not 0 < threshold <= 1
        ):
            raise ValueError(
                f"{owner}: `threshold` must be a probability in (0, 1], got {threshold!r}. "
                f"Use e.g. 0.4 (the paper's value); 1.0 always takes `max_k` experts."
            )
        check_positive_int(owner, "max_k", max_k)
        check_non_negative(owner, "load_balance_coef", load_balance_coef)
        check_non_negative(owner, "z_loss_coef", z_loss_coef)
        check_non_negative(owner, "entropy_loss_coef", entropy_loss_coef)
        check_load_balance_scope(owner, load_balance_scope)
        self.threshold = float(threshold)
        self.max_k = max_k
        self.load_balance_coef = load_balance_coef
        self.load_balance_scope = load_balance_scope
        self.z_loss_coef = z_loss_coef
        self.entropy_loss_coef = entropy_loss_coef

    def _build(self, d_model: int, num_experts: int) -> None:
        check_at_most_experts(type(self).__name__, "max_k", self.max_k, num_experts)
        super()._build(d_model, num_experts)

    def forward(self, x_TD: torch.Tensor, *, num_sequences: int = 1) -> Routing:
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        # Only the max_k most probable experts can ever be taken, so sorting those is enough.
        # Device-limited routing (a no-op unless MoEStrategy set expert groups) masks the experts of
        # excluded groups to -inf; the mass is counted with the unmasked probabilities.
        allowed_TE, kept_groups_TG = self.limit_and_keep_groups(probs_TE)
        sorted_ids_TK = torch.topk(allowed_TE, self.max_k, dim=-1).indices
        sorted_probs_TK = probs_TE.gather(1, sorted_ids_TK)
        # Slot j is taken while the mass of the slots before it is still below the threshold: the
        # first slot always, and the prefix stops at the first cumulative sum >= threshold.
        mass_before_TK = torch.cumsum(sorted_probs_TK, dim=-1) - sorted_probs_TK
        keep_TK = mass_before_TK < self.threshold
        keep_TK[:, 0] = True  # robust to rounding in the subtraction above
        keep_TK &= torch.isfinite(allowed_TE.gather(1, sorted_ids_TK))  # fewer allowed experts than max_k

        num_tokens = x_TD.shape[0]
        # k-major (priority) order: transpose to [K, T] before flattening, then keep the taken slots.
        keep_KT = keep_TK.t()
        token_index_KT = torch.arange(num_tokens, device=x_TD.device).expand(self.max_k, num_tokens)
        routing = Routing(
            token_index_N=token_index_KT[keep_KT],
            expert_index_N=sorted_ids_TK.t()[keep_KT],
            weight_N=sorted_probs_TK.t()[keep_KT],
            num_tokens=num_tokens,
            allowed_devices_TG=kept_groups_TG,
        )
        add_softmax_router_losses(
            routing, logits_TE, probs_TE, load_balance_coef=self.load_balance_coef, z_loss_coef=self.z_loss_coef,
            reduce_counts=self.counts_reducer(self.load_balance_scope),
        )
        if self.entropy_loss_coef > 0:
            routing.aux_losses["entropy_loss"] = AuxLoss(router_entropy(probs_TE), self.entropy_loss_coef)
        routing.stats["experts_per_token"] = keep_TK.sum(dim=-1).float().mean()
        return routing
