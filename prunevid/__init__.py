"""PruneVid: training-free visual token pruning for video LLMs, as a one-line patch.

model = LlavaOnevisionForConditionalGeneration.from_pretrained(...)
prunevid.patch(model, PruneVidConfig(alpha=0.4))
out = model.generate(**inputs, max_new_tokens=64)
trace = prunevid.last_trace(model)

The page and its pictures import as `prunevid.app` and `prunevid.visualizations`. The wheel
installs them inside this package; a source checkout (and a Hugging Face Space, which runs
`python app.py` from one) keeps them beside it, in `app/` and `visualizations/`, and this
package's path reaches them there.
"""

from pathlib import Path as _Path

from .api import last_trace, last_traces, patch, unpatch
from .config import PruneVidConfig
from .merge import MergeResult, merge_tokens
from .trace import PruningTrace

_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "app" / "ui.py").is_file() and (_checkout / "visualizations").is_dir():
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
__version__ = "0.1.0"
