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


def test_a_run_resumed_into_the_same_directory_reads_once_per_step(tmp_path):
    """Resumed from step 2 with the same TensorBoard version: the second event file writes steps 4
    and 6 again. The report reads each step once, in order, the resumed run's value (it read
    2, 4, 6, 4, 6)."""
    def fit(max_steps, seed, ckpt_path=None):
        torch.manual_seed(seed)
        logger = TensorBoardLogger(tmp_path, name="tb", version=0)
        run = trainer(tmp_path, ExpertLoadMonitor(every_n_steps=2, log_images=False), max_steps=max_steps, logger=logger)
        run.fit(TinyMoE(), loader(seed=seed), ckpt_path=ckpt_path)
        return run

    fit(6, seed=0)
    first = trainer(tmp_path, ExpertLoadMonitor(every_n_steps=2, log_images=False), max_steps=2)
    first.fit(TinyMoE(), loader(seed=1))
    first.save_checkpoint(tmp_path / "step2.ckpt")
    resumed = fit(6, seed=1, ckpt_path=tmp_path / "step2.ckpt")
    run = read_run(tmp_path / "tb" / "version_0")
    steps, values = run.scalars["moe/layer0/max_vio"]
    assert steps.tolist() == [2, 4, 6] and run.expert_load[0][0].tolist() == [2, 4, 6]
    monitor = next(c for c in resumed.callbacks if isinstance(c, ExpertLoadMonitor))
    assert values[-1] == pytest.approx(monitor.latest_metrics["moe/layer0/max_vio"])


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
    with pytest.raises(ValueError, match="`--run` 'nope' is not a directory.*version_0"):
        build_report(logdir, tmp_path / "report.png", run="nope")


def test_migrations_are_marked(tmp_path):
    """Steps where ExpertMigration moved a layer get dashed lines in the plots; the HTML page lists
    them with their figures and shows the latest placement image of each layer."""
    import numpy as np
    from torch.utils.tensorboard import SummaryWriter

    from lightning_moe.callbacks.plots import render_placement
    from lightning_moe.report import _overview_figure

    run_dir = tmp_path / "lightning_logs" / "version_0"
    writer = SummaryWriter(run_dir)
    for step in (2, 4, 6, 8):
        writer.add_scalar("moe/layer0/max_vio", 1.0 if step <= 4 else 0.1, step)
        writer.add_scalar("moe/migration/layers_moved", 1.0 if step == 4 else 0.0, step)
        writer.add_scalar("moe/migration/experts_moved", 3.0 if step == 4 else 0.0, step)
        writer.add_scalar("moe/migration/bytes", 3 * 2**20 if step == 4 else 0.0, step)
        writer.add_scalar("moe/migration/predicted_max_over_mean_before", 1.8, step)
        writer.add_scalar("moe/migration/predicted_max_over_mean_after", 1.1, step)
    for field, value in (("intra_node_bandwidth", 3.8e9), ("intra_node_latency", 93e-6)):  # one node: no inter
        writer.add_scalar(f"moe/migration/{field}", value, 0)  # ExpertMigration(measure_links=...)
    image = render_placement(np.array([[30.0, 10, 0], [30, 0, 20]]), np.array([[1, 1, 0], [1, 0, 1]], bool), step=4)
    writer.add_image("moe/layer0/placement", image, global_step=4, dataformats="HWC")
    writer.close()

    run = read_run(run_dir)
    assert run.migration_steps().tolist() == [4]
    marked = [line for line in _overview_figure(run).axes[0].lines if line.get_label() == "expert migration"]
    assert len(marked) == 1 and marked[0].get_xdata()[0] == 4
    page = build_report(tmp_path / "lightning_logs", tmp_path / "report.html").read_text()
    assert "<h2>Expert migrations</h2>" in page
    assert "<tr><td>4</td><td>1</td><td>3</td><td>3.00</td><td>1.80 &rarr; 1.10</td>" in page
    assert "moe/layer0/placement, step 4" in page
    assert "Links measured when training started, which the planner used: 3.80 GB/s and 93 us inside a node.</p>" in page
    assert main([str(tmp_path / "lightning_logs"), "--out", str(tmp_path / "report.png")]) == 0
