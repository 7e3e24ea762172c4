"""ExpertLoadMonitor under MoEStrategy, world 4 = 2 expert-data-parallel replicas x EP 2: the logged
load and traffic are the sums of what every rank saw, identical on every rank, and written once.

The test starts 4 real gloo processes that run this file as a script (see ``worker``); each rank
writes its own per-step counts (the reference) and the monitor's history to JSON.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_moe.layers import moe_layers

EVERY_N_STEPS, MAX_STEPS, WORLD, EP = 2, 4, 4, 2


class RecordLocal(L.Callback):
    """Reference callback: this rank's own counts per optimizer step, before any collective."""

    def __init__(self):
        self.per_step: dict[str, dict] = {}
        self.ep_rank = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        layers = moe_layers(pl_module)
        step = str(batch_idx // trainer.accumulate_grad_batches + 1)
        tokens = [layer.tokens_per_expert.tolist() for layer in layers]
        sent = [layer.traffic.tokens_sent_per_rank.tolist() for layer in layers]
        assigned = [layer.traffic.assignments_sent_per_rank.tolist() for layer in layers]
        if step in self.per_step:
            before = self.per_step[step]
            tokens = [[a + b for a, b in zip(x, y)] for x, y in zip(before["tokens"], tokens)]
            sent = [[a + b for a, b in zip(x, y)] for x, y in zip(before["sent"], sent)]
            assigned = [[a + b for a, b in zip(x, y)] for x, y in zip(before["assigned"], assigned)]
        self.per_step[step] = {"tokens": tokens, "sent": sent, "assigned": assigned}
        self.ep_rank = layers[0].dispatcher.ep_rank


def worker(out_dir: Path) -> None:
    """One rank: train the tiny two-layer model under MoEStrategy(expert_parallel_size=2)."""
    torch.set_num_threads(1)
    from lightning.pytorch.loggers import TensorBoardLogger
    from test_expert_load import TinyMoE, loader

    from lightning_moe import ExpertLoadMonitor, MoEStrategy

    rank = int(os.environ["RANK"])
    torch.manual_seed(0)  # the same initial weights on every rank
    model = TinyMoE()
    monitor, local = ExpertLoadMonitor(every_n_steps=EVERY_N_STEPS, image_every_n_steps=EVERY_N_STEPS), RecordLocal()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=MoEStrategy(expert_parallel_size=EP),
        max_steps=MAX_STEPS,
        # The reference runs first, so that it sees the same micro-batch as the monitor.
        callbacks=[local, monitor],
        logger=TensorBoardLogger(out_dir, name="tb", version=0),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # Lightning adds a DistributedSampler: each rank trains on its own quarter of the samples.
    trainer.fit(model, loader(num_samples=128))
    result = {
        "ep_rank": local.ep_rank,
        "local": local.per_step,
        "history": [
            {
                "step": w.step,
                "tokens": [t.tolist() for t in w.tokens_per_expert],
                "traffic": [t.tolist() for t in w.traffic],
                "rank_load": [t.tolist() for t in w.rank_load],
                "source_load": [t.tolist() for t in w.source_load],
            }
            for w in monitor.history
        ],
        "metrics": monitor.latest_metrics,
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))


def test_world4_ep2_logs_global_sums_once(tmp_path):
    from dist_workers.launch import launch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_moe.callbacks.load_metrics import max_violation

    launch(Path(__file__), [str(tmp_path)], world_size=WORLD, timeout=150, log_dir=tmp_path / "logs")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert sorted(r["ep_rank"] for r in ranks) == [0, 0, 1, 1]

    # Every rank holds the same, world-summed history.
    history = ranks[0]["history"]
    assert [window["step"] for window in history] == [2, 4]
    assert all(r["history"] == history for r in ranks)

    for window in history:
        steps = [str(s) for s in range(window["step"] - EVERY_N_STEPS + 1, window["step"] + 1)]
        for layer in range(2):
            expected_tokens = torch.zeros(len(window["tokens"][layer]), dtype=torch.long)
            expected_traffic = torch.zeros(EP, EP, dtype=torch.long)
            expected_rank_load = torch.zeros(EP, dtype=torch.long)
            expected_source = torch.zeros(EP, len(window["tokens"][layer]), dtype=torch.long)
            for r in ranks:
                for step in steps:
                    expected_tokens += torch.tensor(r["local"][step]["tokens"][layer])
                    expected_source[r["ep_rank"]] += torch.tensor(r["local"][step]["tokens"][layer])
                    expected_traffic[r["ep_rank"]] += torch.tensor(r["local"][step]["sent"][layer])
                    expected_rank_load += torch.tensor(r["local"][step]["assigned"][layer])
            assert window["tokens"][layer] == expected_tokens.tolist()
            assert window["traffic"][layer] == expected_traffic.tolist()
            assert window["rank_load"][layer] == expected_rank_load.tolist()
            # [source EP rank, expert]: what each EP rank routed, summed over its EDP replicas.
            assert window["source_load"][layer] == expected_source.tolist()
            assert torch.tensor(window["source_load"][layer]).sum(0).tolist() == window["tokens"][layer]
            # Dropless: all 4 ranks x 2 steps x 4 x 5 tokens x k assignments, each processed once; each
            # token is sent at least once and at most once per assignment.
            top_k = (2, 1)[layer]
            tokens = WORLD * EVERY_N_STEPS * 4 * 5
            assert sum(window["tokens"][layer]) == sum(window["rank_load"][layer]) == tokens * top_k
            assert tokens <= expected_traffic.sum().item() <= tokens * top_k
            if top_k == 1:
                assert expected_traffic.sum().item() == tokens

    # Written once: one event file, by rank 0, one value per step, equal to the world's MaxVio.
    event_files = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert len(event_files) == 1
    events = EventAccumulator(str(event_files[0].parent), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    events.Reload()
    for layer in range(2):
        scalars = events.Scalars(f"moe/layer{layer}/max_vio")
        assert [e.step for e in scalars] == [2, 4]
        for event, window in zip(scalars, history):
            assert event.value == pytest.approx(max_violation(torch.tensor(window["tokens"][layer])), rel=1e-6)
        histograms = events.Histograms(f"moe/layer{layer}/tokens_per_expert")
        assert [h.histogram_value.bucket for h in histograms] == [w["tokens"][layer] for w in history]
        assert f"moe/layer{layer}/ep_max_vio" in events.Tags()["scalars"]
    assert [i.step for i in events.Images("moe/ep_traffic")] == [2, 4]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from dist_workers.launch import end_rank

    worker(Path(sys.argv[1]))
    end_rank()
