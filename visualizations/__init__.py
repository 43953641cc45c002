"""Pictures of what PruneVid did to a video: pure functions from (frames, PruningTrace) to images/figures."""

from .charts import budget_counts, budget_figure, figure_to_image, static_share, timeline_figure
from .overlay import (
    Layers,
    Style,
    boundary_mask,
    cell_of_pixel,
    contact_sheet,
    label_image,
    overlay_frame,
    overlay_frames,
    save_animation,
    to_pixels,
)

__all__ = [
    "Layers",
    "Style",
    "boundary_mask",
    "budget_counts",
    "budget_figure",
    "cell_of_pixel",
    "contact_sheet",
    "figure_to_image",
    "label_image",
    "overlay_frame",
    "overlay_frames",
    "save_animation",
    "static_share",
    "timeline_figure",
    "to_pixels",
]
