"""The ``lightning-moe`` command: LightningCLI's fit/validate/test, and a few commands of our own.

``lightning-moe fit --config recipes/quickstart.yaml`` trains what the recipe describes. The model
and data sections are in subclass mode, so a recipe names its classes::

    model:
      class_path: lightning_moe.MoETransformer
      init_args: {d_model: 128, num_experts: 8, gate: topk}
    data:
      class_path: lightning_moe.ByteCorpusDataModule

Commands that are not Lightning's (for example ``lightning-moe consolidate CKPT OUT``) are entries of
:data:`COMMANDS`, looked up before LightningCLI parses anything.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from lightning.pytorch.cli import LightningCLI

# Imported for its side effects too: strategies registered at import (`strategy: moe`) and the
# classes a recipe names by their short name resolve once the package is loaded.
import lightning_moe  # noqa: F401

#: Extra sub-commands: name -> function taking the remaining arguments (``argv`` after the name)
#: and returning an exit status (``None`` for success). Add an entry to add a command; import heavy
#: modules inside the function so that ``lightning-moe fit`` does not pay for them.
COMMANDS: dict[str, Callable[[list[str]], int | None]] = {}


def _consolidate(argv: list[str]) -> int:
    from lightning_moe.checkpoint import consolidate_main

    return consolidate_main(argv)


COMMANDS["consolidate"] = _consolidate


def _report(argv: list[str]) -> int:
    """``lightning-moe report LOGDIR --out FILE``: the expert load of a run as a PNG or HTML report."""
    from lightning_moe.report import main as report_main

    return report_main(argv)


COMMANDS["report"] = _report


def _upcycle(argv: list[str]) -> int:
    """``lightning-moe upcycle DENSE_DIR OUT --num-experts 8 --top-k 2 --method copy|split``: dense to MoE."""
    from lightning_moe.interop.upcycle import upcycle_main

    return upcycle_main(argv)


COMMANDS["upcycle"] = _upcycle


def _export(argv: list[str]) -> int:
    """``lightning-moe export CKPT OUT``: a Lightning checkpoint of an MoETransformer as a transformers
    checkpoint directory."""
    from lightning_moe.interop.hf_export import export_main

    return export_main(argv)


COMMANDS["export"] = _export


class MoELightningCLI(LightningCLI):
    """LightningCLI limited to fit, validate and test (no ``predict_step`` on our models)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name in ("fit", "validate", "test")}

    def add_arguments_to_parser(self, parser: Any) -> None:
        # The data decides the vocabulary (256 for bytes, a tokenizer's size otherwise): pass it to
        # the model once both are built, so a recipe cannot get them out of step.
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")


def _usage() -> str:
    extra = "".join(f"\n  {name}" for name in sorted(COMMANDS))
    return (
        "usage: lightning-moe {fit,validate,test} [--config FILE] [options]"
        + ("" if not COMMANDS else f"\n       lightning-moe COMMAND ARGS...\ncommands:{extra}")
        + "\nRun `lightning-moe fit --help` for the options of a Lightning command."
    )


def main(args: Sequence[str] | None = None) -> Any:
    """Run the ``lightning-moe`` command with ``args`` (``sys.argv[1:]`` by default).

    Returns what the extra command returned, or the :class:`LightningCLI` that ran.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    if argv and argv[0] in ("-h", "--help") and COMMANDS:
        print(_usage())
    # On CPU the main process is the fastest loader: Lightning's hint to add workers is noise here.
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    return MoELightningCLI(
        model_class=None,
        datamodule_class=None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        # None lets LightningCLI read sys.argv itself (it warns when given both).
        args=None if args is None else argv,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def console_main() -> int:
    """Entry point of the ``lightning-moe`` script: :func:`main`, with an exit status (0 unless an
    extra command returned a non-zero int), not the CLI object, for ``sys.exit``."""
    result = main()
    return result if isinstance(result, int) else 0
