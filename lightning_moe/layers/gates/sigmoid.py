"""DeepSeek-V3 routing: sigmoid scores, group-limited top-k, and aux-loss-free bias balancing.

DeepSeek-AI 2024, "DeepSeek-V3 Technical Report", Sec. 2.1.1-2.1.2; the bias update follows Wang et
al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts", Alg. 1.

Shape legend: ``T`` tokens, ``D`` model width, ``E`` experts, ``K`` experts per token, ``G`` expert
groups, ``P`` experts per group (``E = G * P``), ``S`` sequences, ``L`` tokens per sequence
(``T = S * L``), ``N`` assignments.
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
    routing_from_topk,
)
from lightning_moe.layers.gates.device_balance import DeviceBalance, DeviceBalanceOptions
from lightning_moe.layers.gates.losses import check_load_balance_scope, switch_load_balance_loss

#: Added to the sum of the kept scores before renormalising, as DeepSeek-V3's released modeling
#: code does, so that an all-zero row cannot divide by zero.
_NORMALIZE_EPSILON = 1e-20


def sequence_balance_loss(
    scores_TE: torch.Tensor, topk_ids_TK: torch.Tensor, num_experts: int, num_sequences: int
) -> torch.Tensor:
    """Complementary sequence-wise balance loss of DeepSeek-V3 (eqs. 17-20), averaged over sequences.

    Per sequence of ``L`` tokens: ``f_i = E / (K * L) * #{t : i in TopK_t}``,
    ``P_i = 1/L * sum_t s_ti / sum_j s_tj`` and ``L_bal = sum_i f_i * P_i``. It is 1.0 when every
    sequence spreads its tokens evenly; only ``P_i`` carries gradient.

    Args:
        scores_TE: unbiased sigmoid scores ``[T, E]`` (fp32).
        topk_ids_TK: the experts each token selected, ``[T, K]``.
        num_experts: ``E``.
        num_sequences: ``S``; ``T`` must be a multiple of it (consecutive equal-length sequences).
    """
    num_tokens, top_k = topk_ids_TK.shape
    if num_tokens == 0:  # no sequence: nothing to balance (and no graph to divide)
        return scores_TE.sum() * 0.0
    if num_tokens % num_sequences:
        raise ValueError(
            f"SigmoidGate: `num_sequences` ({num_sequences}) must divide the number of tokens ({num_tokens}) "
            f"for the sequence-wise balance loss. Pass inputs shaped [batch, seq_len, d_model]."
        )
    tokens_per_sequence = num_tokens // num_sequences
    ids_SN = topk_ids_TK.reshape(num_sequences, tokens_per_sequence * top_k)
    counts_SE = torch.zeros(num_sequences, num_experts, device=scores_TE.device, dtype=scores_TE.dtype)
    counts_SE.scatter_add_(1, ids_SN, torch.ones_like(ids_SN, dtype=scores_TE.dtype))
    fraction_SE = counts_SE * (num_experts / (top_k * tokens_per_sequence))  # eq. 18
    normalized_TE = scores_TE / (scores_TE.sum(dim=-1, keepdim=True) + _NORMALIZE_EPSILON)  # eq. 19
    mean_score_SE = normalized_TE.reshape(num_sequences, tokens_per_sequence, num_experts).mean(dim=1)  # eq. 20
    return (fraction_SE * mean_score_SE).sum(dim=-1).mean()  # eq. 17, without its alpha


class SigmoidGate(DeviceBalanceOptions, LinearRouterGate):
    """DeepSeek-V3 gate: sigmoid affinities, a selection-only bias, and group-limited routing.

    1. Scores ``s = sigmoid(x W^T)`` in fp32 (DeepSeek-V3 eq. 15).
    2. A per-expert bias ``b`` (buffer ``expert_bias``, saved in checkpoints) is added to the scores
       for *selection only* (eq. 16): ``b`` steers load without entering the output.
    3. Group-limited routing (Sec. 2.1.2, node-limited routing): the experts are split into
       ``n_group`` consecutive groups, each group scored by the sum of its two highest biased
       scores; the ``topk_group`` best groups are kept and the biased scores of the others are set
       to ``dropped_group_fill`` before the final top-``k``.
    4. The weights are the *unbiased* scores of the chosen experts, divided by their sum if
       ``normalize`` (eq. 13), times ``routed_scaling_factor``.

    After each optimizer step :meth:`update_bias` moves ``b_e`` by ``bias_update_rate`` towards
    balance: ``b_e += u * sign(mean_load - load_e)`` (Wang et al. 2024, Alg. 1).

    Args:
        top_k: experts per token (``K_r``; 8 in DeepSeek-V3).
        n_group: number of expert groups (8 in DeepSeek-V3, one per node); 1 turns grouping off.
        topk_group: groups each token may use (4 in DeepSeek-V3).
        routed_scaling_factor: factor on the routed weights (2.5 in DeepSeek-V3).
        normalize: divide the kept scores by their sum.
        bias_update_rate: bias update speed ``u`` (1e-3 in DeepSeek-V3); 0 freezes the bias.
        sequence_balance_coef: coefficient ``alpha`` of the complementary sequence-wise balance loss
            (DeepSeek-V3 eq. 17; 1e-4 there); 0 turns it off.
        load_balance_coef: coefficient of a Switch-style load-balancing loss over the normalised
            scores (Fedus et al. 2021, eq. 4); 0 turns it off.
        load_balance_scope: where the load-balancing loss counts each expert's share of the
            assignments: ``"local"``, this process's micro-batch (Switch); ``"global"``, the
            global batch: every data-parallel rank's micro-batch, and those accumulated since the
            optimizer step (Qiu et al. 2025; one all-reduce of ``E`` counts per layer and forward,
            under :class:`~lightning_moe.MoEStrategy`).
        dropped_group_fill: value given to the biased scores of experts in dropped groups.
            ``float("-inf")`` (the default, as the transformers >= 5 port): an expert outside the
            kept groups is never chosen, so group-limited routing bounds the experts a token reaches
            and a uniform shift of the biases does not change routing. ``0.0`` is what DeepSeek-V3's
            released modeling code does; with it, an expert of a dropped group is chosen whenever
            fewer than ``top_k`` experts of the kept groups have a positive biased score. Keep 0.0
            only to reproduce a checkpoint whose reference code uses it (the transformers importer
            measures which one the installed version uses).
        device_balance_coef: coefficient of DeepSeek-V2's device-level balance loss over the
            expert-parallel ranks (:mod:`~lightning_moe.layers.gates.device_balance`).
        communication_balance_coef: coefficient of DeepSeek-V2's communication balance loss.
        device_capacity_factor: each EP rank takes at most this factor times its even share of a
            rank's assignments, dropping those of lowest score (DeepSeek-V2); ``None``: no drop.

    NOTE: ``expert_bias`` stays fp32 whatever dtype the module is cast to (``bf16-true``,
    ``.half()``): in bf16 a bias of magnitude 0.5 has a spacing of 2**-8, so updates of 1e-3 would
    round away and balancing would stop. Megatron-Core and transformers keep it in fp32 too.
    """

    def __init__(
        self,
        *,
        top_k: int = 8,
        n_group: int = 1,
        topk_group: int = 1,
        routed_scaling_factor: float = 1.0,
        normalize: bool = True,
        bias_update_rate: float = 1e-3,
        sequence_balance_coef: float = 0.0,
        load_balance_coef: float = 0.0,
        load_balance_scope: str = "local",
        dropped_group_fill: float = float("-inf"),
        device_balance_coef: float = 0.0,
        communication_balance_coef: float = 0.0,
        device_capacity_factor: float | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_positive_int(owner, "top_k", top_k)
        check_positive_int(owner, "n_group", n_group)
        check_positive_int(owner, "topk_group", topk_group)
        check_non_negative(owner, "bias_update_rate", bias_update_rate)
        check_non_negative(owner, "sequence_balance_coef", sequence_balance_coef)
        check_non_negative(owner, "load_balance_coef", load_balance_coef)
        check_load_balance_scope(owner, load_balance_scope)
        if not (isinstance(routed_scaling_factor, (int, float)) and math.isfinite(routed_scaling_factor)
                and routed_scaling_factor > 0):
            raise ValueError(
                f"{owner}: `routed_scaling_factor` must be a finite number > 0, got {routed_scaling_factor!r}. "
                f"Use 1.0 for no scaling."
            )
        if topk_group > n_group:
            raise ValueError(
                f"{owner}: `topk_group` ({topk_group}) must not exceed `n_group` ({n_group}). "
                f"Lower `topk_group` or raise `n_group`."
            )
        if not isinstance(dropped_group_fill, (int, float)) or math.isnan(dropped_group_fill):
            raise ValueError(
                f"{owner}: `dropped_group_fill` must be a number, got {dropped_group_fill!r}. "
                f"Use 0.0 (DeepSeek-V3 release) or float('-inf') (transformers)."
            )
        self.top_k = top_k
        self.n_group = n_group
        self.topk_group = topk_group
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.normalize = normalize
        self.bias_update_rate = float(bias_update_rate)
        self.sequence_balance_coef = float(sequence_balance_coef)
        self.load_balance_coef = float(load_balance_coef)
        self.load_balance_scope = load_balance_scope
        self.dropped_group_fill = float(dropped_group_fill)
        self.device_balance = DeviceBalance(
            owner,
            device_balance_coef=device_balance_coef,
            communication_balance_coef=communication_balance_coef,
            device_capacity_factor=device_capacity_factor,
        )

    @property
    def needs_bias_update(self) -> bool:  # type: ignore[override]
        # A property, so that setting `bias_update_rate` later (e.g. on a converted checkpoint)
        # switches the updates on or off.
        return self.bias_update_rate > 0

    def _build(self, d_model: int, num_experts: int) -> None:
        owner = type(self).__name__
        if num_experts % self.n_group:
            raise ValueError(
                f"{owner}: `n_group` ({self.n_group}) must divide `num_experts` ({num_experts}). "
                f"Pick `n_group` among the divisors of {num_experts}."
            )
        experts_per_group = num_experts // self.n_group
        if self.n_group > 1 and experts_per_group < 2:
            raise ValueError(
                f"{owner}: `n_group` ({self.n_group}) leaves {experts_per_group} expert per group, but a group "
                f"is scored by its top-2 experts. Use `n_group` <= {num_experts // 2}, or `n_group=1`."
            )
        check_at_most_experts(owner, "top_k", self.top_k, num_experts)
        reachable = self.topk_group * experts_per_group
        if self.top_k > reachable:
            raise ValueError(
                f"{owner}: `top_k` ({self.top_k}) exceeds the {reachable} experts in `topk_group` "
                f"({self.topk_group}) groups of {experts_per_group}. Raise `topk_group` or lower `top_k`."
            )
        super()._build(d_model, num_experts)
        # NOTE: persistent: the bias is trained state (it is what balances the load), so it must be
        # restored with the weights from a checkpoint.
        self.register_buffer("expert_bias", torch.zeros(num_experts), persistent=True)

    def reset_parameters(self, init_std: float) -> None:
        super().reset_parameters(init_std)
        self.expert_bias.zero_()

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # Module casts (`.to(dtype)`, `.half()`, Lightning's `bf16-true`) move the bias to the new
        # device but keep it fp32 (see the class NOTE); it is cast from the fp32 original, so that a
        # cast to bf16 and back cannot round it.
        bias_fp32 = self._buffers.get("expert_bias")
        result = super()._apply(fn, recurse)
        moved = self._buffers.get("expert_bias")
        if bias_fp32 is not None and moved is not None and moved.dtype != torch.float32:
            self._buffers["expert_bias"] = bias_fp32.to(device=moved.device, dtype=torch.float32)
        return result

    def check_group_limit(self, holders_GE: torch.Tensor, max_groups: int) -> None:
        """Device-limited routing next to the group limit only where every rank holds whole expert
        groups of at least ``top_k`` experts: then a kept rank that holds any expert of a kept group
        holds the group, and a token keeps ``top_k`` experts. Where groups straddle the ranks the two
        masks can leave fewer, and top-k would pick experts of dropped groups on dropped ranks."""
        super().check_group_limit(holders_GE, max_groups)
        if self.n_group > 1:
            group_size = self.num_experts // self.n_group
            held_RGP = holders_GE.reshape(holders_GE.shape[0], self.n_group, group_size)
            whole_groups = bool((held_RGP.all(dim=-1) | ~held_RGP.any(dim=-1)).all())
            if not whole_groups or group_size < self.top_k:
                raise ValueError(
                    f"SigmoidGate: group-limited routing (n_group={self.n_group}, groups of {group_size} experts) "
                    f"and device-limited routing (MoEStrategy(device_limited_routing={max_groups})) can together "
                    f"leave a token fewer than top_k={self.top_k} experts: some rank holds part of a group. Place "
                    f"whole groups on each rank (groups of at least top_k experts), or use one of the two limits."
                )

    def select(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """The ``top_k`` experts of each token from its scores: bias, group limit, top-k. ``[T, K]``."""
        return self._select_and_keep_devices(scores_TE)[0]

    def _select_and_keep_devices(self, scores_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`select`, and the devices each token may reach (device-limited routing) or ``None``."""
        num_tokens = scores_TE.shape[0]
        biased_TE = scores_TE.detach() + self.expert_bias.float()  # selection only (eq. 16)
        if self.n_group > 1:
            biased_TGP = biased_TE.view(num_tokens, self.n_group, -1)
            group_score_TG = biased_TGP.topk(2, dim=-1).values.sum(dim=-1)
            kept_group_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
            kept_group_TG.scatter_(1, group_score_TG.topk(self.topk_group, dim=-1).indices, True)
            biased_TE = biased_TGP.masked_fill(~kept_group_TG.unsqueeze(-1), self.dropped_group_fill)
            biased_TE = biased_TE.view(num_tokens, -1)
        # Device-limited routing (DeepSeek-V2 Sec. 2.1.3): a no-op unless MoEStrategy set groups.
        biased_TE, kept_devices_TG = self.limit_and_keep_groups(biased_TE)
        # Sorted, so that first choices come first in the priority order of `routing_from_topk`.
        return biased_TE.topk(self.top_k, dim=-1).indices, kept_devices_TG  # (T, K)

    def forward(self, x_TD: torch.Tensor, *, num_sequences: int = 1) -> Routing:
        scores_TE = torch.sigmoid(self.logits(x_TD))  # (T, E) fp32
        topk_ids_TK, kept_devices_TG = self._select_and_keep_devices(scores_TE)
        weights_TK = scores_TE.gather(1, topk_ids_TK)  # unbiased scores
        if self.normalize:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + _NORMALIZE_EPSILON)
        weights_TK = weights_TK * self.routed_scaling_factor
        routing = routing_from_topk(topk_ids_TK, weights_TK)
        routing.allowed_devices_TG = kept_devices_TG

        if self.sequence_balance_coef > 0:
            loss = sequence_balance_loss(scores_TE, topk_ids_TK, self.num_experts, num_sequences)
            routing.aux_losses["sequence_balance_loss"] = AuxLoss(loss, self.sequence_balance_coef)
        # The epsilon as for the weights: a token whose scores all underflow to 0 (logits below about -104)
        # gives a row of zeros, not NaN.
        normalized_TE = scores_TE / (scores_TE.sum(dim=-1, keepdim=True) + _NORMALIZE_EPSILON)
        if self.load_balance_coef > 0:
            loss = switch_load_balance_loss(
                normalized_TE, routing.expert_index_N, self.num_experts, self.counts_reducer(self.load_balance_scope)
            )
            routing.aux_losses["load_balance_loss"] = AuxLoss(loss, self.load_balance_coef)
        routing.stats["router_entropy"] = router_entropy(normalized_TE.detach())
        routing.stats["expert_bias_abs_mean"] = self.expert_bias.detach().abs().mean()
        # Device-level losses weigh the normalised scores, as the sequence-wise loss does (eq. 19).
        return self.device_balance.apply(routing, normalized_TE, topk_ids_TK, self.expert_group_limit)

    @torch.no_grad()
    def update_bias(self, tokens_per_expert_E: torch.Tensor) -> None:
        """``b_e += bias_update_rate * sign(mean_load - load_e)`` (Wang et al. 2024, Alg. 1).

        Args:
            tokens_per_expert_E: assignments each expert received since the last update, summed over
                every process that shares this gate.
        """
        if self.bias_update_rate == 0:
            return
        load_E = tokens_per_expert_E.to(device=self.expert_bias.device, dtype=torch.float32)
        if load_E.shape != self.expert_bias.shape:
            raise ValueError(
                f"SigmoidGate.update_bias: `tokens_per_expert_E` has shape {tuple(load_E.shape)}, expected "
                f"({self.num_experts},). Pass the per-expert load of this layer."
            )
        step_E = self.bias_update_rate * torch.sign(load_E.mean() - load_E)
        self.expert_bias.copy_(self.expert_bias.float() + step_E)

    def extra_repr(self) -> str:
        return (
            f"top_k={self.top_k}, n_group={self.n_group}, topk_group={self.topk_group}, "
            f"routed_scaling_factor={self.routed_scaling_factor}, normalize={self.normalize}, "
            f"bias_update_rate={self.bias_update_rate}"
        )
