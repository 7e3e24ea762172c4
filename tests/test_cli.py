"""The ``lightning-moe`` command: the quickstart recipe trains, a gate given by class_path, extra commands."""

from __future__ import annotations

import math
import runpy
import sys
from pathlib import Path

import pytest

from lightning_moe import ByteCorpusDataModule, MoETransformer
from lightning_moe import cli
from lightning_moe.layers.gates import TopKGate

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def fit_args(tmp_path: Path, *extra: str, max_steps: int = 3) -> list[str]:
    return [
        "fit",
        "--config",
        str(QUICKSTART),
        *extra,
        f"--trainer.max_steps={max_steps}",
        "--trainer.limit_val_batches=2",
        f"--trainer.val_check_interval={max_steps}",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--data.init_args.cache_dir={tmp_path / 'cache'}",
        "--data.init_args.max_bytes=300000",
    ]


def test_quickstart_recipe_trains_a_few_steps(tmp_path):
    run = cli.main(fit_args(tmp_path))
    trainer, model = run.trainer, run.model
    assert isinstance(model, MoETransformer) and isinstance(run.datamodule, ByteCorpusDataModule)
    assert model.hparams.d_model == 128 and model.hparams.num_experts == 8 and model.hparams.top_k == 2
    assert trainer.global_step == 3
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["val_loss"])) and float(metrics["val_loss"]) < 6.0
    assert float(metrics["val_ppl"]) == pytest.approx(math.exp(float(metrics["val_loss"])), rel=1e-3)
    assert "train/load_balance_loss" in metrics
    log_dir = Path(trainer.logger.log_dir)
    assert list(log_dir.glob("events.out.tfevents.*")) and (log_dir / "config.yaml").exists()
    # The vocabulary comes from the data (linked), and the checkpoint reloads through the CLI's record.
    checkpoint = next((log_dir / "checkpoints").glob("*.ckpt"))
    reloaded = MoETransformer.load_from_checkpoint(checkpoint)
    assert reloaded.hparams.vocab_size == 256 and reloaded.hparams.d_model == 128
    # `--ckpt_path` on the command line: LightningCLI reads the model's class from the checkpoint's
    # hyper-parameters (it refused them, as a plain LightningModule's), and resumes or validates.
    validated = cli.main(["validate", "--config", str(QUICKSTART), f"--ckpt_path={checkpoint}",
                          "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false",
                          f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
                          f"--data.init_args.cache_dir={tmp_path / 'cache'}", "--data.init_args.max_bytes=300000"])
    assert float(validated.trainer.callback_metrics["val_loss"]) == pytest.approx(float(metrics["val_loss"]), rel=1e-5)
    resumed = cli.main(fit_args(tmp_path, f"--ckpt_path={checkpoint}", max_steps=4))
    assert resumed.trainer.global_step == 4


def test_gate_given_by_class_path_in_yaml(tmp_path):
    override = tmp_path / "gate.yaml"
    override.write_text(
        "model:\n"
        "  init_args:\n"
        "    n_layers: 2\n"
        "    gate:\n"
        "      class_path: lightning_moe.layers.gates.TopKGate\n"
        "      init_args:\n"
        "        top_k: 1\n"
        "        z_loss_coef: 0.001\n"
    )
    run = cli.main(fit_args(tmp_path, "--config", str(override), max_steps=1))
    gates = [block.ffn.gate for block in run.model.blocks]
    assert len(gates) == 2 and all(isinstance(gate, TopKGate) and gate.top_k == 1 for gate in gates)
    assert gates[0] is not gates[1]
    assert "train/z_loss" in run.trainer.callback_metrics


def test_extra_commands_run_before_lightning(monkeypatch):
    calls = []
    monkeypatch.setitem(cli.COMMANDS, "echo", lambda argv: calls.append(argv) or 7)
    assert cli.main(["echo", "a", "--b"]) == 7
    assert calls == [["a", "--b"]]


def test_only_fit_validate_test_are_lightning_commands():
    assert set(cli.MoELightningCLI.subcommands()) == {"fit", "validate", "test"}


def test_python_dash_m_shows_help(monkeypatch, capsys):
    # `python -m lightning_moe fit --help`, run in this process (a fresh interpreter costs ~10 s of imports).
    monkeypatch.setattr(sys, "argv", ["lightning_moe", "fit", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("lightning_moe", run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--model" in out and "--data" in out and "--trainer" in out


@pytest.mark.parametrize("command", ["consolidate", "export"])
def test_a_wrong_checkpoint_path_is_a_usage_error(tmp_path, command, capsys):
    """As `report` and `upcycle`: the message and exit status 2, not a traceback."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, str(tmp_path / "missing.ckpt"), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "missing.ckpt" in capsys.readouterr().err
