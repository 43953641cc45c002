"""Speed and estimates: the speeds measured at warm-up, the wait a question should take, the
hardware-aware starting settings, and the speed panel's text.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prunevid.config import PruneVidConfig
from prunevid.pipeline import is_out_of_memory

from . import hardware
from .catalog import TINY_MODELS
from .limits import duration_text, file_digest
from .runs import UNPRUNED, Outcome, comparison_label, prefill_speedup

if TYPE_CHECKING:
    from .models import ModelRegistry

CPU_FRAMES = 8  # where a real model runs on CPUs, the page starts here (its vision tower is slow)
LONG_WAIT_S = 10.0  # a question expected to take longer is announced with its estimate


@dataclass(frozen=True)
class Speed:
    """Seconds measured on this machine at warm-up: what the wait estimates are made of."""

    vision_per_frame: float  # the vision tower
    pruned_per_frame: float  # stage 1 + decoder prefill with PruneVid
    unpruned_per_frame: float  # decoder prefill without pruning
    per_token: float  # one generated token

    def estimate(self, frames: int, new_tokens: int, compare: str, cached: bool) -> float:
        """Seconds one question should take at most (every answer runs to `new_tokens`)."""
        seconds = 0.0 if cached else frames * self.vision_per_frame
        seconds += frames * self.pruned_per_frame + new_tokens * self.per_token
        if compare:
            seconds += frames * self.unpruned_per_frame + new_tokens * self.per_token
        return seconds


def estimate_wait(
    registry: ModelRegistry, model: str, path: str, config: PruneVidConfig, compare: str, max_new_tokens: int
) -> float | None:
    """Seconds the question should take at most on this machine (None when the model's speed was
    not measured, e.g. on ZeroGPU, where the GPU makes waits short)."""
    speed = registry.speeds.get(model)
    if speed is None:
        return None
    key = ("video", file_digest(path), model, config.num_frames) if os.path.isfile(path) else None
    cached = key is not None and key in registry.cache
    return speed.estimate(config.num_frames, max_new_tokens, compare, cached)


def page_config(model: str, config: PruneVidConfig) -> PruneVidConfig:
    """The settings the page starts a model with: its preset, at most CPU_FRAMES frames where a
    real checkpoint would run its vision tower on CPUs (about 7 s a frame for the 0.5B model)."""
    if hardware.has_gpu() or model in TINY_MODELS:
        return config
    return config.replace(num_frames=min(config.num_frames, CPU_FRAMES))


def hardware_note(model: str, config: PruneVidConfig, registry: ModelRegistry) -> str | None:
    """What the banner says when the page starts a model with fewer frames than its preset."""
    frames = page_config(model, config).num_frames
    if frames == config.num_frames:
        return None
    speed = registry.speeds.get(model)
    wait = (
        ""
        if speed is None
        else f" (up to about {duration_text(speed.estimate(frames, 64, False, False))} a question here)"
    )
    return (
        f"This server has no GPU, so the page starts at {frames} frames instead of the model's "
        f"{config.num_frames}{wait}; more frames in Advanced settings show more of the video but take longer."
    )


def wait_message(seconds: float, frames: int) -> str:
    """The notice before a long run."""
    return (
        f"This answer will take up to about {duration_text(seconds)} on this server ({frames} frames through "
        "the vision tower and the language model, as measured at start-up); fewer frames are faster."
    )


def describe_failure(error: BaseException, during: str) -> str:
    """One sentence for an unexpected failure `during` something (running the model, drawing)."""
    if is_out_of_memory(error):
        return (
            f"The server ran out of memory while {during}: try fewer frames, a shorter answer or a smaller "
            "model, or ask again when the server is less busy."
        )
    text = " ".join(str(error).split()).replace(". ", "; ").rstrip(".")
    return f"Something went wrong while {during} ({type(error).__name__}: {text[:200]})."


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
    if outcome.compare == UNPRUNED:
        base = outcome.other.timings["llm_prefill_s"]
        speedup = prefill_speedup(outcome.other, outcome.result)
        overall = prefill_speedup(outcome.other, outcome.result, with_stage1=True)
        lines.append(
            f"| LLM prefill (unpruned) | {_seconds(base)}: measured speedup **{speedup:.1f}x** "
            f"({overall:.1f}x counting stage 1) |"
        )
        if outcome.model in TINY_MODELS:
            lines.append(
                "| Note | the tiny model is so small that fixed per-call costs dominate its times; "
                "the FLOPs ratio is what carries over to real models |"
            )
    other = outcome.other_trace
    if other is not None:  # a method at the same budget
        label, theirs = comparison_label(outcome.compare), outcome.other.timings
        o1, o2 = other.num_after_stage1, other.num_after_stage2
        lines += [
            f"| Visual tokens ({label}) | **{total}** → before the LLM: **{o1}** ({100 * o1 / total:.0f}%) → "
            f"after layer {other.config.get('selected_layer', 0)}: **{o2}** ({100 * o2 / total:.0f}%) |",
            f"| LLM prefill ({label}) | {_seconds(theirs['llm_prefill_s'])} in the decoder + "
            f"{_seconds(theirs.get('stage1_s', 0.0))} before it; FLOPs **{outcome.other_flops_ratio:.2f}x** "
            "of unpruned |",
        ]
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
