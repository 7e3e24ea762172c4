"""Post-local SGD model averaging (Lin et al. 2020) that respects expert shards.

Lightning's ``DDPStrategy(ddp_comm_state=PostLocalSGDState(...), model_averaging_period=k)``
averages every parameter over the world every ``k`` steps. Under expert parallelism that would mix
different experts (EP rank 0's slot 0 is not EP rank 1's slot 0): dense parameters are averaged
over the world, and expert parameters over their expert-data-parallel group, the ranks that hold
the same experts.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
from torch.distributed.algorithms.model_averaging.utils import average_parameters

from lightning_moe.layers.experts import is_expert_param


class ExpertAwareModelAverager(PeriodicModelAverager):
    """Every ``period`` steps after ``warmup_steps``: dense parameters averaged over the world, expert
    parameters over ``edp_group``.

    Args:
        period: steps between averages.
        warmup_steps: steps before the first average (``PostLocalSGDState.start_localSGD_iter``).
        edp_group: this rank's expert-data-parallel group.
    """

    def __init__(self, period: int, warmup_steps: int, edp_group: dist.ProcessGroup | None) -> None:
        super().__init__(period=period, warmup_steps=warmup_steps)
        self.edp_group = edp_group

    def average_parameters(self, params: Iterable[torch.nn.Parameter]) -> None:  # type: ignore[override]
        params = list(params)
        if self.step >= self.warmup_steps and (self.step - self.warmup_steps) % self.period == 0:
            dense = [p for p in params if not is_expert_param(p)]
            experts = [p for p in params if is_expert_param(p)]
            if dense:
                average_parameters(iter(dense), self.process_group)
            if experts:
                average_parameters(iter(experts), self.edp_group)
        self.step += 1
