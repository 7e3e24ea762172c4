"""Forward+backward throughput of :class:`~lightning_moe.MoELayer` against its limit and against transformers.

For each shape ``E x K x D x F`` (experts, experts per token, model width, expert hidden width) the
script times one forward and one backward (with a random ``grad_output``) of:

- ``dense FFN``: one SwiGLU FFN of hidden width ``F`` over ``T * K`` rows. It does the same expert
  FLOPs as the MoE layer in one large GEMM per projection, so it is the limit a MoE layer can reach.
- ``lightning_moe MoELayer``: the whole layer as users run it (router, sort by expert, grouped
  GEMMs, un-sort and weighted combine).
- ``lightning_moe Experts``: only its grouped GEMMs, over rows already sorted by expert, with the
  same tokens per expert; the gap to the row above is the cost of routing and permutation.
- ``transformers eager`` / ``transformers grouped_mm``: transformers' ``MixtralSparseMoeBlock`` with
  each experts implementation, holding the same router and expert weights.

Before timing, the script checks that ours and both transformers implementations give the same
output and input gradient. TFLOP/s count only the expert GEMMs: forward ``2 * T * K * (D * 2F + F * D)``,
backward twice the forward. The router's ``D x E`` GEMM adds ``E / (3 K F)`` to that (0.3% to 2% for
the preset shapes), and the time of routing, sorting and combining is measured but not counted.

Usage::

    python benchmarks/moe_layer.py --preset cpu
    python benchmarks/moe_layer.py --preset h100 --device cuda
    python benchmarks/moe_layer.py --device cpu --tokens 512 --shapes 8x2x128x256 --iters 5

Shape legend: ``T`` tokens, ``D`` model width, ``F`` expert hidden width, ``E`` experts, ``K``
experts per token, ``N`` assignment rows (``T * K``).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import lightning_moe
from lightning_moe import MoELayer
from lightning_moe.layers import FeedForward
from lightning_moe.ops.grouped_mm import _grouped_mm_supported

PRESETS: dict[str, dict[str, object]] = {
    # Small enough to finish in about a minute on two CPU cores.
    "cpu": dict(device="cpu", dtype="float32", tokens=2048, shapes="8x2x256x512,32x4x256x128", warmup=2, iters=10),
    # The MoE layers of Mixtral-8x7B, DeepSeek-V2-Lite (routed experts only) and Qwen3-30B-A3B.
    "h100": dict(
        device="cuda",
        dtype="bfloat16",
        tokens=8192,
        shapes="8x2x4096x14336,64x6x2048x1408,128x8x2048x768",
        warmup=5,
        iters=20,
    ),
}
DEFAULTS: dict[str, object] = dict(device="cpu", dtype="float32", tokens=2048, shapes="8x2x256x512", warmup=2, iters=10)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: Largest allowed ``max|ours - theirs| / max|theirs|`` in the agreement check, per dtype.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}

DENSE, OURS, OURS_EXPERTS, HF_EAGER, HF_GROUPED = (
    "dense FFN (T*K rows)",
    "lightning_moe MoELayer",
    "lightning_moe Experts (GEMMs only)",
    "transformers eager",
    "transformers grouped_mm",
)


@dataclass(frozen=True)
class Shape:
    num_experts: int
    top_k: int
    d_model: int
    d_ff: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        parts = text.lower().split("x")
        if len(parts) != 4 or not all(part.isdigit() and int(part) > 0 for part in parts):
            raise ValueError(
                f"`--shapes` entry {text!r} is not ExKxDxF with positive integers. Write e.g. 8x2x4096x14336 "
                f"(experts x top_k x d_model x d_ff)."
            )
        shape = cls(*(int(part) for part in parts))
        if shape.top_k > shape.num_experts:
            raise ValueError(f"`--shapes` entry {text!r} has top_k {shape.top_k} > experts {shape.num_experts}.")
        return shape

    def __str__(self) -> str:
        return f"E={self.num_experts} k={self.top_k} d={self.d_model} f={self.d_ff}"


def expert_flops(num_tokens: int, shape: Shape) -> float:
    """FLOPs of the SwiGLU expert GEMMs of one forward+backward (router and elementwise ops left out).

    Forward: ``2 * N * (D * 2F + F * D)`` multiply-adds counted as two FLOPs, ``N = T * K`` rows.
    Backward: a gradient for the input and one for the weight per GEMM, twice the forward.
    """
    rows = num_tokens * shape.top_k
    forward = 2 * rows * (shape.d_model * 2 * shape.d_ff + shape.d_ff * shape.d_model)
    return 3.0 * forward


def load_transformers_block() -> tuple[type | None, type | None, str]:
    """transformers' Mixtral MoE block and config classes, or ``None`` and the reason they cannot be used."""
    try:
        import transformers
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError as error:
        return None, None, f"transformers not importable ({error}); its rows are skipped"
    probe = MixtralSparseMoeBlock(
        MixtralConfig(hidden_size=8, intermediate_size=8, num_local_experts=2, num_experts_per_tok=1)
    )
    if not hasattr(probe.experts, "gate_up_proj"):
        return None, None, (
            f"transformers {transformers.__version__} keeps Mixtral experts as separate modules (no "
            f"`gate_up_proj`); install transformers >= 5 for the eager/grouped_mm rows"
        )
    return MixtralSparseMoeBlock, MixtralConfig, f"transformers {transformers.__version__}"


def transformers_grouped_mm_note(rows_ND: torch.Tensor, gate_up_proj: torch.Tensor) -> str:
    """Whether transformers' grouped_mm implementation runs torch's grouped_mm kernel here or its own loop."""
    try:
        from transformers.integrations.moe import _can_use_grouped_mm
    except ImportError:
        return "unknown (transformers.integrations.moe._can_use_grouped_mm not found)"
    offsets_E = torch.zeros(gate_up_proj.shape[0], dtype=torch.int32, device=rows_ND.device)
    if _can_use_grouped_mm(rows_ND, gate_up_proj.transpose(-2, -1), offsets_E):
        return "torch.nn.functional.grouped_mm"
    return "NOT available here: transformers falls back to its per-expert loop (`grouped_mm_fallback`)"


def build_models(
    shape: Shape, *, device: torch.device, dtype: torch.dtype, block_classes: tuple[type | None, type | None]
) -> dict[str, nn.Module]:
    """Our layer, the dense FFN and transformers' block, with transformers' weights copied from ours."""
    torch.manual_seed(0)
    # NOTE: parameters are created on the device directly: the H100 shapes hold billions of
    # parameters, whose initialisation on the CPU takes longer than the benchmark.
    with torch.device(device):
        # Mixtral renormalises the kept probabilities for every k (our default does only for k > 1).
        ours = MoELayer(
            d_model=shape.d_model, d_ff=shape.d_ff, num_experts=shape.num_experts, gate="topk", top_k=shape.top_k,
            gate_kwargs={"normalize": True},
        )
        dense = FeedForward(d_model=shape.d_model, d_ff=shape.d_ff)
    models: dict[str, nn.Module] = {OURS: ours.to(dtype), DENSE: dense.to(dtype)}
    block_class, config_class = block_classes
    if block_class is None:
        return models
    config = config_class(
        hidden_size=shape.d_model,
        intermediate_size=shape.d_ff,
        num_local_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k,
        hidden_act="silu",
        router_jitter_noise=0.0,
        experts_implementation="eager",
    )
    with torch.device(device):
        block = block_class(config).to(dtype)
    with torch.no_grad():
        # Ours: w_in [E, D, 2F] (gate half first), w_out [E, F, D]. transformers multiplies
        # x @ gate_up_proj[e].T with gate_up_proj [E, 2F, D] (gate half first) and down_proj [E, D, F].
        block.experts.gate_up_proj.copy_(ours.experts.w_in.transpose(1, 2))
        block.experts.down_proj.copy_(ours.experts.w_out.transpose(1, 2))
        block.gate.weight.copy_(ours.gate.weight)
    models["transformers"] = block
    return models


def set_transformers_implementation(block: nn.Module, implementation: str) -> None:
    # transformers 5 reads `config._experts_implementation` at every forward of the experts module.
    block.experts.config._experts_implementation = implementation


def forward_backward(model: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    out.backward(grad)
    model.zero_grad(set_to_none=True)
    return out.detach(), x.grad


def check_agreement(
    models: dict[str, nn.Module], x_1TD: torch.Tensor, grad_1TD: torch.Tensor
) -> tuple[list[str], bool]:
    """Compare transformers' implementations with ours on output and input gradient.

    Tokens whose top-k expert set differs are left out: transformers computes the router logits in
    the model dtype and we compute them in fp32, so in bf16 a near tie can pick another expert.

    Returns:
        The lines to print and whether every comparison is within the dtype's tolerance.
    """
    ours = models[OURS]
    block = models.get("transformers")
    if block is None:
        return ["agreement check: skipped (no transformers block)"], True
    x_TD = x_1TD.reshape(-1, x_1TD.shape[-1])
    with torch.no_grad():
        routing = ours.gate(x_TD)
        ours_ids_TK = routing.expert_index_N.view(ours.gate.top_k, -1).t().sort(dim=-1).values
        theirs_ids_TK = block.gate(x_TD)[2].sort(dim=-1).values
    same_T = (ours_ids_TK == theirs_ids_TK).all(dim=-1)
    y_ours, dx_ours = forward_backward(ours, x_1TD, grad_1TD)
    tolerance = TOLERANCE[x_1TD.dtype]
    lines = [f"agreement check: routing identical for {int(same_T.sum())} of {same_T.numel()} tokens"]
    all_ok = True
    for implementation, name in (("eager", HF_EAGER), ("grouped_mm", HF_GROUPED)):
        set_transformers_implementation(block, implementation)
        y_theirs, dx_theirs = forward_backward(block, x_1TD, grad_1TD)
        for what, a, b in (("output", y_ours, y_theirs), ("input grad", dx_ours, dx_theirs)):
            a_TD, b_TD = a.reshape(-1, a.shape[-1])[same_T].float(), b.reshape(-1, b.shape[-1])[same_T].float()
            error = ((a_TD - b_TD).abs().max() / b_TD.abs().max().clamp_min(1e-30)).item()
            all_ok = all_ok and error <= tolerance
            verdict = "ok" if error <= tolerance else "MISMATCH"
            lines.append(
                f"  {name} vs ours, {what}: max|diff|/max|ref| = {error:.2e} (tolerance {tolerance:.0e}) {verdict}"
            )
    return lines, all_ok


def time_ms(step: Callable[[], None], device: torch.device) -> float:
    """Wall time of one call of ``step`` in milliseconds: CUDA events on a GPU, ``perf_counter`` on a CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    started = time.perf_counter()
    step()
    return (time.perf_counter() - started) * 1e3


def interleaved_medians(
    steps: dict[str, tuple[Callable[[], None], nn.Module]], *, device: torch.device, warmup: int, iters: int
) -> dict[str, float]:
    """Median milliseconds of each step, running the steps round-robin.

    NOTE: round-robin rather than one implementation after the other, so that a change in the
    machine's load (a shared CPU, a GPU clocking down) hits every implementation alike and the
    ratios stay meaningful. Gradients are set to ``None`` around each call, outside the timed region,
    as ``optimizer.zero_grad(set_to_none=True)`` does in training, which also keeps only one
    implementation's gradients in memory at a time.
    """
    times_ms: dict[str, list[float]] = {name: [] for name in steps}
    for iteration in range(warmup + iters):
        for name, (step, model) in steps.items():
            model.zero_grad(set_to_none=True)
            elapsed_ms = time_ms(step, device)
            model.zero_grad(set_to_none=True)
            if iteration >= warmup:
                times_ms[name].append(elapsed_ms)
    return {name: statistics.median(values) for name, values in times_ms.items()}


def bench_shape(
    shape: Shape,
    *,
    num_tokens: int,
    device: torch.device,
    dtype: torch.dtype,
    warmup: int,
    iters: int,
    block_classes: tuple[type | None, type | None],
) -> tuple[dict[str, float], list[str], bool]:
    """Median forward+backward milliseconds per implementation, the notes printed above the table,
    and whether the implementations agree."""
    models = build_models(shape, device=device, dtype=dtype, block_classes=block_classes)
    ours, dense = models[OURS], models[DENSE]
    generator = torch.Generator(device=device).manual_seed(1)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, device=device, dtype=dtype, generator=generator)

    x_1TD, grad_1TD = randn(1, num_tokens, shape.d_model), randn(1, num_tokens, shape.d_model)
    rows = num_tokens * shape.top_k
    x_ND, grad_ND = randn(rows, shape.d_model), randn(rows, shape.d_model)
    notes, agree = check_agreement(models, x_1TD, grad_1TD)
    ours(x_1TD)  # the routing whose tokens per expert the GEMMs-only row reuses
    tokens_per_expert_E = ours.tokens_per_expert.clone()
    notes.append(
        f"tokens per expert: min {int(tokens_per_expert_E.min())}, max {int(tokens_per_expert_E.max())}, "
        f"mean {rows / shape.num_experts:.0f}"
    )
    uses_kernel = _grouped_mm_supported(x_ND, ours.experts.w_in)
    notes.append(f"our grouped GEMM: {'torch.nn.functional.grouped_mm' if uses_kernel else 'per-expert loop'}")

    def run(model: nn.Module, x: torch.Tensor, grad: torch.Tensor, *args, implementation=None) -> Callable[[], None]:
        x = x.detach().requires_grad_(True)

        def step() -> None:
            if implementation is not None:
                set_transformers_implementation(model, implementation)
            x.grad = None
            model(x, *args).backward(grad)

        return step

    steps = {
        DENSE: (run(dense, x_ND, grad_ND), dense),
        OURS: (run(ours, x_1TD, grad_1TD), ours),
        OURS_EXPERTS: (run(ours.experts, x_ND, grad_ND, tokens_per_expert_E), ours.experts),
    }
    block = models.get("transformers")
    if block is not None:
        notes.append(f"transformers grouped_mm: {transformers_grouped_mm_note(x_ND, block.experts.gate_up_proj)}")
        for name, implementation in ((HF_EAGER, "eager"), (HF_GROUPED, "grouped_mm")):
            step = run(block, x_1TD, grad_1TD, implementation=implementation)
            steps[name] = (step, block)
    times_ms = interleaved_medians(steps, device=device, warmup=warmup, iters=iters)
    del models, steps
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return times_ms, notes, agree


def markdown_table(results: list[tuple[Shape, dict[str, float]]], num_tokens: int) -> str:
    lines = [
        "| shape | implementation | ms | TFLOP/s | vs dense | vs transformers grouped_mm |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for shape, times_ms in results:
        flops = expert_flops(num_tokens, shape)
        dense_ms, grouped_ms = times_ms[DENSE], times_ms.get(HF_GROUPED)
        for name, ms in times_ms.items():
            # Ratios are throughput ratios: above 1.0 means faster than the reference.
            versus_grouped = f"{grouped_ms / ms:.2f}" if grouped_ms is not None else "n/a"
            tflops = flops / (ms * 1e-3) / 1e12
            lines.append(f"| {shape} | {name} | {ms:.2f} | {tflops:.3f} | {dense_ms / ms:.2f} | {versus_grouped} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), help="shapes, dtype, tokens and device at once; other flags override it"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", choices=sorted(DTYPES))
    parser.add_argument("--tokens", type=int, help="tokens T per forward")
    parser.add_argument("--shapes", help="comma-separated ExKxDxF, e.g. 8x2x4096x14336,64x6x2048x1408")
    parser.add_argument("--warmup", type=int, help="untimed iterations first")
    parser.add_argument("--iters", type=int, help="timed iterations; the median is reported")
    args = parser.parse_args(argv)
    defaults = PRESETS[args.preset] if args.preset else DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("tokens", "iters"):
        if getattr(args, name) < 1:
            parser.error(f"`--{name}` must be >= 1, got {getattr(args, name)}.")
    if args.warmup < 0:
        parser.error(f"`--warmup` must be >= 0, got {args.warmup}.")
    try:
        args.shapes = [Shape.parse(text) for text in args.shapes.split(",") if text]
    except ValueError as error:
        parser.error(str(error))
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("`--device cuda` needs a CUDA GPU and a CUDA build of torch; none is found. Use `--device cpu`.")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    block_class, config_class, transformers_note = load_transformers_block()
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"CPU, {torch.get_num_threads()} threads"
    print(f"# MoE layer forward+backward: {machine}, {args.dtype}, {args.tokens} tokens")
    print(f"torch {torch.__version__}, lightning_moe {lightning_moe.__version__}, {transformers_note}")
    print(
        f"median of {args.iters} iterations after {args.warmup} warm-up, implementations run round-robin; "
        f"backward with a random grad_output.\nTFLOP/s count only the expert GEMMs: 3 x forward, forward = "
        f"2 * T*K * (D*2F + F*D); the router, sort and combine are left out of the count but are in the time.\n"
        f"Ratios are speed ratios: above 1.00 is faster than the reference."
    )
    results, disagreeing = [], []
    for shape in args.shapes:
        times_ms, notes, agree = bench_shape(
            shape, num_tokens=args.tokens, device=device, dtype=dtype, warmup=args.warmup, iters=args.iters,
            block_classes=(block_class, config_class),
        )
        print(f"\n{shape}:")
        for note in notes:
            print(f"  {note}")
        sys.stdout.flush()
        results.append((shape, times_ms))
        if not agree:
            disagreeing.append(str(shape))
    print()
    print(markdown_table(results, args.tokens))
    if disagreeing:
        # Timed anyway (a long GPU run is not thrown away), but the comparison is not like for like.
        raise SystemExit(f"\nImplementations disagree beyond tolerance for {disagreeing}: see MISMATCH above.")


if __name__ == "__main__":
    main()
