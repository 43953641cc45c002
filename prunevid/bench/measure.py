"""One measurement of `prunevid bench speed`: a generate() call of one method, timed and probed.

A `Method` (`prunevid.accuracy`'s, shared with the accuracy benchmark) is one way to run the
model: stock, or patched with a config and a stage-2 rule. A `Prompt` is a clip's model inputs
without the pixels plus the vision features generate() takes in their place, so that every call
measures the language model only. `run_once` runs one generate() and returns a `Sample`: LM
prefill seconds (to the first new token), decode ms/token, KV-cache bytes right after the
prefill (a forward hook), peak RSS (/proc) and the trace's token counts and stage timings.
`measure` repeats that over all methods, warm-up first, the order rotated every round. The
frame preprocessing and the vision tower, which no method changes, are timed apart, each on its
second call (`VisionCost`).

On a GPU every clock here is fenced (`models.timing.clock(device)`: the device has
finished what was queued before the reading): the start of generate(), each new token, the
preprocessing and the vision tower. The stage timings a patched model records need no fence:
they are CUDA-event intervals (`models.timing.Interval`), read with the trace, so the timed call
runs as a server's does. Decode: ms per token over the call's new tokens (the
mean of the fenced intervals between tokens, what an answer costs) and the median interval.
"""

from __future__ import annotations

import gc
import itertools
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..accuracy import Method
from ..api import family_of, last_trace, patch, unpatch
from ..models.base import for_device
from ..models.llava_onevision import pooled_grid
from ..models.timing import clock

DEFAULT_QUESTION = "What animal is in the video?"


def apply(model: torch.nn.Module, method: Method) -> None:
    """Run `method` from now on: the stock model (`config` None) or PruneVid with its rule."""
    if method.config is None:
        unpatch(model)
    else:
        patch(model, method.config, method.method)


@dataclass
class Prompt:
    """A clip's model inputs without the pixels (token ids, mask and the family's extras) and
    the vision features generate() takes in their place."""

    inputs: dict[str, torch.Tensor]
    features: Any  # vision_features' pooler_output
    visual_tokens: int  # T*N (LLaVA-OneVision's trailing newline is not pruned by anyone)

    @property
    def length(self) -> int:
        return self.inputs["input_ids"].shape[1]

    def fresh_features(self, dtype: torch.dtype) -> Any:
        """A copy of the features in `dtype`: the patched model reuses stage 1 for a feature
        tensor it has seen (follow-up questions), and every measured call must run its own."""
        if isinstance(self.features, torch.Tensor):
            return self.features.to(dtype, copy=True)
        return tuple(f.to(dtype, copy=True) for f in self.features)


def model_inputs(
    model: torch.nn.Module, tokenizer: Any, frames: np.ndarray, question: str
) -> tuple[dict[str, torch.Tensor], float]:
    """The family's inputs for one clip and question, pixels included (with the family's default
    frame sizing; on a GPU resized and normalised there), on the model's device, and the seconds
    the frame preprocessing took, to the inputs on the device."""
    family = family_of(model)
    processing = for_device(family.Preprocessing.for_config(model.config), model.device)
    tic = clock(model.device)
    inputs = family.build_inputs(tokenizer, model.config, frames, question, processing)
    inputs = {key: value.to(model.device) for key, value in inputs.items()}
    return inputs, clock(model.device) - tic


@torch.inference_mode()
def vision_features(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[Any, float]:
    """The vision tower + projector (+ pooling) on all frames, and the seconds it took: the
    `pooler_output` that generate() takes precomputed (LLaVA-OneVision: (1, T*N + 1, C) with the
    newline; Qwen-VL: per video (T*N, C), T time steps of two frames)."""
    pixels = inputs["pixel_values_videos"].to(model.dtype)
    tic = clock(model.device)
    output = family_of(model).video_features(model, {**inputs, "pixel_values_videos": pixels})
    return output.pooler_output, clock(model.device) - tic


def video_tokens(model: torch.nn.Module, prompt: Prompt) -> tuple[torch.Tensor, tuple[int, int]]:
    """The clip's visual tokens as stage 1 receives them: (T, N, C), and the (H, W) grid."""
    if model.config.model_type == "llava_onevision":
        grid = pooled_grid(model.config)
        tokens = prompt.features[0, :-1]  # the newline token closes the video
    else:
        merge = model.config.vision_config.spatial_merge_size
        grid = tuple(int(n) // merge for n in prompt.inputs["video_grid_thw"][0, 1:])
        tokens = prompt.features[0]
    return tokens.reshape(-1, grid[0] * grid[1], tokens.shape[-1]), grid


def make_prompt(model: torch.nn.Module, inputs: dict[str, torch.Tensor], features: Any) -> Prompt:
    """The prompt for `inputs` (from `model_inputs`; pixels dropped) and their vision features."""
    prompt = Prompt({k: v for k, v in inputs.items() if k != "pixel_values_videos"}, features, 0)
    prompt.visual_tokens = video_tokens(model, prompt)[0].shape[:2].numel()
    return prompt


@dataclass
class VisionCost:
    """Seconds that no method changes: frame preprocessing and the vision tower (for T frames)."""

    preprocess_s: float
    vision_s: float
    frames_timed: int
    frames: int
    dtype: str

    @property
    def scaled(self) -> bool:
        return self.frames_timed != self.frames

    def describe(self) -> str:
        how = (
            f"measured on all {self.frames} frames"
            if not self.scaled
            else f"measured on {self.frames_timed} frame(s) and scaled linearly to {self.frames}"
        )
        return f"vision tower {self.vision_s:.2f} s ({self.dtype}, {how}); preprocessing {self.preprocess_s:.3f} s"


def time_vision(model: torch.nn.Module, tokenizer: Any, frames: np.ndarray, frames_timed: int) -> float:
    """Vision seconds for all T frames, measured on the first `frames_timed` (scaled linearly:
    both towers attend within a frame or a two-frame time step; pooling costs nothing), on the
    tower's second call: the first pays one-time costs (on a GPU, loading kernels: ~1 s)."""
    inputs, _ = model_inputs(model, tokenizer, frames[:frames_timed], DEFAULT_QUESTION)
    vision_features(model, inputs)
    _, seconds = vision_features(model, inputs)
    return seconds * len(frames) / frames_timed


@dataclass
class Sample:
    """One generate() call of one method."""

    prefill_s: float
    decode_ms: float | None  # mean over the new tokens
    kv_bytes: int
    kv_tokens: int
    peak_rss: int
    rss_before: int
    prefill_cpu_s: float = 0.0
    stage1_s: float = 0.0
    stage2_s: float = 0.0
    decoder_s: float | None = None
    stage1_tokens: int | None = None
    visual_tokens: int | None = None
    layer_retention: float = 1.0  # visual tokens averaged over the decoder layers, share of all
    load: float = 0.0
    decode_steps_ms: list[float] = field(default_factory=list)  # fenced intervals between tokens

    @property
    def decode_median_ms(self) -> float | None:
        return statistics.median(self.decode_steps_ms) if self.decode_steps_ms else None


class TokenClock:
    """A generate() streamer noting when each new token is ready (the first put is the prompt).

    Fenced on a GPU: generate() hands the streamer a host copy of the token, which waits for the
    step on a stock loop, but a loop that streams one step behind (transformers defers the stop
    check on some devices) would hand it over with the next step queued; `clock` waits for both."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self.first_cpu = 0.0  # process CPU seconds (all threads) when the first new token arrived
        self.calls = 0

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls > 1:
            self.times.append(clock(self.device))
        if self.calls == 2:
            self.first_cpu = time.process_time()

    def end(self) -> None:
        pass


class CacheProbe:
    """Forward hook: the KV-cache size right after the first forward of a generate() (the prefill)."""

    def __init__(self) -> None:
        self.bytes: int | None = None
        self.tokens = 0

    def __call__(self, module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        cache = getattr(output, "cache", None)
        if self.bytes is None and cache is not None:
            self.bytes = cache_bytes(cache)
            self.tokens = cache.layers[0].keys.shape[2]


def cache_bytes(cache: Any) -> int:
    """Sum of keys and values bytes over the cache's layers."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def rss_bytes(field_name: str = "VmRSS") -> int:
    """Current (VmRSS) or peak (VmHWM) resident memory of this process from /proc (0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages (None where the platform has none)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


@torch.inference_mode()
def generate(model: torch.nn.Module, prompt: Prompt, new_tokens: int, streamer: Any = None) -> None:
    """Greedy generate() of exactly `new_tokens` tokens from the prompt's precomputed features
    (a fresh copy: each call runs its own stage 1)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    features = BaseModelOutputWithPooling(pooler_output=prompt.fresh_features(model.dtype))
    model.generate(
        **prompt.inputs,
        mm_encoder_outputs={"video": features},
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        streamer=streamer,
    )


def run_once(model: torch.nn.Module, method: Method, prompt: Prompt, new_tokens: int) -> Sample:
    """One generate() from precomputed features: prefill seconds, decode ms/token, KV bytes, peak
    RSS and the trace's stage timings."""
    apply(model, method)
    gc.collect()
    reset_peak_rss()
    rss_before = rss_bytes()
    probe, tokens = CacheProbe(), TokenClock(model.device)
    handle = model.register_forward_hook(probe, with_kwargs=True)
    try:
        start_cpu, start = time.process_time(), clock(model.device)
        generate(model, prompt, new_tokens, tokens)
    finally:
        handle.remove()
    sample = _sample(model, method, prompt, start, tokens, probe, rss_before)
    sample.prefill_cpu_s = tokens.first_cpu - start_cpu
    return sample


def _sample(
    model: torch.nn.Module,
    method: Method,
    prompt: Prompt,
    start: float,
    clock: TokenClock,
    probe: CacheProbe,
    rss_before: int,
) -> Sample:
    times = clock.times
    decode_ms = 1000 * (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
    sample = Sample(
        prefill_s=times[0] - start,
        decode_ms=decode_ms,
        decode_steps_ms=[1000 * (b - a) for a, b in itertools.pairwise(times)],
        kv_bytes=probe.bytes or 0,
        kv_tokens=probe.tokens,
        peak_rss=rss_bytes("VmHWM"),
        rss_before=rss_before,
        load=(load_average() or [0.0])[0],
    )
    if method.config is None:
        sample.stage1_tokens = sample.visual_tokens = prompt.visual_tokens
        return sample
    trace = last_trace(model)
    sample.stage1_tokens, sample.visual_tokens = trace.num_after_stage1, trace.num_after_stage2
    sample.layer_retention = trace.layer_retention
    sample.stage1_s = trace.timings.get("stage1_s", 0.0)
    sample.stage2_s = trace.timings.get("stage2_s", 0.0)
    sample.decoder_s = trace.timings.get("llm_prefill_s")
    return sample


def measure(
    model: torch.nn.Module,
    methods: Sequence[Method],
    prompt: Prompt,
    repeats: int,
    new_tokens: int,
    warmup: Prompt | None = None,
    desc: str = "bench",
) -> dict[str, list[Sample]]:
    """Warm-up (one short call per method), then `repeats` rounds over all methods, the order
    rotated by one every round so that background load and drift hit every method alike."""
    samples: dict[str, list[Sample]] = {m.name: [] for m in methods}
    total = len(methods) * (repeats + (warmup is not None))
    with tqdm(total=total, desc=desc, leave=False, file=sys.stderr, mininterval=2.0) as bar:
        if warmup is not None:
            # A GPU's first call at a shape pays one-time costs (allocator growth, kernel
            # selection): warm up at the timed shape there; on the CPU the short clip suffices.
            warm = prompt if model.device.type == "cuda" else warmup
            for method in methods:
                bar.set_postfix_str(f"warm-up {method.name}")
                run_once(model, method, warm, min(2, new_tokens))
                bar.update()
        for r in range(repeats):
            shift = r % len(methods)
            for method in [*methods[shift:], *methods[:shift]]:
                bar.set_postfix_str(f"repeat {r + 1}/{repeats} {method.name}")
                samples[method.name].append(run_once(model, method, prompt, new_tokens))
                bar.update()
    unpatch(model)
    return samples
