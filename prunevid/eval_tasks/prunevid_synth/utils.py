"""Document functions of the offline `prunevid_synth_*` lmms-eval tasks (loaded by lmms-eval
from this folder with `!function utils.NAME`)."""

from __future__ import annotations

from pathlib import Path

VIDEOS = Path(__file__).resolve().parent / "videos"


def doc_to_visual(doc: dict) -> list[str]:
    """The document's video, as an absolute path (lmms-eval's convention for video tasks)."""
    return [str(VIDEOS / doc["video"])]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question, with the optional pre/post prompts of `lmms_eval_specific_kwargs`."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"
