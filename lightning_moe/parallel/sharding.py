"""Find the MoE layers of a user's module, check them, and shard their experts over the EP group.

Sharding happens in place, before the optimizers are created: each expert ``Parameter`` keeps its
identity and only its ``data`` is replaced by this rank's slots, so anything that holds the
parameter (the optimizer created next, hooks, the user's own references) keeps working.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_moe.layers.experts import is_expert_param
from lightning_moe.layers.moe import MoELayer
from lightning_moe.parallel.dispatch import AllToAllDispatcher
from lightning_moe.parallel.placement import ExpertPlacement


@dataclass
class ShardedExpertParam:
    """An expert parameter of the module under expert parallelism (what checkpoints need).

    Attributes:
        name: its name in the module's ``state_dict``.
        parameter: the (sharded) parameter itself.
        layer: the MoE layer that owns it.
    """

    name: str
    parameter: nn.Parameter
    layer: MoELayer

    @property
    def placement(self) -> ExpertPlacement:
        return self.layer.dispatcher.placement

    @property
    def num_experts(self) -> int:
        """Logical experts of the layer."""
        return self.placement.num_experts

    @property
    def ep_size(self) -> int:
        return self.placement.ep_size

    @property
    def local_experts(self) -> list[int]:
        """Logical ids of this rank's slots, in slot order."""
        return self.placement.experts_on_rank(self.layer.dispatcher.ep_rank)

    def file_rank_of_expert(self, expert: int) -> int:
        """The EP rank whose checkpoint file stores logical expert ``expert``: its first holder, so that
        an expert with replicas is stored once."""
        return int(self.placement.file_rank_E[expert])


def named_moe_layers(module: nn.Module) -> list[tuple[str, MoELayer]]:
    return [(name, child) for name, child in module.named_modules() if isinstance(child, MoELayer)]


def expert_param_problem(module: nn.Module, expert_parallel_size: int) -> str | None:
    """The first reason why ``module`` cannot be sharded, as a message that names the fix, or ``None``."""
    for name, parameter in module.named_parameters(recurse=False):
        if is_expert_param(parameter):
            return (
                f"The expert parameter `{name}` is registered directly on the root module "
                f"{type(module).__name__}. DistributedDataParallel cannot leave root parameters out of its "
                f"gradient sync, so expert parallelism cannot shard it. Move it into a submodule (for example "
                f"an `MoELayer` attribute of your LightningModule)."
            )
    owned = {id(p) for _, layer in named_moe_layers(module) for p in layer.experts.parameters()}
    for name, parameter in module.named_parameters():
        if is_expert_param(parameter) and id(parameter) not in owned:
            return (
                f"The parameter `{name}` is tagged as an expert parameter but does not belong to the `experts` "
                f"of an `MoELayer`, so MoEStrategy does not know how to shard it. Keep routed experts inside "
                f"`MoELayer`, or do not tag this parameter with `mark_expert_param`."
            )
    for name, layer in named_moe_layers(module):
        if layer.num_experts % expert_parallel_size:
            return (
                f"MoE layer `{name}` has num_experts={layer.num_experts}, which is not divisible by "
                f"expert_parallel_size={expert_parallel_size}. Choose an `expert_parallel_size` that divides the "
                f"number of experts of every MoE layer."
            )
    return None


def moe_signature(module: nn.Module) -> list[tuple[Any, ...]]:
    """A summary of every MoE layer's configuration; it must be identical on every rank."""
    signature = []
    for name, layer in named_moe_layers(module):
        experts = layer.experts
        signature.append((
            name,
            type(layer.gate).__name__,
            layer.num_experts,
            layer.d_model,
            experts.d_ff,
            experts.activation,
            layer.capacity_factor,
            getattr(layer.gate, "top_k", None),
        ))
    return signature


def describe_signature_mismatch(signatures: list[list[tuple[Any, ...]]]) -> str | None:
    """A message naming the first rank whose MoE configuration differs from rank 0's, or ``None``."""
    fields = ("layer", "gate", "num_experts", "d_model", "d_ff", "activation", "capacity_factor", "top_k")
    reference = signatures[0]
    for rank, signature in enumerate(signatures[1:], start=1):
        if signature == reference:
            continue
        if len(signature) != len(reference):
            return (
                f"Rank {rank} has {len(signature)} MoE layers but rank 0 has {len(reference)}. Every process "
                f"must build the same model: build it from the same configuration on every rank."
            )
        for layer_0, layer_r in zip(reference, signature):
            for field_name, value_0, value_r in zip(fields, layer_0, layer_r):
                if value_0 != value_r:
                    return (
                        f"MoE layer `{layer_0[0]}`: {field_name}={value_r!r} on rank {rank} but {value_0!r} on rank 0. "
                        f"Every process must build the same model: build it from the same configuration on every rank."
                    )
    return None


@torch.no_grad()
def shard_layer(
    layer: MoELayer,
    *,
    placement: ExpertPlacement,
    ep_rank: int,
    ep_group: dist.ProcessGroup | None,
    broadcast_from_rank_zero: bool = True,
) -> None:
    """Keep this rank's experts of ``layer`` (in place) and install the all-to-all dispatcher.

    Rank 0's full expert weights are broadcast first, so that every rank slices the same
    initialisation even when the user did not seed every process alike.
    """
    local_experts = placement.experts_on_rank(ep_rank)
    for parameter in layer.experts.parameters(recurse=False):
        # A meta tensor holds no data (its experts are read from a checkpoint after sharding).
        if broadcast_from_rank_zero and not parameter.is_meta and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(parameter.data, src=0)
        index = torch.tensor(local_experts, device=parameter.device)
        parameter.data = parameter.data.index_select(0, index).contiguous()
        parameter.grad = None
    layer.experts.num_experts = len(local_experts)
    layer.dispatcher = AllToAllDispatcher(placement=placement, ep_rank=ep_rank, ep_group=ep_group)


def sharded_expert_params(module: nn.Module) -> list[ShardedExpertParam]:
    """Every expert parameter of ``module`` with its state-dict name and layer (after sharding)."""
    names = {id(p): name for name, p in module.named_parameters()}
    result = []
    for _, layer in named_moe_layers(module):
        for parameter in layer.experts.parameters(recurse=False):
            result.append(ShardedExpertParam(names[id(parameter)], parameter, layer))
    return result


def ddp_ignored_names(module: nn.Module) -> list[str]:
    """Names DDP must leave alone: expert parameters (they differ per EP rank) and the per-forward
    count buffers of MoE layers (each rank counts its own tokens; DDP's per-forward buffer broadcast
    would overwrite them with rank 0's)."""
    names = [name for name, p in module.named_parameters() if is_expert_param(p)]
    for layer_name, layer in named_moe_layers(module):
        prefix = f"{layer_name}." if layer_name else ""
        names += [prefix + buffer for buffer in sorted(layer._non_persistent_buffers_set)]
    return names


def reinstate_placements(
    module: nn.Module, saved: dict[str, Any], *, on_switch: Callable[[MoELayer], None]
) -> list[str]:
    """Give each sharded MoE layer of ``module`` its table from a checkpoint (``saved``: layer name ->
    :meth:`ExpertPlacement.to_dict`), where it fits the layer's layout; no data moves, the checkpoint
    fills the slots next. ``on_switch(layer)`` refreshes what derives from the table. Returns, for
    each saved table that does not fit, ``"<layer>: <R> ranks x <S> slots"``."""
    layers = {name: layer for name, layer in named_moe_layers(module) if isinstance(layer.dispatcher, AllToAllDispatcher)}
    misfits = []
    for name, state in saved.items():
        placement = ExpertPlacement.from_dict(state)
        layer = layers.get(name)
        if layer is None or not placement.same_layout(layer.dispatcher.placement):
            misfits.append(f"{name}: {placement.ep_size} ranks x {placement.slots_per_rank} slots")
        elif placement != layer.dispatcher.placement:
            layer.dispatcher.set_placement(placement)
            on_switch(layer)
    return misfits
