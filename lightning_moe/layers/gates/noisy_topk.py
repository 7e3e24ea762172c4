"""Noisy top-k gating with importance and load losses (Shazeer et al. 2017, "Outrageously Large
Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer").

Shape legend: ``T`` tokens, ``D`` model width, ``E`` experts, ``K`` experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_moe.layers.gates.base import (
    AuxLoss,
    LinearRouterGate,
    Routing,
    check_at_most_experts,
    check_non_negative,
    check_positive_int,
    router_entropy,
    routing_from_topk,
)
from lightning_moe.ops.counting import count_per_expert


def cv_squared(values_E: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation ``Var(v) / Mean(v)^2`` of a vector (Shazeer et al. 2017,
    eqs. 7 and 11), with the population variance. Zero for a single value or a zero vector."""
    if values_E.numel() < 2:
        return values_E.new_zeros(())
    mean = values_E.mean()
    variance = (values_E - mean).square().mean()
    # NOTE: the small constant keeps an all-zero vector (no tokens) at 0 instead of 0/0.
    return variance / (mean.square() + 1e-10)


class NoisyTopKGate(LinearRouterGate):
    """Noisy top-k gating (Shazeer et al. 2017, Sec. 2.1, eqs. 3-5).

    In training mode each token's scores get tunable Gaussian noise,
    ``H(x)_e = (x W_g)_e + StandardNormal() * (softplus((x W_noise)_e) + noise_epsilon)`` (eq. 4), the
    ``top_k`` largest are kept and the others set to ``-inf`` (``KeepTopK``, eq. 5), and a softmax
    over the kept ``k`` gives the weights (eq. 3). In eval mode there is no noise. The noise is one
    ``torch.randn_like`` draw of shape ``[T, E]`` per forward, so it follows ``torch.manual_seed``.

    Two auxiliary losses, both on the squared coefficient of variation over experts:

    - ``"importance_loss"`` (Sec. 4, eqs. 6-7): ``CV(Importance)^2`` with ``Importance_e`` the sum over
      the batch of the gate values ``G(x)_e``.
    - ``"load_loss"`` (Appendix A, eqs. 8-11): ``CV(Load)^2`` with the smooth load estimator
      ``Load_e = sum_x P(x, e)``, ``P(x, e) = Phi(((x W_g)_e - kth_excluding(H(x), k, e)) / noise_std_e)``,
      the probability that ``e`` would still be selected with its noise drawn again. In eval mode,
      or with ``top_k == num_experts`` (every expert always selected), it falls back to the token
      counts per expert, which carry no gradient.

    ``W_noise`` starts at zero as in the paper (Appendix A), which gives noise of standard deviation
    ``softplus(0) = ln 2`` at first. ``W_g`` starts from a small normal rather than the paper's zeros,
    so that an untrained gate already routes deterministically in eval mode.

    Args:
        top_k: experts per token (``k``).
        noise_epsilon: added to ``softplus(x W_noise)`` so the noise standard deviation stays positive.
        importance_coef: coefficient of the importance loss (``w_importance``; the paper uses 0.1).
        load_coef: coefficient of the load loss (``w_load``; the paper uses 0.1).
    """

    def __init__(
        self,
        *,
        top_k: int = 2,
        noise_epsilon: float = 1e-2,
        importance_coef: float = 0.01,
        load_coef: float = 0.01,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_positive_int(owner, "top_k", top_k)
        check_non_negative(owner, "noise_epsilon", noise_epsilon)
        check_non_negative(owner, "importance_coef", importance_coef)
        check_non_negative(owner, "load_coef", load_coef)
        self.top_k = top_k
        self.noise_epsilon = float(noise_epsilon)
        self.importance_coef = importance_coef
        self.load_coef = load_coef

    def _build(self, d_model: int, num_experts: int) -> None:
        check_at_most_experts(type(self).__name__, "top_k", self.top_k, num_experts)
        super()._build(d_model, num_experts)
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, d_model))  # W_noise^T, (E, D)

    def reset_parameters(self, init_std: float) -> None:
        nn.init.normal_(self.weight, std=init_std)
        nn.init.zeros_(self.noise_weight)  # Appendix A: W_noise = 0, pure noise of std ln 2 at first.

    def noisy_logits(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Clean scores ``x W_g``, noisy scores ``H(x)`` and the noise standard deviation, all ``[T, E]``
        in fp32 (eq. 4). Draws the noise whatever the module's mode."""
        clean_TE = self.logits(x_TD)
        raw_noise_TE = F.linear(x_TD.float(), self.noise_weight.float())
        noise_std_TE = F.softplus(raw_noise_TE) + self.noise_epsilon
        noisy_TE = clean_TE + torch.randn_like(clean_TE) * noise_std_TE
        return clean_TE, noisy_TE, noise_std_TE

    def forward(self, x_TD: torch.Tensor, *, num_sequences: int = 1) -> Routing:
        if self.training:
            clean_TE, scores_TE, noise_std_TE = self.noisy_logits(x_TD)
        else:
            clean_TE = scores_TE = self.logits(x_TD)
            noise_std_TE = None

        # Device-limited routing (a no-op unless MoEStrategy set expert groups): the experts of the
        # excluded groups get -inf and can be neither selected nor counted in the load.
        scores_TE, kept_groups_TG = self.limit_and_keep_groups(scores_TE)
        # KeepTopK then softmax (eq. 5 then eq. 3): the -inf entries get weight 0, so the softmax over
        # all E after masking equals a softmax over the k kept scores.
        topk_scores_TK, topk_ids_TK = torch.topk(scores_TE, self.top_k, dim=-1)
        topk_weights_TK = torch.softmax(topk_scores_TK, dim=-1)
        routing = routing_from_topk(topk_ids_TK, topk_weights_TK)
        routing.allowed_devices_TG = kept_groups_TG

        gates_TE = torch.zeros_like(scores_TE).scatter(1, topk_ids_TK, topk_weights_TK)  # G(x), (T, E)
        if self.importance_coef > 0:
            importance_E = gates_TE.sum(dim=0)  # eq. 6
            routing.aux_losses["importance_loss"] = AuxLoss(cv_squared(importance_E), self.importance_coef)
        if self.load_coef > 0:
            if noise_std_TE is not None and self.top_k < self.num_experts:
                load_E = self._smooth_load(clean_TE, scores_TE, noise_std_TE, topk_ids_TK)
            else:
                load_E = count_per_expert(routing.expert_index_N, self.num_experts).float()
            routing.aux_losses["load_loss"] = AuxLoss(cv_squared(load_E), self.load_coef)
        routing.stats["router_entropy"] = router_entropy(torch.softmax(clean_TE.detach(), dim=-1))
        return routing

    def _smooth_load(
        self,
        clean_TE: torch.Tensor,
        noisy_TE: torch.Tensor,
        noise_std_TE: torch.Tensor,
        topk_ids_TK: torch.Tensor,
    ) -> torch.Tensor:
        """``Load_e = sum_x P(x, e)`` (Appendix A, eqs. 8-10); needs ``top_k < num_experts``."""
        k = self.top_k
        top_scores_TK1, _ = torch.topk(noisy_TE, k + 1, dim=-1)
        # kth_excluding(H(x), k, e): for an expert inside the top k, removing it promotes the
        # (k+1)-th largest score to k-th; for an expert outside, the k-th largest stays.
        threshold_if_in_T1 = top_scores_TK1[:, k : k + 1]
        threshold_if_out_T1 = top_scores_TK1[:, k - 1 : k]
        selected_TE = torch.zeros_like(noisy_TE, dtype=torch.bool).scatter(1, topk_ids_TK, True)
        threshold_TE = torch.where(selected_TE, threshold_if_in_T1, threshold_if_out_T1)
        # Device-limited routing leaves -inf scores: an excluded expert cannot be selected (P = 0), and
        # when no other allowed expert competes (threshold -inf) a selected one always is (P = 1).
        # NOTE: both cases go through torch.where with finite operands, as inf in the z branch would
        # turn the gradient into nan.
        allowed_TE = torch.isfinite(noisy_TE)
        contested_TE = torch.isfinite(threshold_TE)
        threshold_TE = torch.where(contested_TE, threshold_TE, 0.0)
        # eq. 9: P(x, e) = Phi((clean_e - kth_excluding) / std_e), Phi the standard normal CDF.
        z_TE = (clean_TE - threshold_TE) / noise_std_TE.clamp_min(torch.finfo(noise_std_TE.dtype).tiny)
        prob_TE = torch.where(contested_TE, torch.special.ndtr(z_TE), 1.0)
        prob_TE = torch.where(allowed_TE, prob_TE, 0.0)
        return prob_TE.sum(dim=0)  # eq. 10, (E,)
