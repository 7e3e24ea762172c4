"""One rank of a DDP fit on TokenizedDataModule (gloo, CPU): writes the targets of every batch it trained on.

Usage: ``tokenized_worker.py SCENARIOS.json OUT_DIR`` under ``launch`` (which sets RANK, WORLD_SIZE, ...).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L

from lightning_moe import MoETransformer, TokenizedDataModule


class RecordTargets(L.Callback):
    def __init__(self) -> None:
        self.targets: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.targets.extend(batch[1].tolist())


def main() -> None:
    scenarios = json.loads(Path(sys.argv[1]).read_text())
    out_dir = Path(sys.argv[2])
    world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    for scenario in scenarios:
        data = TokenizedDataModule(**scenario["data"])
        model = MoETransformer(vocab_size=data.vocab_size, **scenario["model"])
        recorder = RecordTargets()
        trainer = L.Trainer(
            accelerator="cpu",
            devices=world_size,
            strategy="ddp",
            max_epochs=1,
            callbacks=[recorder],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(model, data)
        result = {"targets": recorder.targets, "global_step": trainer.global_step}
        (out_dir / f"{scenario['name']}-rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    from launch import end_rank

    main()
    end_rank()
