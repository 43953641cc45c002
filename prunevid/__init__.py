"""PruneVid: training-free visual token pruning for video LLMs, as a one-line patch.

model = LlavaOnevisionForConditionalGeneration.from_pretrained(...)
prunevid.patch(model, PruneVidConfig(alpha=0.4))
out = model.generate(**inputs, max_new_tokens=64)
trace = prunevid.last_trace(model)
"""

from .api import last_trace, last_traces, patch, unpatch
from .config import PruneVidConfig
from .merge import MergeResult, merge_tokens
from .trace import PruningTrace

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
