"""Balance across devices: DeepSeek-V2's device-level balance loss, communication balance loss and
device-level token dropping, over the expert-parallel ranks ("devices") as the placement in force
places the experts.

DeepSeek-AI 2024, "DeepSeek-V2", Sec. 2.2.2 (eqs. 14-19) and 2.2.3; DeepSeekMoE (Dai et al. 2024)
introduced the device-level loss. With ``E`` experts, ``K`` per token, ``T`` tokens, ``G`` devices:

- expert load ``f_i = E / (K T) * #{t : t chose i}`` and affinity ``P_i = 1/T * sum_t s_{i,t}``;
- device-level: ``f'_g = (1 / |E_g|) sum_{i in E_g} f_i``, ``P'_g = sum_{i in E_g} P_i``,
  ``L_DevBal = sum_g f'_g P'_g`` (eqs. 14-16);
- communication: ``f''_g = G / (M T) * #{t : t is sent to device g}`` (``M`` the devices a token may
  reach), ``P''_g = sum_{i in E_g} P_i``, ``L_CommBal = sum_g f''_g P''_g`` (eqs. 17-19);
- token dropping: each device takes at most ``capacity_factor`` times its even share of the
  assignments; those with the lowest affinity go first (Sec. 2.2.3).

An expert with replicas is on several devices: ``share_GE[g, i]``, the share of this rank's
assignments to ``i`` that device ``g`` receives (the routing fractions), replaces "``i`` in ``E_g``"
(with ``|E_g| = E / G``), and "sent to ``g``" becomes its probability when each assignment picks its
replica by the shares. Without replicas both are exactly DeepSeek-V2's. Each loss is 1.0 under
perfect balance. The counts ``f`` carry no gradient, the affinities ``P`` do.

Shape legend: ``T`` tokens, ``K`` experts per token, ``E`` experts, ``G`` devices, ``N`` assignments.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from lightning_moe.layers.gates.base import AuxLoss, Routing
from lightning_moe.layers.replicas import allowed_replicas, choose_replica_ranks, restrict_to_allowed
from lightning_moe.ops.counting import ceil_share, count_per_expert, positions_in_groups
from lightning_moe.validation import check_non_negative


@dataclass
class ExpertDevices:
    """The devices (EP ranks) of the experts under the placement in force, seen from this source rank.

    Attributes:
        share_GE: ``[G, E]``, the share of this rank's assignments to expert ``e`` that device ``g``
            receives (1 on the only holder of an expert without replicas).
        cumulative_EG: ``[E, G]``, the running sum of ``share_GE`` over devices (the replica choice).
        holders_GE: ``[G, E]`` booleans, which devices hold which expert (a holder may have a zero
            share; device-limited routing can still send a token there).
    """

    share_GE: torch.Tensor
    cumulative_EG: torch.Tensor
    holders_GE: torch.Tensor

    @property
    def num_devices(self) -> int:
        return self.share_GE.shape[0]


class DeviceBalance:
    """The device-level options of a token-choice gate (the ``topk`` and ``sigmoid`` gates hold one).

    Args:
        owner: the gate's class name, for messages.
        device_balance_coef: coefficient of the device-level balance loss (``alpha_2``; 0.05 in DeepSeek-V2).
        communication_balance_coef: coefficient of the communication balance loss (``alpha_3``; 0.02).
        device_capacity_factor: each device takes at most this factor times its even share of a
            rank's assignments, dropping those of lowest affinity (1.0 in DeepSeek-V2); ``None``: no drop.
    """

    def __init__(
        self,
        owner: str,
        *,
        device_balance_coef: float = 0.0,
        communication_balance_coef: float = 0.0,
        device_capacity_factor: float | None = None,
    ) -> None:
        check_non_negative(owner, "device_balance_coef", device_balance_coef)
        check_non_negative(owner, "communication_balance_coef", communication_balance_coef)
        if device_capacity_factor is not None and not (
            isinstance(device_capacity_factor, (int, float)) and math.isfinite(device_capacity_factor)
            and device_capacity_factor > 0
        ):
            raise ValueError(
                f"{owner}: `device_capacity_factor` must be None or a finite number > 0, got "
                f"{device_capacity_factor!r}. Use e.g. 1.0 (DeepSeek-V2), or None for no device-level drop."
            )
        self.owner = owner
        self.device_balance_coef = float(device_balance_coef)
        self.communication_balance_coef = float(communication_balance_coef)
        self.device_capacity_factor = None if device_capacity_factor is None else float(device_capacity_factor)
        #: Set by MoEStrategy from the placement in force; ``None`` without expert parallelism.
        self.devices: ExpertDevices | None = None
        self._warned = False

    @property
    def active(self) -> bool:
        """Whether any device-level option is on."""
        return bool(self.device_balance_coef or self.communication_balance_coef or self.device_capacity_factor)

    def describe(self) -> str:
        options = {
            "device_balance_coef": self.device_balance_coef,
            "communication_balance_coef": self.communication_balance_coef,
            "device_capacity_factor": self.device_capacity_factor,
        }
        return ", ".join(f"{name}={value}" for name, value in options.items() if value)

    def apply(
        self, routing: Routing, affinity_TE: torch.Tensor, topk_ids_TK: torch.Tensor, max_devices: int | None
    ) -> Routing:
        """Add the device-level losses to ``routing`` and drop over device capacity; return the routing.

        Args:
            routing: the gate's assignments (token-choice, k-major).
            affinity_TE: the affinities the losses weigh (softmax probabilities, or normalised sigmoid
                scores), with gradient.
            topk_ids_TK: the experts each token chose.
            max_devices: ``M``, the devices a token may reach (device-limited routing), or ``None``.
        """
        if not self.active:
            return routing
        if self.devices is None or self.devices.num_devices == 1:
            if not self._warned:
                warnings.warn(
                    f"{self.owner}: {self.describe()} balances load across expert-parallel devices, but this layer "
                    f"runs without expert parallelism: there is nothing to balance, so these options do nothing. "
                    f"Use MoEStrategy(expert_parallel_size > 1), or set them to 0 / None.",
                    stacklevel=3,
                )
                self._warned = True
            return routing
        num_tokens, top_k = topk_ids_TK.shape
        num_experts = affinity_TE.shape[1]
        share_GE = self.devices.share_GE.to(affinity_TE)
        num_devices = share_GE.shape[0]
        counts_E = count_per_expert(routing.expert_index_N, num_experts).to(affinity_TE.dtype)
        load_E = counts_E * num_experts / (top_k * max(num_tokens, 1))  # f_i
        affinity_E = affinity_TE.mean(dim=0)  # P_i
        device_affinity_G = share_GE @ affinity_E  # P'_g = P''_g
        if self.device_balance_coef:
            device_load_G = (num_devices / num_experts) * (share_GE @ load_E)  # f'_g
            loss = (device_load_G * device_affinity_G).sum()
            routing.aux_losses["device_balance_loss"] = AuxLoss(loss, self.device_balance_coef)
        if self.communication_balance_coef:
            reach = min(top_k, num_devices) if max_devices is None else min(max_devices, num_devices)
            share_TKG = share_GE.t()[topk_ids_TK]
            if routing.allowed_devices_TG is not None:  # replicas only on the token's kept devices
                # As the replica choice does: their shares renormalised, or even when they have none.
                allowed_TKG = routing.allowed_devices_TG.unsqueeze(1) & self.devices.holders_GE.t()[topk_ids_TK]
                share_TKG = restrict_to_allowed(share_TKG, allowed_TKG)
            sent_TG = 1.0 - (1.0 - share_TKG).prod(dim=1)  # P(token t reaches device g)
            sent_load_G = num_devices / (reach * max(num_tokens, 1)) * sent_TG.sum(dim=0)  # f''_g
            loss = (sent_load_G.detach() * device_affinity_G).sum()
            routing.aux_losses["communication_balance_loss"] = AuxLoss(loss, self.communication_balance_coef)
        if self.device_capacity_factor is not None:
            routing = self._drop_over_capacity(routing, affinity_TE)
        return routing

    def _drop_over_capacity(self, routing: Routing, affinity_TE: torch.Tensor) -> Routing:
        """Each device keeps at most ``ceil(factor * N / G)`` of this rank's assignments, highest
        affinity first; the kept ones carry their device, so the dispatcher sends them there."""
        assert self.devices is not None
        allowed_NG = allowed_replicas(
            routing.allowed_devices_TG, routing.token_index_N, routing.expert_index_N, self.devices.holders_GE
        )
        device_N = choose_replica_ranks(routing.expert_index_N, self.devices.cumulative_EG, allowed_NG)
        num_assignments, num_devices = device_N.numel(), self.devices.num_devices
        budget = max(1, ceil_share(self.device_capacity_factor, num_assignments, num_devices))
        affinity_N = affinity_TE.detach()[routing.token_index_N, routing.expert_index_N]
        by_affinity_N = torch.argsort(-affinity_N, stable=True)  # highest affinity first
        keep_N = positions_in_groups(device_N, by_affinity_N, num_devices) < budget
        return routing.subset(keep_N, device_index_N=device_N)

class DeviceBalanceOptions:
    """The device-level options of a gate as attributes named like its constructor arguments (what a
    checkpoint's hyper-parameters read back); the gate keeps them in ``self.device_balance``."""

    device_balance: DeviceBalance

    @property
    def device_balance_coef(self) -> float:
        return self.device_balance.device_balance_coef

    @property
    def communication_balance_coef(self) -> float:
        return self.device_balance.communication_balance_coef

    @property
    def device_capacity_factor(self) -> float | None:
        return self.device_balance.device_capacity_factor
