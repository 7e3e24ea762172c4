"""Write a :class:`~lightning_moe.MoETransformer` as a transformers checkpoint directory, and the
``lightning-moe export CKPT OUT`` command that does it for a Lightning checkpoint.

The directory holds ``config.json`` (the source config updated with the model's architecture, or
a new one for a model trained from scratch; see
:func:`~lightning_moe.interop.hf_config.hf_config_from_model`), safetensors weights in the
per-expert layout transformers writes (sharded with an index past ``max_shard_size``) and, when
the model was read from a checkpoint directory that still exists, its tokenizer and generation
files.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_moe.interop.hf_config import hf_config_from_model
from lightning_moe.interop.hf_load import INDEX_FILE, SINGLE_FILE
from lightning_moe.interop.hf_model import resolve_dtype
from lightning_moe.interop.hf_weights import WeightMapping, empty_shared_expert, hf_weight_mappings
from lightning_moe.layers.dispatch import LocalDispatcher
from lightning_moe.layers.moe import MoELayer

#: Files copied from the source checkpoint directory besides the weights and config.json.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"5GB"`` or ``"500MiB"``."""
    if isinstance(size, int) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(size).upper())
    if not match:
        raise ValueError(f"`max_shard_size` must be a byte count or a size such as '5GB' or '500MiB', got {size!r}.")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or "B"])


def _hf_tensors(
    state: dict[str, torch.Tensor], mappings: list[WeightMapping], dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint tensors of our tensors (the inverse of the loader's mapping), one at a time."""
    for mapping in mappings:
        ours = state[mapping.ours].detach()
        # The correction bias stays fp32, as transformers keeps it (`_keep_in_fp32_modules_strict`).
        target_dtype = torch.float32 if mapping.ours.endswith("gate.expert_bias") else dtype
        if mapping.expert_layer is None:
            for name, part in zip(mapping.hf, ours.chunk(len(mapping.hf), dim=0)):
                yield name, part.to(device="cpu", dtype=target_dtype).contiguous()
            continue
        for expert in range(ours.shape[0]):
            rows = ours[expert].t()  # [rows of all parts, cols]
            for name, part in zip(mapping.expert_names(expert), rows.chunk(len(mapping.hf), dim=0)):
                yield name, part.to(device="cpu", dtype=target_dtype).contiguous()


def _shards(named_tensors: Iterator[tuple[str, torch.Tensor]], limit: int) -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive groups of tensors of at most ``limit`` bytes each (a bigger tensor alone), so that
    only one group of copies is held at a time."""
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > limit:
            yield shard
            shard, size = {}, 0
        shard[name] = tensor
        size += nbytes
    yield shard


def _experts_by_slot(layer: MoELayer) -> list[int] | None:
    """The logical expert each row (slot) of ``layer``'s expert weights holds, as its dispatcher routes
    them; ``None`` for a dispatcher that does not say."""
    dispatcher = layer.dispatcher
    if isinstance(dispatcher, LocalDispatcher):
        if dispatcher.slot_of_expert_E is None:
            return list(range(dispatcher.num_experts))
        return torch.argsort(dispatcher.slot_of_expert_E).tolist()
    placement = getattr(dispatcher, "placement", None)  # the expert-parallel dispatcher's
    return None if placement is None else placement.experts_on_rank(dispatcher.ep_rank)


def _check_unsharded(model: Any) -> None:
    """Every MoE layer holds all of its experts, row e holding expert e (the checkpoint's order)."""
    for name, module in model.named_modules():
        if not isinstance(module, MoELayer):
            continue
        if module.experts.num_experts != module.num_experts:
            experts = module.experts
            raise ValueError(
                f"save_pretrained: MoE layer `{name}` holds {experts.num_experts} of its {module.num_experts} experts "
                f"(expert parallelism). Export from a checkpoint instead: `lightning-moe export CKPT OUT` gathers "
                f"every expert."
            )
        by_slot = _experts_by_slot(module)
        if by_slot is not None and by_slot != list(range(module.num_experts)):
            raise ValueError(
                f"save_pretrained: the expert rows of MoE layer `{name}` hold the logical experts {by_slot} (its "
                f"dispatcher's slot order), and a transformers checkpoint stores expert e at index e: they would be "
                f"written permuted. Put the rows in logical order first (row e = expert e, with "
                f"`LocalDispatcher({module.num_experts})`); under expert parallelism, export from a checkpoint "
                f"instead: `lightning-moe export CKPT OUT` gathers every expert into its place."
            )


def save_pretrained(
    model: Any,
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = "5GB",
    copy_tokenizer: bool = True,
) -> Path:
    """Write ``model`` as a transformers checkpoint directory (``AutoModelForCausalLM.from_pretrained``
    loads it and computes the same logits).

    Args:
        model: an :class:`~lightning_moe.MoETransformer` holding all of its experts.
        path: the directory to write (created; files of the same names are replaced).
        dtype: dtype of the written weights; the model's by default.
        max_shard_size: the largest weight file; bigger models are split into
            ``model-0000i-of-0000n.safetensors`` files with a ``model.safetensors.index.json``.
        copy_tokenizer: copy tokenizer and generation files from the directory the model was read
            from (``hf_source``), when it still exists.

    Returns:
        ``path``.

    Raises:
        ValueError: the model's options cannot be expressed by a supported transformers family
            (the message names each), or its experts are sharded or not in logical order.
    """
    from safetensors.torch import save_file

    _check_unsharded(model)
    dtype = resolve_dtype(dtype) or model.embed.weight.dtype
    config = hf_config_from_model(model, dtype_name=str(dtype).removeprefix("torch."))
    family = config["model_type"]
    mappings = hf_weight_mappings(model, family)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, list[str]]] = []
    total = 0
    tensors = _hf_tensors(model.state_dict(keep_vars=True), mappings, dtype)
    no_shared_expert = {"qwen2_moe": "shared_expert_intermediate_size", "deepseek_v3": "n_shared_experts"}
    if family in no_shared_expert and not config[no_shared_expert[family]]:
        # No shared expert: the empty one transformers builds for width 0 (as `upcycle` writes it).
        empty = [empty_shared_expert(family, index, model.hparams.d_model, dtype)
                 for index, block in enumerate(model.blocks) if block.is_moe]
        tensors = itertools.chain(tensors, *empty)
    for shard in _shards(tensors, parse_size(max_shard_size)):
        file = path / f".lightning-moe-shard-{len(written):05d}.tmp"
        save_file(shard, str(file), metadata={"format": "pt"})
        written.append((file, list(shard)))
        total += sum(tensor.numel() * tensor.element_size() for tensor in shard.values())
    for stale in [*path.glob("model-*-of-*.safetensors"), path / SINGLE_FILE, path / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    if len(written) == 1:
        written[0][0].replace(path / SINGLE_FILE)
    else:
        weight_map = {}
        for number, (file, keys) in enumerate(written, start=1):
            name = f"model-{number:05d}-of-{len(written):05d}.safetensors"
            file.replace(path / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if copy_tokenizer:
        _copy_tokenizer(model, path)
    return path


def _copy_tokenizer(model: Any, path: Path) -> None:
    source = model.hparams.get("hf_source")
    if not source:
        return
    source = Path(source)
    if not source.is_dir():
        warnings.warn(
            f"save_pretrained: the source checkpoint {source} is gone, so no tokenizer files were copied to {path}. "
            f"Copy them by hand.",
            stacklevel=3,
        )
        return
    if source.resolve() == path.resolve():
        return
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, path / name)


def load_lightning_checkpoint(checkpoint: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint of an ``MoETransformer`` as a dict, from a single file or from a
    :class:`~lightning_moe.MoEStrategy` checkpoint directory at any expert-parallel layout (every
    expert read whole). Read with ``weights_only=True``."""
    from lightning_moe.checkpoint import read_full_checkpoint

    if not Path(checkpoint).exists():
        raise FileNotFoundError(f"{checkpoint} does not exist. Pass a .ckpt file or a checkpoint directory.")
    return read_full_checkpoint(checkpoint)


def export_checkpoint(
    checkpoint: str | Path, output: str | Path, *, dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write the ``MoETransformer`` of a Lightning checkpoint as a transformers checkpoint directory.

    Args:
        checkpoint: a ``.ckpt`` file, or a checkpoint directory saved by ``MoEStrategy``.
        output: the directory to write.
        dtype: dtype of the written weights; the checkpoint's by default.
        max_shard_size: see :func:`save_pretrained`.
    """
    from lightning_moe.model import MoETransformer

    saved = load_lightning_checkpoint(checkpoint)
    if "hyper_parameters" not in saved or "state_dict" not in saved:
        raise ValueError(
            f"{checkpoint} has no hyper-parameters or state_dict: it is not a Lightning checkpoint of an "
            f"MoETransformer."
        )
    # What LightningCLI adds to the hyper-parameters (`_class_path`, `_instantiator`) is not an argument.
    arguments = {key: value for key, value in saved["hyper_parameters"].items() if not key.startswith("_")}
    with torch.device("meta"):
        model = MoETransformer(**arguments)
    # assign=True: the meta tensors are replaced by the checkpoint's, with no second copy.
    model.load_state_dict(saved["state_dict"], strict=True, assign=True)
    if model.hparams.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return save_pretrained(model, output, dtype=dtype or model.embed.weight.dtype, max_shard_size=max_shard_size)


def export_main(argv: Sequence[str]) -> int:
    """``lightning-moe export CKPT OUT [--dtype bfloat16] [--max-shard-size 5GB]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="lightning-moe export",
        description="Write the MoETransformer of a Lightning checkpoint (a .ckpt file or an MoEStrategy checkpoint "
        "directory) as a transformers checkpoint directory that AutoModelForCausalLM.from_pretrained loads.",
    )
    parser.add_argument("checkpoint", help="a .ckpt file or an MoEStrategy checkpoint directory")
    parser.add_argument("output", help="directory to write (config.json, safetensors, tokenizer files)")
    parser.add_argument("--dtype", default=None, help="dtype of the written weights (default: the checkpoint's)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest weight file (default: 5GB)")
    from lightning_moe.checkpoint.layout import CheckpointError

    args = parser.parse_args(list(argv))
    try:
        output = export_checkpoint(args.checkpoint, args.output, dtype=args.dtype, max_shard_size=args.max_shard_size)
    except (CheckpointError, FileNotFoundError, ValueError) as error:  # a wrong path or option: exit 2
        parser.error(str(error))
    print(f"wrote {output}")
    return 0
