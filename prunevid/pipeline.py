"""Load a model and answer a question about a video with PruneVid: the library's front door.

loaded = load_model("llava-hf/llava-onevision-qwen2-0.5b-ov-hf")   # or "tiny" (offline)
result = answer(loaded, "clip.mp4", "What happens?", PruneVidConfig())
result.text, result.trace.num_after_stage2, result.timings["llm_prefill_s"]
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .api import last_trace, patch
from .config import PruneVidConfig
from .models.llava_onevision import PROMPT, FrameProcessing
from .trace import PruningTrace
from .video import Video, load_video

DEFAULT_MODEL = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
TINY_MODEL = "tiny"
MAX_QUESTION_CHARS = 2000

# Per-model defaults: thresholds such as tau depend on how alike a model's visual tokens are.
PRESETS: dict[str, PruneVidConfig] = {
    "llava-hf/llava-onevision-qwen2-0.5b-ov-hf": PruneVidConfig(),
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": PruneVidConfig(),
    TINY_MODEL: PruneVidConfig(selected_layer=1),
}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message is one sentence saying what to do."""


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    tokenizer: Any
    processing: FrameProcessing

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_layers(self) -> int:
        return self.model.config.text_config.num_hidden_layers


@dataclass
class Result:
    """One answer. timings (seconds): video_s, vision_s, stage1_s, stage2_s, llm_prefill_s,
    ttft_s (from the start of generate to the first token), generate_s, total_s."""

    text: str
    trace: PruningTrace
    timings: dict[str, float]
    num_new_tokens: int
    config: PruneVidConfig
    extra: dict[str, Any] = field(default_factory=dict)


def preset(name: str, num_layers: int | None = None) -> PruneVidConfig:
    """The default settings for a model: its preset, else the paper's, with `selected_layer`
    scaled by depth (10 of LLaVA-OneVision-7B's 28 layers) when the model is too shallow for it."""
    config = PRESETS.get(name, PruneVidConfig())
    if num_layers is not None and config.selected_layer >= num_layers:
        config = config.replace(selected_layer=max(0, num_layers * 10 // 28))
    return config


def load_model(
    name: str = DEFAULT_MODEL, dtype: str | torch.dtype = "auto", device: str | None = None
) -> LoadedModel:
    """Load a LLaVA-OneVision checkpoint (Hub id or local folder) or the offline "tiny" model."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name == TINY_MODEL:
        from .testing import tiny_model, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        model = tiny_model(tokenizer=tokenizer).to(device)
        return LoadedModel(name, model, tokenizer, FrameProcessing(size=(112, 112)))

    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

    # Cached or local first; only then the network, and not at all when the Hub is unreachable
    # (its client would retry for half a minute before failing).
    offline = not os.path.isdir(name) and not _hub_reachable()
    try:
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(
            name, dtype=dtype, local_files_only=offline
        )
        model = model.to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=offline)
    except Exception as error:  # OSError, hub errors, bad configs: all mean "no usable checkpoint here"
        raise ModelLoadError(
            f"Could not load the model '{name}' ({type(error).__name__}): its weights are neither cached nor "
            "downloadable here, so download them where there is network or pass --model a local folder "
            "holding the checkpoint."
        ) from error
    return LoadedModel(name, model, tokenizer, _frame_processing(name, model.config))


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
def encode_video(loaded: LoadedModel, frames: np.ndarray) -> torch.Tensor:
    """The vision tower's pooled features of one video, (1, T*N + 1, C): what apps cache."""
    pixels = loaded.processing(frames)[None].to(loaded.device, loaded.model.dtype)
    return loaded.model.model.get_video_features(pixels, return_dict=True).pooler_output


@torch.no_grad()
def answer(
    loaded: LoadedModel,
    video: str | os.PathLike | np.ndarray | Video,
    question: str,
    config: PruneVidConfig | None = None,
    max_new_tokens: int = 64,
    features: torch.Tensor | None = None,
    streamer: Any = None,
) -> Result:
    """Answer `question` about `video` (a path, a loaded Video or (T, H, W, 3) uint8 frames).

    `features` (from `encode_video` on the same frames) skips the vision tower. Greedy decoding.
    """
    config = config or preset(loaded.name, loaded.num_layers)
    question = check_question(question)
    start = time.perf_counter()
    frames = _frames(video, config.num_frames)
    timings = {"video_s": time.perf_counter() - start}

    if features is None:
        tic = time.perf_counter()
        features = encode_video(loaded, frames)
        timings["vision_s"] = time.perf_counter() - tic
    else:
        timings["vision_s"] = 0.0

    inputs = _with_video_tokens(loaded, question, features)
    patch(loaded.model, config)
    clock = _FirstTokenClock(streamer)
    tic = time.perf_counter()
    out = loaded.model.generate(
        **{k: v.to(loaded.device) for k, v in inputs.items()},
        mm_encoder_outputs={"video": BaseModelOutputWithPooling(pooler_output=features)},
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
    return Result(text, trace, timings, int(new_tokens.numel()), config)


def _with_video_tokens(loaded: LoadedModel, question: str, features: torch.Tensor) -> dict[str, torch.Tensor]:
    """Prompt ids with as many video placeholders as `features` has rows (no pixels needed)."""
    tokenizer = loaded.tokenizer
    video_token = tokenizer.convert_ids_to_tokens(loaded.model.config.video_token_id)
    prompt = PROMPT.format(question=question).replace("<video>", video_token * features.shape[1])
    encoded = tokenizer([prompt], return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def _frames(video: str | os.PathLike | np.ndarray | Video, num_frames: int) -> np.ndarray:
    if isinstance(video, Video):
        return video.frames
    if isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8 or len(video) == 0:
            raise ValueError("frames must be a non-empty (T, H, W, 3) uint8 array")
        return video
    return load_video(video, num_frames).frames


def _frame_processing(name: str, config) -> FrameProcessing:
    """The checkpoint's own video preprocessing settings, where it ships them."""
    from huggingface_hub import hf_hub_download

    for filename in ("video_preprocessor_config.json", "preprocessor_config.json"):
        local = os.path.join(name, filename)
        try:
            path = local if os.path.isfile(local) else hf_hub_download(name, filename)
        except Exception:  # not in this checkpoint (or offline): try the next, then the defaults
            continue
        return FrameProcessing.from_json(path)
    return FrameProcessing(size=(config.vision_config.image_size,) * 2)


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
