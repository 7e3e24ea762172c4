"""Which transformers checkpoint tensors make up each tensor of a :class:`~lightning_moe.MoETransformer`.

Checkpoints on disk (what transformers' ``save_pretrained`` writes and what the Hub holds) keep one
2-D tensor per expert and projection: ``...experts.{e}.gate_proj.weight [F, D]``, ``up_proj [F, D]``,
``down_proj [D, F]`` (Mixtral: ``block_sparse_moe.experts.{e}.w1 / w3 / w2``). Our
:class:`~lightning_moe.layers.Experts` keeps ``w_in [E, D, 2F]`` (gate half first) and
``w_out [E, F, D]``, so expert ``e``'s rows are the transposed concatenations
``[gate; up]^T`` and ``down^T``. transformers' in-memory layout (``experts.gate_up_proj
[E, 2F, D]``, ``experts.down_proj [E, D, F]``) is read too when a file holds it (for Mixtral under
``mlp.``, the name transformers 5 gives the block in memory, see :data:`IN_MEMORY_MOE_ATTRIBUTE`).

Dense tensors map one to one, except two fused projections: ``kv_proj = [k_proj; v_proj]`` and a
dense or shared FFN's ``w_in = [gate_proj; up_proj]`` (rows concatenated).

Shape legend: ``E`` experts, ``D`` model width, ``F`` expert hidden width.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_moe.layers.gates import SigmoidGate
from lightning_moe.layers.moe import MoELayer
from lightning_moe.modeling.mla import MultiHeadLatentAttention

#: Per family: (MoE block attribute, names of the gate, up and down projections of one expert,
#: shared-expert attribute).
_MOE_NAMES: dict[str, tuple[str, tuple[str, str, str], str | None]] = {
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2"), None),
    "qwen2_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"), "shared_expert"),
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"), None),
    "olmoe": ("mlp", ("gate_proj", "up_proj", "down_proj"), None),
    "deepseek_v3": ("mlp", ("gate_proj", "up_proj", "down_proj"), "shared_experts"),
}

#: transformers 5 names every family's MoE block ``mlp`` in memory and renames Mixtral's to
#: ``block_sparse_moe`` (its name on the Hub) when it saves, so a Mixtral file of the in-memory state
#: dict (fused experts) has the router and the experts under ``mlp``.
IN_MEMORY_MOE_ATTRIBUTE = "mlp"


@dataclass(frozen=True)
class WeightMapping:
    """One tensor of ours and the checkpoint tensors it is made of.

    Attributes:
        ours: its name in our ``state_dict``.
        hf: checkpoint names whose row-wise (dim 0) concatenation it is; for routed experts,
            templates with ``{e}`` (the logical expert), concatenated then transposed per expert.
        expert_layer: the name of the :class:`~lightning_moe.MoELayer` for routed-expert tensors.
        fused: for routed experts, the name of transformers' 3-D tensor (``[E, rows, cols]``) a
            file may hold instead of the per-expert ones.
    """

    ours: str
    hf: tuple[str, ...]
    expert_layer: str | None = None
    fused: str | None = None

    def expert_names(self, expert: int) -> list[str]:
        return [template.format(e=expert) for template in self.hf]


def _linear(ours: str, hf: str, linear: nn.Linear) -> list[WeightMapping]:
    mappings = [WeightMapping(f"{ours}.weight", (f"{hf}.weight",))]
    if linear.bias is not None:
        mappings.append(WeightMapping(f"{ours}.bias", (f"{hf}.bias",)))
    return mappings


def _stacked(ours: str, hfs: tuple[str, ...], linear: nn.Linear) -> list[WeightMapping]:
    mappings = [WeightMapping(f"{ours}.weight", tuple(f"{hf}.weight" for hf in hfs))]
    if linear.bias is not None:
        mappings.append(WeightMapping(f"{ours}.bias", tuple(f"{hf}.bias" for hf in hfs)))
    return mappings


def _attention(ours: str, hf: str, attention: nn.Module) -> list[WeightMapping]:
    if isinstance(attention, MultiHeadLatentAttention):
        mappings = []
        if attention.q_lora_rank is None:
            mappings += _linear(f"{ours}.q_proj", f"{hf}.q_proj", attention.q_proj)
        else:
            mappings += _linear(f"{ours}.q_a_proj", f"{hf}.q_a_proj", attention.q_a_proj)
            mappings.append(WeightMapping(f"{ours}.q_a_norm.weight", (f"{hf}.q_a_layernorm.weight",)))
            mappings += _linear(f"{ours}.q_b_proj", f"{hf}.q_b_proj", attention.q_b_proj)
        mappings += _linear(f"{ours}.kv_a_proj", f"{hf}.kv_a_proj_with_mqa", attention.kv_a_proj)
        mappings.append(WeightMapping(f"{ours}.kv_a_norm.weight", (f"{hf}.kv_a_layernorm.weight",)))
        mappings += _linear(f"{ours}.kv_b_proj", f"{hf}.kv_b_proj", attention.kv_b_proj)
        return mappings + _linear(f"{ours}.out_proj", f"{hf}.o_proj", attention.out_proj)
    mappings = _linear(f"{ours}.q_proj", f"{hf}.q_proj", attention.q_proj)
    mappings += _stacked(f"{ours}.kv_proj", (f"{hf}.k_proj", f"{hf}.v_proj"), attention.kv_proj)
    mappings += _linear(f"{ours}.out_proj", f"{hf}.o_proj", attention.out_proj)
    if attention.qk_norm is not None:
        mappings += [
            WeightMapping(f"{ours}.q_norm.weight", (f"{hf}.q_norm.weight",)),
            WeightMapping(f"{ours}.k_norm.weight", (f"{hf}.k_norm.weight",)),
        ]
    return mappings


def _mlp(ours: str, hf: str) -> list[WeightMapping]:
    return [
        WeightMapping(f"{ours}.w_in.weight", (f"{hf}.gate_proj.weight", f"{hf}.up_proj.weight")),
        WeightMapping(f"{ours}.w_out.weight", (f"{hf}.down_proj.weight",)),
    ]


def _moe(ours: str, hf: str, layer: MoELayer, family: str) -> list[WeightMapping]:
    _, (gate_proj, up_proj, down_proj), shared = _MOE_NAMES[family]
    mappings = [
        WeightMapping(f"{ours}.gate.weight", (f"{hf}.gate.weight",)),
        WeightMapping(
            f"{ours}.experts.w_in",
            (f"{hf}.experts.{{e}}.{gate_proj}.weight", f"{hf}.experts.{{e}}.{up_proj}.weight"),
            expert_layer=ours,
            fused=f"{hf}.experts.gate_up_proj",
        ),
        WeightMapping(
            f"{ours}.experts.w_out", (f"{hf}.experts.{{e}}.{down_proj}.weight",), expert_layer=ours,
            fused=f"{hf}.experts.down_proj",
        ),
    ]
    if isinstance(layer.gate, SigmoidGate):
        mappings.append(WeightMapping(f"{ours}.gate.expert_bias", (f"{hf}.gate.e_score_correction_bias",)))
    if layer.shared_experts is not None and shared is not None:
        mappings += _mlp(f"{ours}.shared_experts", f"{hf}.{shared}")
    if layer.shared_expert_gate is not None:
        mappings.append(WeightMapping(f"{ours}.shared_expert_gate.weight", (f"{hf}.shared_expert_gate.weight",)))
    return mappings


def empty_shared_expert(
    family: str, layer: int, width: int, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a block's shared expert of width 0, and for Qwen2-MoE of its gate (zeros): what
    transformers builds for Qwen2-MoE's ``shared_expert_intermediate_size: 0`` and DeepSeek-V3's
    ``n_shared_experts: 0``. They add nothing to the output (the gate scales a zero)."""
    prefix = f"model.layers.{layer}.mlp.{_MOE_NAMES[family][2]}"
    yield f"{prefix}.gate_proj.weight", torch.zeros(0, width, dtype=dtype)
    yield f"{prefix}.up_proj.weight", torch.zeros(0, width, dtype=dtype)
    yield f"{prefix}.down_proj.weight", torch.zeros(width, 0, dtype=dtype)
    if family == "qwen2_moe":
        yield f"{prefix}_gate.weight", torch.zeros(1, width, dtype=dtype)


def hf_weight_mappings(model: Any, family: str, *, moe_attribute: str | None = None) -> list[WeightMapping]:
    """Every parameter and persistent buffer of ``model`` (a tied output head once), with the
    checkpoint tensors of a transformers ``family`` model it is made of.

    Args:
        model: the :class:`~lightning_moe.MoETransformer`.
        family: the transformers ``model_type``.
        moe_attribute: the MoE blocks' name in the checkpoint (``model.layers.i.<name>.gate.weight``);
            the family's name on disk by default (Mixtral: ``block_sparse_moe``), see
            :data:`IN_MEMORY_MOE_ATTRIBUTE` for the other.

    Raises:
        ValueError: when a tensor of ``model`` has no counterpart in ``family`` (e.g. shared experts
            in a Mixtral), naming it.
    """
    moe_attribute = moe_attribute or _MOE_NAMES[family][0]
    mappings = [WeightMapping("embed.weight", ("model.embed_tokens.weight",))]
    for index, block in enumerate(model.blocks):
        ours, hf = f"blocks.{index}", f"model.layers.{index}"
        mappings.append(WeightMapping(f"{ours}.attn_norm.weight", (f"{hf}.input_layernorm.weight",)))
        mappings += _attention(f"{ours}.attn", f"{hf}.self_attn", block.attn)
        mappings.append(WeightMapping(f"{ours}.ffn_norm.weight", (f"{hf}.post_attention_layernorm.weight",)))
        if block.is_moe:
            mappings += _moe(f"{ours}.ffn", f"{hf}.{moe_attribute}", block.ffn, family)
        else:
            mappings += _mlp(f"{ours}.ffn", f"{hf}.mlp")
    mappings.append(WeightMapping("norm.weight", ("model.norm.weight",)))
    if model.lm_head.weight is not model.embed.weight:
        mappings.append(WeightMapping("lm_head.weight", ("lm_head.weight",)))
    mapped = {mapping.ours for mapping in mappings}
    state = set(model.state_dict(keep_vars=True))
    if model.lm_head.weight is model.embed.weight:
        state.discard("lm_head.weight")
    missing = sorted(state - mapped)
    if missing:
        raise ValueError(
            f"MoETransformer tensors {missing} have no counterpart in a transformers {family!r} checkpoint. "
            f"Use the options of that family (see docs/finetuning.md)."
        )
    return mappings
