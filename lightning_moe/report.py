"""``lightning-moe report LOGDIR --out FILE``: expert load from TensorBoard event files, as PNG or HTML.

For people who will not open TensorBoard: reads what :class:`~lightning_moe.ExpertLoadMonitor`
wrote (with tensorboard's ``EventAccumulator``) and renders, with matplotlib, MaxVio over time per
layer, drops and dead experts, the load of every expert over time per layer (from the
``tokens_per_expert`` histograms), and the latest layers x experts heatmap and EP traffic images.
The steps at which :class:`~lightning_moe.ExpertMigration` moved experts are marked with dashed
lines; the HTML page also lists the migrations and shows the latest placement of each layer.
``.png`` gives one image; ``.html`` a self-contained page with the images embedded in base64 and
a table of the latest values.

Shape legend: ``E`` experts of a layer, ``S`` logged steps.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imread

_EVENT_FILE = "events.out.tfevents.*"
_LAYER_TAG = re.compile(r"^moe/layer(\d+)/(.+)$")
_IMAGE_TAGS = ("moe/load_heatmap", "moe/ep_traffic")
_PLACEMENT_TAG = re.compile(r"^moe/layer(\d+)/placement$")
_MIGRATION = "moe/migration/"


@dataclass
class RunLog:
    """What the monitor logged in one run directory.

    Attributes:
        path: the run directory.
        scalars: tag -> ``(steps, values)``.
        expert_load: layer index -> ``(steps [S], tokens per expert [S, E])`` from the histograms.
        images: tag -> ``(step, PNG bytes)`` of the latest image.
    """

    path: Path
    scalars: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    expert_load: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    images: dict[str, tuple[int, bytes]] = field(default_factory=dict)

    def migration_series(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of ``moe/migration/{name}`` (empty when it was not logged)."""
        return self.scalars.get(f"{_MIGRATION}{name}", (np.array([]), np.array([])))

    def migration_steps(self) -> np.ndarray:
        """Steps at which :class:`~lightning_moe.ExpertMigration` moved at least one layer."""
        steps, values = self.migration_series("layers_moved")
        return steps[values > 0]

    def layer_scalars(self, name: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """``moe/layer{i}/{name}`` by layer index."""
        found = {}
        for tag, series in self.scalars.items():
            match = _LAYER_TAG.match(tag)
            if match and match.group(2) == name:
                found[int(match.group(1))] = series
        return dict(sorted(found.items()))


def find_runs(logdir: Path) -> list[Path]:
    """Directories under ``logdir`` (itself included) that hold TensorBoard event files, oldest first."""
    runs = {path.parent for path in logdir.rglob(_EVENT_FILE)}
    return sorted(runs, key=lambda run: max(f.stat().st_mtime for f in run.glob(_EVENT_FILE)))


def read_run(run_dir: Path) -> RunLog:
    """Read the ``moe/`` scalars, histograms and latest images of one run directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # 0 keeps every event; images keep only a few, and the reservoir always holds the newest.
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0, "images": 4})
    accumulator.Reload()
    tags = accumulator.Tags()
    run = RunLog(path=run_dir)
    for tag in tags.get("scalars", []):
        if tag.startswith("moe/"):
            events = _last_per_step(accumulator.Scalars(tag))
            run.scalars[tag] = (np.array([e.step for e in events]), np.array([e.value for e in events]))
    for tag in tags.get("histograms", []):
        match = _LAYER_TAG.match(tag)
        if match and match.group(2) == "tokens_per_expert":
            events = _last_per_step(accumulator.Histograms(tag))
            width = max(len(e.histogram_value.bucket) for e in events)
            load_SE = np.zeros((len(events), width))
            for row, event in enumerate(events):
                counts = event.histogram_value.bucket
                load_SE[row, : len(counts)] = counts
            run.expert_load[int(match.group(1))] = (np.array([e.step for e in events]), load_SE)
    for tag in tags.get("images", []):
        if tag in _IMAGE_TAGS or _PLACEMENT_TAG.match(tag):
            latest = accumulator.Images(tag)[-1]
            run.images[tag] = (latest.step, latest.encoded_image_string)
    return run


def _last_per_step(events: list) -> list:
    """``events`` in step order, the last one written for each step: a run resumed into the same
    directory writes the steps after its checkpoint again, in a new event file read after the first."""
    latest = {event.step: event for event in events}
    return [latest[step] for step in sorted(latest)]


def _plot_layer_lines(axes, series: dict[int, tuple[np.ndarray, np.ndarray]], title: str) -> None:
    for index, (steps, values) in series.items():
        axes.plot(steps, values, marker="." if len(steps) < 30 else None, label=f"layer {index}")
    axes.set_title(title, fontsize=10)
    axes.set_xlabel("step")
    axes.grid(alpha=0.3)
    if 0 < len(series) <= 12:
        axes.legend(fontsize=7, ncol=2)


def _mark_migrations(axes, positions: Sequence[float]) -> None:
    """Dashed vertical lines where experts were migrated."""
    for number, position in enumerate(positions):
        axes.axvline(position, color="black", linestyle="--", linewidth=0.8, alpha=0.6,
                     label="expert migration" if number == 0 else None)


def _plot_overview(axes_vio, axes_vio_run, axes_waste, run: RunLog) -> None:
    migrations = run.migration_steps()
    _mark_migrations(axes_vio, migrations)
    _plot_layer_lines(axes_vio, run.layer_scalars("max_vio"), "MaxVio per window ((max - mean) / mean)")
    _plot_layer_lines(axes_vio_run, run.layer_scalars("max_vio_run"), "MaxVio since the start of training")
    _mark_migrations(axes_waste, migrations)
    for tag, label in (("moe/dead_experts", "dead experts (all layers)"), ("moe/dropped_fraction", "dropped fraction")):
        if tag in run.scalars:
            steps, values = run.scalars[tag]
            axes_waste.plot(steps, values, label=label)
    axes_waste.set_title("Dead experts and dropped assignments", fontsize=10)
    axes_waste.set_xlabel("step")
    axes_waste.grid(alpha=0.3)
    axes_waste.legend(fontsize=7)


def _plot_expert_load(axes, index: int, steps_S: np.ndarray, load_SE: np.ndarray, migrations: np.ndarray = ()):
    """Load of each expert over time relative to the mean of its step (1.0 = balanced); dashed lines
    between the columns before and after each expert migration."""
    mean_S = load_SE.mean(axis=1, keepdims=True)
    relative_ES = np.divide(load_SE, mean_S, out=np.zeros_like(load_SE), where=mean_S > 0).T
    image = axes.imshow(
        relative_ES,
        aspect="auto",
        cmap="RdBu_r",
        vmin=0.0,
        vmax=2.0,
        interpolation="nearest",
        extent=(-0.5, len(steps_S) - 0.5, relative_ES.shape[0] - 0.5, -0.5),
    )
    ticks = np.linspace(0, len(steps_S) - 1, num=min(len(steps_S), 8)).round().astype(int)
    axes.set_xticks(ticks)
    axes.set_xticklabels([str(steps_S[t]) for t in ticks], fontsize=7)
    axes.set_ylabel("expert", fontsize=8)
    axes.set_title(f"layer {index}: tokens per expert / mean over time", fontsize=9)
    _mark_migrations(axes, [np.searchsorted(steps_S, step, side="right") - 0.5 for step in migrations])
    return image


def _figure_png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


def _overview_figure(run: RunLog) -> Figure:
    figure = Figure(figsize=(15, 4), dpi=90)
    axes = figure.subplots(1, 3)
    _plot_overview(*axes, run)
    figure.tight_layout()
    return figure


def _expert_load_figure(run: RunLog) -> Figure | None:
    if not run.expert_load:
        return None
    layers = sorted(run.expert_load)
    columns = 2 if len(layers) > 1 else 1
    rows = -(-len(layers) // columns)
    figure = Figure(figsize=(15, 2.4 * rows), dpi=90)
    for position, index in enumerate(layers):
        axes = figure.add_subplot(rows, columns, position + 1)
        image = _plot_expert_load(axes, index, *run.expert_load[index], run.migration_steps())
        figure.colorbar(image, ax=axes, fraction=0.03, pad=0.01)
    figure.tight_layout()
    return figure


def render_png(run: RunLog, out: Path) -> None:
    """One PNG: the overview plots, the load of each expert over time per layer, the latest images."""
    parts = [_figure_png(_overview_figure(run))]
    load_figure = _expert_load_figure(run)
    if load_figure is not None:
        parts.append(_figure_png(load_figure))
    images = [imread(io.BytesIO(png), format="png") for png in parts]
    latest = [
        (tag, *run.images[tag][:1], imread(io.BytesIO(run.images[tag][1]), format="png"))
        for tag in _IMAGE_TAGS
        if tag in run.images
    ]
    width_px = max(image.shape[1] for image in images)
    heights_px = [image.shape[0] for image in images] + ([max(i.shape[0] for _, _, i in latest) + 40] if latest else [])
    dpi = 90
    figure = Figure(figsize=(width_px / dpi, sum(heights_px) / dpi), dpi=dpi)
    grid = figure.add_gridspec(len(heights_px), max(1, len(latest)), height_ratios=heights_px, hspace=0.06)
    for row, image in enumerate(images):
        axes = figure.add_subplot(grid[row, :])
        axes.imshow(image)
        axes.axis("off")
    for column, (tag, step, image) in enumerate(latest):
        axes = figure.add_subplot(grid[len(images), column])
        axes.imshow(image)
        axes.set_title(f"{tag} (latest, step {step})", fontsize=9)
        axes.axis("off")
    figure.subplots_adjust(left=0.0, right=1.0, top=1.0, bottom=0.0)
    FigureCanvasAgg(figure).print_png(str(out))


def render_html(run: RunLog, out: Path) -> None:
    """A self-contained HTML page: the plots and latest images in base64, and the latest values."""

    def img(png: bytes, alt: str) -> str:
        return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'

    body = [f"<h1>Expert load: {html.escape(str(run.path))}</h1>", "<h2>Balance over time</h2>"]
    body.append(img(_figure_png(_overview_figure(run)), "MaxVio, dead experts and drops over time"))
    load_figure = _expert_load_figure(run)
    if load_figure is not None:
        body += ["<h2>Tokens per expert over time</h2>", img(_figure_png(load_figure), "load per expert over time")]
    body += _migration_section(run, img)
    if run.images:
        body.append("<h2>Latest heatmaps</h2>")
        for tag in (tag for tag in _IMAGE_TAGS if tag in run.images):
            step, png = run.images[tag]
            body.append(f"<figure>{img(png, tag)}<figcaption>{html.escape(tag)}, step {step}</figcaption></figure>")
    rows = [
        f"<tr><td>{html.escape(tag)}</td><td>{int(steps[-1])}</td><td>{values[-1]:.4g}</td></tr>"
        for tag, (steps, values) in sorted(run.scalars.items())
        if len(steps)
    ]
    body += ["<h2>Latest values</h2>", "<table><tr><th>tag</th><th>step</th><th>value</th></tr>", *rows, "</table>"]
    style = "body{font-family:sans-serif;margin:2em}img{max-width:100%}td,th{padding:2px 12px;text-align:left}"
    page = f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>lightning-moe report</title><style>{style}</style></head><body>"
    out.write_text(page + "\n".join(body) + "</body></html>\n", encoding="utf-8")


def _measured_links(run: RunLog) -> list[str]:
    """HTML: the links ExpertMigration measured when training started (``measure_links``), if it did."""
    def first(name: str) -> float | None:
        values = run.migration_series(name)[1]
        return float(values[0]) if len(values) else None

    levels = []
    for level, where in (("intra", "inside a node"), ("inter", "across nodes")):
        bandwidth, latency = first(f"{level}_node_bandwidth"), first(f"{level}_node_latency")
        if bandwidth is not None:
            levels.append(f"{bandwidth / 1e9:.2f} GB/s and {(latency or 0.0) * 1e6:.0f} us {where}")
    return [f"<p>Links measured when training started, which the planner used: {', '.join(levels)}.</p>"] if levels else []


def _migration_section(run: RunLog, img) -> list[str]:
    """HTML: one row per re-plan of ExpertMigration that moved something, and the latest placements."""
    steps = run.migration_steps()
    links = _measured_links(run)
    if not len(steps):
        return links

    def value(name: str, step: int) -> float:
        tag_steps, values = run.migration_series(name)
        hits = values[tag_steps == step]
        return float(hits[-1]) if len(hits) else float("nan")

    rows = [
        f"<tr><td>{int(step)}</td><td>{value('layers_moved', step):.0f}</td><td>{value('experts_moved', step):.0f}</td>"
        f"<td>{value('bytes', step) / 2**20:.2f}</td><td>{value('predicted_max_over_mean_before', step):.2f} &rarr; "
        f"{value('predicted_max_over_mean_after', step):.2f}</td><td>{value('measured_step_seconds_before', step) * 1e3:.1f}"
        f"</td></tr>"
        for step in steps
    ]
    section = [
        "<h2>Expert migrations</h2>",
        "<table><tr><th>step</th><th>layers moved</th><th>slots moved</th><th>MiB</th>"
        "<th>predicted max/mean</th><th>step ms before</th></tr>", *rows, "</table>", *links,
    ]
    placements = sorted((int(m.group(1)), tag) for tag in run.images if (m := _PLACEMENT_TAG.match(tag)))
    for _, tag in placements:
        step, png = run.images[tag]
        section.append(f"<figure>{img(png, tag)}<figcaption>{html.escape(tag)}, step {step}</figcaption></figure>")
    return section


def build_report(logdir: str | Path, out: str | Path, *, run: str | None = None) -> Path:
    """Render the report of the newest run under ``logdir`` (or of ``logdir/run``) into ``out``.

    Args:
        logdir: a TensorBoard log directory (e.g. ``lightning_logs``) or one run's directory.
        out: the report file, ``.png`` or ``.html``.
        run: a run directory relative to ``logdir``; by default the run written last.

    Returns:
        The path of the report.
    """
    logdir, out = Path(logdir), Path(out)
    if out.suffix.lower() not in (".png", ".html"):
        raise ValueError(f"report: `--out` must end in .png or .html, got {str(out)!r}.")
    if not logdir.is_dir():
        raise ValueError(f"report: LOGDIR {str(logdir)!r} is not a directory. Pass the logger's directory, e.g. lightning_logs.")
    if run is not None and not (logdir / run).is_dir():
        runs = sorted(str(path.relative_to(logdir)) for path in find_runs(logdir))
        raise ValueError(f"report: `--run` {run!r} is not a directory under {str(logdir)!r}. Runs there: {runs}.")
    candidates = [logdir / run] if run is not None else find_runs(logdir)
    # The newest run that holds the monitor's scalars.
    log = next((log for log in map(read_run, reversed(candidates)) if log.scalars), None)
    if log is None:
        raise ValueError(
            f"report: no `moe/` scalars under {str(logdir)!r}. Train with `ExpertLoadMonitor` in the callbacks "
            f"and a TensorBoardLogger, then point LOGDIR at its directory."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    (render_png if out.suffix.lower() == ".png" else render_html)(log, out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-moe report`` (and ``python -m lightning_moe.report``)."""
    parser = argparse.ArgumentParser(
        prog="lightning-moe report",
        description="Render the expert load logged by ExpertLoadMonitor into a PNG or HTML report.",
    )
    parser.add_argument("logdir", help="TensorBoard log directory, e.g. lightning_logs")
    parser.add_argument("--out", required=True, help="output file, .png or .html")
    parser.add_argument("--run", default=None,
                        help="run directory relative to LOGDIR (default: the newest with the monitor's moe/ scalars)")
    args = parser.parse_args(argv)
    try:
        path = build_report(args.logdir, args.out, run=args.run)
    except ValueError as error:
        parser.error(str(error))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
