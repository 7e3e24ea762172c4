"""`lightning-moe report LOGDIR --out FILE` renders the monitor's event files into PNG or HTML."""

from __future__ import annotations

import base64
import re

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.image import imread

from lightning_moe import ExpertLoadMonitor
from lightning_moe.report import build_report, main, read_run
from test_expert_load import TinyMoE, loader, trainer


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    logger = TensorBoardLogger(root, name="lightning_logs")
    trainer(root, ExpertLoadMonitor(every_n_steps=2, image_every_n_steps=2), max_steps=6, logger=logger).fit(TinyMoE(), loader())
    return root / "lightning_logs"


def test_read_run_finds_what_the_monitor_wrote(logdir):
    run = read_run(next(logdir.iterdir()))
    assert sorted(run.layer_scalars("max_vio")) == [0, 1]
    assert run.scalars["moe/max_vio"][0].tolist() == [2, 4, 6]
    steps, load_SE = run.expert_load[1]
    assert steps.tolist() == [2, 4, 6] and load_SE.shape == (3, 6)
    assert (load_SE.sum(axis=1) == 2 * 4 * 5 * 1).all()  # two batches of 4 x 5 tokens, top-1
    assert {tag: step for tag, (step, _) in run.images.items()} == {"moe/load_heatmap": 6}


def test_png_report(logdir, tmp_path):
    out = tmp_path / "report.png"
    assert main([str(logdir), "--out", str(out)]) == 0
    image = imread(out)
    assert image.shape[0] > 500 and image.shape[1] > 800
    assert image[..., :3].std() > 0.05  # not a blank page


def test_lightning_moe_report_command(logdir, tmp_path):
    from lightning_moe.cli import main as lightning_moe

    out = tmp_path / "via_cli.html"
    assert lightning_moe(["report", str(logdir), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000


def test_html_report(logdir, tmp_path):
    out = build_report(logdir, tmp_path / "report.html")
    page = out.read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3  # overview, load over time, heatmap (no EP traffic in one process)
    assert all(base64.b64decode(data).startswith(b"\x89PNG") for data in images)
    assert "moe/layer1/max_vio" in page and "moe/load_heatmap" in page


def test_report_errors_name_the_fix(logdir, tmp_path):
    with pytest.raises(ValueError, match=r"\.png or \.html"):
        build_report(logdir, tmp_path / "report.pdf")
    with pytest.raises(ValueError, match="ExpertLoadMonitor"):
        build_report(tmp_path, tmp_path / "report.png")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing"), "--out", str(tmp_path / "r.png")])
