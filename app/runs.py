"""One question, without Gradio: check and decode the video (or reuse its cached features), run
the model work (PruneVid, and optionally the unpruned model or another method at the same token
budget) and gather what the page shows (`Outcome`).

Decoded frames (kept at display size) and vision features share one byte budget with stage-1
results (`prunevid.lru.shared_cache`, PRUNEVID_CACHE_MB).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from prunevid.baselines import METHODS
from prunevid.config import PruneVidConfig
from prunevid.flops import DecoderShape, prefill_flops
from prunevid.pipeline import LoadedModel, Result, answer, check_question, encode_video
from prunevid.trace import PruningTrace
from prunevid.video import Video, downscale, load_video

from . import hardware
from .limits import Limits, check_upload, file_digest

if TYPE_CHECKING:
    from .models import ModelRegistry

DISPLAY_SIDE = 640  # overlays are drawn on frames at most this large

UNPRUNED = "unpruned"  # compare with the stock model; any other comparison is a method of METHODS
METHOD_LABELS = {
    "prunevid": "PruneVid",
    "stage1": "PruneVid stage 1 only",
    "stage2": "PruneVid stage 2 only",
    "fastv": "FastV-style",
    "random": "random tokens",
    "uniform": "uniform pooling",
    "evs": "EVS-style",
    "dycoke": "DyCoke-style",
}
# What an answer can be compared with: nothing, the unpruned model, or another method at PruneVid's budget.
COMPARISONS = ["", UNPRUNED, *(name for name in METHODS if name != "prunevid")]

Progress = Callable[[float, str], None]
log = logging.getLogger(__name__)


def no_progress(fraction: float, text: str) -> None:
    pass


def comparison(compare: str, config: PruneVidConfig, ours: PruningTrace) -> tuple[PruneVidConfig, str]:
    """The settings and method of the run PruneVid is compared with: the stock model, or a method
    of `prunevid.baselines.METHODS` at PruneVid's budget (the page's retention, or else the share
    of the tokens PruneVid kept, which gives the method exactly PruneVid's count)."""
    if compare == UNPRUNED:
        return config.replace(stage1=False, stage2=False), "prunevid"
    if compare not in METHODS:
        raise ValueError(f"cannot compare with {compare!r}; choose one of {', '.join(COMPARISONS[1:])}")
    return config.replace(retention=config.retention or ours.retention), compare


def comparison_label(compare: str) -> str:
    return "unpruned model" if compare == UNPRUNED else METHOD_LABELS.get(compare, compare)


@dataclass
class Encoded:
    """A video as the cache keeps it: frames at display size (only drawn), the sampled frames'
    full shape (T, H, W) (the prompt depends on it) and the vision tower's output."""

    video: Video  # frames (T, h, w, 3) at most DISPLAY_SIDE
    frame_shape: tuple[int, int, int]
    features: Any  # the family's vision features, e.g. (1, T*N + 1, C)


@dataclass
class Job:
    """The model work of one answer, picklable (ZeroGPU runs it in another process)."""

    model: str
    question: str
    config: PruneVidConfig
    max_new_tokens: int
    compare: str  # "" (no comparison), UNPRUNED or a method of METHODS
    frame_shape: tuple[int, int, int]  # (T, H, W)
    frames: np.ndarray | None = None  # (T, H, W, 3) sampled frames; None when features are cached
    features: Any = None


@dataclass
class Work:
    """What the model work returns: both answers, the features (to cache) and the tower's seconds."""

    result: Result
    other: Result | None
    features: Any
    vision_s: float = field(default=0.0)


def check_layer(loaded: LoadedModel, config: PruneVidConfig) -> None:
    layers = loaded.num_layers
    if config.stage2 and config.selected_layer >= layers:
        raise ValueError(
            f"selected_layer must be below the model's {layers} decoder layers (0 to {layers - 1}), "
            f"got {config.selected_layer}"
        )


def flops_ratio(loaded: LoadedModel, trace: PruningTrace, num_prompt: int) -> float:
    """Prefill FLOPs of the traced run / without pruning: the stage-1 length up to the selected
    layer, the stage-2 length after it (the settings the run had, from its trace).

    num_prompt is the unpruned prompt (text and video tokens); only visual tokens are pruned.
    """
    shape = DecoderShape.from_config(loaded.model.config)
    text = num_prompt - trace.num_visual_tokens
    after = trace.num_after_stage2 + text if trace.config.get("stage2") else None
    pruned = prefill_flops(shape, trace.num_after_stage1 + text, after, trace.config.get("selected_layer", 0))
    return pruned / prefill_flops(shape, num_prompt)


class _Phases:
    """Reports the phases of one generate() to `progress`: stage 1 (the prompt is in, the first
    forward starts with it), prefill (the first decoder layer runs for the first time) and each
    generated token. A generate() streamer plus a forward pre-hook on the first decoder layer."""

    def __init__(self, progress: Progress, start: float, span: float, limit: int, label: str, stage1: bool):
        self.progress, self.start, self.span, self.limit = progress, start, span, limit
        self.label, self.stage1 = label, stage1
        self.count, self.prefilling = -1, False  # the first put is the prompt

    def put(self, value: torch.Tensor) -> None:
        self.count += 1
        if self.count == 0 and self.stage1:
            self.progress(self.start, f"Stage 1: merging repeated tokens ({self.label})")
        elif self.count > 0:
            done = min(self.count / self.limit, 1.0)
            text = f"Generation ({self.label}): token {self.count} of at most {self.limit}"
            self.progress(self.start + self.span * (0.2 + 0.8 * done), text)

    def end(self) -> None:
        pass

    def __call__(self, module: torch.nn.Module, args: Any) -> None:
        if not self.prefilling:
            self.prefilling = True
            self.progress(
                self.start + 0.05 * self.span, f"Prefill: the language model reads the prompt ({self.label})"
            )


def _answer_with_progress(
    loaded: LoadedModel,
    frames: np.ndarray,
    job: Job,
    features: Any,
    progress: Progress,
    start: float,
    span: float,
    label: str,
    config: PruneVidConfig | None = None,
    method: str = "prunevid",
) -> Result:
    """`answer` with its phases reported to `progress` between `start` and `start + span`."""
    config = config or job.config
    phases = _Phases(progress, start, span, job.max_new_tokens, label, config.stage1)
    handle = loaded.model.get_decoder().layers[0].register_forward_pre_hook(phases)
    try:
        return answer(loaded, frames, job.question, config, job.max_new_tokens, features, phases, method)
    finally:
        handle.remove()


def model_work(loaded: LoadedModel, job: Job, progress: Progress = no_progress) -> Work:
    """The model part of one answer: vision tower (unless cached), then PruneVid's answer
    (stage 1, prefill with stage 2, generation) and, when comparing, the other run."""
    frames = job.frames
    if frames is None:  # cached features: the prompt needs the frames' shape only
        frames = np.broadcast_to(np.zeros((1, 1, 1, 3), np.uint8), (*job.frame_shape, 3))
    features, vision_s = job.features, 0.0
    if features is None:
        progress(0.1, f"Vision tower: encoding {len(frames)} frames")
        tic = time.perf_counter()
        features = encode_video(loaded, frames)
        vision_s = time.perf_counter() - tic
    else:
        features = hardware.move_to(features, loaded.device)
    runs = 2 if job.compare else 1
    result = _answer_with_progress(loaded, frames, job, features, progress, 0.4, 0.5 / runs, "PruneVid")
    other = None
    if job.compare:
        config, method = comparison(job.compare, job.config, result.trace)
        label = comparison_label(job.compare)
        other = _answer_with_progress(
            loaded, frames, job, features, progress, 0.65, 0.25, label, config=config, method=method
        )
    if hardware.zero_gpu():  # results cross back to the main process: no CUDA tensors
        features = hardware.move_to(features, "cpu")
    return Work(result, other, features, vision_s)


@dataclass
class Outcome:
    """One question answered: PruneVid's run, the optional run it is compared with (`compare`:
    UNPRUNED or a method name), and what the speed panel shows."""

    model: str
    question: str
    video: Video
    result: Result
    other: Result | None
    cache_used: bool
    num_text_tokens: int
    flops_ratio: float
    compare: str = ""
    other_flops_ratio: float | None = None

    @property
    def trace(self) -> PruningTrace:
        return self.result.trace

    @property
    def other_trace(self) -> PruningTrace | None:
        """The compared method's trace (None without one, or against the unpruned model)."""
        return self.other.trace if self.other is not None and self.compare != UNPRUNED else None

    def stats(self) -> dict[str, Any]:
        """Plain numbers for the page's JSON panel and API clients."""
        trace = self.trace
        out: dict[str, Any] = {
            "model": self.model,
            "cache_used": self.cache_used,
            "num_frames": trace.num_frames,
            "grid": list(trace.grid),
            **_counts(trace),
            "num_text_tokens": self.num_text_tokens,
            "flops_ratio": self.flops_ratio,
            "num_new_tokens": self.result.num_new_tokens,
            "timings": dict(self.result.timings),
            "config": self.result.config.to_dict(),
        }
        if self.compare == UNPRUNED:
            out["unpruned_timings"] = dict(self.other.timings)
            out["prefill_speedup"] = prefill_speedup(self.other, self.result)
            out["prefill_speedup_with_stage1"] = prefill_speedup(self.other, self.result, with_stage1=True)
        elif self.other is not None:
            out["comparison"] = {
                "method": self.compare,
                "answer": self.other.text,
                **_counts(self.other.trace),
                "flops_ratio": self.other_flops_ratio,
                "timings": dict(self.other.timings),
            }
        return out


COUNTS = (
    "num_visual_tokens",
    "num_after_stage1",
    "num_after_stage2",
    "retention",
    "retention_target",
    "retention_layer_averaged",
)


def _counts(trace: PruningTrace) -> dict[str, Any]:
    """The token counts and retentions of a run, as its trace summarises them."""
    summary = trace.summary()
    return {key: summary[key] for key in COUNTS}


def prefill_speedup(baseline: Result, pruned: Result, with_stage1: bool = False) -> float:
    """Unpruned decoder prefill time / PruneVid's (optionally adding stage 1, which runs before it)."""
    ours = pruned.timings["llm_prefill_s"] + (pruned.timings.get("stage1_s", 0.0) if with_stage1 else 0.0)
    return baseline.timings["llm_prefill_s"] / max(ours, 1e-9)


def run_question(
    registry: ModelRegistry,
    model: str,
    path: str,
    question: str,
    config: PruneVidConfig,
    compare: str = "",
    max_new_tokens: int = 64,
    progress: Progress = no_progress,
    limits: Limits | None = None,
    work: Callable[[Job, Progress], Work] | None = None,
) -> Outcome:
    """Check and decode the video (or reuse its cached features), run the model work (`work`:
    `registry.work`, or its `spaces.GPU` wrapper on ZeroGPU), and keep what a follow-up question
    reuses: display-size frames and features, in the shared byte budget. `compare`: "" (nothing),
    UNPRUNED or a method of `prunevid.baselines.METHODS`, run at PruneVid's budget."""
    question = check_question(question)
    if compare not in COMPARISONS:
        raise ValueError(f"cannot compare with {compare!r}; choose one of {', '.join(COMPARISONS[1:])}")
    loaded = registry.get(model)
    check_layer(loaded, config)
    progress(0.0, f"Decode: checking the video and sampling {config.num_frames} frames")
    check_upload(path, limits or Limits())
    key = ("video", file_digest(path), model, config.num_frames)
    encoded = registry.cache.get(key)
    job = Job(model, question, config, max_new_tokens, compare, (config.num_frames, 0, 0))
    tic = time.perf_counter()
    if encoded is None:
        video = load_video(path, config.num_frames)
        job.frames, job.frame_shape = video.frames, video.frames.shape[:3]
    else:
        job.features, job.frame_shape = encoded.features, encoded.frame_shape
        progress(0.1, "Vision tower: skipped, the cached features of this video are reused")
    decode_s = time.perf_counter() - tic

    done = (work or registry.work)(job, progress)
    if encoded is None:
        small = Video(display_frames(video.frames), video.timestamps, video.fps, video.duration, video.path)
        encoded = Encoded(small, job.frame_shape, done.features)
        registry.cache.put(key, encoded)
    result = done.result
    result.timings["video_s"] = decode_s
    result.timings["vision_s"] = done.vision_s
    result.timings["total_s"] += decode_s + done.vision_s
    num_text = result.num_prompt_tokens - result.trace.num_visual_tokens
    ratio = flops_ratio(loaded, result.trace, result.num_prompt_tokens)
    other_ratio = (
        None if done.other is None else flops_ratio(loaded, done.other.trace, result.num_prompt_tokens)
    )
    cached = job.frames is None
    return Outcome(
        model, question, encoded.video, result, done.other, cached, num_text, ratio, compare, other_ratio
    )


def display_frames(frames: np.ndarray, max_side: int = DISPLAY_SIDE) -> np.ndarray:
    """The frames at display size (never enlarged)."""
    return downscale(frames, max_side)
