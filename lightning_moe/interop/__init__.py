"""Import and export of MoE checkpoints from other libraries (transformers)."""

from lightning_moe.interop.hf import HF_MOE_BLOCKS, from_hf_moe_block, hf_moe_family, to_hf_moe_block

__all__ = ["HF_MOE_BLOCKS", "from_hf_moe_block", "hf_moe_family", "to_hf_moe_block"]
