"""Fine-tuning data: text and JSONL files tokenised with a checkpoint's tokenizer, packed, streamed."""

from lightning_moe.tokenized.datamodule import TokenizedDataModule

__all__ = ["TokenizedDataModule"]
