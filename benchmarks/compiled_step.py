"""What ``MoETransformer(compile_blocks=True)`` gains: the time of one training step (forward, backward,
AdamW) of the quickstart's model, eager and with each block compiled by ``torch.compile``.

The model of ``recipes/quickstart.yaml`` (4 blocks, d_model 128, 8 SwiGLU experts of d_ff 256,
top-2; fp32 unless ``--dtype``) on a batch of 16 x 128 tokens. Each setting is built from the same
seed, warmed up (the first step compiles; its time is printed apart), then timed over ``--steps``
steps; both settings are timed ``--rounds`` times, alternately, and the median of every step is
printed.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/compiled_step.py
    python benchmarks/compiled_step.py --device cuda --dtype bfloat16 --batch 64  # where a GPU is lent
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_moe import MoETransformer

QUICKSTART = dict(d_model=128, n_layers=4, n_heads=4, d_ff=256, max_seq_len=128, num_experts=8, gate="topk", top_k=2)


def build(compile_blocks: bool, device: torch.device, batch: int, dtype: torch.dtype):
    torch.manual_seed(0)
    model = MoETransformer(**QUICKSTART, compile_blocks=compile_blocks).to(device=device, dtype=dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    tokens_BT = torch.randint(0, 256, (batch, QUICKSTART["max_seq_len"] + 1), generator=generator).to(device)

    def step() -> None:
        logits_BTV = model(tokens_BT[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits_BTV.flatten(0, 1), tokens_BT[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def timed(step, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameters and activations")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    steps = {compiled: build(compiled, device, args.batch, dtype) for compiled in (False, True)}
    first = {compiled: timed(step, device) for compiled, step in steps.items()}
    for step in steps.values():
        for _ in range(3):
            step()
    seconds: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for compiled, step in steps.items():
            seconds[compiled] += [timed(step, device) for _ in range(args.steps)]
    print(f"Training step of the quickstart model, batch {args.batch} x {QUICKSTART['max_seq_len']}, {args.dtype}, on {device} "
          f"(torch {torch.__version__}, {torch.get_num_threads()} thread(s)), {args.rounds} x {args.steps} steps each\n")
    print("| setting | first step (s) | median (ms) | min (ms) |")
    print("|---|---:|---:|---:|")
    for compiled, name in ((False, "eager"), (True, "compile_blocks=True")):
        print(f"| {name} | {first[compiled]:.1f} | {statistics.median(seconds[compiled]) * 1e3:.1f} | "
              f"{min(seconds[compiled]) * 1e3:.1f} |")
    print(f"\nspeed-up (medians): {statistics.median(seconds[False]) / statistics.median(seconds[True]):.2f}x")


if __name__ == "__main__":
    main()
