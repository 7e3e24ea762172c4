"""Dense-to-MoE upcycling: a local Llama or Qwen2 transformers checkpoint becomes a Mixtral or Qwen2-MoE one.

``lightning-moe upcycle DENSE_DIR OUT --num-experts 8 --top-k 2 --method copy|split`` reads the
dense checkpoint's safetensors lazily, one layer at a time, and writes a checkpoint that
``transformers.AutoModelForCausalLM.from_pretrained(OUT)`` loads. Attention, norms, embeddings and
the output head are copied unchanged; every FFN becomes an MoE layer; tokenizer and generation
files are copied.

Methods (each expert ``e`` is a SwiGLU FFN ``down_e(act(gate_e x) * up_e x)``; the router's softmax
weights of a token's top-k experts are renormalised to sum to 1, which Mixtral always does and
the Qwen2-MoE config gets ``norm_topk_prob: true`` for):

- ``copy`` (sparse upcycling, Komatsuzaki et al. 2023): every expert is the dense FFN. The layer
  is ``sum_e w_e FFN(x) = FFN(x)`` for any router, since the weights sum to 1; the router starts
  random (normal, std ``router_std``, by default the checkpoint's ``initializer_range``) so that
  tokens spread over the experts from the first step, as in the paper, where the router is new.
- ``split`` (LLaMA-MoE, Zhu et al. 2024): the FFN's ``I`` hidden neurons are partitioned into ``E``
  groups of ``I / E`` (``random`` or ``clustered``, see
  :mod:`~lightning_moe.interop.neuron_partition`); expert ``e`` keeps its group's rows of
  ``gate_proj`` and ``up_proj`` and columns of ``down_proj``, the latter times ``E``. The dense FFN
  is the sum of the groups' outputs, so with a zero router (every weight ``1 / E``) and
  ``top_k = E`` the layer is ``sum_e (1/E) E FFN_e(x) = FFN(x)`` exactly. With ``top_k = k < E``
  a zero router gives weights ``1 / k``, i.e. the k chosen groups' outputs scaled by ``E / k``;
  the zero router ties all experts at first (every token gets the same k, whichever
  ``torch.topk`` returns for equal scores), so pass
  ``router_std`` > 0 to start from varied routing at the cost of exactness.

Qwen2-MoE always has a shared expert with a sigmoid gate; the upcycled model's has width 0 (its
output is exactly 0), so the MoE layer is the routed experts alone. (transformers warns that it
initialises zero-element tensors when it builds that model: harmless.)

Shape legend: ``D`` model width, ``I`` dense FFN width, ``E`` experts, ``M`` expert width.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_moe.interop.hf_weights import empty_shared_expert
from lightning_moe.interop.neuron_partition import PARTITIONS, clustered_partition, neuron_features, random_partition
from lightning_moe.interop.safetensors_files import SafetensorsCheckpoint, ShardedSafetensorsWriter

METHODS = ("copy", "split")
_DENSE_FFN_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight$")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
_WEIGHT_FILES = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.index\.json)$")


@dataclasses.dataclass(frozen=True)
class _Target:
    """How one dense family's MoE counterpart names and configures its MoE layers."""

    dense_type: str
    model_type: str
    architecture: str
    #: Projection name -> the expert weight's name in the hub layout (one tensor per expert).
    expert_names: dict[str, str]
    block: str  # the MoE block's prefix inside a decoder layer

    def expert_key(self, layer: int, expert: int, projection: str) -> str:
        return f"model.layers.{layer}.{self.block}.experts.{expert}.{self.expert_names[projection]}.weight"

    def router_key(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.block}.gate.weight"


TARGETS = {
    "llama": _Target(
        dense_type="llama",
        model_type="mixtral",
        architecture="MixtralForCausalLM",
        expert_names={"gate": "w1", "down": "w2", "up": "w3"},
        block="block_sparse_moe",
    ),
    "qwen2": _Target(
        dense_type="qwen2",
        model_type="qwen2_moe",
        architecture="Qwen2MoeForCausalLM",
        expert_names={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
        block="mlp",
    ),
}


def _read_dense_config(dense_dir: Path) -> dict[str, Any]:
    if not dense_dir.is_dir():
        raise ValueError(
            f"upcycle: DENSE_DIR {str(dense_dir)!r} is not a directory. Give a local checkpoint directory."
        )
    config_path = dense_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"upcycle: {str(dense_dir)!r} has no config.json; it is not a transformers checkpoint.")
    config = json.loads(config_path.read_text())
    model_type = config.get("model_type")
    if model_type not in TARGETS:
        raise ValueError(
            f"upcycle: {str(dense_dir)!r} holds a {model_type!r} model; upcycling supports dense llama (to Mixtral) "
            f"and qwen2 (to Qwen2-MoE) checkpoints."
        )
    if model_type == "llama":
        for flag in ("attention_bias", "mlp_bias"):
            if config.get(flag):
                raise ValueError(
                    f"upcycle: the Llama checkpoint sets `{flag}: true`; Mixtral has no such biases, so it cannot hold "
                    f"this model."
                )
    return config


def _check_arguments(
    config: dict[str, Any], *, num_experts: int, top_k: int, method: str, partition: str | None
) -> None:
    width = config["intermediate_size"]
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"upcycle: --num-experts must be a positive integer, got {num_experts!r}.")
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"upcycle: --top-k must lie in [1, --num-experts = {num_experts}], got {top_k!r}.")
    if method not in METHODS:
        raise ValueError(f"upcycle: --method must be one of {', '.join(METHODS)}, got {method!r}.")
    if method == "copy" and partition is not None:
        raise ValueError("upcycle: --partition applies to --method split (copy keeps every neuron in every expert).")
    if partition is not None and partition not in PARTITIONS:
        raise ValueError(f"upcycle: --partition must be one of {', '.join(PARTITIONS)}, got {partition!r}.")
    if method == "split" and width % num_experts:
        raise ValueError(
            f"upcycle: --method split needs --num-experts to divide the FFN width (intermediate_size {width}); "
            f"{num_experts} does not. Pick a divisor (e.g. {', '.join(str(e) for e in (2, 4, 8) if width % e == 0)})."
        )


def moe_config(dense_dir: Path, *, num_experts: int, top_k: int, expert_width: int) -> Any:
    """The transformers config of the MoE model: the dense config's shared fields plus the MoE ones.

    The dense config is read through transformers, which turns older fields (a top-level
    ``rope_theta``) into their current form, so RoPE and every other shared setting carry over.

    Args:
        dense_dir: the dense checkpoint directory.
        num_experts: routed experts per layer.
        top_k: experts per token.
        expert_width: hidden width of each expert.
    """
    from transformers import AutoConfig

    dense = AutoConfig.from_pretrained(dense_dir, local_files_only=True).to_dict()
    target = TARGETS[dense["model_type"]]
    config_class = type(AutoConfig.for_model(target.model_type))
    fields = {field.name for field in dataclasses.fields(config_class)} - {"architectures", "transformers_version"}
    shared = {key: value for key, value in dense.items() if key in fields}
    if target.model_type == "mixtral":
        moe = dict(intermediate_size=expert_width, num_local_experts=num_experts, router_jitter_noise=0.0)
    else:
        # Qwen2's attention always has q/k/v biases; the shared expert is empty (width 0), every
        # layer is MoE, and the top-k weights are renormalised (see the module docstring).
        moe = dict(
            moe_intermediate_size=expert_width,
            num_experts=num_experts,
            shared_expert_intermediate_size=0,
            norm_topk_prob=True,
            qkv_bias=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    config = config_class(**{**shared, **moe, "num_experts_per_tok": top_k, "output_router_logits": False})
    config.architectures = [target.architecture]
    return config


def _expert_groups(
    ffn: dict[str, torch.Tensor], *, num_experts: int, partition: str, generator: torch.Generator
) -> torch.Tensor:
    """``[E, M]`` neuron indices of each expert of a ``split``."""
    if partition == "clustered":
        return clustered_partition(neuron_features(ffn["gate"], ffn["up"]), num_experts, generator)
    return random_partition(ffn["gate"].shape[0], num_experts, generator)


def _moe_layer_tensors(
    target: _Target,
    layer: int,
    ffn: dict[str, torch.Tensor],
    *,
    num_experts: int,
    groups_EM: torch.Tensor | None,
    router_std: float,
    generator: torch.Generator,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of layer ``layer``'s MoE block, from its dense FFN ``{"gate", "up", "down"}``."""
    gate_ID, up_ID, down_DI = ffn["gate"], ffn["up"], ffn["down"]
    dtype, width = gate_ID.dtype, gate_ID.shape[1]
    router_ED = torch.zeros(num_experts, width)
    if router_std > 0:
        router_ED = torch.randn(num_experts, width, generator=generator) * router_std
    yield target.router_key(layer), router_ED.to(dtype)
    for expert in range(num_experts):
        if groups_EM is None:
            weights = {"gate": gate_ID.clone(), "up": up_ID.clone(), "down": down_DI.clone()}
        else:
            neurons_M = groups_EM[expert]
            # Times E: with all E experts at weight 1/E the outputs add up to the dense FFN's.
            down = (down_DI[:, neurons_M].float() * num_experts).to(dtype)
            weights = {"gate": gate_ID[neurons_M], "up": up_ID[neurons_M], "down": down}
        for projection, tensor in weights.items():
            yield target.expert_key(layer, expert, projection), tensor
    if target.model_type == "qwen2_moe":
        yield from empty_shared_expert("qwen2_moe", layer, width, dtype)


def upcycle(
    dense_dir: str | Path,
    out_dir: str | Path,
    *,
    num_experts: int,
    top_k: int,
    method: str = "copy",
    partition: str | None = None,
    seed: int = 0,
    router_std: float | None = None,
    max_shard_bytes: int = 4 << 30,
) -> Path:
    """Write an MoE transformers checkpoint made from a dense Llama or Qwen2 one (see the module docstring).

    Args:
        dense_dir: the dense checkpoint directory (``config.json`` and safetensors weights).
        out_dir: where to write; must not exist or be empty.
        num_experts: routed experts per layer.
        top_k: experts per token.
        method: ``"copy"`` or ``"split"``.
        partition: ``split`` only: ``"random"`` (default) or ``"clustered"``.
        seed: seeds the router and the partition.
        router_std: std of the router's normal init; by default ``initializer_range`` for ``copy``
            and 0 (exact) for ``split``.
        max_shard_bytes: largest safetensors shard written.

    Returns:
        ``out_dir``.
    """
    dense_dir, out_dir = Path(dense_dir), Path(out_dir)
    dense = _read_dense_config(dense_dir)
    _check_arguments(dense, num_experts=num_experts, top_k=top_k, method=method, partition=partition)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"upcycle: OUT {str(out_dir)!r} exists and is not an empty directory. Choose a new path.")
    if router_std is None:
        router_std = float(dense.get("initializer_range", 0.02)) if method == "copy" else 0.0
    if not router_std >= 0:
        raise ValueError(f"upcycle: --router-std must be >= 0, got {router_std!r}.")
    weights = SafetensorsCheckpoint(dense_dir)
    target = TARGETS[dense["model_type"]]
    width = dense["intermediate_size"]
    expert_width = width if method == "copy" else width // num_experts
    config = moe_config(dense_dir, num_experts=num_experts, top_k=top_k, expert_width=expert_width)

    out_dir.mkdir(parents=True, exist_ok=True)
    writer = ShardedSafetensorsWriter(out_dir, max_shard_bytes=max_shard_bytes)
    generator = torch.Generator().manual_seed(seed)
    by_layer: dict[int, list[str]] = {}
    for key in weights.keys():
        match = _LAYER_KEY.match(key)
        if match is None:
            writer.add(key, weights.get(key))  # embeddings, final norm, output head
        else:
            by_layer.setdefault(int(match.group(1)), []).append(key)
    for layer in sorted(by_layer):
        ffn = {}
        for key in by_layer[layer]:
            match = _DENSE_FFN_KEY.match(key)
            if match is None:
                writer.add(key, weights.get(key))  # attention and norms, unchanged
            else:
                ffn[match.group(2)] = weights.get(key)
        if set(ffn) != {"gate", "up", "down"}:
            raise ValueError(
                f"upcycle: layer {layer} of {str(dense_dir)!r} lacks mlp.gate_proj/up_proj/down_proj weights."
            )
        groups_EM = None
        if method == "split":
            groups_EM = _expert_groups(
                ffn, num_experts=num_experts, partition=partition or "random", generator=generator
            )
        for key, tensor in _moe_layer_tensors(
            target, layer, ffn, num_experts=num_experts, groups_EM=groups_EM, router_std=router_std, generator=generator
        ):
            writer.add(key, tensor)
    writer.close()
    config.save_pretrained(out_dir)
    for path in dense_dir.iterdir():  # tokenizer, chat template, generation config, licence
        if path.is_file() and path.name != "config.json" and not _WEIGHT_FILES.search(path.name):
            shutil.copy2(path, out_dir / path.name)
    return out_dir


def upcycle_main(argv: Sequence[str]) -> int:
    """``lightning-moe upcycle DENSE_DIR OUT --num-experts E --top-k K --method copy|split``: see :func:`upcycle`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="lightning-moe upcycle",
        description="Turn a local dense Llama or Qwen2 transformers checkpoint into a Mixtral or Qwen2-MoE one.",
    )
    parser.add_argument("dense_dir", help="dense checkpoint directory (config.json, safetensors, tokenizer)")
    parser.add_argument("out", help="output directory (new or empty)")
    parser.add_argument("--num-experts", type=int, required=True, help="routed experts per layer")
    parser.add_argument("--top-k", type=int, required=True, help="experts per token")
    parser.add_argument("--method", choices=METHODS, default="copy", help="copy: every expert is the dense FFN; split: "
                        "the FFN's neurons are partitioned into the experts")
    parser.add_argument("--partition", choices=PARTITIONS, default=None, help="split only: how neurons are grouped "
                        "(default random)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the router and the partition")
    parser.add_argument("--router-std", type=float, default=None, help="std of the router's normal init (default: "
                        "initializer_range for copy, 0 for split)")
    args = parser.parse_args(list(argv))
    try:
        out = upcycle(
            args.dense_dir,
            args.out,
            num_experts=args.num_experts,
            top_k=args.top_k,
            method=args.method,
            partition=args.partition,
            seed=args.seed,
            router_std=args.router_std,
        )
    except ValueError as error:
        parser.error(str(error))  # usage and the message on stderr, exit status 2
    architecture = json.loads((out / "config.json").read_text())["architectures"][0]
    print(f"wrote {out}: {architecture}, {args.num_experts} experts ({args.method}), top-{args.top_k}")
    return 0
