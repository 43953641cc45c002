"""`prunevid bench speed`: its options, its one-time setup and the order of its measurements.

It measures, in one process and interleaved, what PruneVid changes in a LLaVA-OneVision or
Qwen2.5-VL model of real layer sizes (`archs.py`; random weights: speed does not depend on them):

* stock: the unpatched model;
* stage1 / stage2: one stage of PruneVid only;
* prunevid: both stages (the paper's defaults);
* fastv / random: stage 1 off, stage 2's rule swapped for FastV's (last prompt token's
  attention at the same layer) or a seeded random pick, at PruneVid's final retention.

Per method (`measure.py`): visual tokens kept, LM prefill (wall time from `generate()` with
precomputed vision features to the first new token: embeddings, stage 1, the decoder with stage
2, the LM head on the last position), stage-1 time, end-to-end time to first token from pixels
(frame preprocessing + vision tower, both measured once since no method changes them, plus the
LM prefill), decode ms/token, KV-cache bytes after prefill, peak RSS, analytic FLOPs
(`prunevid.flops`, text tokens included) and speedups vs stock (`report.py`). Medians over
repeats with min-max spread; the methods' order rotates every repeat so background load hits all
alike.

Random-weight vision towers make every token look alike, so stage 1's output size is set by
calibrating `tau` on the clip's features (bisection) to a stated retention (default 40%).
`--sweep` adds a grid over `alpha` x `cluster_ratio` (CSV + speedup-vs-retention plot), and
`--retentions 0.25,0.1` every method of `prunevid.baselines.METHODS` at each of those budgets;
`--profile` each method's prefill and decode step under torch.profiler and `HostProbe`
(`profile.py`). `--device cuda` builds the model on the CPU, then runs everything on the GPU,
frame preprocessing included; every clock of the benchmark waits for the GPU (`measure.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..baselines import METHODS
from ..config import PruneVidConfig
from ..flops import DecoderShape
from ..merge import merge_tokens
from ..select import kept_total
from .archs import ARCHS, Arch, build_model
from .measure import (
    DEFAULT_QUESTION,
    Method,
    Prompt,
    VisionCost,
    load_average,
    make_prompt,
    measure,
    model_inputs,
    time_vision,
    video_tokens,
    vision_features,
)
from .profile import profile_methods
from .report import (
    Row,
    budget_record,
    check_targets,
    machine_info,
    markdown_table,
    report_markdown,
    row_json,
    summarize,
    sweep_record,
    write_outputs,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VIDEO = "assets/bbb.mp4"
METHOD_NAMES = ("stock", "stage1", "stage2", "prunevid", "fastv", "random")


# Defaults of the full run and of --quick (CI: the tiny model, seconds); explicit options win.
FULL = dict(
    arch="qwen2-0.5b",
    repeats=3,
    new_tokens=32,
    sweep_alphas="0.1,0.2,0.4,0.7,1.0",
    sweep_cluster_ratios="0.25,0.5,0.75",
)
QUICK = dict(arch="tiny", repeats=1, new_tokens=4, sweep_alphas="0.4,1.0", sweep_cluster_ratios="0.5")


def add_arguments(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--device", default="cpu",
                   help="where the model runs: cpu (default) or cuda[:i] (built on the CPU, then moved)")  # fmt: skip
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
    p.add_argument("--retentions", default=None,
                   help="also run every method at these budgets (final retention), e.g. 0.25,0.2,0.15,0.1")  # fmt: skip
    p.add_argument("--profile", action="store_true",
                   help="also profile every method's prefill and decode step: aten ops, host reads and uploads, "
                   "wall, busy and host-overhead ms; on a GPU kernels, syncs and device-host copies")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="tiny model, 1 repeat, seconds (CI)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """`prunevid bench speed`: run, print the table, write JSON/markdown/CSV/PNG as asked."""
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    _check_arguments(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = prepare(args)
    result = benchmark(setup, args)
    print(report_markdown(result))
    write_outputs(result, args)
    return result


def _check_arguments(args: argparse.Namespace) -> None:
    if args.repeats < 1 or args.new_tokens < 1 or args.frames < 2:
        raise ValueError("--repeats and --new-tokens must be >= 1 and --frames >= 2")
    if not 0 < args.stage1_retention <= 1:
        raise ValueError(f"--stage1-retention must be in (0, 1], got {args.stage1_retention}")
    if args.retentions is not None:
        for value in _floats(args.retentions):
            PruneVidConfig(retention=value)  # one sentence for a budget out of (0, 1]
    if args.vision_frames is not None and not 1 <= args.vision_frames <= args.frames:
        raise ValueError(f"--vision-frames must be in [1, {args.frames}], got {args.vision_frames}")
    check_device(args.device)


def check_device(name: str) -> torch.device:
    """`name` as a torch device this machine has, or one sentence saying why not."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be cpu or cuda[:index], got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:index], got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA GPU on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


# ----------------------------------------------------------------------------- setup (measured once)


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
    model, tokenizer = build_model(arch, args.seed, check_device(args.device))
    build_s = time.perf_counter() - tic
    video, frames = _clip(args)
    warmup = None
    if args.warmup_frames:
        # A cheap input that runs every code path: the first frames, their own features. It is
        # also the first call of the preprocessing and the vision tower, which pays one-time
        # costs (on a GPU, loading kernels), so that the calls below are timed warm.
        short, _ = model_inputs(model, tokenizer, frames[: args.warmup_frames], DEFAULT_QUESTION)
        warmup = make_prompt(model, short, vision_features(model, short)[0])
    inputs, _ = model_inputs(model, tokenizer, frames, args.question)
    preprocess_s = model_inputs(model, tokenizer, frames, args.question)[1]  # the second call: warm
    cache = (
        None
        if args.features_cache is None
        else features_cache_path(args.features_cache, video, arch, args.seed, len(frames))
    )
    features, fp32_vision_s = clip_features(model, inputs, cache)
    prompt = make_prompt(model, inputs, features)
    dtype = getattr(torch, args.dtype)
    model.to(dtype)
    warm_s = fp32_vision_s if warmup is not None else None  # a cold first call is no measurement
    vision = _vision_cost(model, tokenizer, frames, preprocess_s, warm_s, args)
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


def resolve_video(path: str | None) -> Path:
    """The clip to use: `path`, or the Big Buck Bunny asset (looked up from the cwd, then the repo)."""
    candidates = [Path(path)] if path else [Path(DEFAULT_VIDEO), REPO_ROOT / DEFAULT_VIDEO]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ValueError(f"video not found: {candidates[0]} (pass --video PATH)")


def load_frames(path: Path, num_frames: int) -> np.ndarray:
    from ..video import load_video

    return load_video(str(path), num_frames).frames


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
        return torch.load(cache, map_location=model.device)["features"], None
    features, seconds = vision_features(model, inputs)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"features": features}, cache)
    return features, seconds


def _vision_cost(
    model: torch.nn.Module,
    tokenizer: Any,
    frames: np.ndarray,
    preprocess_s: float,
    fp32_s: float | None,
    args: argparse.Namespace,
) -> VisionCost:
    """The fp32 feature pass on all frames is the measurement when there was one and the tower
    was warm (`fp32_s`); otherwise (other dtype, features from the cache, no warm-up) time
    `--vision-frames` frames (default 2) on their second call and scale."""
    total = len(frames)
    if fp32_s is not None and args.dtype == "float32":
        return VisionCost(preprocess_s, fp32_s, total, total, args.dtype)
    timed = args.vision_frames or min(2, total)
    seconds = time_vision(model, tokenizer, frames, timed)
    return VisionCost(preprocess_s, seconds, timed, total, args.dtype)


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
    return kept_total(config, frames.shape[:2].numel(), merge.num_tokens, merge.set_sizes)


# ----------------------------------------------------------------------------- methods and runs


def default_methods(base: PruneVidConfig, ratio: float) -> list[Method]:
    """The six methods of the table. base: PruneVid's settings (calibrated tau);
    ratio: PruneVid's final visual retention, which FastV and random pruning match."""
    single = base.replace(stage1=False)
    return [
        Method("stock"),
        Method("stage1", base.replace(stage2=False)),
        Method("stage2", single),
        Method("prunevid", base),
        Method("fastv", single.replace(retention=ratio), "fastv"),
        Method("random", single.replace(retention=ratio), "random"),
    ]


def sweep_methods(base: PruneVidConfig, alphas: Sequence[float], ratios: Sequence[float]) -> list[Method]:
    """PruneVid over the cluster_ratio x alpha grid (tau kept at its calibrated value)."""
    return [
        Method(f"cr={ratio:g} alpha={alpha:g}", base.replace(cluster_ratio=ratio, alpha=alpha))
        for ratio in ratios
        for alpha in alphas
    ]


def benchmark(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    """Measure the six methods (and the sweep), summarise, evaluate the targets."""
    shape = DecoderShape.from_config(setup.model.config)
    methods = default_methods(setup.base, setup.kept / setup.prompt.visual_tokens)
    samples = measure(
        setup.model, methods, setup.prompt, args.repeats, args.new_tokens, setup.warmup, "methods"
    )
    rows = summarize(methods, samples, setup.prompt, shape, setup.vision)
    result = _result(setup, args, rows)
    if args.profile:
        result["profile"] = [p.record() for p in profile_methods(setup.model, methods, setup.prompt)]
    if args.sweep:
        records, sweep_rows = run_sweep(setup, args, shape)
        result["sweep"] = records
        result["targets"] = [dataclasses.asdict(t) for t in check_targets(rows, sweep_rows)]
    if args.retentions:
        result["budgets"] = run_budgets(setup, args, shape)
    return result


def run_budgets(setup: Setup, args: argparse.Namespace, shape: DecoderShape) -> list[dict[str, Any]]:
    """Prefill only (one new token) of every method of `prunevid.baselines.METHODS` at each
    budget, stock interleaved. PruneVid's tau stays the calibrated one: under a budget it only
    decides which tokens are static, not how many tokens there are."""
    methods = [Method("stock")] + [
        Method(f"{name} @ {retention:g}", setup.base.replace(retention=retention), name)
        for retention in _floats(args.retentions)
        for name in METHODS
    ]
    samples = measure(
        setup.model, methods, setup.prompt, args.sweep_repeats or args.repeats, 1, setup.warmup, "budgets"
    )
    rows = summarize(methods, samples, setup.prompt, shape, None)
    return [budget_record(r, m) for r, m in zip(rows, methods)]


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


# ----------------------------------------------------------------------------- the result


def _result(setup: Setup, args: argparse.Namespace, rows: list[Row]) -> dict[str, Any]:
    machine = machine_info()
    machine["load_average_end"] = load_average()
    stock = rows[0]
    return {
        "machine": machine,
        "command": command_line(args),
        "arch": {"name": setup.arch.name, "note": setup.arch.note, "build_s": setup.build_s},
        "dtype": args.dtype,
        "device": device_info(setup.model),
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


def device_info(model: torch.nn.Module) -> dict[str, Any]:
    """Where the model ran and its attention kernel; on a GPU its name, CUDA version and peak memory."""
    device, attention = model.device, model.config._attn_implementation
    if device.type != "cuda":
        return {"type": device.type, "name": "cpu", "attention": attention}
    return {
        "type": "cuda",
        "attention": attention,
        "name": torch.cuda.get_device_name(device),
        "cuda": torch.version.cuda,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
    }


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run (every option that changes the numbers, spelled out)."""
    parts = ["prunevid bench speed", f"--arch {args.arch}", f"--dtype {args.dtype}"]
    parts += [f"--device {args.device}"] if args.device != "cpu" else []
    parts += [f"--video {args.video}"] if args.video else []
    for name in ("frames", "repeats", "new_tokens", "stage1_retention", "alpha", "selected_layer",
                 "seed", "warmup_frames", "vision_frames", "threads"):  # fmt: skip
        value = getattr(args, name)
        if value is not None:
            parts.append(f"--{name.replace('_', '-')} {value}")
    if args.retentions:
        parts.append(f"--retentions {args.retentions}")
    if args.profile:
        parts.append("--profile")
    if args.sweep:
        parts += [
            "--sweep",
            f"--sweep-repeats {args.sweep_repeats or args.repeats}",
            f"--sweep-alphas {args.sweep_alphas}",
            f"--sweep-cluster-ratios {args.sweep_cluster_ratios}",
        ]
    return " ".join(parts)
