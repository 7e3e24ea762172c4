"""Lightning callbacks that watch and act on expert load."""

from lightning_moe.callbacks.expert_load import ExpertLoadMonitor
from lightning_moe.callbacks.load_metrics import ExpertLoadMetric, LoadWindow
from lightning_moe.callbacks.migration import ExpertMigration

__all__ = ["ExpertLoadMetric", "ExpertLoadMonitor", "ExpertMigration", "LoadWindow"]
