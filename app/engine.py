"""What the page does, without Gradio: pick, load and free models, cache vision features, run
one question (PruneVid, and optionally the unpruned model or another method at the same token
budget), estimate the wait, and describe the speed. The UI in `ui.py` only wires these to
components.

A public server is shared by strangers, so everything here is bounded (limits from the
environment, `Limits`): one byte budget for decoded frames (kept at display size), vision
features and stage-1 results (`prunevid.lru.shared_cache`, PRUNEVID_CACHE_MB); one real model
resident at a time (PRUNEVID_MAX_MODELS); uploads capped in size and duration before decoding.
On ZeroGPU Spaces the model work of one answer runs under `spaces.GPU` (`on_gpu`).
"""

from __future__ import annotations

import functools
import gc
import hashlib
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunevid.baselines import METHODS
from prunevid.config import PruneVidConfig
from prunevid.flops import DecoderShape, prefill_flops
from prunevid.lru import ByteLRU, shared_cache
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
    is_out_of_memory,
    load_model,
    preset,
)
from prunevid.trace import PruningTrace
from prunevid.video import Video, downscale, load_video, probe

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
TINY_MODELS = (TRAINED_TINY_MODEL, TINY_MODEL, "tiny-qwen")  # kilobytes: never evicted, never slow
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
MAX_FRAMES = 64  # the library allows more; a shared demo server should not
MAX_NEW_TOKENS = 512
DISPLAY_SIDE = 640  # overlays are drawn on frames at most this large
CPU_FRAMES = 8  # where a real model runs on CPUs, the page starts here (its vision tower is slow)
LONG_WAIT_S = 10.0  # a question expected to take longer is announced with its estimate
KEPT_ANSWER_FOLDERS = 4  # output files of the last answers (Gradio copies them into its cache on return)
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


def _no_progress(fraction: float, text: str) -> None:
    pass


# ---- limits ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What one server accepts and keeps, from the environment (defaults for a free CPU Space).

    PRUNEVID_MAX_UPLOAD_MB: largest upload; PRUNEVID_MAX_VIDEO_MINUTES: longest video (read from
    the container before decoding); PRUNEVID_MAX_MODELS: real models resident at once (the tiny
    offline ones do not count); PRUNEVID_FILE_TTL_S: how long uploads and output files are kept;
    PRUNEVID_GPU_MAX_S: the longest ZeroGPU reservation one answer may ask for.
    The byte budget of the caches is PRUNEVID_CACHE_MB (`prunevid.lru`).
    """

    max_upload_mb: float = 200.0
    max_video_minutes: float = 10.0
    max_models: int = 1
    file_ttl_s: int = 1800
    gpu_max_s: int = 120

    @classmethod
    def from_env(cls) -> Limits:
        values = {}
        for name in ("max_upload_mb", "max_video_minutes", "max_models", "file_ttl_s", "gpu_max_s"):
            variable = f"PRUNEVID_{name.upper()}"
            text = os.environ.get(variable, "").strip()
            if not text:
                continue
            kind = type(getattr(cls, name))
            try:
                value = kind(text)
            except ValueError:
                value = None
            if value is None or not value > 0:
                number = "a whole number" if kind is int else "a number"
                raise ValueError(f"{variable} must be {number} above 0, got {text!r}")
            values[name] = value
        return cls(**values)


def check_upload(path: str, limits: Limits) -> None:
    """Refuse, before decoding, a file that is gone, too large or too long (one sentence each)."""
    if not os.path.isfile(path):
        raise ValueError("The uploaded video is gone from the server: upload it again.")
    size_mb = os.path.getsize(path) / 2**20
    if size_mb > limits.max_upload_mb:
        raise ValueError(
            f"The file is {size_mb:.0f} MB, more than the {limits.max_upload_mb:g} MB this server accepts "
            "(PRUNEVID_MAX_UPLOAD_MB): trim or compress it and upload it again."
        )
    seconds = probe(path).duration
    if seconds > limits.max_video_minutes * 60:
        raise ValueError(
            f"The video is {_duration(seconds)} long, more than the {_duration(limits.max_video_minutes * 60)} "
            "this server accepts (PRUNEVID_MAX_VIDEO_MINUTES): trim it and upload it again."
        )


# ---- hardware ----------------------------------------------------------------------------------


def zero_gpu() -> bool:
    """Whether this process runs on a ZeroGPU Space (as the `spaces` package reads it)."""
    try:
        from spaces.config import Config
    except ImportError:
        return False
    return bool(Config.zero_gpu)


def has_gpu() -> bool:
    return zero_gpu() or torch.cuda.is_available()


def on_gpu(task: Callable, duration: Callable[..., int]) -> Callable:
    """`task` under `spaces.GPU(duration=...)` when the `spaces` package is installed: on ZeroGPU
    each call then gets a GPU for `duration(*args)` seconds (in a worker process: arguments and
    results are pickled); anywhere else `spaces.GPU` returns `task` itself, so nothing changes."""
    try:
        import spaces
    except ImportError:
        return task
    return spaces.GPU(duration=duration)(task)


M_ARENA_MAX = -8  # glibc's mallopt parameter


def bound_heap(arenas: int = 2) -> None:
    """Keep glibc's heap from growing with the number of threads that ever ran a question.

    glibc gives each thread its own arena and keeps the memory freed there (decoded frames,
    images): a server answering in a pool of threads grew by ~20 MB per distinct HD upload
    without this; with two arenas and a trim after each answer (`release_memory`), it stays flat.
    No-op where glibc is absent.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_ARENA_MAX, arenas)


def release_memory() -> None:
    """Give the heap's free pages back to the system (glibc only)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc() -> Any:
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _move(value: Any, device: torch.device | str) -> Any:
    """Tensors inside `value` (tensor, mapping, tuple or list) on `device`, same structure."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return type(value)(**{key: _move(item, device) for key, item in value.items()})
    if isinstance(value, (tuple, list)):
        return type(value)(_move(item, device) for item in value)
    return value


# ---- models ------------------------------------------------------------------------------------


def startup_model() -> str:
    """The model the page starts with: $PRUNEVID_MODEL, else the library default."""
    return os.environ.get("PRUNEVID_MODEL", "").strip() or DEFAULT_MODEL


def fallback_message(error: ModelLoadError, instead: str) -> str:
    """The banner when a model cannot be loaded: why and what to do (the load error's sentence),
    and what the page uses meanwhile."""
    return f"{str(error).rstrip('.')}; meanwhile the page uses {instead}."


def cached_on_disk(name: str) -> bool:
    """A local checkpoint folder, or a Hub model whose config is already in the local cache (for tests)."""
    if os.path.isdir(name):
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # not a valid repo id, broken cache: treat as not cached
        return False


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


class ModelRegistry:
    """The loaded models by name, with their measured speed.

    At most `max_real` real checkpoints stay resident: loading another first frees the least
    recently used (its cached features too), so a server never holds two large models by
    accident. The tiny offline models do not count. A failed load leaves nothing behind.
    """

    def __init__(
        self,
        loader: Callable[[str], LoadedModel] = load_model,
        max_real: int = 1,
        cache: ByteLRU | None = None,
        warm: bool = True,
        gpu_max_s: int = Limits.gpu_max_s,
    ):
        self._loader, self.max_real, self.warm, self.gpu_max_s = loader, max_real, warm, gpu_max_s
        self.cache = cache if cache is not None else shared_cache()
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self.speeds: dict[str, Speed] = {}
        self.sizes: dict[str, int] = {}  # parameters
        self._lock = threading.Lock()

    def __contains__(self, name: str) -> bool:
        return name in self._models

    def get(self, name: str) -> LoadedModel:
        """The loaded model, loading it on first use; ModelLoadError (one sentence, by kind) if it cannot be.

        `load_model` itself skips the Hub when it is unreachable, so a failure here is quick offline.
        """
        with self._lock:
            if name not in self._models:
                if name not in TINY_MODELS:
                    self._make_room(self.max_real - 1)
                loaded = self._loader(name)
                self.sizes[name] = sum(p.numel() for p in loaded.model.parameters())
                speed = warm_up(loaded) if self.warm else None
                if speed is not None:
                    self.speeds[name] = speed
                self._models[name] = loaded
            self._models.move_to_end(name)
            return self._models[name]

    def _make_room(self, keep: int) -> None:
        """Free real models, least recently used first, until at most `keep` remain."""
        real = [name for name in self._models if name not in TINY_MODELS]
        for name in real[: max(len(real) - keep, 0)]:
            del self._models[name]
            self.speeds.pop(name, None)
            # Its features are useless now; stage-1 results pin features of some model: drop them too.
            self.cache.discard(
                lambda key, name=name: key[0] == "stage1" or (key[0] == "video" and key[2] == name)
            )
            log.info("freed %s to make room for another model", name)
        gc.collect()
        if torch.cuda.is_available() and not zero_gpu():
            torch.cuda.empty_cache()

    def gpu_seconds(self, job: Job, progress: Progress = _no_progress) -> int:
        """How long to reserve a ZeroGPU device for `job` (the `spaces.GPU` duration): weights
        moved in, vision tower (unless cached), prefill and every token of each run, with a
        margin, from the model's size, the frames and max_new_tokens."""
        billions = self.sizes.get(job.model, 1e9) / 1e9
        frames, runs = job.frame_shape[0], 1 + bool(job.compare)
        vision = 0.0 if job.features is not None else frames * 0.05
        prefill = runs * frames * 0.005 * billions
        tokens = runs * job.max_new_tokens * (0.01 + 0.004 * billions)
        seconds = 10 + billions + 1.5 * (vision + prefill + tokens)
        return int(min(max(math.ceil(seconds), 15), self.gpu_max_s))

    def work(self, job: Job, progress: Progress = _no_progress) -> Work:
        """The model part of one answer: vision tower (unless cached), then PruneVid's answer
        (stage 1, prefill with stage 2, generation) and, when comparing, the unpruned one.
        On ZeroGPU this runs in a GPU worker process (`on_gpu`): it takes and returns CPU data."""
        loaded = self.get(job.model)
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
            features = _move(features, loaded.device)
        runs = 2 if job.compare else 1
        result = _answer_with_progress(loaded, frames, job, features, progress, 0.4, 0.5 / runs, "PruneVid")
        other = None
        if job.compare:
            config, method = comparison(job.compare, job.config, result.trace)
            label = comparison_label(job.compare)
            other = _answer_with_progress(
                loaded, frames, job, features, progress, 0.65, 0.25, label, config=config, method=method
            )
        if zero_gpu():  # results cross back to the main process: no CUDA tensors
            features = _move(features, "cpu")
        return Work(result, other, features, vision_s)


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


def warm_up(loaded: LoadedModel, num_frames: int = 2, new_tokens: int = 4) -> Speed | None:
    """One short pruned and one unpruned answer on blank frames, so that the first question's
    measured prefill times and speedup are not first-call overheads; returns the speeds seen
    (per frame and per token), from which the page estimates waits. None if it failed."""
    frames = np.zeros((num_frames, 64, 64, 3), dtype=np.uint8)
    settings = preset(loaded.name, loaded.num_layers).replace(num_frames=num_frames)
    try:
        tic = time.perf_counter()
        features = encode_video(loaded, frames)
        vision = time.perf_counter() - tic
        runs = [
            answer(loaded, frames, "warm up", settings.replace(stage1=on, stage2=on), new_tokens, features)
            for on in (True, False)
        ]
    except Exception as error:  # a warm-up must never stop the page from starting
        log.warning("warm-up of %s failed: %s", loaded.name, error)
        return None
    pruned, unpruned = (run.timings for run in runs)
    decoded = [(run.timings["generate_s"] - run.timings["ttft_s"], run.num_new_tokens - 1) for run in runs]
    steps = sum(count for _, count in decoded)
    per_token = sum(seconds for seconds, _ in decoded) / steps if steps else pruned["ttft_s"]
    return Speed(
        vision_per_frame=vision / num_frames,
        pruned_per_frame=(pruned["llm_prefill_s"] + pruned.get("stage1_s", 0.0)) / num_frames,
        unpruned_per_frame=unpruned["llm_prefill_s"] / num_frames,
        per_token=per_token,
    )


# ---- one question --------------------------------------------------------------------------------


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


class ScratchFolders:
    """One folder per answer for its output files, under one root; only the last `keep` stay
    (Gradio copies returned files into its own cache, which PRUNEVID_FILE_TTL_S bounds)."""

    def __init__(self, keep: int = KEPT_ANSWER_FOLDERS, root: str | None = None):
        self.keep = keep
        self.root = Path(root or tempfile.mkdtemp(prefix="prunevid-app-"))
        self._folders: list[Path] = []
        self._lock = threading.Lock()

    def new(self) -> Path:
        folder = Path(tempfile.mkdtemp(dir=self.root))
        with self._lock:
            self._folders.append(folder)
            while len(self._folders) > self.keep:
                shutil.rmtree(self._folders.pop(0), ignore_errors=True)
        return folder

    def __len__(self) -> int:
        return len(self._folders)


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (the upload's name changes every time; its content does not),
    computed once per file version (the wait estimate and the question both ask)."""
    stat = os.stat(path)
    return _digest(os.fspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def make_config(stage1: bool, stage2: bool, **knobs: Any) -> PruneVidConfig:
    """A validated config from UI values; whole floats become ints (number boxes send floats) and
    a retention of 0 means none."""
    values: dict[str, Any] = {}
    for name, value in knobs.items():
        if name == "retention" and not value:  # 0 or empty: no budget, the knobs decide the count
            values[name] = None
            continue
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
    progress: Progress = _no_progress,
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
    if has_gpu() or model in TINY_MODELS:
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
        else f" (up to about {_duration(speed.estimate(frames, 64, False, False))} a question here)"
    )
    return (
        f"This server has no GPU, so the page starts at {frames} frames instead of the model's "
        f"{config.num_frames}{wait}; more frames in Advanced settings show more of the video but take longer."
    )


def wait_message(seconds: float, frames: int) -> str:
    """The notice before a long run."""
    return (
        f"This answer will take up to about {_duration(seconds)} on this server ({frames} frames through "
        "the vision tower and the language model, as measured at start-up); fewer frames are faster."
    )


def _duration(seconds: float) -> str:
    total = max(1, round(seconds))
    return f"{total} s" if total < 90 else f"{total // 60} min {total % 60:02d} s"


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


def display_frames(frames: np.ndarray, max_side: int = DISPLAY_SIDE) -> np.ndarray:
    """The frames at display size (never enlarged)."""
    return downscale(frames, max_side)
