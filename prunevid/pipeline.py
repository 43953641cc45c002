"""Load a model and answer a question about a video with PruneVid: the library's front door.

loaded = load_model("llava-hf/llava-onevision-qwen2-0.5b-ov-hf")   # or "tiny-trained" (offline)
result = answer(loaded, "clip.mp4", "What happens?", PruneVidConfig())
result.text, result.trace.num_after_stage2, result.timings["llm_prefill_s"]
"""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .api import (
    TRANSFORMERS_SUPPORTED,
    TransformersVersionError,
    check_transformers,
    family_of,
    last_trace,
    patch,
)
from .config import PruneVidConfig
from .models.base import for_device
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
GIB = 2**30
log = logging.getLogger(__name__)

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
    """A model could not be loaded; the message is one sentence saying what happened and what to do.

    kind: "missing" (not cached, no network or no such model), "memory", "version" (the installed
    transformers cannot load it), "architecture" (not a family PruneVid patches), "corrupt" (the
    checkpoint's files are damaged or incomplete) or "other".
    """

    def __init__(self, message: str, kind: str = "other"):
        super().__init__(message)
        self.kind = kind


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
    """Load a checkpoint PruneVid patches (Hub id or local folder) or an offline tiny model
    ("tiny-trained", "tiny", "tiny-qwen"): bf16 on a GPU, fp32 on the CPU unless `dtype` says
    (a torch dtype or its name, e.g. "bfloat16"; the offline models too).

    Every failure is a `ModelLoadError` whose `kind` and one-sentence message tell apart a model
    that is not cached (or no network), too little memory, an incompatible transformers, an
    unsupported architecture and a corrupt checkpoint; a failed load leaves nothing in memory.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name == TRAINED_TINY_MODEL:
        from .accuracy import WEIGHTS, load_checkpoint

        checkpoint = load_checkpoint(WEIGHTS)
        model = checkpoint.model.to(device=device, dtype=torch_dtype(dtype))
        return LoadedModel(name, model, checkpoint.tokenizer, checkpoint.processing)
    if name in PRESETS and name.startswith(TINY_MODEL):
        from .testing import tiny_tokenizer

        tokenizer = tiny_tokenizer()
        model = _tiny_models()[name](tokenizer=tokenizer).to(device=device, dtype=torch_dtype(dtype))
        return LoadedModel(name, model, tokenizer, _processing(name, model))

    # Cached or local first; only then the network, and not at all when the Hub is unreachable
    # (its client would retry for half a minute before failing).
    from transformers import AutoTokenizer

    offline = not os.path.isdir(name) and not _hub_reachable()
    model = None
    try:
        model = _load_checkpoint(name, dtype, device, offline)
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=offline)
        # The processor's chat template (legacy chat_template.json) knows the video item; the
        # tokenizer's own may be the language model's text-only one.
        template = _checkpoint_file(name, "chat_template.json", local_only=offline)
        if template is not None:
            with open(template) as f:
                tokenizer.chat_template = json.load(f)["chat_template"]
        return LoadedModel(name, model, tokenizer, _processing(name, model, local_only=offline))
    except Exception as error:
        # A failed load keeps nothing: drop our reference and the frames of the loading code
        # (a traceback would otherwise hold the half-built model for as long as the error lives).
        model = None
        failure = load_failure(name, error, offline)
        traceback.clear_frames(error.__traceback__)
        _free_memory()
        raise failure from error


def _load_checkpoint(name: str, dtype: str | torch.dtype, device: str, offline: bool) -> torch.nn.Module:
    """The model of a Hub id or local folder, on `device`, after checking (from its config alone,
    before any weight is read) that this transformers can build it, that PruneVid patches it
    and that it fits in memory."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    check_transformers()
    config = AutoConfig.from_pretrained(name, local_files_only=offline)
    skeleton = _skeleton(AutoModelForImageTextToText, config)
    if skeleton is not None:
        family_of(skeleton)
        check_fits(name, sum(p.numel() for p in skeleton.parameters()), dtype, device)
    model = AutoModelForImageTextToText.from_pretrained(
        name, config=config, dtype=dtype, local_files_only=offline
    )
    return model.to(device).eval()


def _skeleton(auto_class: Any, config: Any) -> torch.nn.Module | None:
    """The model's architecture on PyTorch's meta device (no memory): its class and its number of
    weights. A config no image-text-to-text class takes raises (ValueError); if the skeleton
    cannot be built for another reason (a torch that intercepts devices, as ZeroGPU's does), the
    checks it serves are skipped and the load itself decides."""
    try:
        with torch.device("meta"):
            return auto_class.from_config(config)
    except ValueError:
        raise
    except Exception as error:
        log.warning("skipped the architecture and memory checks (%s: %s)", type(error).__name__, error)
        return None


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from itself or its name ("bfloat16", "float32"; "auto" reads as float32)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    value = torch.float32 if dtype == "auto" else getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}: use e.g. bfloat16, float16 or float32")
    return value


def check_fits(name: str, num_parameters: int, dtype: str | torch.dtype, device: str) -> None:
    """Refuse, before reading any weight, a model whose weights alone exceed the memory available
    (a process that overshoots is killed by the kernel, with no message at all)."""
    needed = num_parameters * torch_dtype(dtype).itemsize
    available = available_memory(device)
    if available is not None and needed > available:
        where = "GPU memory" if device.startswith("cuda") else "memory"
        raise ModelLoadError(
            f"The model `{name}` needs about {needed / GIB:.1f} GiB for its weights in "
            f"{str(dtype).removeprefix('torch.')} but only {available / GIB:.1f} GiB of {where} is free "
            "here: pick a smaller model, free memory, or run on a machine with more memory.",
            "memory",
        )


def available_memory(device: str) -> int | None:
    """Bytes free for new weights on `device` (None when unknown): CUDA's free memory, or the
    system's available memory capped by this process's cgroup limit (containers, Spaces)."""
    if device.startswith("cuda"):
        try:
            return torch.cuda.mem_get_info(torch.device(device))[0]
        except Exception:  # ZeroGPU's main process has no real device: the scheduler checks instead
            return None
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        free = info["MemAvailable"]
    except (OSError, KeyError, ValueError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
        if limit != "max":
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation failure (CUDA or CPU)."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error).lower()
    return "out of memory" in text or "can't allocate memory" in text or "defaultcpuallocator" in text


def load_failure(name: str, error: BaseException, offline: bool) -> ModelLoadError:
    """One sentence for a failed load, by what went wrong, with what to do."""
    import transformers

    if isinstance(error, ModelLoadError):
        return error
    text = " ".join(str(error).split())
    installed = transformers.__version__
    wanted = f"transformers>={TRANSFORMERS_SUPPORTED[0]},<{TRANSFORMERS_SUPPORTED[1]}"
    if is_out_of_memory(error):
        return ModelLoadError(
            f"Loading `{name}` ran out of memory: pick a smaller model, free memory (other models or "
            "programs), or run on a machine with more memory.",
            "memory",
        )
    if isinstance(error, TransformersVersionError) or "does not recognize this architecture" in text:
        needs = _checkpoint_field(name, "transformers_version")
        if isinstance(error, TransformersVersionError) or (needs and _newer(needs, installed)):
            made = f" (the checkpoint was saved with {needs})" if needs else ""
            return ModelLoadError(
                f"The installed transformers {installed} cannot load `{name}`{made}: install {wanted} "
                f'(`pip install "{wanted}"`), the versions PruneVid is written for.',
                "version",
            )
    if (
        "does not recognize this architecture" in text
        or "Unrecognized configuration class" in text
        or (isinstance(error, TypeError) and "PruneVid has no adapter" in text)
    ):
        kind = _checkpoint_field(name, "model_type")
        what = f"a `{kind}` model" if kind else "of an architecture"
        return ModelLoadError(
            f"The model `{name}` is {what} which PruneVid does not patch: use a "
            f"LLaVA-OneVision or Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint.",
            "architecture",
        )
    if (
        type(error).__name__ in ("SafetensorError", "JSONDecodeError", "UnpicklingError", "HeaderTooLarge")
        or isinstance(error, EOFError)
        or any(
            clue in text
            for clue in ("not a valid JSON", "no file named", "size mismatch", "ignore_mismatched_sizes")
        )
    ):
        again = (
            "replace the folder with a complete copy"
            if os.path.isdir(name)
            else f"remove it with `hf cache rm model/{name}` and download it again"
        )
        return ModelLoadError(
            f"The checkpoint of `{name}` is corrupt or incomplete ({_short(error)}): {again}.", "corrupt"
        )
    if isinstance(error, (ImportError, AttributeError, TypeError)):
        return ModelLoadError(
            f"The installed transformers {installed} failed while building `{name}` ({_short(error)}): "
            f"install {wanted}, the versions PruneVid is written for.",
            "version",
        )
    if isinstance(error, OSError):
        why = "the Hugging Face Hub is unreachable" if offline else _short(error)
        return ModelLoadError(
            f"The model `{name}` is neither cached nor downloadable here ({why}): download it once "
            "with network access or give a local checkpoint folder instead (PRUNEVID_MODEL for the app, "
            "--model on the command line).",
            "missing",
        )
    return ModelLoadError(f"Could not load the model `{name}` ({_short(error)}).")


def _short(error: BaseException, limit: int = 160) -> str:
    """`Type: message` on one line, cut to `limit` characters (no sentence breaks inside)."""
    text = " ".join(str(error).split()).replace(". ", "; ").rstrip(".")
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _checkpoint_field(name: str, key: str) -> str | None:
    """A field of the checkpoint's config.json as stored (even when transformers cannot read it)."""
    import json

    from huggingface_hub import hf_hub_download

    try:
        path = os.path.join(name, "config.json")
        if not os.path.isfile(path):
            path = hf_hub_download(name, "config.json", local_files_only=True)
        with open(path) as f:
            value = json.load(f).get(key)
    except Exception:  # no readable config: the caller says what it can without it
        return None
    return str(value) if value else None


def _newer(version: str, than: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version) > Version(than)
    except InvalidVersion:
        return False


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
    if any(0xD800 <= ord(c) <= 0xDFFF for c in question):
        # A JSON client can send half a UTF-16 pair; the tokenizer would fail on it with a TypeError.
        raise ValueError("The question holds an unpaired surrogate (broken UTF-16): it is not valid text.")
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
    if trace.question_attention is not None:  # stage 2's question rows are the prompt's last tokens
        rows = inputs["input_ids"][0, inputs["input_ids"].shape[1] - trace.question_attention.shape[0] :]
        trace.question_tokens = [loaded.tokenizer.decode([token]) for token in rows.tolist()]
    timings.update(trace.timings)
    timings["total_s"] = time.perf_counter() - start
    new_tokens = out[0, inputs["input_ids"].shape[1] :]
    text = loaded.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
    return Result(text, trace, timings, int(new_tokens.numel()), config, inputs["input_ids"].shape[1])


def model_inputs(loaded: LoadedModel, frames: np.ndarray, question: str) -> dict[str, torch.Tensor]:
    """The model's inputs for one video and question, on its device (pixels in its dtype; on a
    GPU the frames are resized and normalised there)."""
    family = family_of(loaded.model)
    processing = for_device(loaded.processing, loaded.device)
    inputs = family.build_inputs(loaded.tokenizer, loaded.model.config, frames, question, processing)
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
