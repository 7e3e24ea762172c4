"""ExpertMigration on real processes: the step time before and after it re-places experts.

Two CPU processes (gloo) train one MoE layer of 8 experts at EP 2 with two spare slots per rank
(the default table: rank 0 holds experts 0-5, rank 1 experts 4-7 and replicas of 0 and 1). The
sigmoid gate's selection bias favours experts 2 and 3, which only rank 0 holds, so that about 80%
of the assignments go to rank 0's experts, after the per-step replica balancing of the default
strategy has moved what it can of experts 0 and 1 to their replicas on rank 1: rank 0 computes four
times what rank 1 does and sets the step time. ``ExpertMigration`` re-plans at step
``--every``: it replicates hot experts on rank 1 and splits their tokens with routing fractions.
The script prints the measured step times before and after (medians, skipping the first steps and
the step of the move), the speed-up, the share of assignments each rank's experts process, what the
re-plan cost (planning and moving), and that cost as a share of training time at the callback's
default period (``every_n_steps=500``), next to a run without the callback.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/migration_real.py

(Lightning starts the second process itself.) Prints a Markdown table (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_moe import ExpertMigration, MoELayer, MoEStrategy, collect_aux_loss


class SkewedMoE(L.LightningModule):
    """One linear map and one MoE layer; the gate's selection bias favours the ``hot`` experts."""

    def __init__(self, *, d_model: int, d_ff: int, num_experts: int, hot: list[int], skew: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(d_model, d_model)
        self.moe = MoELayer(d_model=d_model, d_ff=d_ff, num_experts=num_experts, gate="sigmoid", top_k=2,
                            gate_kwargs={"bias_update_rate": 0.0})
        with torch.no_grad():
            self.moe.gate.expert_bias.copy_(torch.tensor([skew if e in hot else 0.0 for e in range(num_experts)]))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.moe(self.proj(x)), y) + collect_aux_loss(self)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


class StepClock(L.Callback):
    """Wall-clock seconds of every optimizer step, the busiest rank's CPU seconds in it, and the
    assignments each EP rank's experts got."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.busiest_cpu_seconds: list[float] = []
        self.rank_share: list[list[float]] = []
        self._last = self._last_cpu = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._last is None:
            self._last, self._last_cpu = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now, cpu = time.perf_counter(), time.process_time()
        self.seconds.append(now - self._last)
        # With a core per rank, the busiest rank computes for the whole step; on shared cores the
        # step's wall time exceeds its CPU time (checked in main).
        busiest = torch.tensor([cpu - self._last_cpu], dtype=torch.float64)
        torch.distributed.all_reduce(busiest, op=torch.distributed.ReduceOp.MAX)
        self.busiest_cpu_seconds.append(float(busiest))
        self._last, self._last_cpu = now, cpu
        # Assignments each rank's experts processed in this step, over both source ranks.
        traffic = pl_module.moe.traffic.assignments_sent_per_rank.double()
        torch.distributed.all_reduce(traffic)
        self.rank_share.append((traffic / traffic.sum()).tolist())


def train(args: argparse.Namespace, *, migrate: bool) -> tuple[StepClock, ExpertMigration | None]:
    model = SkewedMoE(d_model=args.d_model, d_ff=args.d_ff, num_experts=args.num_experts, hot=args.hot,
                      skew=args.skew)
    clock = StepClock()
    migration = ExpertMigration(every_n_steps=args.every) if migrate else None
    callbacks = [clock] + ([migration] if migration is not None else [])
    generator = torch.Generator().manual_seed(0)
    samples = args.steps * 2 * args.batch
    data = TensorDataset(torch.randn(samples, args.tokens // args.batch, args.d_model, generator=generator),
                         torch.randn(samples, args.tokens // args.batch, args.d_model, generator=generator))
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=MoEStrategy(expert_parallel_size=2, spare_expert_slots=2),
        max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks,
    )
    trainer.fit(model, DataLoader(data, batch_size=args.batch))
    return clock, migration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per rank per step")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--hot", type=int, nargs="+", default=[2, 3], help="experts the gate's bias favours")
    parser.add_argument("--skew", type=float, default=0.095, help="their selection bias")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--every", type=int, default=10, help="ExpertMigration's every_n_steps")
    parser.add_argument("--skip", type=int, default=3, help="steps left out at the start and after the move")
    args = parser.parse_args()
    torch.set_num_threads(1)

    load_before = os.getloadavg()
    static, _ = train(args, migrate=False)
    clock, migration = train(args, migrate=True)
    if int(os.environ.get("LOCAL_RANK", 0)) != 0:
        return
    move = args.every  # the step the callback re-planned at (it moves before step `every + 1` runs)
    if not migration.history or migration.history[0]["experts_moved"] == 0:
        sys.exit(f"no slot moved at step {move} (history: {migration.history}): nothing to measure; raise --skew")
    before = statistics.median(clock.seconds[args.skip:move])
    after = statistics.median(clock.seconds[move + args.skip:])
    # The run without the callback over the same steps as before and after (early steps run slower).
    without_early = statistics.median(static.seconds[args.skip:move])
    without = statistics.median(static.seconds[move + args.skip:])
    replan = migration.history[0]
    cost = replan["plan_seconds"] + replan["seconds"]
    default_period = 500
    print(f"{args.num_experts} SwiGLU experts d_model {args.d_model} d_ff {args.d_ff}, top-2 sigmoid gate biased "
          f"+{args.skew} towards experts {args.hot}, "
          f"{args.tokens} tokens per rank per step, fp32, 2 gloo processes on CPU (1 thread each), EP 2 with 2 "
          f"spare slots per rank; re-plan at step {move}\n")
    print("| | step time (ms, median) | assignments on rank 0 / rank 1 |")
    print("|---|---:|---:|")
    share_before = clock.rank_share[move - 1]
    share_after = clock.rank_share[-1]
    early, late = f"steps {args.skip + 1}-{move}", f"steps {move + args.skip + 1}-{args.steps}"
    print(f"| without ExpertMigration, {early} | {without_early * 1e3:.1f} | {static.rank_share[move - 1][0]:.0%} / "
          f"{static.rank_share[move - 1][1]:.0%} |")
    print(f"| without ExpertMigration, {late} | {without * 1e3:.1f} | {static.rank_share[-1][0]:.0%} / {static.rank_share[-1][1]:.0%} |")
    print(f"| before the move, {early} | {before * 1e3:.1f} | {share_before[0]:.0%} / {share_before[1]:.0%} |")
    print(f"| after the move, {late} | {after * 1e3:.1f} | {share_after[0]:.0%} / {share_after[1]:.0%} |")
    print(f"\nspeed-up after the move: {before / after:.2f}x (against the run without the callback over the same "
          f"steps: {without / after:.2f}x)")
    print(f"predicted by the cost model: max/mean {replan['predicted_max_over_mean_before']:.2f} -> "
          f"{replan['predicted_max_over_mean_after']:.2f}, layer time {replan['predicted_layer_seconds_before'] * 1e3:.1f} -> "
          f"{replan['predicted_layer_seconds_after'] * 1e3:.1f} ms")
    print(f"re-plan at step {move}: planning {replan['plan_seconds'] * 1e3:.1f} ms, moving {replan['experts_moved']} "
          f"slots ({replan['bytes'] / 2**20:.1f} MiB) {replan['seconds'] * 1e3:.1f} ms")
    print(f"overhead at the default every_n_steps={default_period}: {cost / (cost + default_period * after):.3%} of "
          f"training time (one re-plan per {default_period} steps of {after * 1e3:.0f} ms)")
    # Both ranks compute after the move: on two cores shared with other work they cannot both run at
    # once, and the speed-up measures the contention instead of the placement.
    cpu_after = statistics.median(clock.busiest_cpu_seconds[move + args.skip:])
    print(f"busiest rank's CPU time after the move: {cpu_after * 1e3:.0f} ms a step (wall {after * 1e3:.0f} ms); "
          f"load average before the runs {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    if after > 1.15 * cpu_after:
        print(f"WARNING: the steps after the move took {after / cpu_after:.2f}x the busiest rank's CPU time: the "
              f"ranks shared cores with other work, and the speed-up above understates the placement's. Re-run on "
              f"two idle cores.")
    print(json.dumps({"before": before, "after": after, "without": without, "without_early": without_early, "cost": cost,
                      "cpu_after": cpu_after}))


if __name__ == "__main__":
    main()
