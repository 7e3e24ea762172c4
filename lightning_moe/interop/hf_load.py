"""Read a transformers safetensors checkpoint into a :class:`~lightning_moe.MoETransformer`, expert by
expert, so that a process holds only the experts it is given.

The model may be built on the meta device (``with torch.device("meta"): MoETransformer(...)``, or
``MoETransformer.from_pretrained(path, load_weights=False)``): then nothing is allocated until
:func:`load_pretrained_weights` creates each tensor from the file. Tensors are read with
``safetensors.safe_open(...).get_slice``: only the listed experts' bytes are copied out of the
memory-mapped files, and each dense tensor once.

Contract for expert parallelism (what :class:`~lightning_moe.MoEStrategy` must do):

1. Build the model on the meta device (``MoETransformer.from_pretrained(path, load_weights=False)``).
2. Install each MoE layer's expert-parallel dispatcher for its placement. The expert parameters
   may keep all ``E`` rows, or be sliced to this rank's rows first (``index_select`` on a meta
   tensor costs nothing; ``shard_layer(..., broadcast_from_rank_zero=False)`` does that) - but
   must not be broadcast (meta tensors hold no data).
3. Call ``load_pretrained_weights(model, path, local_experts={layer_name:
   placement.experts_on_rank(ep_rank) for every MoE layer})``. Each expert parameter then has
   ``len(list)`` rows, row ``i`` holding logical expert ``list[i]`` (the slot order the dispatcher
   uses), and ``experts.num_experts`` is ``len(list)``. Dense parameters are read on every rank
   (no broadcast is needed: every rank reads the same bytes).
4. After loading: set device-limited expert groups (``gate.set_expert_groups``), create the
   optimizer, wrap with DDP.

Parameters that were on the meta device are replaced by new ``Parameter`` objects (a meta tensor
cannot take CPU data in place; the expert tag and ``requires_grad`` are kept), so re-read any
reference taken before loading. Parameters that were already materialised keep their identity and
are filled in place (with fewer rows through ``.data`` when ``local_experts`` asks for fewer).

Shape legend: ``E`` experts, ``D`` model width, ``F`` expert hidden width.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_moe.interop.hf_config import check_hf_config
from lightning_moe.interop.hf_weights import IN_MEMORY_MOE_ATTRIBUTE, WeightMapping, hf_weight_mappings
from lightning_moe.layers.dispatch import LocalDispatcher
from lightning_moe.layers.experts import is_expert_param, mark_expert_param
from lightning_moe.layers.moe import MoELayer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

#: Bytes per element of the safetensors dtypes (for the checkpoint's total size).
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
                "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass
class LoadReport:
    """What :func:`load_pretrained_weights` read.

    Attributes:
        bytes_read: bytes copied out of the checkpoint files (tensor data, in the file's dtype).
        checkpoint_bytes: bytes of all tensors in the checkpoint.
        tensors_read: checkpoint tensors (or row ranges of a fused tensor) read.
        local_experts: per MoE layer, the logical experts loaded, in row order.
        unused_keys: checkpoint tensors not read: other ranks' experts, and multi-token prediction
            layers past ``num_hidden_layers`` (DeepSeek-V3), which transformers ignores too.
    """

    bytes_read: int = 0
    checkpoint_bytes: int = 0
    tensors_read: int = 0
    local_experts: dict[str, list[int]] = field(default_factory=dict)
    unused_keys: list[str] = field(default_factory=list)


class SafetensorsCheckpoint:
    """The tensors of a transformers checkpoint directory (one file or a sharded index), read lazily.

    Shapes come from the files' headers (the 8-byte length and the JSON header of the safetensors
    format), parsed once per file; data through ``safe_open(...).get_slice``.

    NOTE: each read opens its file and closes it again. ``safe_open`` memory-maps the file, and the
    pages a read touches stay in this process's resident memory while the map lives: kept open,
    they added about one more copy of everything read to the peak (measured with
    benchmarks/load_pretrained.py). Re-opening costs one header parse per tensor.

    Args:
        path: directory with ``config.json`` and ``model.safetensors`` or ``model.safetensors.index.json``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config = read_hf_config(self.path)
        index = self.path / INDEX_FILE
        self._headers: dict[str, dict[str, Any]] = {}
        if index.is_file():
            self.file_of: dict[str, str] = dict(json.loads(index.read_text())["weight_map"])
        elif (self.path / SINGLE_FILE).is_file():
            self.file_of = dict.fromkeys(self._header(SINGLE_FILE), SINGLE_FILE)
        else:
            raise FileNotFoundError(
                f"{self.path} has neither {SINGLE_FILE} nor {INDEX_FILE}. Point at a transformers checkpoint "
                f"directory saved with safetensors (`save_pretrained(..., safe_serialization=True)`, the default)."
            )
        self.bytes_read = 0
        self.tensors_read = 0

    def _file(self, file_name: str) -> Path:
        file = self.path / file_name
        if not file.is_file():
            raise FileNotFoundError(f"{file} is listed in {INDEX_FILE} but missing. Copy the whole checkpoint.")
        return file

    def _header(self, file_name: str) -> dict[str, Any]:
        """``name -> {"dtype", "shape", "data_offsets"}`` of one file (the safetensors header)."""
        if file_name not in self._headers:
            with open(self._file(file_name), "rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(length))
            header.pop("__metadata__", None)
            self._headers[file_name] = header
        return self._headers[file_name]

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header(self.file_of[key])[key]["shape"])

    def total_bytes(self) -> int:
        total = 0
        for key, file_name in self.file_of.items():
            entry = self._header(file_name)[key]
            total += _DTYPE_BYTES.get(entry["dtype"], 4) * int(torch.Size(entry["shape"]).numel())
        return total

    def read(self, key: str, rows: slice | None = None) -> torch.Tensor:
        """The tensor ``key``, or only its ``rows`` (first dimension), reading no other bytes."""
        from safetensors import safe_open

        with safe_open(self._file(self.file_of[key]), framework="pt", device="cpu") as handle:
            sliced = handle.get_slice(key)
            tensor = sliced[:] if rows is None else sliced[rows]  # a copy: it outlives the map
        self.bytes_read += tensor.numel() * tensor.element_size()
        self.tensors_read += 1
        return tensor


def read_hf_config(path: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint directory, with errors that say what is missing."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory. Pass a transformers checkpoint directory (config.json, "
                                f"model.safetensors).")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json. Pass a directory written by transformers' save_pretrained.")
    config = json.loads(config_file.read_text())
    check_hf_config(config, str(config_file))
    return config


def _check_local_experts(
    layers: dict[str, MoELayer], local_experts: dict[str, Sequence[int]] | None
) -> dict[str, list[int]]:
    if local_experts is None:
        return {name: list(range(layer.num_experts)) for name, layer in layers.items()}
    unknown = sorted(set(local_experts) - set(layers))
    missing = sorted(set(layers) - set(local_experts))
    if unknown or missing:
        raise ValueError(
            f"load_pretrained_weights: `local_experts` must name every MoE layer of the model ({sorted(layers)}); "
            f"unknown: {unknown}, missing: {missing}."
        )
    checked = {}
    for name, experts in local_experts.items():
        experts = [int(e) for e in experts]
        num_experts = layers[name].num_experts
        if not experts or len(set(experts)) != len(experts) or not all(0 <= e < num_experts for e in experts):
            raise ValueError(
                f"load_pretrained_weights: `local_experts[{name!r}]` must list distinct logical experts in "
                f"[0, {num_experts}), got {experts}."
            )
        # A layer that routes on its own sends expert e's tokens to row e. Every expert in another
        # order would be routed to the wrong rows, silently (fewer experts are a rank's share, awaiting
        # its expert-parallel dispatcher: that model cannot run nor export until it has one).
        routes_locally = isinstance(layers[name].dispatcher, LocalDispatcher)
        if routes_locally and len(experts) == num_experts and experts != list(range(num_experts)):
            raise ValueError(
                f"load_pretrained_weights: `local_experts[{name!r}]` lists every expert in the order {experts}, but "
                f"the layer routes locally (LocalDispatcher): row e must hold expert e. Pass "
                f"list(range({num_experts})) (or None), or install the expert-parallel dispatcher of a placement "
                f"with this slot order first."
            )
        checked[name] = experts
    return checked


def _moe_attribute(checkpoint: SafetensorsCheckpoint, family: str) -> str | None:
    """``"mlp"`` for a Mixtral file of transformers' in-memory state dict (Mixtral has no dense MLP, so
    only such a file names anything ``mlp``), else ``None``: the family's name on disk."""
    in_memory = f".{IN_MEMORY_MOE_ATTRIBUTE}."
    if family == "mixtral" and any(in_memory in key for key in checkpoint.file_of):
        return IN_MEMORY_MOE_ATTRIBUTE
    return None


def _expected_shape(checkpoint: SafetensorsCheckpoint, key: str, expected: tuple[int, ...], ours: str) -> None:
    found = checkpoint.shape(key)
    if found != expected:
        raise ValueError(
            f"Checkpoint tensor `{key}` has shape {list(found)}, but `{ours}` needs {list(expected)}: config.json "
            f"(or an override given to from_pretrained) does not match the weights. Load the matching config, and "
            f"do not override architecture fields."
        )


def _require_keys(checkpoint: SafetensorsCheckpoint, keys: Sequence[str], ours: str) -> None:
    missing = [key for key in keys if key not in checkpoint]
    if missing:
        raise ValueError(
            f"Checkpoint {checkpoint.path} lacks {missing} (needed for `{ours}`): the weights do not belong to "
            f"this config.json, or the checkpoint is incomplete."
        )


def _read_dense(checkpoint: SafetensorsCheckpoint, mapping: WeightMapping, target: torch.Tensor) -> torch.Tensor:
    """``target``'s tensor: one checkpoint tensor, or equal row blocks (``[k; v]``, ``[gate; up]``)."""
    _require_keys(checkpoint, mapping.hf, mapping.ours)
    part_shape = (target.shape[0] // len(mapping.hf), *target.shape[1:])
    for key in mapping.hf:
        _expected_shape(checkpoint, key, tuple(part_shape), mapping.ours)
    parts = [checkpoint.read(key) for key in mapping.hf]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def _check_unused(checkpoint: SafetensorsCheckpoint, unused: set[str], expert_keys: set[str]) -> list[str]:
    """The unused keys, after checking that each is another rank's expert, a multi-token prediction
    layer (DeepSeek-V3 keeps ``num_nextn_predict_layers`` blocks after the last one, which
    transformers does not load either), an empty tensor (Qwen2-MoE's shared expert of width 0, and its
    gate), a rotary ``inv_freq`` buffer (older transformers and conversion scripts stored the
    frequencies, which transformers recomputes from the config and ignores on load, as we do) or,
    with tied embeddings, a stored copy of the embedding as the output head (some exporters write
    one; a head that differs is refused: tying would lose it)."""
    n_layers = checkpoint.config["num_hidden_layers"]
    extra_layers = range(n_layers, n_layers + int(checkpoint.config.get("num_nextn_predict_layers") or 0))
    prediction_layers = tuple(f"model.layers.{index}." for index in extra_layers)
    head, embedding = "lm_head.weight", "model.embed_tokens.weight"
    tied_copy = (
        checkpoint.config.get("tie_word_embeddings", False) and head in unused and embedding in checkpoint
        and torch.equal(checkpoint.read(head), checkpoint.read(embedding))
    )
    # Qwen2-MoE's shared expert of width 0 (and the gate that scales its zero output) adds nothing.
    empty = {key for key in unused if 0 in checkpoint.shape(key)}
    empty_gates = {key for key in unused if key.endswith(".mlp.shared_expert_gate.weight")
                   and key.replace("_gate.weight", ".down_proj.weight") in empty}
    rotary_frequencies = {key for key in unused if key.endswith("rotary_emb.inv_freq")}
    expected = expert_keys | empty | empty_gates | rotary_frequencies | ({head} if tied_copy else set())
    unexpected = sorted(key for key in unused - expected if not key.startswith(prediction_layers))
    if unexpected:
        raise ValueError(
            f"Checkpoint {checkpoint.path} holds tensors the model has no place for: {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}. config.json (or an override given to from_pretrained) does "
            f"not match the weights."
        )
    return sorted(unused)


def _read_experts(
    checkpoint: SafetensorsCheckpoint, mapping: WeightMapping, target: torch.Tensor, experts: list[int],
    num_experts: int, device: torch.device,
) -> torch.Tensor:
    """``[len(experts), *target.shape[1:]]``: row ``i`` is logical expert ``experts[i]``, transposed
    from the checkpoint's ``[rows, cols]`` layout."""
    row_shape = tuple(target.shape[1:])  # (D, 2F) or (F, D)
    data = torch.empty((len(experts), *row_shape), dtype=target.dtype, device=device)
    per_expert = all(name in checkpoint for name in mapping.expert_names(experts[0]))
    if not per_expert and mapping.fused is not None and mapping.fused in checkpoint:
        _expected_shape(checkpoint, mapping.fused, (num_experts, row_shape[1], row_shape[0]), mapping.ours)
        for slot, expert in enumerate(experts):
            data[slot].copy_(checkpoint.read(mapping.fused, slice(expert, expert + 1))[0].t())
        return data
    parts_per_expert = len(mapping.hf)
    for slot, expert in enumerate(experts):
        names = mapping.expert_names(expert)
        _require_keys(checkpoint, names, mapping.ours)
        for name in names:
            _expected_shape(checkpoint, name, (row_shape[1] // parts_per_expert, row_shape[0]), mapping.ours)
        rows = [checkpoint.read(name) for name in names]
        data[slot].copy_((rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)).t())
    return data


def _holders(model: nn.Module, tensor: torch.Tensor) -> Iterator[tuple[nn.Module, str, bool]]:
    """Every (module, attribute, is_parameter) that holds ``tensor`` (a tied weight has two)."""
    for module in model.modules():
        for name, value in module._parameters.items():
            if value is tensor:
                yield module, name, True
        for name, value in module._buffers.items():
            if value is tensor:
                yield module, name, False


@torch.no_grad()
def _install(model: nn.Module, target: torch.Tensor, data: torch.Tensor) -> None:
    """Put ``data`` where ``target`` is: in place when possible, else as a new tensor (meta targets)."""
    if target.device.type != "meta" and target.shape == data.shape:
        target.copy_(data)
        return
    if target.device.type != "meta":
        target.data = data.to(device=target.device, dtype=target.dtype)  # fewer expert rows, same Parameter
        return
    if isinstance(target, nn.Parameter):
        replacement: torch.Tensor = nn.Parameter(data, requires_grad=target.requires_grad)
        if is_expert_param(target):
            mark_expert_param(replacement)
    else:
        replacement = data
    for module, name, is_parameter in list(_holders(model, target)):
        (module._parameters if is_parameter else module._buffers)[name] = replacement


def materialize_meta_state(model: nn.Module, device: torch.device | str = "cpu") -> None:
    """Create what no checkpoint holds but a model built on the meta device left there: each MoE
    layer's load counters (zeros, as built) and, for a layer that routes on its own, a fresh
    :class:`~lightning_moe.layers.dispatch.LocalDispatcher` (its counters were made on the meta device).

    Raises:
        ValueError: another buffer is still on the meta device; its value is unknown here (e.g. the
            expert groups of device-limited routing: set them after loading).
    """
    unknown = []
    for module_name, module in model.named_modules():
        counters = module._non_persistent_buffers_set if isinstance(module, MoELayer) else set()
        for name, buffer in list(module._buffers.items()):
            if buffer is None or buffer.device.type != "meta":
                continue
            if name in counters:
                module._buffers[name] = torch.zeros(buffer.shape, dtype=buffer.dtype, device=device)
            else:
                unknown.append(f"{module_name}.{name}" if module_name else name)
        if isinstance(module, MoELayer) and type(module.dispatcher) is LocalDispatcher:
            module.dispatcher = LocalDispatcher(module.num_experts)
    if unknown:
        raise ValueError(
            f"load_pretrained_weights: buffers {unknown} are on the meta device and not in the checkpoint. Set them "
            f"after loading (for expert groups: call `gate.set_expert_groups` once the weights are loaded)."
        )


def load_pretrained_weights(
    model: nn.Module,
    path: str | Path,
    *,
    local_experts: dict[str, Sequence[int]] | None = None,
    device: torch.device | str = "cpu",
) -> LoadReport:
    """Fill ``model`` (a :class:`~lightning_moe.MoETransformer`, possibly on the meta device) from a
    transformers checkpoint directory, reading only the listed experts.

    Args:
        model: the model, built from the checkpoint's config (``MoETransformer.from_pretrained(path,
            load_weights=False)``); each tensor keeps its dtype (cast the meta model first to load in
            bf16; a DeepSeek-V3 gate's correction bias stays fp32).
        path: the checkpoint directory (``config.json`` and ``model.safetensors`` or a sharded
            ``model.safetensors.index.json``).
        local_experts: per MoE layer (module name, e.g. ``"blocks.1.ffn"``), the logical experts to
            load, in the order of the rows they get; ``None`` loads every expert of every layer.
            When given, it must name every MoE layer; a layer that routes on its own
            (``LocalDispatcher``) and gets every expert needs them in order (row ``e`` is expert
            ``e``). See the module docstring for the contract under expert parallelism.
        device: where tensors that were on the meta device are created.

    Returns:
        A :class:`LoadReport` with the bytes read.

    Raises:
        FileNotFoundError: no config.json or safetensors files.
        ValueError: the config's ``model_type`` is not supported, a tensor is missing, or a shape
            does not match (config and weights disagree).
    """
    device = torch.device(device)
    layers = {name: module for name, module in model.named_modules() if isinstance(module, MoELayer)}
    experts_of = _check_local_experts(layers, local_experts)
    checkpoint = SafetensorsCheckpoint(path)
    family = checkpoint.config["model_type"]
    mappings = hf_weight_mappings(model, family, moe_attribute=_moe_attribute(checkpoint, family))
    state = model.state_dict(keep_vars=True)
    used: set[str] = set()
    expert_keys: set[str] = set()
    for mapping in mappings:
        target = state[mapping.ours]
        if mapping.expert_layer is None:
            data = _read_dense(checkpoint, mapping, target).to(device=device, dtype=target.dtype)
            used.update(mapping.hf)
        else:
            experts = experts_of[mapping.expert_layer]
            layer = layers[mapping.expert_layer]
            if target.shape[0] not in (layer.num_experts, len(experts)):
                raise ValueError(
                    f"`{mapping.ours}` has {target.shape[0]} rows; load_pretrained_weights fills either all "
                    f"{layer.num_experts} experts or the {len(experts)} listed in `local_experts`."
                )
            data = _read_experts(checkpoint, mapping, target, experts, layer.num_experts, device)
            for expert in experts:
                used.update(mapping.expert_names(expert))
            for expert in range(layer.num_experts):
                expert_keys.update(mapping.expert_names(expert))
            if mapping.fused is not None:
                used.add(mapping.fused)
            layer.experts.num_experts = len(experts)
        _install(model, target, data)
    materialize_meta_state(model, device)
    left_on_meta = [name for name, tensor in model.state_dict(keep_vars=True).items() if tensor.device.type == "meta"]
    if left_on_meta:
        raise ValueError(f"load_pretrained_weights: {left_on_meta} were not loaded and are still on the meta device.")
    return LoadReport(
        bytes_read=checkpoint.bytes_read,
        checkpoint_bytes=checkpoint.total_bytes(),
        tensors_read=checkpoint.tensors_read,
        local_experts=experts_of,
        unused_keys=_check_unused(checkpoint, set(checkpoint.file_of) - used, expert_keys),
    )
