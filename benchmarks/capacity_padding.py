"""What ``MoELayer(pad_to_capacity=True)`` costs: forward + backward of one MoE layer under a
capacity, computing the kept rows only (their number read back to the host) against every expert
on exactly its capacity of rows (static shapes, padding computed too).

One process, top-2 softmax routing of random tokens (so few are dropped above a capacity factor of
1), each setting built from the same seed and timed over ``--steps`` steps after 3 warm-up steps
(medians, ms). The padded layer computes ``capacity_factor`` times the dropless expert rows; on a
GPU what it saves (no host read before the experts, one graph under ``torch.compile``, CUDA graphs)
may outweigh that, here on a CPU the rows are the cost.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/capacity_padding.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_moe import MoELayer


def median_ms(capacity_factor: float, pad_to_capacity: bool, args: argparse.Namespace) -> tuple[float, int]:
    """Median milliseconds of forward + backward, and the assignments the capacity dropped."""
    torch.manual_seed(0)
    layer = MoELayer(d_model=args.d_model, d_ff=args.d_ff, num_experts=args.num_experts, top_k=2,
                     capacity_factor=capacity_factor, pad_to_capacity=pad_to_capacity)
    generator = torch.Generator().manual_seed(0)
    x_TD = torch.randn(args.tokens, args.d_model, generator=generator, requires_grad=True)
    grad_TD = torch.randn(args.tokens, args.d_model, generator=generator)
    for _ in range(3):
        layer(x_TD).backward(grad_TD)
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        layer(x_TD).backward(grad_TD)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds) * 1e3, int(layer.dropped_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=512)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--capacity-factors", type=float, nargs="+", default=[1.0, 1.25, 2.0])
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    print(f"{args.tokens} tokens, d_model {args.d_model}, d_ff {args.d_ff}, {args.num_experts} experts, top-2, fp32, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); forward + backward, median of {args.steps}\n")
    print("| capacity factor | dropped assignments | kept rows only (ms) | padded to capacity (ms) |")
    print("|---:|---:|---:|---:|")
    for capacity_factor in args.capacity_factors:
        kept_only, dropped = median_ms(capacity_factor, False, args)
        padded, _ = median_ms(capacity_factor, True, args)
        print(f"| {capacity_factor} | {dropped} | {kept_only:.1f} | {padded:.1f} |")


if __name__ == "__main__":
    main()
