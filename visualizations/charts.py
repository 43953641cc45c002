"""Matplotlib figures of a PruningTrace: the temporal-segment timeline and the token budget.

Figures are built with the object API on an Agg canvas (no pyplot state), so they are safe to
make from server threads. `figure_to_image` turns one into an (h, w, 3) uint8 image.
"""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from prunevid.trace import PruningTrace

SEGMENT_COLOURS = [
    "#4C72B0",
    "#DD8452",
    "#55A868",
    "#C44E52",
    "#8172B3",
    "#937860",
    "#DA8BC3",
    "#8C8C8C",
    "#CCB974",
    "#64B5CD",
]
BUDGET_COLOURS = ["#8C8C8C", "#4C72B0", "#55A868"]
BUDGET_LABELS = ["Original", "After stage 1 (merge)", "After stage 2 (prune)"]


def segment_colour(segment: int) -> str:
    return SEGMENT_COLOURS[segment % len(SEGMENT_COLOURS)]


def static_share(trace: PruningTrace) -> np.ndarray:
    """(T,) fraction of each frame's tokens that stage 1 merged over time as static."""
    return trace.static.reshape(trace.num_frames, -1).mean(axis=1)


def segment_runs(segment: np.ndarray) -> list[tuple[int, int, int]]:
    """Maximal runs of equal segment ids as (segment, first frame, last frame + 1)."""
    runs, start = [], 0
    for t in range(1, len(segment) + 1):
        if t == len(segment) or segment[t] != segment[start]:
            runs.append((int(segment[start]), start, t))
            start = t
    return runs


def budget_counts(trace: PruningTrace) -> list[int]:
    """Visual tokens entering the pipeline, after stage 1 and after stage 2."""
    return [trace.num_visual_tokens, trace.num_after_stage1, trace.num_after_stage2]


def _figure(width: float, height: float, dpi: int) -> Figure:
    figure = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def timeline_figure(
    trace: PruningTrace, timestamps: np.ndarray | None = None, width: float = 7.0, dpi: int = 110
) -> Figure:
    """One bar per frame, coloured by temporal segment, as tall as the frame's static share (%).

    Segments are shaded behind their frames and labelled with their static share.
    """
    share = static_share(trace) * 100  # (T,)
    frames = np.arange(trace.num_frames)
    figure = _figure(width, 2.6, dpi)
    axes = figure.add_subplot()
    for segment, start, stop in segment_runs(trace.segment):
        colour = segment_colour(segment)
        axes.axvspan(start - 0.5, stop - 0.5, color=colour, alpha=0.12, linewidth=0)
        axes.text(
            (start + stop - 1) / 2,
            104,
            f"seg {segment}\n{share[start:stop].mean():.0f}% static",
            ha="center",
            va="bottom",
            fontsize=7,
            color=colour,
        )
    axes.bar(frames, share, width=0.8, color=[segment_colour(int(s)) for s in trace.segment])
    axes.set_xlim(-0.5, trace.num_frames - 0.5)
    axes.set_ylim(0, 125)
    axes.set_yticks([0, 25, 50, 75, 100])
    axes.set_ylabel("static tokens (%)")
    if timestamps is not None and len(timestamps) == trace.num_frames:
        step = max(1, trace.num_frames // 8)
        axes.set_xticks(frames[::step], [f"{s:.1f}s" for s in np.asarray(timestamps)[::step]])
        axes.set_xlabel("sampled frame (time)")
    else:
        axes.set_xlabel("sampled frame")
    count = len(np.unique(trace.segment))
    axes.set_title(f"Temporal segments: {count}, static share per frame", fontsize=10)
    axes.spines[["top", "right"]].set_visible(False)
    return figure


def budget_figure(trace: PruningTrace, width: float = 7.0, dpi: int = 110) -> Figure:
    """Horizontal bars: visual tokens originally, after stage 1 and after stage 2 (count and %)."""
    counts = budget_counts(trace)
    total = counts[0]
    figure = _figure(width, 2.2, dpi)
    axes = figure.add_subplot()
    positions = np.arange(len(counts))
    axes.barh(positions, counts, color=BUDGET_COLOURS, height=0.6)
    for y, count in zip(positions, counts):
        axes.text(count + total * 0.01, y, f"{count}  ({100 * count / total:.0f}%)", va="center", fontsize=9)
    axes.set_yticks(positions, BUDGET_LABELS)
    axes.invert_yaxis()
    axes.set_xlim(0, total * 1.25)
    axes.set_xlabel("visual tokens given to the language model")
    axes.set_title("Token budget", fontsize=10)
    axes.spines[["top", "right"]].set_visible(False)
    return figure


def figure_to_image(figure: Figure) -> np.ndarray:
    """Render a figure to an (h, w, 3) uint8 RGB image."""
    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
