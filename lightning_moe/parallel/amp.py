"""fp16 loss scaling under expert parallelism: every rank agrees on skipping a step.

``torch.amp.GradScaler`` skips ``optimizer.step()`` when the unscaled gradients hold an inf or NaN,
and halves its scale. Under DDP the check is the same on every rank because every gradient was
all-reduced. Expert gradients are not: each EP rank holds other experts, so an overflow in one
rank's expert gradient would make that rank alone skip the step. The dense replicas would then
differ, the scales would part, and a collective that only the stepping ranks run (the sigmoid gate's
bias update) would hang. :class:`WorldSyncedGradScaler` reduces the inf flag over the world after
unscaling, so all ranks skip together and keep one scale. A fused optimizer (``AdamW(fused=True)``)
is not unscaled first: the scaler checks its gradients itself and hands the flag to its ``step``,
which then changes nothing; that check is reduced over the world too.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.amp import GradScaler


class WorldSyncedGradScaler(GradScaler):
    """A ``GradScaler`` whose inf/NaN check is the maximum over ``process_group`` (the world by default).

    Args:
        device: the device type of the gradients (``"cuda"``, ``"cpu"``).
        process_group: the processes that must agree (``None``: the default group).
        **kwargs: ``GradScaler``'s own arguments (``init_scale``, ``growth_interval``...).
    """

    def __init__(self, device: str = "cuda", *, process_group: dist.ProcessGroup | None = None, **kwargs) -> None:
        super().__init__(device, **kwargs)
        self.process_group = process_group

    @classmethod
    def replacing(cls, scaler: GradScaler, *, process_group: dist.ProcessGroup | None = None) -> WorldSyncedGradScaler:
        """A synced scaler with ``scaler``'s device, settings and current scale."""
        synced = cls(scaler._device, process_group=process_group, enabled=scaler.is_enabled())
        if scaler.is_enabled():
            synced.load_state_dict(scaler.state_dict())
        return synced

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        super().unscale_(optimizer)
        self._agree_on_inf(optimizer)

    def _check_inf_per_device(self, optimizer: torch.optim.Optimizer) -> dict:
        # The check `step` runs for an optimizer that unscales in its own (fused) kernel.
        found_inf_per_device = super()._check_inf_per_device(optimizer)
        self._agree_on_inf(optimizer)
        return found_inf_per_device

    def _agree_on_inf(self, optimizer: torch.optim.Optimizer) -> None:
        if not self.is_enabled() or not (dist.is_available() and dist.is_initialized()):
            return
        found_inf_per_device = self._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        if not found_inf_per_device:
            return
        tensors = list(found_inf_per_device.values())
        found_inf = torch.stack([t.to(tensors[0].device) for t in tensors]).amax()
        dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=self.process_group)
        # `step` and `update` read these same tensors: every rank now skips, or steps, together.
        for tensor in tensors:
            tensor.copy_(found_inf.to(tensor.device))
