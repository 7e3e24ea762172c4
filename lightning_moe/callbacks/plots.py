"""Images of expert load for TensorBoard and reports: a layers x experts heatmap and the EP traffic matrix.

Rendered with matplotlib's Agg canvas on a private ``Figure`` (no ``pyplot``: no global figure
state, no GUI backend), returned as ``[H, W, 3]`` uint8 arrays for ``SummaryWriter.add_image``.

Shape legend: ``L`` MoE layers, ``E`` experts of a layer, ``M`` the most experts of any layer,
``P`` expert-parallel ranks, ``H``/``W`` image height and width in pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

# Cells up to this count get their value printed; beyond it the numbers would not be readable.
_MAX_ANNOTATED_CELLS = 256


def _figure_with_colorbar(
    width: float, height: float, *, left: float = 0.75, right: float = 0.9, bottom: float = 0.65, top: float = 0.35
) -> tuple[Figure, Any, Any]:
    """A ``width`` x ``height`` inch figure with one axes and a colour-bar axes, margins in inches.

    NOTE: fixed margins instead of ``tight_layout``, which draws the figure an extra time to
    measure it (a third of the rendering time).
    """
    figure = Figure(figsize=(width, height), dpi=100)
    axes = figure.add_axes((left / width, bottom / height, 1 - (left + right) / width, 1 - (bottom + top) / height))
    colorbar_axes = figure.add_axes((1 - (right - 0.15) / width, bottom / height, 0.15 / width, 1 - (bottom + top) / height))
    return figure, axes, colorbar_axes


def figure_to_array(figure: Figure) -> np.ndarray:
    """Render a figure to an ``[H, W, 3]`` uint8 RGB array."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def relative_load(tokens_per_expert: Sequence[torch.Tensor]) -> np.ndarray:
    """``[L, M]`` load of each expert divided by its layer's mean load (1.0 = balanced); NaN pads
    layers with fewer than ``M`` experts."""
    widest = max(load_E.numel() for load_E in tokens_per_expert)
    relative_LM = np.full((len(tokens_per_expert), widest), np.nan)
    for index, load_E in enumerate(tokens_per_expert):
        load = load_E.double().cpu().numpy()
        mean = load.mean()
        relative_LM[index, : load.size] = load / mean if mean > 0 else 0.0
    return relative_LM


def render_load_heatmap(tokens_per_expert: Sequence[torch.Tensor], *, step: int | None = None) -> np.ndarray:
    """A layers x experts heatmap of the load relative to each layer's mean, as an RGB array.

    Blue is below the mean (dark blue: dead), white balanced, red hot. The colour scale is centred
    on 1.0 so that balance reads the same in every layer and at every step.

    Args:
        tokens_per_expert: per layer, the tokens each expert processed, ``[E]``.
        step: the training step, shown in the title.
    """
    relative_LM = relative_load(tokens_per_expert)
    num_layers, widest = relative_LM.shape
    peak = float(np.nanmax(relative_LM)) if np.isfinite(relative_LM).any() else 1.0
    figure, axes, colorbar_axes = _figure_with_colorbar(min(14.0, 2.0 + 0.45 * widest), 1.2 + 0.45 * num_layers)
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, peak))
    image = axes.imshow(
        np.ma.masked_invalid(relative_LM), cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest"
    )
    if relative_LM.size <= _MAX_ANNOTATED_CELLS:
        for layer in range(num_layers):
            for expert in range(widest):
                value = relative_LM[layer, expert]
                if np.isfinite(value):
                    # White text on the saturated ends of the colour map, black near balance.
                    colour = "white" if abs(float(norm(value)) - 0.5) > 0.3 else "black"
                    axes.text(expert, layer, f"{value:.2f}", ha="center", va="center", fontsize=7, color=colour)
    axes.set_xlabel("expert")
    axes.set_ylabel("MoE layer")
    axes.set_yticks(range(num_layers))
    if widest <= 32:
        axes.set_xticks(range(widest))
    suffix = "" if step is None else f", step {step}"
    axes.set_title(f"Tokens per expert / layer mean{suffix}", fontsize=10)
    figure.colorbar(image, cax=colorbar_axes)
    return figure_to_array(figure)


def render_traffic(traffic_PP: torch.Tensor, *, step: int | None = None, title: str = "EP token traffic") -> np.ndarray:
    """The rank x rank traffic matrix (rows: source EP rank, columns: destination EP rank) as RGB.

    Each cell holds the assignment rows sent; the diagonal stays on its rank. The column totals
    (load each rank's experts processed) are printed under the matrix.

    Args:
        traffic_PP: ``[P, P]`` rows sent from each EP rank to each EP rank.
        step: the training step, shown in the title.
        title: the figure title.
    """
    traffic = traffic_PP.double().cpu().numpy()
    num_ranks = traffic.shape[0]
    size = min(9.0, 1.6 + 0.6 * num_ranks)
    figure, axes, colorbar_axes = _figure_with_colorbar(size + 1.6, size + 1.0, bottom=0.9, right=1.3)
    image = axes.imshow(traffic, cmap="viridis", vmin=0.0, interpolation="nearest")
    if traffic.size <= _MAX_ANNOTATED_CELLS:
        peak = traffic.max() if traffic.size else 0.0
        for source in range(num_ranks):
            for destination in range(num_ranks):
                value = traffic[source, destination]
                colour = "black" if peak > 0 and value > 0.6 * peak else "white"
                axes.text(destination, source, f"{int(value)}", ha="center", va="center", fontsize=8, color=colour)
    axes.set_xticks(range(num_ranks))
    axes.set_yticks(range(num_ranks))
    axes.set_xlabel("destination EP rank\nreceived: " + ", ".join(str(int(v)) for v in traffic.sum(axis=0)))
    axes.set_ylabel("source EP rank")
    suffix = "" if step is None else f", step {step}"
    axes.set_title(f"{title}{suffix}", fontsize=10)
    figure.colorbar(image, cax=colorbar_axes)
    return figure_to_array(figure)


def render_placement(
    processed_RE: np.ndarray, holders_RE: np.ndarray, *, step: int | None = None, title: str = "Expert placement"
) -> np.ndarray:
    """Which EP rank holds which expert and how many tokens each copy processes, as RGB.

    Rows are EP ranks, columns logical experts; a held cell is coloured by the tokens per step that
    rank's copy processes (a blank cell: the rank does not hold the expert; two coloured cells in a
    column: replicas). Each rank's total load is in its row label, so balance reads off the left
    margin.

    Args:
        processed_RE: ``[R, E]`` tokens per step each rank's copy of each expert processes.
        holders_RE: ``[R, E]`` booleans: which ranks hold which experts.
        step: the training step, shown in the title.
        title: the figure title.
    """
    processed = np.asarray(processed_RE, dtype=np.float64)
    held = np.asarray(holders_RE, dtype=bool)
    num_ranks, num_experts = processed.shape
    figure, axes, colorbar_axes = _figure_with_colorbar(
        min(16.0, 2.8 + 0.42 * num_experts), 1.3 + 0.42 * num_ranks, left=1.2
    )
    image = axes.imshow(np.ma.masked_where(~held, processed), cmap="viridis", vmin=0.0, aspect="auto",
                        interpolation="nearest")
    if processed.size <= _MAX_ANNOTATED_CELLS:
        peak = processed.max() if processed.size else 0.0
        for rank in range(num_ranks):
            for expert in range(num_experts):
                if held[rank, expert]:
                    colour = "black" if peak > 0 and processed[rank, expert] > 0.6 * peak else "white"
                    axes.text(expert, rank, f"{processed[rank, expert]:.0f}", ha="center", va="center", fontsize=7,
                              color=colour)
    rank_load = processed.sum(axis=1)
    mean = rank_load.mean() if rank_load.size else 0.0
    axes.set_yticks(range(num_ranks))
    axes.set_yticklabels([f"{rank}: {load:.0f}" for rank, load in enumerate(rank_load)], fontsize=8)
    if num_experts <= 32:
        axes.set_xticks(range(num_experts))
    axes.set_xlabel("expert")
    axes.set_ylabel("EP rank: tokens")
    balance = f", max/mean {rank_load.max() / mean:.2f}" if mean > 0 else ""
    suffix = "" if step is None else f", step {step}"
    axes.set_title(f"{title}{suffix}{balance}", fontsize=10)
    figure.colorbar(image, cax=colorbar_axes)
    return figure_to_array(figure)
