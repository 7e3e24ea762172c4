"""What ExpertLoadMonitor adds to the training step time.

Trains a MoETransformer (by default the quickstart's size) with the monitor active on every other
step, and prints for each setting the median wall time of the steps with and without it, and the
mean time spent inside the monitor's hook. Settings: the default (accumulate every step, log every
50); scalars and histograms every step (images every 50, the default cadence); images every step too.
Usage::

    python benchmarks/monitor_overhead.py                  # CPU, quickstart size
    python benchmarks/monitor_overhead.py --accelerator gpu --batch-size 32

Shape legend: ``B`` batch, ``T`` sequence length.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import tempfile
import time
import warnings

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_moe import ExpertLoadMonitor, MoETransformer

SETTINGS = {
    "every_n_steps=50 (default)": {"every_n_steps": 50},
    "every_n_steps=1 (images every 50)": {"every_n_steps": 1},
    "every_n_steps=1, image_every_n_steps=1": {"every_n_steps": 1, "image_every_n_steps": 1},
}


def monitored(batch_idx: int) -> bool:
    """The monitor runs on every other training step (those that end at an even ``global_step``, so
    that images every 50 steps are drawn); the steps in between are the baseline."""
    return batch_idx % 2 == 1


class StepTimer(L.Callback):
    """From one training batch's start to the next one's: the whole step, hooks and logging included."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self._start = warmup, {}, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if self._start is not None and batch_idx - 1 >= self.warmup:
            self.times[batch_idx - 1] = now - self._start
        self._start = now

    def pairs(self) -> list[tuple[float, float]]:
        """``(monitored step, the unmonitored step right after it)`` seconds."""
        return [(self.times[i], self.times[i + 1]) for i in sorted(self.times) if monitored(i) and i + 1 in self.times]


class AlternatingMonitor(ExpertLoadMonitor):
    """The monitor on every other step only, timing its own per-batch hook.

    NOTE: alternating inside one run pairs each monitored step with unmonitored neighbours of the
    same moment, so a change of machine load (other jobs on a shared machine) hits both alike.
    Every monitored step is logged (``every_n_steps=1``: ``global_step`` has moved since the last one).
    """

    def __init__(self, warmup: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.warmup, self.hook_times = warmup, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not monitored(batch_idx):
            return
        start = time.perf_counter()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if batch_idx >= self.warmup:
            self.hook_times.append(time.perf_counter() - start)


def run(setting: dict, args: argparse.Namespace, data: DataLoader, logdir: str) -> tuple[list, list]:
    """Train one setting: ``(monitored, unmonitored)`` step pairs and each hook call, in seconds."""
    torch.manual_seed(0)
    model = MoETransformer(
        vocab_size=256,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=4,
        d_ff=2 * args.d_model,
        max_seq_len=args.seq_len,
        num_experts=args.num_experts,
        top_k=2,
        warmup_steps=10,
    )
    timer, monitor = StepTimer(args.warmup), AlternatingMonitor(args.warmup, **setting)
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=1,
        max_steps=args.warmup + args.steps + 1,
        logger=TensorBoardLogger(logdir),
        callbacks=[timer, monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data)
    return timer.pairs(), monitor.hook_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="repetitions of every setting")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)

    samples = args.batch_size * (args.warmup + args.steps + 2)
    tokens_BT = torch.randint(0, 256, (samples, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    data = DataLoader(TensorDataset(tokens_BT[:, :-1], tokens_BT[:, 1:]), batch_size=args.batch_size)
    pairs: dict[str, list] = {name: [] for name in SETTINGS}
    hook_times: dict[str, list] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as logdir:
        for _ in range(args.rounds):
            for name, setting in SETTINGS.items():
                steps, hooks = run(setting, args, data, logdir)
                pairs[name] += steps
                hook_times[name] += hooks

    print(
        f"# MoETransformer d_model={args.d_model} n_layers={args.n_layers} experts={args.num_experts} top-2, "
        f"batch {args.batch_size} x {args.seq_len} tokens, {args.accelerator} "
        f"({platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads), "
        f"{args.rounds} x {args.steps} timed steps per setting, monitored and unmonitored steps alternating"
    )
    print(
        "| setting | step without monitor, median (ms) | monitored - next unmonitored step, median (ms) "
        "| monitor hook, mean (ms) | hook / step |"
    )
    print("| --- | --- | --- | --- | --- |")
    for name in SETTINGS:
        off = statistics.median(unmonitored for _, unmonitored in pairs[name])
        difference = statistics.median(monitored - unmonitored for monitored, unmonitored in pairs[name])
        hook = statistics.mean(hook_times[name])
        print(f"| {name} | {1e3 * off:.1f} | {1e3 * difference:+.1f} | {1e3 * hook:.2f} | {100 * hook / off:.1f}% |")


if __name__ == "__main__":
    main()
