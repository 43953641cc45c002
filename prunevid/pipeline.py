"""Load a model and answer a question about a video with PruneVid: the library's front door.

loaded = load_model("llava-hf/llava-onevision-qwen2-0.5b-ov-hf")   # or "tiny-trained" (offline)
result = answer(loaded, "clip.mp4", "What happens?", PruneVidConfig())
result.text, result.trace.num_after_stage2, result.timings["llm_prefill_s"]
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .api import family_of, last_trace, patch
from .config import PruneVidConfig
from .trace import PruningTrace
from .video import Video, load_video

DEFAULT_MODEL = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
TINY_MODEL = "tiny"
# A 0.8M-parameter LLaVA-OneVision trained here on synthetic videos (prunevid.synthetic): offline,
# and its answers about such videos mean something.
TRAINED_TINY_MODEL = "tiny-trained"
MODELS = [
    DEFAULT_MODEL,
    "llava-hf/llava-onevision-qwen2-7b-ov-hf",
    "Qwen/Qwen2.5-VL-3B-Instruct",
    "Qwen/Qwen2.5-VL-7B-Instruct",
]
MAX_QUESTION_CHARS = 2000

# Per-model defaults: thresholds such as tau depend on how alike a model's visual tokens are.
PRESETS: dict[str, PruneVidConfig] = {
    "llava-hf/llava-onevision-qwen2-0.5b-ov-hf": PruneVidConfig(),
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": PruneVidConfig(),
    # Random towers make all tokens alike (cosine ~0.95), so tau must sit higher than the paper's.
    TINY_MODEL: PruneVidConfig(selected_layer=1, tau=0.98),
    "tiny-qwen": PruneVidConfig(selected_layer=1, tau=0.98),
}


def _tiny_models() -> dict[str, Any]:
    from . import testing

    return {TINY_MODEL: testing.tiny_model, "tiny-qwen": testing.tiny_qwen_vl}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message is one sentence saying what to do."""


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    tokenizer: Any
    processing: Any  # the family's frame preprocessing (FrameProcessing, VideoPatchify)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_layers(self) -> int:
        return self.model.config.text_config.num_hidden_layers


@dataclass
class Result:
    """One answer. timings (seconds): video_s, vision_s, stage1_s, stage2_s, llm_prefill_s
    (the decoder prefill with stage 2, without stage 1), ttft_s (from the start of generate to
    the first token), generate_s, total_s."""

    text: str
    trace: PruningTrace
    timings: dict[str, float]
    num_new_tokens: int
    config: PruneVidConfig
    num_prompt_tokens: int = 0  # the unpruned prompt: text and video placeholders
    extra: dict[str, Any] = field(default_factory=dict)


def preset(name: str, num_layers: int | None = None) -> PruneVidConfig:
    """The default settings for a model: its preset, else the paper's, with `selected_layer`
    scaled by depth (10 of LLaVA-OneVision-7B's 28 layers) when the model is too shallow for it."""
    if name == TRAINED_TINY_MODEL:  # calibrated on training seeds, stored beside its weights
        from .accuracy import load_preset

        return load_preset()[0]
    config = PRESETS.get(name, PruneVidConfig())
    if num_layers is not None and config.selected_layer >= num_layers:
        config = config.replace(selected_layer=max(0, num_layers * 10 // 28))
    return config


def load_model(
    name: str = DEFAULT_MODEL, dtype: str | torch.dtype = "auto", device: str | None = None
) -> LoadedModel:
    """Load a LLaVA-OneVision checkpoint (Hub id or local folder) or an offline tiny model ("tiny-trained", "tiny", "tiny-qwen")."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name == TRAINED_TINY_MODEL:
        from .accuracy import WEIGHTS, load_checkpoint

        checkpoint = load_checkpoint(WEIGHTS)
        return LoadedModel(name, checkpoint.model.to(device), checkpoint.tokenizer, checkpoint.processing)
    if name in PRESETS and name.startswith(TINY_MODEL):
        from .testing import tiny_tokenizer

        tokenizer = tiny_tokenizer()
        model = _tiny_models()[name](tokenizer=tokenizer).to(device)
        return LoadedModel(name, model, tokenizer, _processing(name, model))

    from transformers import AutoModelForImageTextToText, AutoTokenizer

    # Cached or local first; only then the network, and not at all when the Hub is unreachable
    # (its client would retry for half a minute before failing).
    offline = not os.path.isdir(name) and not _hub_reachable()
    try:
        model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype, local_files_only=offline)
        model = model.to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=offline)
        # The processor's chat template (legacy chat_template.json) knows the video item; the
        # tokenizer's own may be the language model's text-only one.
        template = _checkpoint_file(name, "chat_template.json", local_only=offline)
        if template is not None:
            with open(template) as f:
                tokenizer.chat_template = json.load(f)["chat_template"]
    except Exception as error:  # OSError, hub errors, bad configs: all mean "no usable checkpoint here"
        raise ModelLoadError(
            f"Could not load the model '{name}' ({type(error).__name__}): its weights are neither cached nor "
            "downloadable here, so download them where there is network or pass --model a local folder "
            "holding the checkpoint."
        ) from error
    family_of(model)  # an unsupported architecture fails here, with the supported list
    return LoadedModel(name, model, tokenizer, _processing(name, model, local_only=offline))


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def check_question(question: str) -> str:
    question = (question or "").strip()
    if not question:
        raise ValueError("The question is empty: type a question about the video.")
    if len(question) > MAX_QUESTION_CHARS:
        raise ValueError(
            f"The question is too long ({len(question)} characters; at most {MAX_QUESTION_CHARS})."
        )
    return question


@torch.no_grad()
def encode_video(loaded: LoadedModel, frames: np.ndarray) -> Any:
    """The vision tower's output for one video: what apps cache to skip it on the next question."""
    inputs = model_inputs(loaded, frames, "")
    return family_of(loaded.model).video_features(loaded.model, inputs)


@torch.no_grad()
def answer(
    loaded: LoadedModel,
    video: str | os.PathLike | np.ndarray | Video,
    question: str,
    config: PruneVidConfig | None = None,
    max_new_tokens: int = 64,
    features: Any = None,
    streamer: Any = None,
    method: str = "prunevid",
) -> Result:
    """Answer `question` about `video` (a path, a loaded Video or (T, H, W, 3) uint8 frames).

    `features` (from `encode_video` on the same frames) skips the vision tower; `method` runs a
    baseline instead of PruneVid (`prunevid.baselines.METHODS`). Greedy decoding.
    """
    config = config or preset(loaded.name, loaded.num_layers)
    question = check_question(question)
    start = time.perf_counter()
    frames = _frames(video, config.num_frames)
    timings = {"video_s": time.perf_counter() - start}

    inputs = model_inputs(loaded, frames, question)
    tic = time.perf_counter()
    if features is None:
        features = family_of(loaded.model).video_features(loaded.model, inputs)
        timings["vision_s"] = time.perf_counter() - tic
    else:
        timings["vision_s"] = 0.0
    del inputs["pixel_values_videos"]

    patch(loaded.model, config, method)
    clock = _FirstTokenClock(streamer)
    tic = time.perf_counter()
    out = loaded.model.generate(
        **inputs,
        mm_encoder_outputs={"video": features},
        max_new_tokens=max_new_tokens,
        do_sample=False,
        streamer=clock,
    )
    timings["generate_s"] = time.perf_counter() - tic
    timings["ttft_s"] = (clock.first or time.perf_counter()) - tic
    trace = last_trace(loaded.model)
    timings.update(trace.timings)
    timings["total_s"] = time.perf_counter() - start
    new_tokens = out[0, inputs["input_ids"].shape[1] :]
    text = loaded.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
    return Result(text, trace, timings, int(new_tokens.numel()), config, inputs["input_ids"].shape[1])


def model_inputs(loaded: LoadedModel, frames: np.ndarray, question: str) -> dict[str, torch.Tensor]:
    """The model's inputs for one video and question, on its device (pixels in its dtype)."""
    family = family_of(loaded.model)
    inputs = family.build_inputs(loaded.tokenizer, loaded.model.config, frames, question, loaded.processing)
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(loaded.model.dtype)
    return {k: v.to(loaded.device) for k, v in inputs.items()}


def _frames(video: str | os.PathLike | np.ndarray | Video, num_frames: int) -> np.ndarray:
    if isinstance(video, Video):
        return video.frames
    if isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8 or len(video) == 0:
            raise ValueError("frames must be a non-empty (T, H, W, 3) uint8 array")
        return video
    return load_video(video, num_frames).frames


def _processing(name: str, model, local_only: bool = True) -> Any:
    """The family's frame preprocessing, with the checkpoint's own settings where it ships them."""
    settings = family_of(model).Preprocessing
    for filename in ("video_preprocessor_config.json", "preprocessor_config.json"):
        path = _checkpoint_file(name, filename, local_only)
        if path is not None:
            return settings.from_json(path)
    return settings.for_config(model.config)


def _checkpoint_file(name: str, filename: str, local_only: bool = True) -> str | None:
    """A file of a local checkpoint folder or of a Hub checkpoint (cached, or downloaded unless
    `local_only`); None where it has none. The model and tokenizer loaders never fetch these files."""
    from huggingface_hub import hf_hub_download

    if os.path.isdir(name):
        path = os.path.join(name, filename)
        return path if os.path.isfile(path) else None
    try:
        return hf_hub_download(name, filename, local_files_only=local_only)
    except Exception:  # not in this checkpoint, or not cached
        return None


class _FirstTokenClock:
    """A generate() streamer that notes when the first new token arrives (and forwards to `inner`)."""

    def __init__(self, inner: Any = None):
        self.inner, self.first, self.calls = inner, None, 0

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:  # the first put is the prompt
            self.first = time.perf_counter()
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()
