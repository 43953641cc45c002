"""PruneVid: training-free visual token pruning for video LLMs, as a one-line patch.

model = LlavaOnevisionForConditionalGeneration.from_pretrained(...)
prunevid.patch(model, PruneVidConfig(alpha=0.4))
out = model.generate(**inputs, max_new_tokens=64)
trace = prunevid.last_trace(model)

The page and its pictures import as `prunevid.app` and `prunevid.visualizations`. The wheel
installs them inside this package, with the example videos in `prunevid/assets/`; a source
checkout (and a Hugging Face Space, which runs `python app.py` from one) keeps them beside it, in
`app/`, `visualizations/` and `assets/`, and this package's path reaches them there.
"""

from pathlib import Path as _Path

from .api import last_trace, last_traces, patch, unpatch
from .config import PruneVidConfig
from .merge import MergeResult, merge_tokens
from .trace import PruningTrace

_package = _Path(__file__).resolve().parent
_checkout = _package.parent
# Only where the package does not carry the page itself: an installed one never reaches out of it.
if not (_package / "app").is_dir() and (_checkout / "app" / "ui.py").is_file():
    __path__.append(str(_checkout))

__all__ = [
    "MergeResult",
    "PruneVidConfig",
    "PruningTrace",
    "last_trace",
    "last_traces",
    "merge_tokens",
    "patch",
    "unpatch",
]
__version__ = "0.2.0"  # the one place; pyproject.toml and `prunevid --version` read it
