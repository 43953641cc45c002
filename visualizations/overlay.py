"""Draw a PruningTrace on the real frames: one image per sampled frame, plus sheets and animations.

The model resizes every frame to a square (no crop) before cutting it into an H x W token grid,
so token cell (r, c) covers the frame pixels whose rows fall in [r * h / H, (r + 1) * h / H) and
whose columns fall in [c * w / W, (c + 1) * w / W). Every layer below is drawn on that mapping:

clusters  each stage-1 merged token is filled with the mean colour of its pixels (ToMe style)
heatmap   stage-2 relevance of each merged token (normalised over the whole video)
static    tokens merged over time as static get diagonal hatching
pruned    tokens dropped by stage 2 are darkened
outlines  lines where neighbouring cells went into different merged tokens

Tokens a baseline drops before the language model (merged index -1, EVS-style pruning) are
darkened like pruned ones and left unfilled: they went into no token.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import cv2
import numpy as np

from prunevid.trace import PruningTrace

STATIC_COLOR = (0, 229, 255)  # RGB cyan hatching
OUTLINE_COLOR = (255, 255, 255)


@dataclass(frozen=True)
class Layers:
    """Which layers `overlay_frame` draws (in this order, bottom to top)."""

    clusters: bool = True
    heatmap: bool = False
    static: bool = True
    pruned: bool = True
    outlines: bool = True


@dataclass(frozen=True)
class Style:
    fill_opacity: float = 0.75  # merged-token mean colour over the frame
    heatmap_opacity: float = 0.5
    pruned_brightness: float = 0.3  # pruned pixels are multiplied by this
    hatch_period: int | None = None  # pixels between static hatch lines; None: from the frame size
    line_width: int | None = None  # outline half-width in pixels; None: from the frame size
    static_color: tuple[int, int, int] = STATIC_COLOR
    outline_color: tuple[int, int, int] = OUTLINE_COLOR


def cell_of_pixel(size: int, cells: int) -> np.ndarray:
    """(size,) index of the token cell that each pixel row (or column) falls in."""
    return np.minimum(np.arange(size) * cells // size, cells - 1)


def to_pixels(grid_values: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, ...) per-cell values -> (height, width, ...) per-pixel values (nearest cell)."""
    rows = cell_of_pixel(height, grid_values.shape[0])
    cols = cell_of_pixel(width, grid_values.shape[1])
    return grid_values[rows[:, None], cols[None, :]]


def mean_colour_fill(frame: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Replace every pixel by the mean colour of all pixels sharing its label. frame (h, w, 3), labels (h, w)."""
    _, inverse = np.unique(labels.reshape(-1), return_inverse=True)  # (h*w,)
    pixels = frame.reshape(-1, 3).astype(np.float64)
    counts = np.bincount(inverse)  # (L,)
    sums = np.stack([np.bincount(inverse, weights=pixels[:, ch]) for ch in range(3)], axis=1)  # (L, 3)
    means = sums / counts[:, None]
    return np.round(means[inverse]).astype(np.uint8).reshape(frame.shape)


def boundary_mask(labels: np.ndarray, half_width: int = 1) -> np.ndarray:
    """(h, w) bool: pixels within `half_width` of a place where 4-neighbouring labels differ."""
    edge = np.zeros(labels.shape, dtype=bool)
    across = labels[:, 1:] != labels[:, :-1]  # (h, w-1) between column x and x+1
    down = labels[1:, :] != labels[:-1, :]  # (h-1, w) between row y and y+1
    edge[:, 1:] |= across
    edge[:, :-1] |= across
    edge[1:, :] |= down
    edge[:-1, :] |= down
    if half_width > 1:
        kernel = np.ones((2 * half_width - 1,) * 2, dtype=np.uint8)
        edge = cv2.dilate(edge.astype(np.uint8), kernel).astype(bool)
    return edge


def hatch_mask(height: int, width: int, period: int, thickness: int = 2) -> np.ndarray:
    """(h, w) bool diagonal stripes: pixels with (x + y) mod period < thickness."""
    y, x = np.indices((height, width))
    return (x + y) % period < thickness


def normalised_scores(trace: PruningTrace) -> np.ndarray:
    """(T, H, W) stage-2 scores scaled to [0, 1] over the whole video; NaN stays NaN."""
    score = trace.score.astype(np.float64)
    finite = np.isfinite(score)
    if not finite.any():
        return score
    low, high = score[finite].min(), score[finite].max()
    return (score - low) / (high - low) if high > low else np.where(finite, 1.0, np.nan)


def heatmap_colours(values: np.ndarray) -> np.ndarray:
    """(...,) values in [0, 1] -> (..., 3) uint8 RGB from OpenCV's inferno colour map."""
    grey = np.round(np.clip(np.nan_to_num(values), 0, 1) * 255).astype(np.uint8)
    bgr = cv2.applyColorMap(grey.reshape(-1, 1), cv2.COLORMAP_INFERNO)  # (n, 1, 3)
    return bgr[:, 0, ::-1].reshape(*values.shape, 3)


def default_line_width(height: int, width: int) -> int:
    return max(1, round(min(height, width) / 240))


def default_hatch_period(height: int, width: int) -> int:
    return max(6, min(height, width) // 20)


def _blend(base: np.ndarray, top: np.ndarray, opacity: float, where: np.ndarray | None = None) -> np.ndarray:
    mixed = base.astype(np.float32) * (1 - opacity) + top.astype(np.float32) * opacity
    if where is not None:
        mixed = np.where(where[..., None], mixed, base)
    return mixed


def overlay_frame(
    frame: np.ndarray,
    trace: PruningTrace,
    t: int,
    layers: Layers = Layers(),
    style: Style = Style(),
    scores: np.ndarray | None = None,
) -> np.ndarray:
    """Draw frame t of `trace` on `frame` (h, w, 3) uint8 RGB; returns a new (h, w, 3) uint8 image.

    `scores`: (T, H, W) heatmap values in [0, 1]; defaults to `normalised_scores(trace)`.
    """
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame must be (h, w, 3), got {frame.shape}")
    if not 0 <= t < trace.num_frames:
        raise ValueError(f"frame index {t} is outside the trace's {trace.num_frames} frames")
    height, width = frame.shape[:2]
    labels = to_pixels(trace.merged_index[t], height, width)  # (h, w) merged token of each pixel
    image = frame.astype(np.float32)

    if layers.clusters:
        image = _blend(image, mean_colour_fill(frame, labels), style.fill_opacity, labels >= 0)
    if layers.heatmap:
        values = normalised_scores(trace) if scores is None else scores
        cell_values = values[t]  # (H, W)
        if np.isfinite(cell_values).any():
            colours = to_pixels(heatmap_colours(cell_values), height, width)  # (h, w, 3)
            scored = to_pixels(np.isfinite(cell_values), height, width)
            image = _blend(image, colours, style.heatmap_opacity, scored)
    if layers.static:
        period = style.hatch_period or default_hatch_period(height, width)
        stripes = hatch_mask(height, width, period, thickness=max(1, period // 8))
        marked = to_pixels(trace.static[t], height, width) & stripes
        image[marked] = style.static_color
    if layers.pruned:
        dropped = ~to_pixels(trace.kept[t], height, width)
        image[dropped] *= style.pruned_brightness
    if layers.outlines:
        half = style.line_width or default_line_width(height, width)
        image[boundary_mask(labels, half)] = style.outline_color
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def overlay_frames(
    frames: np.ndarray,
    trace: PruningTrace,
    layers: Layers = Layers(),
    style: Style = Style(),
) -> np.ndarray:
    """(T, h, w, 3) frames -> (T, h, w, 3) overlays, one per frame of the trace."""
    if len(frames) != trace.num_frames:
        raise ValueError(f"got {len(frames)} frames for a trace of {trace.num_frames} frames")
    scores = normalised_scores(trace)
    return np.stack([overlay_frame(f, trace, t, layers, style, scores) for t, f in enumerate(frames)])


def label_image(image: np.ndarray, text: str) -> np.ndarray:
    """A copy of `image` with `text` in a dark box at its top-left corner."""
    out = image.copy()
    scale = max(0.35, min(image.shape[:2]) / 500)
    thickness = max(1, round(scale * 2))
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    pad = max(2, th // 3)
    cv2.rectangle(out, (0, 0), (tw + 2 * pad, th + base + 2 * pad), (0, 0, 0), thickness=-1)
    cv2.putText(
        out, text, (pad, th + pad), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness, cv2.LINE_AA
    )
    return out


def contact_sheet(
    images: np.ndarray,
    columns: int = 4,
    pad: int = 4,
    captions: list[str] | None = None,
    background: int = 255,
) -> np.ndarray:
    """Tile (T, h, w, 3) images row by row into one (rows*h + (rows+1)*pad, cols*w + (cols+1)*pad, 3) image."""
    count, height, width = images.shape[:3]
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    sheet = np.full((rows * height + (rows + 1) * pad, columns * width + (columns + 1) * pad, 3), background)
    sheet = sheet.astype(np.uint8)
    for i, image in enumerate(images):
        if captions is not None:
            image = label_image(image, captions[i])
        top = pad + (i // columns) * (height + pad)
        left = pad + (i % columns) * (width + pad)
        sheet[top : top + height, left : left + width] = image
    return sheet


def save_animation(path: str | os.PathLike, images: np.ndarray, fps: float = 2.0) -> str:
    """Write (T, h, w, 3) uint8 images as an H.264 .mp4 (browser-playable) or a looping .gif."""
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".mp4":
        from prunevid.video import write_video

        write_video(path, images, fps)
    elif suffix == ".gif":
        from PIL import Image

        pictures = [Image.fromarray(image) for image in images]
        duration = round(1000 / fps)
        pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=duration, loop=0)
    else:
        raise ValueError(f"animation path must end in .mp4 or .gif, got {path!r}")
    return path
