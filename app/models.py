"""The loaded models: which one the page starts with, loading and freeing them (at most
PRUNEVID_MAX_MODELS real checkpoints resident; the tiny offline ones do not count), their
warm-up, and the model work of one answer (on ZeroGPU, under `spaces.GPU`).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch

from prunevid.lru import ByteLRU, shared_cache
from prunevid.pipeline import (
    DEFAULT_MODEL,
    LoadedModel,
    ModelLoadError,
    answer,
    encode_video,
    load_model,
    preset,
)

from . import hardware
from .catalog import TINY_MODELS
from .estimates import Speed
from .limits import Limits
from .runs import Job, Progress, Work, model_work, no_progress

log = logging.getLogger(__name__)


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
        if torch.cuda.is_available() and not hardware.zero_gpu():
            torch.cuda.empty_cache()

    def gpu_seconds(self, job: Job, progress: Progress = no_progress) -> int:
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

    def work(self, job: Job, progress: Progress = no_progress) -> Work:
        """The model part of one answer (`runs.model_work`) on the loaded model. On ZeroGPU this
        runs in a GPU worker process (`hardware.on_gpu`): it takes and returns CPU data."""
        return model_work(self.get(job.model), job, progress)


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
