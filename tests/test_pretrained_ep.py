"""Fine-tuning a transformers checkpoint under expert parallelism: ``MoETransformer(pretrained=DIR)`` is
built on the meta device, MoEStrategy shards it there, and each rank reads only the experts its
slots hold (real gloo processes, world 2 at EP 2, DeepSeek-V3 with a replica slot per rank).

Run as a script, this file is one rank (started by tests/dist_workers/launch.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hf_tiny import VOCAB, hf_logits, save_tiny, token_ids  # noqa: E402


def worker(source: Path, out: Path) -> None:
    import lightning as L
    import torch.distributed as dist
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_moe import MoEStrategy, MoETransformer
    from lightning_moe.layers.aux_loss import moe_layers

    torch.set_num_threads(1)
    model = MoETransformer(pretrained=str(source), learning_rate=1e-3, warmup_steps=1)
    assert all(p.is_meta for p in model.parameters())  # nothing allocated yet
    ids = token_ids(seed=3)
    seen = {}

    class Check(Callback):
        def on_train_start(self, trainer, pl_module):
            rank = dist.get_rank()
            layers = moe_layers(pl_module)
            seen["local_experts"] = [layer.dispatcher.placement.experts_on_rank(rank) for layer in layers]
            seen["rows"] = [int(layer.experts.w_in.shape[0]) for layer in layers]
            report = trainer.strategy.pretrained_load_report
            seen["bytes_read"], seen["checkpoint_bytes"] = report.bytes_read, report.checkpoint_bytes
            pl_module.eval()
            with torch.no_grad():
                seen["logits"] = pl_module(ids).tolist()  # a collective: both ranks run it
            pl_module.train()

    data = TensorDataset(torch.randint(0, VOCAB, (8, 8)), torch.randint(0, VOCAB, (8, 8)))
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=MoEStrategy(expert_parallel_size=2, spare_expert_slots=1),
        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Check()],
    )
    trainer.fit(model, DataLoader(data, batch_size=2))
    seen["loss_finite"] = bool(torch.isfinite(trainer.callback_metrics["train_loss"]))
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(seen))


def test_each_rank_reads_only_its_experts_and_computes_transformers_logits(tmp_path):
    from dist_workers.launch import launch

    source, reference = save_tiny("deepseek_v3", tmp_path / "source")
    expected = hf_logits(reference, token_ids(seed=3))
    launch(Path(__file__), [str(source), str(tmp_path)], world_size=2, timeout=180, log_dir=tmp_path / "logs")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, seen in enumerate(ranks):
        # 8 routed experts over 2 ranks, 4 + 1 spare slot each (the default table's replica).
        assert seen["rows"] == [5] and len(seen["local_experts"][0]) == 5
        torch.testing.assert_close(torch.tensor(seen["logits"]), expected, atol=1e-5, rtol=1e-5)
        assert seen["loss_finite"]
        # Dense weights (read by every rank) plus 5 of the 8 experts of the one MoE layer.
        assert seen["bytes_read"] < seen["checkpoint_bytes"]
    assert ranks[0]["local_experts"] != ranks[1]["local_experts"]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from dist_workers.launch import end_rank

    worker(Path(sys.argv[1]), Path(sys.argv[2]))
    end_rank()
