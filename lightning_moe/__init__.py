"""lightning-moe: Mixture-of-Experts training for PyTorch Lightning."""

from lightning_moe.callbacks import ExpertLoadMonitor, ExpertMigration
from lightning_moe.checkpoint import load_from_checkpoint
from lightning_moe.layers import (
    Gate,
    MoELayer,
    collect_aux_loss,
    collect_aux_losses,
    is_expert_param,
    mark_expert_param,
)
from lightning_moe.data import ByteCorpusDataModule, TextFileDataModule
from lightning_moe.model import MoETransformer
from lightning_moe.planning import PlacementPlanner, Topology
from lightning_moe.resumable_loader import ResumableDataLoader
from lightning_moe.tokenized import TokenizedDataModule
from lightning_moe.strategy import MoEStrategy, register_moe_strategy

# `strategy="moe"` resolves once the package is imported.
register_moe_strategy()

__version__ = "0.1.0"

__all__ = [
    "ByteCorpusDataModule",
    "MoEStrategy",
    "MoETransformer",
    "PlacementPlanner",
    "ResumableDataLoader",
    "TextFileDataModule",
    "TokenizedDataModule",
    "Topology",
    "ExpertLoadMonitor",
    "ExpertMigration",
    "Gate",
    "MoELayer",
    "collect_aux_loss",
    "collect_aux_losses",
    "is_expert_param",
    "load_from_checkpoint",
    "mark_expert_param",
]
