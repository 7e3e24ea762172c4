"""``python -m lightning_moe``: the same as the ``lightning-moe`` command."""

from lightning_moe.cli import console_main

if __name__ == "__main__":
    raise SystemExit(console_main())
