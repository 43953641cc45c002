"""Benchmarks (`prunevid bench ...`). Subcommands are registered in `add_commands`.

`prunevid bench speed` measures, in one process and interleaved, what PruneVid changes in a
LLaVA-OneVision or Qwen2.5-VL model of real layer sizes (random weights: speed does not depend
on them):

* stock: the unpatched model;
* stage1 / stage2: one stage of PruneVid only;
* prunevid: both stages (the paper's defaults);
* fastv / random: stage 1 off, stage 2's rule swapped for FastV's (last prompt token's
  attention at the same layer) or a seeded random pick, at PruneVid's final retention.

Per method: visual tokens kept, LM prefill (wall time from `generate()` with precomputed
vision features to the first new token: embeddings, stage 1, the decoder with stage 2, the
LM head on the last position), stage-1 time, end-to-end time to first token from pixels
(frame preprocessing + vision tower, both measured once since no method changes them, plus
the LM prefill), decode ms/token, KV-cache bytes after prefill, peak RSS, analytic FLOPs
(`prunevid.flops`, text tokens included) and speedups vs stock. Medians over repeats with
min-max spread; the methods' order rotates every repeat so background load hits all alike.

Random-weight vision towers make every token look alike, so stage 1's output size is set by
calibrating `tau` on the clip's features (bisection) to a stated retention (default 40%).
`--sweep` adds a grid over `alpha` x `cluster_ratio` (CSV + speedup-vs-retention plot).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import baselines
from .api import family_of, last_trace, patch, unpatch
from .config import PruneVidConfig
from .flops import DecoderShape, prefill_flops
from .merge import merge_tokens
from .models.decoder import Rule
from .models.llava_onevision import pooled_grid
from .select import keep_by_budget

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VIDEO = "assets/bbb.mp4"
DEFAULT_QUESTION = "What animal is in the video?"
BENCH_VOCAB = 32768  # real Qwen2 has 151,936: only the LM head on one position depends on it
METHOD_NAMES = ("stock", "stage1", "stage2", "prunevid", "fastv", "random")
MIB = 2**20

# LLaVA-OneVision's SigLIP-so400m: its last layer and pooling head are dropped (26 of 27 layers).
SIGLIP_SO400M = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=26,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
    vision_use_head=False,
)
# Qwen2.5-VL-3B-Instruct's vision tower (window attention, full attention every 8th block).
QWEN25_VIT = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    out_hidden_size=2048,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    tokens_per_second=2,
    hidden_act="silu",
)


# ----------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class Arch:
    """A model to benchmark: its family, Qwen2 text sizes and vision tower (empty for the tiny
    test models)."""

    name: str
    text: dict[str, Any]
    selected_layer: int
    note: str
    family: str = "llava_onevision"
    vision: dict[str, Any] = field(default_factory=lambda: SIGLIP_SO400M)


ARCHS: dict[str, Arch] = {
    "tiny": Arch("tiny", {}, 1, "prunevid.testing tiny model (2-layer SigLIP 112 px, 4-layer Qwen2)"),
    "tiny-qwen": Arch(
        "tiny-qwen",
        {},
        1,
        "prunevid.testing tiny Qwen2.5-VL (2-block vision tower, 4-layer Qwen2 with M-RoPE)",
        "qwen2_5_vl",
        {},
    ),
    "qwen2-0.5b": Arch(
        "qwen2-0.5b",
        dict(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
        10,
        "LLaVA-OneVision-0.5B sizes: SigLIP-so400m + Qwen2-0.5B (24 layers), vocab cut to 32,768",
    ),
    "qwen2-7b-4layers": Arch(
        "qwen2-7b-4layers",
        dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=4,
            num_attention_heads=28,
            num_key_value_heads=4,
            tie_word_embeddings=False,
        ),
        1,
        "LLaVA-OneVision-7B layer sizes (Qwen2-7B) with 4 of its 28 decoder layers, vocab cut to "
        "32,768; selected_layer 1 = 10 * 4 // 28 (layers 0-1 at full length, 2-3 pruned)",
    ),
    "qwen2-7b": Arch(
        "qwen2-7b",
        dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            tie_word_embeddings=False,
        ),
        10,
        "LLaVA-OneVision-7B sizes: SigLIP-so400m + Qwen2-7B (all 28 layers), vocab cut to 32,768 "
        "(GPU runs: scripts/gpu_check.sh)",
    ),
    "qwen2.5-vl-7b": Arch(
        "qwen2.5-vl-7b",
        dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
        ),
        10,
        "Qwen2.5-VL-7B-Instruct sizes: its 32-block window-attention ViT + Qwen2.5-7B (28 layers, "
        "M-RoPE), vocab cut to 32,768 (GPU runs: scripts/gpu_check.sh)",
        "qwen2_5_vl",
        {**QWEN25_VIT, "out_hidden_size": 3584},
    ),
    "qwen2.5-vl-3b": Arch(
        "qwen2.5-vl-3b",
        dict(
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
        ),
        10,
        "Qwen2.5-VL-3B-Instruct sizes: its 32-block window-attention ViT + Qwen2.5-3B (36 layers, "
        "M-RoPE), vocab cut to 32,768; frames sized by the video processor's defaults "
        "(128-768 x 28 x 28 pixels, as qwen-vl-utils)",
        "qwen2_5_vl",
        QWEN25_VIT,
    ),
}


def build_model(arch: Arch, seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """A random-weight model of `arch` (fp32, eval) and a tokenizer."""
    from .testing import tiny_model, tiny_qwen_vl, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    if not arch.text:
        tiny = (
            tiny_model(seed, tokenizer)
            if arch.family == "llava_onevision"
            else tiny_qwen_vl(arch.family, seed, tokenizer)
        )
        return tiny, tokenizer
    from transformers import LlavaOnevisionForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

    if arch.family == "llava_onevision":
        model_class, config = LlavaOnevisionForConditionalGeneration, _llava_config(arch, tokenizer)
    else:
        model_class, config = Qwen2_5_VLForConditionalGeneration, _qwen25_config(arch, tokenizer)
    with _skip_init():
        model = model_class(config).eval()
    model.tie_weights()  # skipped along with the initialisation; both 0.5B and 3B tie the LM head
    randomize(model, seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def _llava_config(arch: Arch, tokenizer: Any):
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    text = Qwen2Config(
        vocab_size=BENCH_VOCAB,
        max_position_embeddings=32768,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **arch.text,
    )
    return LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**arch.vision).to_dict(),
        text_config=text.to_dict(),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=arch.text["tie_word_embeddings"],
    )


def _qwen25_config(arch: Arch, tokenizer: Any):
    from transformers import Qwen2_5_VLConfig

    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        vocab_size=BENCH_VOCAB,
        max_position_embeddings=32768,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.pad_token_id,
        **arch.text,
    )
    return Qwen2_5_VLConfig(
        vision_config=arch.vision,
        text_config=text,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=arch.text["tie_word_embeddings"],
    )


def _skip_init():
    """transformers' context that skips weight initialisation (we fill the weights ourselves)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older layouts: initialise normally (slower, same result for speed)
        import contextlib

        return contextlib.nullcontext()
    return no_init_weights()


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Deterministic random weights: norms 1/0, other biases 0, the rest uniform with std `std`
    (uniform is faster to draw than normal; speed does not depend on the values)."""
    generator = torch.Generator().manual_seed(seed)
    bound = std * 3**0.5
    for module in model.modules():
        is_norm = "Norm" in type(module).__name__
        for name, param in module.named_parameters(recurse=False):
            if is_norm:
                param.fill_(1.0 if name == "weight" else 0.0)
            elif name == "bias":
                param.zero_()
            else:
                param.uniform_(-bound, bound, generator=generator)


# ----------------------------------------------------------------------------- clip and features


def resolve_video(path: str | None) -> Path:
    """The clip to use: `path`, or the Big Buck Bunny asset (looked up from the cwd, then the repo)."""
    candidates = [Path(path)] if path else [Path(DEFAULT_VIDEO), REPO_ROOT / DEFAULT_VIDEO]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ValueError(f"video not found: {candidates[0]} (pass --video PATH)")


def load_frames(path: Path, num_frames: int) -> np.ndarray:
    from .video import load_video

    return load_video(str(path), num_frames).frames


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


def model_inputs(
    model: torch.nn.Module, tokenizer: Any, frames: np.ndarray, question: str
) -> tuple[dict[str, torch.Tensor], float]:
    """The family's inputs for one clip and question, pixels included (with the family's default
    frame sizing), and the seconds they took (the frame preprocessing)."""
    family = family_of(model)
    processing = family.Preprocessing.for_config(model.config)
    tic = time.perf_counter()
    inputs = family.build_inputs(tokenizer, model.config, frames, question, processing)
    return inputs, time.perf_counter() - tic


@torch.inference_mode()
def vision_features(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[Any, float]:
    """The vision tower + projector (+ pooling) on all frames, and the seconds it took: the
    `pooler_output` that generate() takes precomputed (LLaVA-OneVision: (1, T*N + 1, C) with the
    newline; Qwen-VL: per video (T*N, C), T time steps of two frames)."""
    pixels = inputs["pixel_values_videos"].to(model.dtype)
    tic = time.perf_counter()
    output = family_of(model).video_features(model, {**inputs, "pixel_values_videos": pixels})
    return output.pooler_output, time.perf_counter() - tic


def features_cache_path(directory: str, video: Path, arch: Arch, seed: int, frames: int) -> Path:
    stat = video.stat()
    key = f"{video.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{arch.name}|{seed}|{frames}|v2"
    return Path(directory) / f"features-{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"


def clip_features(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], cache: Path | None
) -> tuple[Any, float | None]:
    """fp32 vision features of the clip, from `cache` when present; also the fp32 tower
    seconds when they were measured now (None when read from the cache)."""
    if cache is not None and cache.is_file():
        return torch.load(cache)["features"], None
    features, seconds = vision_features(model, inputs)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"features": features}, cache)
    return features, seconds


def time_vision(model: torch.nn.Module, tokenizer: Any, frames: np.ndarray, frames_timed: int) -> float:
    """Vision seconds for all T frames, measured on the first `frames_timed` (scaled linearly:
    both towers attend within a frame or a two-frame time step; pooling costs nothing)."""
    inputs, _ = model_inputs(model, tokenizer, frames[:frames_timed], DEFAULT_QUESTION)
    _, seconds = vision_features(model, inputs)
    return seconds * len(frames) / frames_timed


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


# ----------------------------------------------------------------------------- stage-1 calibration


@dataclass
class Calibration:
    """tau chosen by bisection so that stage 1 keeps about `target` of the clip's tokens."""

    tau: float
    tokens: int
    target: int
    total: int
    steps: int

    def describe(self) -> str:
        return (
            f"stage 1 calibrated by bisection on tau: tau={self.tau:.6f} keeps {self.tokens}/{self.total} "
            f"tokens ({100 * self.tokens / self.total:.1f}%, target {100 * self.target / self.total:.1f}%)"
        )


def calibrate_tau(
    frames: torch.Tensor,
    config: PruneVidConfig,
    retention: float,
    grid: tuple[int, int] | None = None,
    steps: int = 30,
) -> Calibration:
    """Bisection on tau (stage 1's output grows with tau: fewer static positions) to the token
    count nearest round(retention * T * N). frames: (T, N, C) features as they enter stage 1
    (grid: their (H, W); default square)."""
    total = frames.shape[0] * frames.shape[1]
    target = round(retention * total)

    def count(tau: float) -> int:
        return merge_tokens(frames, config.replace(tau=tau), grid).num_tokens

    low, high = -1.0, 1.0
    low_count, high_count = count(low), count(high)
    if target <= low_count or target >= high_count:
        tau, tokens = (low, low_count) if target <= low_count else (high, high_count)
        return Calibration(tau, tokens, target, total, 0)
    for _ in range(steps):
        middle = (low + high) / 2
        middle_count = count(middle)
        if middle_count >= target:
            high, high_count = middle, middle_count
        else:
            low, low_count = middle, middle_count
    tau, tokens = (low, low_count) if target - low_count < high_count - target else (high, high_count)
    return Calibration(tau, tokens, target, total, steps)


def stage2_kept(frames: torch.Tensor, config: PruneVidConfig, grid: tuple[int, int] | None = None) -> int:
    """Visual tokens PruneVid keeps after both stages (the budget does not depend on the scores)."""
    merge = merge_tokens(frames, config, grid)
    return len(keep_by_budget(torch.zeros(merge.num_tokens), merge.groups.cpu(), config.alpha))


# ----------------------------------------------------------------------------- methods and prompts


@dataclass(frozen=True)
class Method:
    """One way to run the model: `config` None is the stock (unpatched) model."""

    name: str
    config: PruneVidConfig | None = None
    rule: Rule | None = None


def default_methods(base: PruneVidConfig, ratio: float, seed: int = 0) -> list[Method]:
    """The six methods of the table. base: PruneVid's settings (calibrated tau);
    ratio: PruneVid's final visual retention, which FastV and random pruning match."""
    single = base.replace(stage1=False)
    return [
        Method("stock"),
        Method("stage1", base.replace(stage2=False)),
        Method("stage2", single),
        Method("prunevid", base),
        Method("fastv", single, baselines.fastv(ratio)),
        Method("random", single, baselines.random(ratio, seed)),
    ]


def sweep_methods(base: PruneVidConfig, alphas: Sequence[float], ratios: Sequence[float]) -> list[Method]:
    """PruneVid over the cluster_ratio x alpha grid (tau kept at its calibrated value)."""
    return [
        Method(f"cr={ratio:g} alpha={alpha:g}", base.replace(cluster_ratio=ratio, alpha=alpha))
        for ratio in ratios
        for alpha in alphas
    ]


def apply(model: torch.nn.Module, method: Method) -> None:
    if method.config is None:
        unpatch(model)
    else:
        patch(model, method.config, method.rule)


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


def make_prompt(model: torch.nn.Module, inputs: dict[str, torch.Tensor], features: Any) -> Prompt:
    """The prompt for `inputs` (from `model_inputs`; pixels dropped) and their vision features."""
    prompt = Prompt({k: v for k, v in inputs.items() if k != "pixel_values_videos"}, features, 0)
    prompt.visual_tokens = video_tokens(model, prompt)[0].shape[:2].numel()
    return prompt


# ----------------------------------------------------------------------------- one measurement


@dataclass
class Sample:
    """One generate() call of one method."""

    prefill_s: float
    decode_ms: float | None
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
    load: float = 0.0


class TokenClock:
    """A generate() streamer noting when each new token arrives (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.first_cpu = 0.0  # process CPU seconds (all threads) when the first new token arrived
        self.calls = 0

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls > 1:
            self.times.append(time.perf_counter())
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


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


@torch.inference_mode()
def run_once(model: torch.nn.Module, method: Method, prompt: Prompt, new_tokens: int) -> Sample:
    """One generate() from precomputed features: prefill seconds, decode ms/token, KV bytes, peak RSS."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    apply(model, method)
    gc.collect()
    reset_peak_rss()
    rss_before = rss_bytes()
    probe, clock = CacheProbe(), TokenClock()
    handle = model.register_forward_hook(probe, with_kwargs=True)
    features = BaseModelOutputWithPooling(pooler_output=prompt.fresh_features(model.dtype))
    try:
        start_cpu, start = time.process_time(), time.perf_counter()
        model.generate(
            **prompt.inputs,
            mm_encoder_outputs={"video": features},
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            streamer=clock,
        )
    finally:
        handle.remove()
    sample = _sample(model, method, prompt, start, clock, probe, rss_before)
    sample.prefill_cpu_s = clock.first_cpu - start_cpu
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
        kv_bytes=probe.bytes or 0,
        kv_tokens=probe.tokens,
        peak_rss=rss_bytes("VmHWM"),
        rss_before=rss_before,
        load=os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0,
    )
    if method.config is None:
        sample.stage1_tokens = sample.visual_tokens = prompt.visual_tokens
        return sample
    trace = last_trace(model)
    sample.stage1_tokens, sample.visual_tokens = trace.num_after_stage1, trace.num_after_stage2
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
            for method in methods:
                bar.set_postfix_str(f"warm-up {method.name}")
                run_once(model, method, warmup, min(2, new_tokens))
                bar.update()
        for r in range(repeats):
            shift = r % len(methods)
            for method in [*methods[shift:], *methods[:shift]]:
                bar.set_postfix_str(f"repeat {r + 1}/{repeats} {method.name}")
                samples[method.name].append(run_once(model, method, prompt, new_tokens))
                bar.update()
    unpatch(model)
    return samples


# ----------------------------------------------------------------------------- summary


@dataclass
class Row:
    """One method's results: medians over repeats (spread: min and max)."""

    name: str
    visual_tokens: int
    stage1_tokens: int
    total_visual: int
    seq_before: int
    seq_after: int
    llm_prefill_s: float
    prefill_min: float
    prefill_max: float
    prefill_cpu_s: float
    stage1_s: float
    stage2_s: float
    decoder_s: float | None
    ttft_s: float
    decode_ms_per_token: float | None
    kv_bytes: int
    kv_tokens: int
    peak_rss: int
    rss_delta: int
    flops: float
    speedup: float = 1.0
    flops_speedup: float = 1.0
    ttft_speedup: float = 1.0
    cpu_speedup: float = 1.0
    kv_ratio: float = 1.0
    samples: list[float] = field(default_factory=list)

    @property
    def retention(self) -> float:
        return self.visual_tokens / self.total_visual

    @property
    def efficiency(self) -> float:
        """Measured speedup / FLOPs-predicted speedup (1 = the physical limit)."""
        return self.speedup / self.flops_speedup


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def method_flops(
    shape: DecoderShape, method: Method, prompt: Prompt, stage1: int, kept: int
) -> tuple[float, int, int]:
    """Analytic prefill FLOPs (text tokens included) and the sequence length before/after stage 2."""
    before = prompt.length - prompt.visual_tokens + stage1
    after = before - stage1 + kept
    if method.config is None or not method.config.stage2:
        return prefill_flops(shape, before), before, before
    return prefill_flops(shape, before, after, method.config.selected_layer), before, after


def summarize(
    methods: Sequence[Method],
    samples: dict[str, list[Sample]],
    prompt: Prompt,
    shape: DecoderShape,
    vision: VisionCost | None,
    reference: str = "stock",
) -> list[Row]:
    rows = [_row(m, samples[m.name], prompt, shape, vision) for m in methods]
    base = next(r for r in rows if r.name == reference)
    for row in rows:
        row.speedup = base.llm_prefill_s / row.llm_prefill_s
        row.flops_speedup = base.flops / row.flops
        row.ttft_speedup = base.ttft_s / row.ttft_s
        row.cpu_speedup = base.prefill_cpu_s / row.prefill_cpu_s if row.prefill_cpu_s > 0 else float("nan")
        row.kv_ratio = row.kv_bytes / base.kv_bytes if base.kv_bytes else float("nan")
    return rows


def _row(
    method: Method, runs: list[Sample], prompt: Prompt, shape: DecoderShape, vision: VisionCost | None
) -> Row:
    first = runs[0]
    stage1, kept = first.stage1_tokens or prompt.visual_tokens, first.visual_tokens or prompt.visual_tokens
    flops, before, after = method_flops(shape, method, prompt, stage1, kept)
    prefill = [s.prefill_s for s in runs]
    median = statistics.median(prefill)
    fixed = 0.0 if vision is None else vision.preprocess_s + vision.vision_s
    return Row(
        name=method.name,
        visual_tokens=kept,
        stage1_tokens=stage1,
        total_visual=prompt.visual_tokens,
        seq_before=before,
        seq_after=after,
        llm_prefill_s=median,
        prefill_min=min(prefill),
        prefill_max=max(prefill),
        prefill_cpu_s=statistics.median(s.prefill_cpu_s for s in runs),
        stage1_s=statistics.median(s.stage1_s for s in runs),
        stage2_s=statistics.median(s.stage2_s for s in runs),
        decoder_s=_median([s.decoder_s for s in runs]),
        ttft_s=fixed + median,
        decode_ms_per_token=_median([s.decode_ms for s in runs]),
        kv_bytes=first.kv_bytes,
        kv_tokens=first.kv_tokens,
        peak_rss=max(s.peak_rss for s in runs),
        rss_delta=max(s.peak_rss - s.rss_before for s in runs),
        flops=flops,
        samples=prefill,
    )


# ----------------------------------------------------------------------------- reports


def markdown_table(rows: Sequence[Row], vision: VisionCost | None) -> str:
    """The results as a GitHub markdown table."""
    head = (
        "| method | visual tokens kept | stage 1 s | LM prefill s, median [min-max] | speedup "
        "(FLOPs-predicted, efficiency) | prefill CPU s (speedup) | TTFT from pixels s | decode ms/token | KV cache MiB (% stock) "
        "| peak RSS MiB (+ during call) | prefill TFLOPs |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        decode = "-" if r.decode_ms_per_token is None else f"{r.decode_ms_per_token:.1f}"
        ttft = "-" if vision is None else f"{r.ttft_s:.2f} ({r.ttft_speedup:.2f}x)"
        lines.append(
            f"| {r.name} | {r.visual_tokens} ({100 * r.retention:.1f}%) | {r.stage1_s:.3f} "
            f"| {r.llm_prefill_s:.3f} [{r.prefill_min:.3f}-{r.prefill_max:.3f}] "
            f"| {r.speedup:.2f}x ({r.flops_speedup:.2f}x, {100 * r.efficiency:.0f}%) "
            f"| {r.prefill_cpu_s:.2f} ({r.cpu_speedup:.2f}x) | {ttft} | {decode} "
            f"| {r.kv_bytes / MIB:.1f} ({100 * r.kv_ratio:.1f}%) | {r.peak_rss / MIB:.0f} (+{r.rss_delta / MIB:.0f}) "
            f"| {r.flops / 1e12:.3f} |"
        )
    return "\n".join(lines)


@dataclass
class Target:
    name: str
    met: bool
    detail: str

    def line(self) -> str:
        return f"- [{'x' if self.met else ' '}] {self.name}: {self.detail}"


def check_targets(rows: Sequence[Row], sweep_rows: Sequence[Row] = ()) -> list[Target]:
    """The issue's targets, evaluated on these results (benchmark only: never asserted)."""
    by = {r.name: r for r in rows}
    stock, ours, fastv = by["stock"], by["prunevid"], by["fastv"]
    targets = [
        Target("LM prefill >= 3x faster than stock", ours.speedup >= 3, f"{ours.speedup:.2f}x"),
        Target(
            "stage 1 < 5% of stock prefill",
            ours.stage1_s < 0.05 * stock.llm_prefill_s,
            f"{ours.stage1_s:.3f} s = {100 * ours.stage1_s / stock.llm_prefill_s:.2f}% of {stock.llm_prefill_s:.2f} s",
        ),
        Target("KV cache <= 25% of stock", ours.kv_ratio <= 0.25, f"{100 * ours.kv_ratio:.1f}%"),
        Target(
            "PruneVid at least as fast as FastV at equal retention",
            ours.llm_prefill_s <= fastv.llm_prefill_s,
            f"{ours.llm_prefill_s:.3f} s vs {fastv.llm_prefill_s:.3f} s ({ours.visual_tokens} vs {fastv.visual_tokens} tokens)",
        ),
        Target(
            "PruneVid within 15% of its FLOPs-predicted speedup",
            ours.efficiency >= 0.85,
            f"{ours.speedup:.2f}x of {ours.flops_speedup:.2f}x ({100 * ours.efficiency:.0f}%)",
        ),
    ]
    if sweep_rows:
        points = [r for r in sweep_rows if r.name != "stock"]
        worst = min(points, key=lambda r: r.efficiency)
        targets.append(
            Target(
                "every sweep point within 15% of its FLOPs-predicted speedup",
                worst.efficiency >= 0.85,
                f"worst {worst.name}: {worst.speedup:.2f}x of {worst.flops_speedup:.2f}x ({100 * worst.efficiency:.0f}%); "
                f"{sum(r.efficiency >= 0.85 for r in points)}/{len(points)} points within",
            )
        )
    return targets


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import transformers

    return {
        "cpu": _cpu_name(),
        "cpu_flags": _cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        if hasattr(os, "sysconf")
        else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    """The CPU features that decide fp32/bf16 matmul speed (AVX-512, AVX-512 BF16, AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    return [flag for flag in wanted if flag in flags]


def row_json(row: Row) -> dict[str, Any]:
    return {
        "name": row.name,
        "visual_tokens": row.visual_tokens,
        "stage1_tokens": row.stage1_tokens,
        "total_visual_tokens": row.total_visual,
        "retention": row.retention,
        "sequence_tokens": [row.seq_before, row.seq_after],
        "llm_prefill_s": row.llm_prefill_s,
        "llm_prefill_min_s": row.prefill_min,
        "llm_prefill_max_s": row.prefill_max,
        "llm_prefill_samples_s": row.samples,
        "llm_prefill_cpu_s": row.prefill_cpu_s,
        "cpu_speedup": row.cpu_speedup,
        "stage1_s": row.stage1_s,
        "stage2_select_s": row.stage2_s,
        "decoder_s": row.decoder_s,
        "ttft_s": row.ttft_s,
        "decode_ms_per_token": row.decode_ms_per_token,
        "kv_bytes": row.kv_bytes,
        "kv_tokens": row.kv_tokens,
        "kv_ratio": row.kv_ratio,
        "peak_rss_bytes": row.peak_rss,
        "rss_increase_bytes": row.rss_delta,
        "flops": row.flops,
        "speedup": row.speedup,
        "flops_speedup": row.flops_speedup,
        "efficiency": row.efficiency,
        "ttft_speedup": row.ttft_speedup,
    }


# ----------------------------------------------------------------------------- sweep outputs


def sweep_record(row: Row, method: Method) -> dict[str, Any]:
    config = method.config
    return {
        "cluster_ratio": None if config is None else config.cluster_ratio,
        "alpha": None if config is None else config.alpha,
        **{k: v for k, v in row_json(row).items() if k not in ("llm_prefill_samples_s", "name")},
        "name": row.name,
    }


def write_csv(records: Sequence[dict[str, Any]], path: str) -> None:
    columns = [k for k, v in records[0].items() if not isinstance(v, list | dict)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


def plot_sweep(records: Sequence[dict[str, Any]], path: str, title: str) -> None:
    """Measured and FLOPs-predicted speedup vs final retention, with the ideal 1/retention line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in records if r["name"] != "stock"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    grid = np.geomspace(min(r["retention"] for r in points) * 0.8, 1.0, 100)
    ax.plot(grid, 1 / grid, "k--", lw=1, label="ideal 1/retention (every layer at the kept length)")
    for i, ratio in enumerate(sorted({r["cluster_ratio"] for r in points})):
        mine = sorted((r for r in points if r["cluster_ratio"] == ratio), key=lambda r: r["retention"])
        x = [r["retention"] for r in mine]
        colour = f"C{i}"
        low = [r["speedup"] - r["speedup"] * r["llm_prefill_s"] / r["llm_prefill_max_s"] for r in mine]
        high = [r["speedup"] * r["llm_prefill_s"] / r["llm_prefill_min_s"] - r["speedup"] for r in mine]
        ax.errorbar(x, [r["speedup"] for r in mine], yerr=[low, high], fmt="o-", color=colour,
                    label=f"measured, cluster_ratio={ratio:g}")  # fmt: skip
        ax.plot(x, [r["flops_speedup"] for r in mine], "s:", color=colour, mfc="none",
                label=f"FLOPs-predicted, cluster_ratio={ratio:g}")  # fmt: skip
        for r in mine:
            ax.annotate(f"a={r['alpha']:g}", (r["retention"], r["speedup"]), fontsize=7,
                        xytext=(3, -9), textcoords="offset points")  # fmt: skip
    ax.set(xscale="log", yscale="log", xlabel="visual tokens kept (fraction of T x N)",
           ylabel="LM prefill speedup vs stock", title=title)  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ----------------------------------------------------------------------------- the command


# Defaults of the full run and of --quick (CI: the tiny model, seconds); explicit options win.
FULL = dict(
    arch="qwen2-0.5b",
    repeats=3,
    new_tokens=32,
    sweep_alphas="0.1,0.2,0.4,0.7,1.0",
    sweep_cluster_ratios="0.25,0.5,0.75",
)
QUICK = dict(arch="tiny", repeats=1, new_tokens=4, sweep_alphas="0.4,1.0", sweep_cluster_ratios="0.5")


def add_commands(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="bench", required=True)
    speed = commands.add_parser("speed", help="prefill / TTFT / decode / memory: PruneVid vs stock vs FastV")
    add_speed_arguments(speed)
    speed.set_defaults(run=run_speed)

    from . import accuracy

    known_answers = commands.add_parser("accuracy", help="known-answer accuracy on synthetic videos, offline")
    accuracy.add_arguments(known_answers)
    known_answers.set_defaults(run=accuracy.run)


def add_speed_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", choices=sorted(ARCHS), default=None, help="default qwen2-0.5b (--quick: tiny)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--video", default=None, help=f"clip to use (default {DEFAULT_VIDEO})")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--question", default=DEFAULT_QUESTION)
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3; --quick: 1)")
    p.add_argument(
        "--new-tokens", type=int, default=None, help="tokens generated per call (default 32; --quick: 4)"
    )
    p.add_argument(
        "--stage1-retention", type=float, default=0.4, help="stage 1's output size (tau calibrated to it)"
    )
    p.add_argument("--alpha", type=float, default=0.4)
    p.add_argument("--selected-layer", type=int, default=None, help="default: the arch's (10 for 0.5B)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-frames", type=int, default=2, help="warm-up input length in frames (0: none)")
    p.add_argument("--vision-frames", type=int, default=None,
                   help="when the fp32 feature pass is not the measurement (bf16, cached features): "
                   "time the vision tower on this many frames and scale linearly (default 2)")  # fmt: skip
    p.add_argument("--features-cache", default=None, help="folder caching the clip's fp32 vision features")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--markdown", default=None, help="write the table and settings here")
    p.add_argument("--sweep", action="store_true", help="also sweep alpha x cluster_ratio")
    p.add_argument(
        "--sweep-repeats", type=int, default=None, help="timed rounds of the sweep (default: --repeats)"
    )
    p.add_argument("--sweep-alphas", default=None, help=f"default {FULL['sweep_alphas']}")
    p.add_argument("--sweep-cluster-ratios", default=None, help=f"default {FULL['sweep_cluster_ratios']}")
    p.add_argument("--sweep-csv", default="bench_sweep.csv")
    p.add_argument("--sweep-png", default="bench_sweep.png")
    p.add_argument("--quick", action="store_true", help="tiny model, 1 repeat, seconds (CI)")


def run_speed(args: argparse.Namespace) -> dict[str, Any]:
    """`prunevid bench speed`: run, print the table, write JSON/markdown/CSV/PNG as asked."""
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    _check_arguments(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = prepare(args)
    result = benchmark(setup, args)
    _print_report(result)
    _write_outputs(result, args)
    return result


def _check_arguments(args: argparse.Namespace) -> None:
    if args.repeats < 1 or args.new_tokens < 1 or args.frames < 2:
        raise ValueError("--repeats and --new-tokens must be >= 1 and --frames >= 2")
    if not 0 < args.stage1_retention <= 1:
        raise ValueError(f"--stage1-retention must be in (0, 1], got {args.stage1_retention}")
    if args.vision_frames is not None and not 1 <= args.vision_frames <= args.frames:
        raise ValueError(f"--vision-frames must be in [1, {args.frames}], got {args.vision_frames}")


@dataclass
class Setup:
    """Everything measured once: the model, the prompt, the vision cost and the calibration."""

    arch: Arch
    model: torch.nn.Module
    tokenizer: Any
    frames: np.ndarray
    video: str
    prompt: Prompt
    warmup: Prompt | None
    vision: VisionCost
    calibration: Calibration
    base: PruneVidConfig
    kept: int
    build_s: float


def prepare(args: argparse.Namespace) -> Setup:
    arch = ARCHS[args.arch]
    tic = time.perf_counter()
    model, tokenizer = build_model(arch, args.seed)
    build_s = time.perf_counter() - tic
    video, frames = _clip(args)
    inputs, preprocess_s = model_inputs(model, tokenizer, frames, args.question)
    cache = (
        None
        if args.features_cache is None
        else features_cache_path(args.features_cache, video, arch, args.seed, len(frames))
    )
    features, fp32_vision_s = clip_features(model, inputs, cache)
    prompt = make_prompt(model, inputs, features)
    warmup = None
    if args.warmup_frames:
        # A cheap input that runs every code path: the first frames, their own features.
        short, _ = model_inputs(model, tokenizer, frames[: args.warmup_frames], DEFAULT_QUESTION)
        warmup = make_prompt(model, short, vision_features(model, short)[0])
    dtype = getattr(torch, args.dtype)
    model.to(dtype)
    vision = _vision_cost(model, tokenizer, frames, preprocess_s, fp32_vision_s, args)
    selected = arch.selected_layer if args.selected_layer is None else args.selected_layer
    base = PruneVidConfig(alpha=args.alpha, selected_layer=selected, seed=args.seed, num_frames=len(frames))
    tokens, grid = video_tokens(model, prompt)
    stage1_input = tokens.to(dtype)
    calibration = calibrate_tau(stage1_input, base, args.stage1_retention, grid)
    base = base.replace(tau=calibration.tau)
    kept = stage2_kept(stage1_input, base, grid)
    return Setup(
        arch, model, tokenizer, frames, str(video), prompt, warmup, vision, calibration, base, kept, build_s
    )


def _clip(args: argparse.Namespace) -> tuple[Path, np.ndarray]:
    video = resolve_video(args.video)
    return video, load_frames(video, args.frames)


def _vision_cost(
    model: torch.nn.Module,
    tokenizer: Any,
    frames: np.ndarray,
    preprocess_s: float,
    fp32_s: float | None,
    args: argparse.Namespace,
) -> VisionCost:
    """The fp32 feature pass on all frames is the measurement when there was one; otherwise
    (other dtype, or features from the cache) time `--vision-frames` frames (default 2) and scale."""
    total = len(frames)
    if fp32_s is not None and args.dtype == "float32":
        return VisionCost(preprocess_s, fp32_s, total, total, args.dtype)
    timed = args.vision_frames or min(2, total)
    seconds = time_vision(model, tokenizer, frames, timed)
    return VisionCost(preprocess_s, seconds, timed, total, args.dtype)


def benchmark(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    """Measure the six methods (and the sweep), summarise, evaluate the targets."""
    shape = DecoderShape.from_config(setup.model.config)
    methods = default_methods(setup.base, setup.kept / setup.prompt.visual_tokens, args.seed)
    samples = measure(
        setup.model, methods, setup.prompt, args.repeats, args.new_tokens, setup.warmup, "methods"
    )
    rows = summarize(methods, samples, setup.prompt, shape, setup.vision)
    result = _result(setup, args, rows)
    if args.sweep:
        records, sweep_rows = run_sweep(setup, args, shape)
        result["sweep"] = records
        result["targets"] = [dataclasses.asdict(t) for t in check_targets(rows, sweep_rows)]
    return result


def run_sweep(
    setup: Setup, args: argparse.Namespace, shape: DecoderShape
) -> tuple[list[dict[str, Any]], list[Row]]:
    """Prefill only (one new token) over the alpha x cluster_ratio grid, stock interleaved."""
    points = sweep_methods(setup.base, _floats(args.sweep_alphas), _floats(args.sweep_cluster_ratios))
    methods = [Method("stock"), *points]
    repeats = args.sweep_repeats or args.repeats
    samples = measure(setup.model, methods, setup.prompt, repeats, 1, setup.warmup, "sweep")
    rows = summarize(methods, samples, setup.prompt, shape, None)
    return [sweep_record(r, m) for r, m in zip(rows, methods)], rows


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _result(setup: Setup, args: argparse.Namespace, rows: list[Row]) -> dict[str, Any]:
    machine = machine_info()
    machine["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    stock = rows[0]
    return {
        "machine": machine,
        "command": command_line(args),
        "arch": {"name": setup.arch.name, "note": setup.arch.note, "build_s": setup.build_s},
        "dtype": args.dtype,
        "video": setup.video,
        "frames": len(setup.frames),
        "question": args.question,
        "repeats": args.repeats,
        "new_tokens": args.new_tokens,
        "config": setup.base.to_dict(),
        "predicted_kept": setup.kept,
        "calibration": dataclasses.asdict(setup.calibration) | {"text": setup.calibration.describe()},
        "vision": dataclasses.asdict(setup.vision)
        | {"text": setup.vision.describe(), "share_of_stock_ttft": setup.vision.vision_s / stock.ttft_s},
        "methods": [row_json(r) for r in rows],
        "targets": [dataclasses.asdict(t) for t in check_targets(rows)],
        "table": markdown_table(rows, setup.vision),
    }


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run (every option that changes the numbers, spelled out)."""
    parts = ["prunevid bench speed", f"--arch {args.arch}", f"--dtype {args.dtype}"]
    parts += [f"--video {args.video}"] if args.video else []
    for name in ("frames", "repeats", "new_tokens", "stage1_retention", "alpha", "selected_layer",
                 "seed", "warmup_frames", "vision_frames", "threads"):  # fmt: skip
        value = getattr(args, name)
        if value is not None:
            parts.append(f"--{name.replace('_', '-')} {value}")
    if args.sweep:
        parts += [
            "--sweep",
            f"--sweep-repeats {args.sweep_repeats or args.repeats}",
            f"--sweep-alphas {args.sweep_alphas}",
            f"--sweep-cluster-ratios {args.sweep_cluster_ratios}",
        ]
    return " ".join(parts)


def _print_report(result: dict[str, Any]) -> None:
    print(report_markdown(result))


def report_markdown(result: dict[str, Any]) -> str:
    """Settings, the table and the targets, as markdown."""
    m = result["machine"]
    vision = result["vision"]
    lines = [
        f"**{result['arch']['name']}**, {result['dtype']}: {result['arch']['note']}.",
        f"Clip `{result['video']}`, {result['frames']} frames; {result['repeats']} repeats "
        f"(medians, [min-max]); decode over {result['new_tokens']} new tokens.",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['torch_threads']} torch threads, "
        f"flags {' '.join(m['cpu_flags']) or '-'}; torch {m['torch']}, transformers {m['transformers']}; "
        f"{m['date']}; load average {_load(m)}.",
        f"{result['calibration']['text']}; PruneVid settings {_settings(result['config'])}.",
        f"{vision['text']}: {100 * vision['share_of_stock_ttft']:.0f}% of the stock TTFT.",
        "",
        result["table"],
        "",
        "Targets:",
        *[Target(**t).line() for t in result["targets"]],
    ]
    return "\n".join(lines)


def _load(machine: dict[str, Any]) -> str:
    start, end = machine.get("load_average_start"), machine.get("load_average_end")
    if not start:
        return "n/a"
    return f"{start[0]:.1f} at start, {end[0]:.1f} at end (1-min)" if end else f"{start[0]:.1f}"


def _settings(config: dict[str, Any]) -> str:
    keys = ("tau", "cluster_ratio", "temporal_segment_ratio", "alpha", "selected_layer", "k")
    return ", ".join(
        f"{k}={config[k]:.4g}" if isinstance(config[k], float) else f"{k}={config[k]}" for k in keys
    )


def _write_outputs(result: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report_markdown(result) + "\n")
    if "sweep" in result:
        write_csv(result["sweep"], args.sweep_csv)
        title = f"PruneVid prefill speedup, {result['arch']['name']} {result['dtype']}, {result['machine']['date'][:10]}"
        try:
            plot_sweep(result["sweep"], args.sweep_png, title)
        except ImportError:
            print("matplotlib is not installed: sweep plot skipped (pip install matplotlib)", file=sys.stderr)
