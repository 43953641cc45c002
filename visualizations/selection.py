"""Show one selected token: the original tokens that went into its stage-1 token lit, the rest dimmed.

Pure functions on images already drawn (e.g. `overlay_frames`), with the token-cell to pixel
mapping of `overlay.py`: cell (r, c) of an h x w image covers rows [r * h / H, (r + 1) * h / H)
and columns [c * w / W, (c + 1) * w / W). `token_at` is its inverse (a click -> a cell).

members   (T, H, W) bool, `PruningTrace.members(t, r, c)`: outlined, left at full brightness
others    cells of the selected token's segment outside it: dimmed
elsewhere frames of other segments: dimmed further (nothing there went into the token)
selected  the clicked cell: a thick frame in the selection colour
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .overlay import boundary_mask, cell_of_pixel, default_line_width, to_pixels

SELECTION_COLOR = (255, 214, 0)  # RGB amber: not used by any overlay layer


@dataclass(frozen=True)
class SelectionStyle:
    dim: float = 0.35  # brightness of the segment's other cells
    dim_elsewhere: float = 0.2  # brightness of frames outside the segment
    color: tuple[int, int, int] = SELECTION_COLOR


def token_at(x: float, y: float, height: int, width: int, grid: tuple[int, int]) -> tuple[int, int]:
    """The (row, col) token cell under pixel (x, y) of an h x w image (clamped to the grid)."""
    row = int(cell_of_pixel(height, grid[0])[min(max(int(y), 0), height - 1)])
    col = int(cell_of_pixel(width, grid[1])[min(max(int(x), 0), width - 1)])
    return row, col


def _scaled(image: np.ndarray, factor: float) -> np.ndarray:
    """image * factor in uint8, through a 256-entry table (faster than float arithmetic)."""
    table = np.round(np.arange(256) * factor).astype(np.uint8)
    return table[image]


def highlight_frame(
    image: np.ndarray,
    members: np.ndarray,
    selected: tuple[int, int] | None = None,
    in_segment: bool = True,
    style: SelectionStyle = SelectionStyle(),
) -> np.ndarray:
    """One (h, w, 3) uint8 image with the cells of `members` (H, W) bool lit and outlined, the
    other cells dimmed (further when the frame is outside the token's segment), and the cell
    `selected` (row, col) framed. Returns a new image."""
    if not in_segment:
        return _scaled(image, style.dim_elsewhere)
    height, width = image.shape[:2]
    lit = to_pixels(members, height, width)  # (h, w)
    out = np.where(lit[..., None], image, _scaled(image, style.dim))
    half = default_line_width(height, width)
    out[boundary_mask(lit.astype(np.int8), half) & lit] = style.color
    if selected is not None:
        rows = np.flatnonzero(cell_of_pixel(height, members.shape[0]) == selected[0])
        cols = np.flatnonzero(cell_of_pixel(width, members.shape[1]) == selected[1])
        box = np.zeros((height, width), dtype=bool)
        box[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = True
        ring = box & boundary_mask(box.astype(np.int8), 2 * half)
        out[ring] = style.color
    return out


def highlight_frames(
    images: np.ndarray,
    members: np.ndarray,
    segment: np.ndarray,
    selected: tuple[int, int, int],
    style: SelectionStyle = SelectionStyle(),
) -> np.ndarray:
    """(T, h, w, 3) images -> the same with the selected token's stage-1 token lit.

    members: (T, H, W) bool; segment: (T,) segment of each frame; selected: (frame, row, col).
    """
    frame, row, col = selected
    return np.stack(
        [
            highlight_frame(
                image,
                members[t],
                (row, col) if t == frame else None,
                in_segment=bool(segment[t] == segment[frame]),
                style=style,
            )
            for t, image in enumerate(images)
        ]
    )
