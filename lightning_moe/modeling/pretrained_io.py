"""Reading and writing an :class:`~lightning_moe.MoETransformer`'s weights from outside its training:
transformers checkpoints in and out, a model built on the meta device until its weights are read,
and Lightning checkpoints saved as directories by :class:`~lightning_moe.MoEStrategy`.

:class:`PretrainedIO` is a mixin of ``MoETransformer`` (the model's own methods stay in
:mod:`lightning_moe.model`).
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch

from lightning_moe.checkpoint import is_sharded_checkpoint, load_from_checkpoint

OWNER = "MoETransformer"


class PretrainedIO:
    """Pretrained weights in and out for a LightningModule built like :class:`~lightning_moe.MoETransformer`
    (``hf_config`` / ``hf_source`` hyper-parameters, ``_pretrained_source`` while weights are pending)."""

    _pretrained_source: str | None

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # A model built with `pretrained` holds meta tensors until its weights are read. A dtype cast
        # works on them; a device move cannot (no data to move) and is skipped: the weights are read
        # onto the CPU and moved with the model afterwards. Without this, Lightning's teardown after an
        # early error (`model.cpu()`) would hide that error behind "Cannot copy out of meta tensor".
        if getattr(self, "_pretrained_source", None) is None:
            return super()._apply(fn, recurse)
        try:
            return super()._apply(fn, recurse)
        except NotImplementedError:
            return self

    def configure_model(self) -> None:
        """Read the weights of a model built with ``pretrained`` (on the meta device), unless the
        strategy reads each rank's share itself (:class:`~lightning_moe.MoEStrategy` reads only a rank's
        own experts, after sharding)."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if self._pretrained_source is not None and not getattr(strategy, "reads_local_experts", False):
            self.load_pretrained_weights()

    def load_pretrained_weights(self, local_experts: dict[str, list[int]] | None = None) -> Any:
        """Fill a model built with ``pretrained`` from its checkpoint directory: dense weights, and the
        listed logical experts of each MoE layer (all when ``None``). Returns the load report (bytes
        read). See :func:`lightning_moe.interop.load_pretrained_weights`."""
        from lightning_moe.interop.hf_load import load_pretrained_weights

        if self._pretrained_source is None:
            raise RuntimeError(
                f"{OWNER}.load_pretrained_weights: this model was not built with `pretrained` (or its weights were "
                f"read already)."
            )
        report = load_pretrained_weights(self, self._pretrained_source, local_experts=local_experts)
        self._pretrained_source = None
        return report

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: Any, map_location: Any = None, hparams_file: Any = None, strict: bool | None = None,
        **kwargs: Any,
    ) -> MoETransformer:
        """Lightning's ``load_from_checkpoint``, which also takes a checkpoint *directory* written by
        :class:`~lightning_moe.MoEStrategy` at any expert-parallel layout (read whole, every expert, in
        this process; see :func:`lightning_moe.load_from_checkpoint`)."""
        if isinstance(checkpoint_path, (str, os.PathLike)) and is_sharded_checkpoint(checkpoint_path):
            return load_from_checkpoint(cls, checkpoint_path, map_location=map_location, hparams_file=hparams_file,
                                        strict=strict, **kwargs)
        return super().load_from_checkpoint(checkpoint_path, map_location=map_location, hparams_file=hparams_file,
                                            strict=strict, **kwargs)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, load_weights: bool = True, dtype: torch.dtype | str | None = None, **overrides: Any
    ) -> MoETransformer:
        """The model of a local transformers checkpoint directory (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
        DeepSeek-V3); see :func:`lightning_moe.interop.hf_model.from_pretrained`."""
        from lightning_moe.interop.hf_model import from_pretrained

        return from_pretrained(path, load_weights=load_weights, dtype=dtype, model_class=cls, **overrides)

    def save_pretrained(self, path: str | Path, **kwargs: Any) -> Path:
        """Write a transformers checkpoint directory that ``AutoModelForCausalLM.from_pretrained`` loads;
        see :func:`lightning_moe.interop.hf_export.save_pretrained`."""
        from lightning_moe.interop.hf_export import save_pretrained

        return save_pretrained(self, path, **kwargs)



def init_defaults(module_class: type) -> dict[str, Any]:
    """The defaults of ``module_class.__init__`` (an argument equal to its default was not set)."""
    return {
        name: parameter.default
        for name, parameter in inspect.signature(module_class.__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
