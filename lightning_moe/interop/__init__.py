"""Import and export of MoE checkpoints from other libraries (transformers).

Whole models: ``MoETransformer.from_pretrained(path)`` / ``model.save_pretrained(path)``
(:mod:`~lightning_moe.interop.hf_model`, :mod:`~lightning_moe.interop.hf_export`), the
expert-selective loader :func:`load_pretrained_weights`; single MoE blocks: :func:`from_hf_moe_block`.
"""

from lightning_moe.interop.hf import HF_MOE_BLOCKS, from_hf_moe_block, hf_moe_family, to_hf_moe_block
from lightning_moe.interop.hf_config import HF_ARCHITECTURES
from lightning_moe.interop.hf_export import export_checkpoint, save_pretrained
from lightning_moe.interop.hf_load import LoadReport, load_pretrained_weights
from lightning_moe.interop.hf_model import from_pretrained

__all__ = [
    "HF_ARCHITECTURES",
    "HF_MOE_BLOCKS",
    "LoadReport",
    "export_checkpoint",
    "from_hf_moe_block",
    "from_pretrained",
    "hf_moe_family",
    "load_pretrained_weights",
    "save_pretrained",
    "to_hf_moe_block",
]
