"""Peak host memory and bytes read per rank when an expert-parallel rank loads a transformers checkpoint.

Writes a Mixtral-layout checkpoint (``save_pretrained`` of a random MoETransformer; no download),
then, for EP sizes 1, 2 and 4, runs every rank in a fresh process: build the model on the meta
device, read the dense weights and only rank r's experts (``load_pretrained_weights(...,
local_experts=...)``), and report the peak resident memory (``getrusage`` max RSS) and the bytes
copied out of the safetensors files (the median of ``--repeats`` fresh processes). For comparison, ``all experts, then slice`` loads the whole
model in each process and keeps its slice, as a rank must when every rank builds every expert.

    python benchmarks/load_pretrained.py                    # default sizes, about 400 MB of experts
    python benchmarks/load_pretrained.py --d-model 256 --layers 2

Results are in docs/finetuning.md ("Memory and bytes per rank").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MB = 2**20


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (``VmRSS``: now, ``VmHWM``: peak), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Start a new peak-RSS window (Linux: writing 5 to /proc/self/clear_refs resets VmHWM), so that the
    peak measures loading rather than the imports before it. Returns whether it could."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def write_checkpoint(directory: Path, args: argparse.Namespace) -> None:
    import torch

    from lightning_moe import MoETransformer

    torch.manual_seed(0)
    model = MoETransformer(
        vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=8, n_kv_heads=2, d_ff=args.d_ff,
        max_seq_len=256, num_experts=args.experts, top_k=2,
    )
    model.save_pretrained(directory)


def rank_worker(args: argparse.Namespace) -> dict:
    """One rank in a fresh process: meta build, then the dense weights and this rank's experts only."""
    from lightning_moe import MoELayer, MoETransformer
    from lightning_moe.interop.hf_load import load_pretrained_weights

    baseline = _status_mb("VmRSS")
    peak_from_load = _reset_peak_rss()
    experts_per_rank = args.experts // args.ep
    local = list(range(args.rank * experts_per_rank, (args.rank + 1) * experts_per_rank))
    start = time.perf_counter()
    if args.mode == "full":
        model = MoETransformer.from_pretrained(args.checkpoint)  # every expert, as each rank does today
        bytes_read = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        for block in model.blocks:  # keep this rank's slice, as MoEStrategy's sharding does
            for parameter in block.ffn.experts.parameters():
                parameter.data = parameter.data[local].clone()
    else:
        model = MoETransformer.from_pretrained(args.checkpoint, load_weights=False)
        names = [name for name, module in model.named_modules() if isinstance(module, MoELayer)]
        report = load_pretrained_weights(model, args.checkpoint, local_experts=dict.fromkeys(names, local))
        bytes_read = report.bytes_read
    seconds = time.perf_counter() - start
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    assert all(p.device.type == "cpu" for p in model.parameters())
    # Without a peak reset, getrusage's max RSS covers the imports too (an upper bound).
    peak = _status_mb("VmHWM") if peak_from_load else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": args.mode, "ep": args.ep, "rank": args.rank, "baseline_rss_mb": baseline, "peak_rss_mb": peak,
            "bytes_read_mb": bytes_read / MB, "params_held_mb": held / MB, "seconds": seconds}


def run_rank(checkpoint: Path, args: argparse.Namespace, *, mode: str, ep: int, rank: int) -> dict:
    command = [sys.executable, __file__, "--worker", "--checkpoint", str(checkpoint), "--mode", mode, "--ep", str(ep),
               "--rank", str(rank), "--experts", str(args.experts)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ff", type=int, default=1024, help="hidden width of each expert")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--ep-sizes", default="1,2,4")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per row; the median is shown")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="meta", help=argparse.SUPPRESS)
    parser.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(rank_worker(args)))
        return

    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = Path(scratch) / "checkpoint"
        write_checkpoint(checkpoint, args)
        size = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors")) / MB
        print(f"checkpoint: {size:.0f} MB ({args.layers} MoE layers x {args.experts} experts of "
              f"3 x {args.d_model} x {args.d_ff} fp32, d_model {args.d_model}, vocab {args.vocab})")
        print("| load | EP | rank | bytes read (MB) | parameters held (MB) | RSS before (MB) | peak RSS while loading "
              "(MB) | peak - before (MB) | seconds |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for ep in [int(size) for size in args.ep_sizes.split(",")]:
            for mode in ("meta", "full"):
                for rank in range(ep):
                    if mode == "full" and rank > 0:
                        continue  # every rank reads the same whole checkpoint
                    runs = [run_rank(checkpoint, args, mode=mode, ep=ep, rank=rank) for _ in range(args.repeats)]
                    row = {key: statistics.median(run[key] for run in runs) for key in
                           ("bytes_read_mb", "params_held_mb", "baseline_rss_mb", "peak_rss_mb", "seconds")}
                    row["added_mb"] = statistics.median(run["peak_rss_mb"] - run["baseline_rss_mb"] for run in runs)
                    label = "meta + own experts" if mode == "meta" else "all experts, then slice"
                    print(f"| {label} | {ep} | {rank} | {row['bytes_read_mb']:.1f} | {row['params_held_mb']:.1f} | "
                          f"{row['baseline_rss_mb']:.0f} | {row['peak_rss_mb']:.0f} | "
                          f"{row['added_mb']:.0f} | {row['seconds']:.2f} |")


if __name__ == "__main__":
    main()
