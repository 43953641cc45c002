"""What the page does, without Gradio: pick and load models, cache vision features, run one
question (pruned and optionally unpruned), and describe the speed. The UI in `ui.py` only wires
these to components.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from prunevid.config import PruneVidConfig
from prunevid.flops import DecoderShape, prefill_flops
from prunevid.pipeline import (
    DEFAULT_MODEL,
    MODELS,
    TINY_MODEL,
    TRAINED_TINY_MODEL,
    LoadedModel,
    ModelLoadError,
    Result,
    answer,
    check_question,
    encode_video,
    load_model,
    preset,
)
from prunevid.trace import PruningTrace
from prunevid.video import Video, downscale, load_video

LARGE_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
MODEL_CHOICES = [*MODELS, TRAINED_TINY_MODEL, TINY_MODEL]
MODEL_LABELS = {
    "llava-hf/llava-onevision-qwen2-0.5b-ov-hf": "LLaVA-OneVision 0.5B (llava-hf/llava-onevision-qwen2-0.5b-ov-hf)",
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": "LLaVA-OneVision 7B (llava-hf/llava-onevision-qwen2-7b-ov-hf)",
    "Qwen/Qwen2.5-VL-3B-Instruct": "Qwen2.5-VL 3B (Qwen/Qwen2.5-VL-3B-Instruct)",
    "Qwen/Qwen2.5-VL-7B-Instruct": "Qwen2.5-VL 7B (Qwen/Qwen2.5-VL-7B-Instruct)",
    TRAINED_TINY_MODEL: "tiny-trained: offline, trained on synthetic shape videos (8 frames)",
    TINY_MODEL: "tiny: offline demo model (random weights)",
}
OFFLINE_MODEL = TRAINED_TINY_MODEL  # what the page uses when the startup model cannot be loaded
TINY_MODELS = (TRAINED_TINY_MODEL, TINY_MODEL)
# What the banner says about the offline models, whose answers only hold in a narrow world.
MODEL_NOTES = {
    TRAINED_TINY_MODEL: (
        "The offline demo model is tiny (0.8M parameters) and was trained only on synthetic shape "
        "videos: it answers the synthetic examples' questions (colour, shape, direction, count, first "
        "newcomer, scene change, small object) and nothing else; pick a real model in Advanced settings."
    ),
    TINY_MODEL: (
        "The tiny demo model has untrained random weights: its answers are meaningless, it only "
        "demonstrates the pipeline (merging, pruning, timings)."
    ),
}
CACHE_ENTRIES = 8
MAX_FRAMES = 64  # the library allows more; a shared demo server should not
MAX_NEW_TOKENS = 512
DISPLAY_SIDE = 640  # overlays are drawn on frames at most this large

Progress = Callable[[float, str], None]
log = logging.getLogger(__name__)


def startup_model() -> str:
    """The model the page starts with: $PRUNEVID_MODEL, else the library default."""
    return os.environ.get("PRUNEVID_MODEL", "").strip() or DEFAULT_MODEL


def unavailable_message(name: str, instead: str = "the offline tiny demo model") -> str:
    """The one sentence shown when a model cannot be loaded."""
    return (
        f"The model `{name}` is neither cached nor downloadable here, so the page uses {instead}; to get "
        "the real one, start the app once with network access (it downloads the weights from the Hugging "
        "Face Hub) or set `PRUNEVID_MODEL` to a local checkpoint folder."
    )


def cached_on_disk(name: str) -> bool:
    """A local checkpoint folder, or a Hub model whose config is already in the local cache (for tests)."""
    if os.path.isdir(name):
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # not a valid repo id, broken cache: treat as not cached
        return False


class ModelRegistry:
    """Loaded models by name (loading a real checkpoint is slow: keep them)."""

    def __init__(self, loader: Callable[[str], LoadedModel] = load_model):
        self._loader = loader
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    def __contains__(self, name: str) -> bool:
        return name in self._models

    def get(self, name: str) -> LoadedModel:
        """The loaded model, loading it on first use; ModelLoadError (one sentence) if it cannot be.

        `load_model` itself skips the Hub when it is unreachable, so a failure here is quick offline.
        """
        with self._lock:
            if name not in self._models:
                try:
                    loaded = self._loader(name)
                except ModelLoadError as error:
                    raise ModelLoadError(unavailable_message(name)) from error
                warm_up(loaded)
                self._models[name] = loaded
            return self._models[name]


def warm_up(loaded: LoadedModel, num_frames: int = 2) -> None:
    """One short pruned and one unpruned answer on two blank frames, so that the first question's
    measured prefill times and speedup are not first-call overheads."""
    frames = np.zeros((num_frames, 64, 64, 3), dtype=np.uint8)
    settings = preset(loaded.name, loaded.num_layers).replace(num_frames=num_frames)
    try:
        features = encode_video(loaded, frames)
        for stages in (True, False):
            answer(loaded, frames, "warm up", settings.replace(stage1=stages, stage2=stages), 1, features)
    except Exception as error:  # a warm-up must never stop the page from starting
        log.warning("warm-up of %s failed: %s", loaded.name, error)


@dataclass
class Encoded:
    """A decoded video and its vision-tower features: what follow-up questions reuse."""

    video: Video
    features: torch.Tensor  # (1, T*N + 1, C)


class FeatureCache:
    """A small LRU cache of `Encoded` by (file content hash, model name, num_frames)."""

    def __init__(self, entries: int = CACHE_ENTRIES):
        self.entries = entries
        self._items: OrderedDict[tuple, Encoded] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple) -> Encoded | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: tuple, item: Encoded) -> None:
        with self._lock:
            self._items[key] = item
            self._items.move_to_end(key)
            while len(self._items) > self.entries:
                self._items.popitem(last=False)


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (the upload's name changes every time; its content does not)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def make_config(stage1: bool, stage2: bool, **knobs: Any) -> PruneVidConfig:
    """A validated config from UI values; whole floats become ints (number boxes send floats)."""
    values: dict[str, Any] = {}
    for name, value in knobs.items():
        if value is None:
            raise ValueError(f"{name} is empty: give it a value (the model's preset is a good start).")
        if isinstance(value, float) and value.is_integer() and isinstance(getattr(PruneVidConfig, name), int):
            value = int(value)
        values[name] = value
    config = PruneVidConfig(stage1=bool(stage1), stage2=bool(stage2), **values)
    if config.num_frames > MAX_FRAMES:
        raise ValueError(f"num_frames must be at most {MAX_FRAMES} in this demo, got {config.num_frames}")
    return config


def check_new_tokens(value: float | None) -> int:
    if value is None or not float(value).is_integer() or not 1 <= value <= MAX_NEW_TOKENS:
        raise ValueError(f"max_new_tokens must be a whole number in [1, {MAX_NEW_TOKENS}], got {value!r}")
    return int(value)


def check_layer(loaded: LoadedModel, config: PruneVidConfig) -> None:
    layers = loaded.num_layers
    if config.stage2 and config.selected_layer >= layers:
        raise ValueError(
            f"selected_layer must be below the model's {layers} decoder layers (0 to {layers - 1}), "
            f"got {config.selected_layer}"
        )


def flops_ratio(loaded: LoadedModel, trace: PruningTrace, config: PruneVidConfig, num_prompt: int) -> float:
    """Prefill FLOPs with PruneVid / without: stage-1 length up to the selected layer, stage-2 after.

    num_prompt is the unpruned prompt (text and video tokens); only visual tokens are pruned.
    """
    shape = DecoderShape.from_config(loaded.model.config)
    text = num_prompt - trace.num_visual_tokens
    after = trace.num_after_stage2 + text if config.stage2 else None
    pruned = prefill_flops(shape, trace.num_after_stage1 + text, after, config.selected_layer)
    return pruned / prefill_flops(shape, num_prompt)


class _TokenProgress:
    """A generate() streamer that reports each new token to `progress`."""

    def __init__(self, progress: Progress, start: float, span: float, limit: int, label: str):
        self.progress, self.start, self.span, self.limit, self.label = progress, start, span, limit, label
        self.count = -1  # the first put is the prompt

    def put(self, value: torch.Tensor) -> None:
        self.count += 1
        if self.count > 0:
            done = min(self.count / self.limit, 1.0)
            self.progress(self.start + self.span * done, f"{self.label}: token {self.count}/{self.limit}")

    def end(self) -> None:
        pass


@dataclass
class Outcome:
    """One question answered: the pruned run, the optional unpruned run, and what the speed panel shows."""

    model: str
    question: str
    video: Video
    result: Result
    baseline: Result | None
    cache_used: bool
    num_text_tokens: int
    flops_ratio: float

    @property
    def trace(self) -> PruningTrace:
        return self.result.trace

    def stats(self) -> dict[str, Any]:
        """Plain numbers for the page's JSON panel and API clients."""
        trace = self.trace
        out: dict[str, Any] = {
            "model": self.model,
            "cache_used": self.cache_used,
            "num_frames": trace.num_frames,
            "grid": list(trace.grid),
            "num_visual_tokens": trace.num_visual_tokens,
            "num_after_stage1": trace.num_after_stage1,
            "num_after_stage2": trace.num_after_stage2,
            "retention": trace.num_after_stage2 / trace.num_visual_tokens,
            "num_text_tokens": self.num_text_tokens,
            "flops_ratio": self.flops_ratio,
            "num_new_tokens": self.result.num_new_tokens,
            "timings": dict(self.result.timings),
            "config": self.result.config.to_dict(),
        }
        if self.baseline is not None:
            out["unpruned_timings"] = dict(self.baseline.timings)
            out["prefill_speedup"] = prefill_speedup(self.baseline, self.result)
            out["prefill_speedup_with_stage1"] = prefill_speedup(self.baseline, self.result, with_stage1=True)
        return out


def prefill_speedup(baseline: Result, pruned: Result, with_stage1: bool = False) -> float:
    """Unpruned decoder prefill time / PruneVid's (optionally adding stage 1, which runs before it)."""
    ours = pruned.timings["llm_prefill_s"] + (pruned.timings.get("stage1_s", 0.0) if with_stage1 else 0.0)
    return baseline.timings["llm_prefill_s"] / max(ours, 1e-9)


def run_question(
    loaded: LoadedModel,
    cache: FeatureCache,
    path: str,
    question: str,
    config: PruneVidConfig,
    compare: bool = False,
    max_new_tokens: int = 64,
    progress: Progress = lambda fraction, text: None,
) -> Outcome:
    """Decode (or reuse) the video and its features, then answer with PruneVid (and without, if `compare`)."""
    question = check_question(question)
    check_layer(loaded, config)
    progress(0.0, "Decoding the video")
    if not os.path.isfile(path):
        raise ValueError("The uploaded video is gone from the server: upload it again.")
    key = (file_digest(path), loaded.name, config.num_frames)
    encoded = cache.get(key)
    cache_used = encoded is not None
    if encoded is None:
        tic = time.perf_counter()
        video = load_video(path, config.num_frames)
        decode_s = time.perf_counter() - tic
        progress(0.1, "Encoding the frames (vision tower)")
        tic = time.perf_counter()
        features = encode_video(loaded, video.frames)
        encode_s = time.perf_counter() - tic
        encoded = Encoded(video, features)
        cache.put(key, encoded)
    else:
        decode_s = encode_s = 0.0
        progress(0.1, "Reusing the cached frames and vision features")

    runs = 2 if compare else 1
    progress(0.4, "Stage 1 (merging tokens) and language-model prefill with stage 2")
    streamer = _TokenProgress(progress, 0.4, 0.5 / runs, max_new_tokens, "Language model (PruneVid)")
    result = answer(loaded, encoded.video, question, config, max_new_tokens, encoded.features, streamer)
    result.timings["video_s"] = decode_s
    result.timings["vision_s"] = encode_s
    result.timings["total_s"] += decode_s + encode_s

    baseline = None
    if compare:
        progress(0.65, "Language model without pruning (for comparison)")
        stock = config.replace(stage1=False, stage2=False)
        streamer = _TokenProgress(progress, 0.65, 0.25, max_new_tokens, "Language model (unpruned)")
        baseline = answer(loaded, encoded.video, question, stock, max_new_tokens, encoded.features, streamer)

    num_text = result.num_prompt_tokens - result.trace.num_visual_tokens
    ratio = flops_ratio(loaded, result.trace, config, result.num_prompt_tokens)
    return Outcome(loaded.name, question, encoded.video, result, baseline, cache_used, num_text, ratio)


def _seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def speed_markdown(outcome: Outcome) -> str:
    """The speed panel: tokens per stage, timings, measured speedup and FLOPs ratio."""
    trace, timings = outcome.trace, outcome.result.timings
    total = trace.num_visual_tokens
    s1, s2 = trace.num_after_stage1, trace.num_after_stage2
    lines = [
        "| Speed | |",
        "|---|---|",
        f"| Visual tokens | **{total}** → stage 1: **{s1}** ({100 * s1 / total:.0f}%) → "
        f"stage 2: **{s2}** ({100 * s2 / total:.0f}%) |",
        f"| LLM prefill (PruneVid) | {_seconds(timings['llm_prefill_s'])} in the decoder (stage 2 included: "
        f"{_seconds(timings.get('stage2_s', 0.0))}) + stage 1 {_seconds(timings.get('stage1_s', 0.0))} |",
        f"| Prefill FLOPs vs unpruned | **{outcome.flops_ratio:.2f}x** ({1 / outcome.flops_ratio:.1f}x fewer) |",
    ]
    if outcome.baseline is not None:
        base = outcome.baseline.timings["llm_prefill_s"]
        speedup = prefill_speedup(outcome.baseline, outcome.result)
        overall = prefill_speedup(outcome.baseline, outcome.result, with_stage1=True)
        lines.append(
            f"| LLM prefill (unpruned) | {_seconds(base)}: measured speedup **{speedup:.1f}x** "
            f"({overall:.1f}x counting stage 1) |"
        )
        if outcome.model in TINY_MODELS:
            lines.append(
                "| Note | the tiny model is so small that fixed per-call costs dominate its times; "
                "the FLOPs ratio is what carries over to real models |"
            )
    if outcome.cache_used:
        vision = "skipped: **cache used** (same video, model and frame count as an earlier question)"
    else:
        vision = f"{_seconds(timings['vision_s'])} (decode {_seconds(timings['video_s'])})"
    lines += [
        f"| Vision tower | {vision} |",
        f"| Generation | {outcome.result.num_new_tokens} tokens in {_seconds(timings['generate_s'])} |",
        f"| Total (PruneVid run) | {_seconds(timings['total_s'])} |",
    ]
    return "\n".join(lines)


def display_frames(frames: np.ndarray, max_side: int = DISPLAY_SIDE) -> np.ndarray:
    """The frames at display size (never enlarged)."""
    return downscale(frames, max_side)
