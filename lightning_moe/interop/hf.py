"""Conversion between transformers' MoE blocks and :class:`~lightning_moe.MoELayer`.

Supported blocks (transformers >= 5, whose routed experts are stored as 3-D tensors):

=================  ===========================  ==========================================
family             block class                  routing
=================  ===========================  ==========================================
``mixtral``        ``MixtralSparseMoeBlock``    softmax, top-k, always renormalised
``qwen2_moe``      ``Qwen2MoeSparseMoeBlock``   softmax, top-k, ``norm_topk_prob``; shared
                                                expert scaled by ``sigmoid(x w)``
``qwen3_moe``      ``Qwen3MoeSparseMoeBlock``   softmax, top-k, ``norm_topk_prob``
``deepseek_v3``    ``DeepseekV3MoE``            sigmoid, ``e_score_correction_bias``,
                                                groups, ``routed_scaling_factor``; shared
                                                experts
=================  ===========================  ==========================================

Weight layouts: transformers keeps ``gate_up_proj: [E, 2F, D]`` (gate rows first, then up rows)
and ``down_proj: [E, D, F]``, used as ``x @ W^T``; :class:`~lightning_moe.layers.Experts` keeps
``w_in: [E, D, 2F]`` (gate half first) and ``w_out: [E, F, D]``, used as ``x @ W``. So each is the
other's transpose over the last two dimensions. Shared-expert MLPs (``gate_proj``, ``up_proj``,
``down_proj`` linears) map onto :class:`~lightning_moe.layers.FeedForward` with
``w_in = [gate_proj; up_proj]``.

Shape legend: ``E`` experts, ``D`` model width, ``F`` expert hidden width.
"""

from __future__ import annotations

import copy
import importlib

import torch
import torch.nn.functional as F
from torch import nn

from lightning_moe.layers.gates import Gate, SigmoidGate, TopKGate
from lightning_moe.layers.moe import MoELayer

#: Family name -> (module, class) of the transformers MoE block it converts.
HF_MOE_BLOCKS: dict[str, tuple[str, str]] = {
    "mixtral": ("transformers.models.mixtral.modeling_mixtral", "MixtralSparseMoeBlock"),
    "qwen2_moe": ("transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeSparseMoeBlock"),
    "qwen3_moe": ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeSparseMoeBlock"),
    "deepseek_v3": ("transformers.models.deepseek_v3.modeling_deepseek_v3", "DeepseekV3MoE"),
}


def hf_moe_family(block: nn.Module) -> str:
    """The family (a key of :data:`HF_MOE_BLOCKS`) of a transformers MoE block.

    Raises:
        ValueError: for any other module, naming its type.
    """
    for family, (module_name, class_name) in HF_MOE_BLOCKS.items():
        try:
            block_class = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue
        if isinstance(block, block_class):
            return family
    supported = ", ".join(class_name for _, class_name in HF_MOE_BLOCKS.values())
    raise ValueError(
        f"Unsupported MoE block type {type(block).__module__}.{type(block).__qualname__}. "
        f"Pass one of transformers' {supported} (e.g. `model.model.layers[i].mlp`)."
    )


def _expert_shapes(experts: nn.Module) -> tuple[int, int, int]:
    """``(E, D, F)`` of a transformers 3-D experts module, after checking that we read its layout right."""
    name = type(experts).__name__
    if not isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor) or not isinstance(
        getattr(experts, "down_proj", None), torch.Tensor
    ):
        raise ValueError(
            f"{name} has no 3-D `gate_up_proj`/`down_proj` expert weights (transformers < 5 keeps one MLP per "
            f"expert). Upgrade to transformers >= 5 to convert it."
        )
    layout = {
        "is_transposed": (getattr(experts, "is_transposed", False), False),
        "is_concatenated": (getattr(experts, "is_concatenated", True), True),
        "has_bias": (getattr(experts, "has_bias", False), False),
    }
    for field, (value, expected) in layout.items():
        if value != expected:
            raise ValueError(
                f"{name}.{field} is {value!r}; only the default layout ({field}={expected}) converts. "
                f"Load the checkpoint with the default experts layout."
            )
    num_experts, two_d_ff, d_model = experts.gate_up_proj.shape
    d_ff = two_d_ff // 2
    if two_d_ff % 2 or tuple(experts.down_proj.shape) != (num_experts, d_model, d_ff):
        raise ValueError(
            f"{name}: `gate_up_proj` {tuple(experts.gate_up_proj.shape)} and `down_proj` "
            f"{tuple(experts.down_proj.shape)} are not [E, 2F, D] and [E, D, F]."
        )
    _check_silu(name, experts.act_fn)
    return num_experts, d_model, d_ff


def _check_silu(owner: str, act_fn: nn.Module) -> None:
    # Checked by value rather than by class: transformers wraps activations in several classes.
    probe = torch.linspace(-6.0, 6.0, 25)
    if not torch.allclose(act_fn(probe), F.silu(probe), atol=1e-6):
        raise ValueError(
            f"{owner} uses activation {act_fn!r}; MoELayer's SwiGLU experts need `hidden_act='silu'`. "
            f"Only SiLU-gated experts convert."
        )


def _shared_mlp(block: nn.Module, family: str) -> nn.Module | None:
    """The block's always-on shared-expert MLP, if its family has one and it is not empty.

    An empty one (width 0: Qwen2-MoE's ``shared_expert_intermediate_size=0``, which ``lightning-moe
    upcycle`` writes, or DeepSeek-V3's ``n_shared_experts=0``) outputs zeros, so Qwen2-MoE's gate of it
    adds nothing either: the block has no shared expert.
    """
    attribute = {"qwen2_moe": "shared_expert", "deepseek_v3": "shared_experts"}.get(family)
    mlp = getattr(block, attribute) if attribute else None
    if mlp is None or mlp.gate_proj.weight.shape[0] == 0:
        return None
    return mlp


def _mlp_shapes(mlp: nn.Module) -> tuple[int, int]:
    """``(D, F)`` of a transformers gated MLP (``gate_proj``, ``up_proj``, ``down_proj``, no biases)."""
    for projection in ("gate_proj", "up_proj", "down_proj"):
        if getattr(mlp, projection).bias is not None:
            raise ValueError(f"{type(mlp).__name__}.{projection} has a bias; MoELayer's shared experts have none.")
    _check_silu(type(mlp).__name__, mlp.act_fn)
    d_ff, d_model = mlp.gate_proj.weight.shape
    return d_model, d_ff


def _dropped_group_fill(router: nn.Module) -> float:
    """The value this transformers version gives the scores of experts in dropped groups, measured.

    DeepSeek-V3's release fills them with 0.0, transformers 5 with ``-inf``; the two only differ
    when biased scores are negative, so we route one token with all scores 0.5 and biases that
    make every biased score negative, the kept groups' less so, and see which groups win.
    """
    probe = copy.deepcopy(router).to(device="cpu", dtype=torch.float32)
    num_experts, num_group, topk_group = probe.num_experts, probe.num_group, probe.topk_group
    with torch.no_grad():
        probe.weight.zero_()  # every score is sigmoid(0) = 0.5
        bias_GP = torch.full((num_group, num_experts // num_group), -2.0)  # biased score -1.5
        bias_GP[:topk_group] = -1.0  # -0.5: these groups are kept
        probe.e_score_correction_bias.copy_(bias_GP.reshape(-1))
        _, _, topk_ids = probe(torch.zeros(1, probe.weight.shape[1]))
    kept_only = bool((topk_ids < topk_group * (num_experts // num_group)).all())
    return float("-inf") if kept_only else 0.0


def _gate_for(block: nn.Module, family: str) -> Gate:
    """An unbuilt gate with the block's routing semantics and no aux losses (inference parity)."""
    router = block.gate
    if family == "mixtral":
        return TopKGate(top_k=router.top_k, normalize=True, load_balance_coef=0.0, z_loss_coef=0.0)
    if family in ("qwen2_moe", "qwen3_moe"):
        return TopKGate(
            top_k=router.top_k, normalize=bool(router.norm_topk_prob), load_balance_coef=0.0, z_loss_coef=0.0
        )
    # DeepSeek-V3: the correction bias is loaded, not trained, unless the user sets a bias_update_rate.
    return SigmoidGate(
        top_k=router.top_k,
        n_group=router.num_group,
        topk_group=router.topk_group,
        routed_scaling_factor=float(router.routed_scaling_factor),
        normalize=bool(router.norm_topk_prob),
        bias_update_rate=0.0,
        sequence_balance_coef=0.0,
        load_balance_coef=0.0,
        dropped_group_fill=_dropped_group_fill(router) if router.num_group > 1 else float("-inf"),
    )


@torch.no_grad()
def from_hf_moe_block(block: nn.Module) -> MoELayer:
    """A :class:`~lightning_moe.MoELayer` that computes what a transformers MoE block computes.

    Routed experts, router weights, the DeepSeek-V3 correction bias (into ``gate.expert_bias``),
    shared experts and Qwen2-MoE's shared-expert gate are copied; the layer has the block's dtype
    and device. Aux-loss coefficients are 0 and DeepSeek-V3's ``bias_update_rate`` is 0, so the
    layer reproduces the block (set them on ``layer.gate`` to fine-tune with balancing).

    NOTE: our routers compute logits in fp32, transformers' Mixtral and Qwen routers in the block
    dtype; in bf16 near-tied choices can differ. Mixtral's training-time jitter noise is not
    carried over.

    Args:
        block: a ``MixtralSparseMoeBlock``, ``Qwen2MoeSparseMoeBlock``, ``Qwen3MoeSparseMoeBlock`` or
            ``DeepseekV3MoE``, e.g. ``model.model.layers[i].mlp``.

    Raises:
        ValueError: for another block type or a layout that does not convert.
    """
    family = hf_moe_family(block)
    num_experts, d_model, d_ff = _expert_shapes(block.experts)
    shared_mlp = _shared_mlp(block, family)
    shared_d_ff = None
    if shared_mlp is not None:
        shared_d_ff = _mlp_shapes(shared_mlp)[1]
    shared_gate = block.shared_expert_gate if family == "qwen2_moe" and shared_mlp is not None else None
    gate = _gate_for(block, family)

    device, dtype = block.experts.gate_up_proj.device, block.experts.gate_up_proj.dtype
    with torch.device(device):
        layer = MoELayer(
            d_model=d_model,
            d_ff=d_ff,
            num_experts=num_experts,
            gate=gate,
            top_k=gate.top_k,
            activation="swiglu",
            shared_expert_d_ff=shared_d_ff,
            shared_expert_gate=shared_gate is not None,
        )
    layer.to(dtype=dtype)
    _copy_weights(source=block, target=layer, family=family, to_hf=False)
    return layer


@torch.no_grad()
def to_hf_moe_block(layer: MoELayer, block: nn.Module) -> nn.Module:
    """Copy ``layer``'s weights into an existing transformers MoE block of the same shape (export).

    Args:
        layer: a layer with the block's routing semantics, e.g. from :func:`from_hf_moe_block`.
        block: the transformers block to overwrite; its dtype and device are kept.

    Returns:
        ``block``.

    Raises:
        ValueError: when shapes, routing hyper-parameters or the gate type do not match.
    """
    family = hf_moe_family(block)
    num_experts, d_model, d_ff = _expert_shapes(block.experts)
    expected_gate = _gate_for(block, family)
    if type(layer.gate) is not type(expected_gate):
        raise ValueError(
            f"to_hf_moe_block: a {family} block routes with {type(expected_gate).__name__}, the layer's gate is "
            f"{type(layer.gate).__name__}. Convert a layer built with the block's routing."
        )
    fields = {
        "num_experts": (layer.num_experts, num_experts),
        "d_model": (layer.d_model, d_model),
        "d_ff": (layer.experts.d_ff, d_ff),
        "activation": (layer.experts.activation, "swiglu"),
    }
    for name in ("top_k", "normalize", "n_group", "topk_group", "routed_scaling_factor"):
        if hasattr(expected_gate, name):
            fields[f"gate.{name}"] = (getattr(layer.gate, name), getattr(expected_gate, name))
    shared_mlp = _shared_mlp(block, family)
    fields["shared experts"] = (layer.shared_experts is not None, shared_mlp is not None)
    if shared_mlp is not None and layer.shared_experts is not None:
        fields["shared_expert_d_ff"] = (layer.shared_experts.w_out.in_features, _mlp_shapes(shared_mlp)[1])
    block_gates_shared = family == "qwen2_moe" and shared_mlp is not None
    fields["shared_expert_gate"] = (layer.shared_expert_gate is not None, block_gates_shared)
    for name, (ours, theirs) in fields.items():
        if ours != theirs:
            raise ValueError(
                f"to_hf_moe_block: the layer's `{name}` is {ours!r}, the {family} block's is {theirs!r}. "
                f"Export into a block built from a config with the layer's `{name}`."
            )
    if isinstance(expected_gate, SigmoidGate) and expected_gate.n_group > 1:
        # The score of dropped groups' experts (0.0 in DeepSeek's release, -inf in transformers 5)
        # decides the routing whenever biased scores are negative; without groups none is dropped.
        layer_fill, block_fill = layer.gate.dropped_group_fill, expected_gate.dropped_group_fill
        if layer_fill != block_fill:
            raise ValueError(
                f"to_hf_moe_block: the layer's `gate.dropped_group_fill` is {layer_fill}, but the installed "
                f"transformers fills dropped groups with {block_fill}: the block would route differently. Use a "
                f"transformers version with the layer's fill, or set `layer.gate.dropped_group_fill = "
                f"float('{block_fill}')` (which changes the layer's routing) before exporting."
            )
    _copy_weights(source=layer, target=block, family=family, to_hf=True)
    return block


def _copy_weights(*, source: nn.Module, target: nn.Module, family: str, to_hf: bool) -> None:
    """Copy every tensor between a block and a layer; ``to_hf`` gives the direction.

    Each pair is (ours, theirs, map) where ``map`` is its own inverse (identity or a transpose), so
    the same table serves both directions.
    """
    block, layer = (target, source) if to_hf else (source, target)
    pairs: list[tuple[torch.Tensor, torch.Tensor, bool]] = [  # (ours, theirs, transposed)
        (layer.experts.w_in, block.experts.gate_up_proj, True),  # [E, D, 2F] <-> [E, 2F, D]
        (layer.experts.w_out, block.experts.down_proj, True),  # [E, F, D] <-> [E, D, F]
        (layer.gate.weight, block.gate.weight, False),  # [E, D] in both
    ]
    if family == "deepseek_v3":
        pairs.append((layer.gate.expert_bias, block.gate.e_score_correction_bias, False))
    shared_mlp = _shared_mlp(block, family)
    if shared_mlp is not None:
        w_in = layer.shared_experts.w_in.weight  # [2F, D]: gate rows, then up rows
        d_ff = w_in.shape[0] // 2
        pairs += [
            (w_in[:d_ff], shared_mlp.gate_proj.weight, False),
            (w_in[d_ff:], shared_mlp.up_proj.weight, False),
            (layer.shared_experts.w_out.weight, shared_mlp.down_proj.weight, False),
        ]
    if family == "qwen2_moe" and shared_mlp is not None:
        pairs.append((layer.shared_expert_gate.weight, block.shared_expert_gate.weight, False))
    for ours, theirs, transposed in pairs:
        destination, origin = (theirs, ours) if to_hf else (ours, theirs)
        destination.copy_(origin.transpose(-2, -1) if transposed else origin)
