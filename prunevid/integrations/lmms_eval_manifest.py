"""lmms-eval's `lmms_eval.models` entry point: registers `--model prunevid`.

This module may import nothing of lmms-eval but `lmms_eval.models.registry_v2`: lmms-eval loads
entry points while its own `lmms_eval.models` package is still initialising.
"""

from __future__ import annotations

from lmms_eval.models.registry_v2 import ModelManifest

MODEL_ID = "prunevid"
SIMPLE_CLASS = "prunevid.integrations.lmms_eval.PruneVid"
CHAT_CLASS = "prunevid.integrations.lmms_eval.PruneVidChat"


def manifest() -> ModelManifest:
    """Both classes: chat by default, the simple one with lmms-eval's `--force_simple`."""
    return ModelManifest(model_id=MODEL_ID, simple_class_path=SIMPLE_CLASS, chat_class_path=CHAT_CLASS)
