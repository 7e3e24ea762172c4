"""Expert-choice routing: each expert picks its top tokens (Zhou et al. 2022, "Mixture-of-Experts
with Expert Choice Routing").

Shape legend: ``T`` tokens, ``D`` model width, ``E`` experts, ``C`` tokens per expert (capacity),
``N`` assignments.
"""

from __future__ import annotations

import math

import torch

from lightning_moe.layers.gates.base import LinearRouterGate, Routing, router_entropy
from lightning_moe.ops.counting import ceil_share, count_per_expert


class ExpertChoiceGate(LinearRouterGate):
    """Each expert takes the ``C`` tokens with the highest scores for it (Zhou et al. 2022, Sec. 3.1).

    ``S = softmax(X W)`` over experts per token (fp32, eq. 1), then ``G, I = TopK(S^T, C)`` per
    expert: expert ``e`` takes tokens ``I[e]`` with weights ``G[e]``, the tokens' scores for ``e``.
    ``C = ceil(T * capacity_factor / E)`` (the paper's ``k = n c / e``), at most ``T``. Every expert is
    exactly full, so no load-balancing loss is needed; a token may be taken by 0 to ``E`` experts.

    NOTE: the experts choose among all ``T`` tokens of the batch at once, so a token's routing
    depends on the other tokens, later ones included. This is not causal: autoregressive decoding
    (one token at a time) cannot reproduce training-time routing, as the paper notes in its
    limitations. ``num_sequences`` is ignored: the choice is over the whole batch, as in the paper.

    Assignments are listed rank-major (every expert's best token, then every expert's second
    best, ...), so a capacity limit applied on top drops each expert's lowest-scored tokens first.

    Stats: ``"router_entropy"``, ``"experts_per_token"`` (mean experts per token, ``C E / T``) and
    ``"unrouted_fraction"`` (fraction of tokens taken by no expert; the residual carries them on).

    Args:
        capacity_factor: average number of experts per token, ``c`` (the paper's EC-CF2 uses 2).
    """

    has_own_capacity = True

    def __init__(self, *, capacity_factor: float = 2.0) -> None:
        super().__init__()
        if (
            not isinstance(capacity_factor, (int, float))
            or isinstance(capacity_factor, bool)
            or not math.isfinite(capacity_factor)
            or capacity_factor <= 0
        ):
            raise ValueError(
                f"{type(self).__name__}: `capacity_factor` must be a finite number > 0, got {capacity_factor!r}. "
                f"Use e.g. 2.0 (each token is taken by two experts on average)."
            )
        self.capacity_factor = float(capacity_factor)

    def set_expert_groups(self, groups: torch.Tensor | None, max_groups: int | None) -> None:
        """Device-limited routing limits the experts of each token; here experts choose tokens, so a
        limit cannot be applied and is refused (lifting it, with ``None``, is accepted)."""
        if groups is not None and max_groups is not None:
            raise ValueError(
                f"{type(self).__name__} cannot apply device-limited routing (`max_groups`={max_groups}): each "
                f"expert chooses its tokens, so a token's experts cannot be limited. Turn the limit off "
                f"(`device_limited_routing`) or use a token-choice gate."
            )
        super().set_expert_groups(None, None)

    def capacity(self, num_tokens: int) -> int:
        """Tokens each expert takes from a batch of ``num_tokens``: ``ceil(T c / E)``, in ``[1, T]``."""
        if num_tokens == 0:
            return 0
        return min(num_tokens, max(1, ceil_share(self.capacity_factor, num_tokens, self.num_experts)))

    def forward(self, x_TD: torch.Tensor, *, num_sequences: int = 1) -> Routing:
        num_tokens = x_TD.shape[0]
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)  # S, eq. 1
        capacity = self.capacity(num_tokens)
        # Each expert (row of S^T) picks its C best tokens.
        weights_EC, token_ids_EC = torch.topk(probs_TE.t(), capacity, dim=-1)
        expert_ids_EC = torch.arange(self.num_experts, device=x_TD.device).unsqueeze(1).expand(-1, capacity)
        routing = Routing(
            token_index_N=token_ids_EC.t().reshape(-1),
            expert_index_N=expert_ids_EC.t().reshape(-1),
            weight_N=weights_EC.t().reshape(-1),
            num_tokens=num_tokens,
        )
        experts_per_token_T = count_per_expert(routing.token_index_N, num_tokens)  # assignments per token
        routing.stats["router_entropy"] = router_entropy(probs_TE.detach())
        routing.stats["experts_per_token"] = experts_per_token_T.float().mean()
        routing.stats["unrouted_fraction"] = (experts_per_token_T == 0).float().mean()
        return routing
