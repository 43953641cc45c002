"""The PruneVid Gradio app: `build_demo()` makes the page, `launch()` serves it (`prunevid demo`, app.py)."""

from .ui import build_demo, launch

__all__ = ["build_demo", "launch"]
