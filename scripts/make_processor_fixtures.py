"""Golden outputs of transformers' own video processors, for tests/test_processor_fixtures.py.

transformers' video processors need torchvision, which the project's main environment does not
have (its CPU torch has no matching build), so they are run once here, in a side environment,
and their outputs committed; the main test suite then checks our torchvision-free preprocessing
(`FrameProcessing`, `VideoPatchify`) and prompt expansion against them on every run:

    python -m venv /tmp/tv
    /tmp/tv/bin/pip install torch==2.14.1 torchvision==0.29.1 "transformers==5.24.*" jinja2
    PYTHONPATH=. /tmp/tv/bin/python scripts/make_processor_fixtures.py

It writes tests/data/processor_fixtures.npz. For each case `<name>`:

* `<name>/clip`: the (T, H, W, 3) uint8 frames given to the processor;
* `<name>/settings`: the processor's own JSON (`to_json_string()`), which the test reads back
  with our `from_json`;
* `<name>/values`, `<name>/codes`, `<name>/shape`: `pixel_values_videos` of the one video,
  stored losslessly (normalised uint8 levels take at most 3 x 256 distinct float32 values):
  `values[codes].reshape(shape)` is the processor's float32 output bit for bit;
* `<name>/grid`: `video_grid_thw` (Qwen-VL);
* `<name>/text`: the prompt text the full processor tokenises for our built-in prompt with one
  video placeholder, i.e. the placeholder expanded by transformers (Qwen3-VL: with timestamps);
* `<name>/second_per_grid_ts` (Qwen2.5-VL), `<name>/fps` (the fps given in the video metadata).

Clips are small (a few frames, tens of pixels) and some processors get small size settings so
that the file stays well under 2 MB; every resampling path (up, down, mixed, thin, temporal
padding, clip-level budget) is covered.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import (
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from prunevid.models import llava_onevision, qwen2_vl
from prunevid.testing import tiny_tokenizer

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "processor_fixtures.npz"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
QUESTION = "what is the colour"


def noise(t: int, h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def smooth(t: int, h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    frames = [
        np.stack([128 + 100 * np.sin(x / 9 + 0.7 * i + c) * np.cos(y / 7 - c) for c in range(3)], axis=-1)
        for i in range(t)
    ]
    return np.clip(np.round(frames), 0, 255).astype(np.uint8)


# (name, family, video processor settings, clip). Settings left out are the class defaults.
SMALL_LLAVA = {"size": {"height": 96, "width": 128}}
SMALL_QWEN2 = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}
SMALL_QWEN3 = {"size": {"shortest_edge": 4 * 64 * 64, "longest_edge": 4 * 128 * 128}}
CASES = [
    # llava-hf/llava-onevision-qwen2-*-ov-hf: 384 x 384, mean = std = 0.5
    ("llava_checkpoint_up", "llava", {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}, smooth(2, 60, 80)),
    ("llava_small_noise_up", "llava", SMALL_LLAVA, noise(2, 40, 56, seed=1)),
    ("llava_small_noise_down", "llava", SMALL_LLAVA, noise(2, 110, 150, seed=2)),
    ("llava_small_noise_mixed", "llava", SMALL_LLAVA, noise(1, 60, 300, seed=3)),
    ("qwen2_default_smooth", "qwen2_vl", {}, smooth(2, 30, 40)),
    ("qwen2_small_noise", "qwen2_vl", SMALL_QWEN2, noise(4, 60, 80, seed=5)),
    ("qwen2_small_noise_odd_frames", "qwen2_vl", SMALL_QWEN2, noise(5, 150, 60, seed=6)),
    ("qwen2_small_thin", "qwen2_vl", SMALL_QWEN2, smooth(3, 20, 500)),
    ("qwen2_5_small_noise", "qwen2_5_vl", SMALL_QWEN2, noise(4, 90, 70, seed=7)),
    ("qwen3_small_noise", "qwen3_vl", SMALL_QWEN3, noise(4, 60, 80, seed=8)),
    ("qwen3_small_many_frames", "qwen3_vl", SMALL_QWEN3, noise(6, 56, 72, seed=9)),
    ("qwen3_small_tiny_frames", "qwen3_vl", SMALL_QWEN3, smooth(4, 20, 28)),
]
FPS = 2.0


def processor_for(family: str, settings: dict):
    tokenizer = tiny_tokenizer()
    if family == "llava":
        base = {"size": {"height": 384, "width": 384}, "resample": 3}
        video = LlavaOnevisionVideoProcessor(**{**base, **settings})
        full = LlavaOnevisionProcessor(
            image_processor=LlavaOnevisionImageProcessor(),
            tokenizer=tokenizer,
            video_processor=video,
            num_image_tokens=729,
            vision_feature_select_strategy="full",
        )
        return video, full
    if family == "qwen3_vl":
        video = Qwen3VLVideoProcessor(**settings)
        full = Qwen3VLProcessor(
            image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer, video_processor=video
        )
        return video, full
    video = Qwen2VLVideoProcessor(**settings)
    processor_class = Qwen2_5_VLProcessor if family == "qwen2_5_vl" else Qwen2VLProcessor
    return video, processor_class(
        image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer, video_processor=video
    )


def prompt(family: str) -> str:
    """Our built-in prompt with one video placeholder, as the processors expect it."""
    if family == "llava":
        return llava_onevision.PROMPT.format(question=QUESTION)
    return qwen2_vl.PROMPT.format(question=QUESTION)


def metadata(num_frames: int) -> dict:
    """The sampled frames as consecutive frames of a FPS video (what `seconds_per_frame = 1 / FPS` means)."""
    return {"fps": FPS, "total_num_frames": num_frames, "frames_indices": list(range(num_frames))}


def run(family: str, settings: dict, clip: np.ndarray) -> dict[str, np.ndarray]:
    video, full = processor_for(family, settings)
    call = {"return_tensors": "pt"}
    if family != "llava":
        call |= {"do_sample_frames": False, "video_metadata": [metadata(len(clip))]}
    if family in ("qwen2_vl", "qwen2_5_vl"):
        call["cap_pixels_per_frame"] = False
    alone = video(videos=[clip], **call)
    seen = {}
    expand = full.get_text_with_replacements

    def record(*args, **kwargs):
        text, offsets = expand(*args, **kwargs)
        seen["text"] = text
        return text, offsets

    full.get_text_with_replacements = record
    together = full(text=[prompt(family)], videos=[clip], **call)
    pixels = alone["pixel_values_videos"]
    pixels = pixels[0] if family == "llava" else pixels
    assert torch.equal(
        pixels, together["pixel_values_videos"][0] if family == "llava" else together["pixel_values_videos"]
    )
    values, codes = np.unique(pixels.numpy(), return_inverse=True)
    assert len(values) < 2**16
    out = {
        "clip": clip,
        "settings": np.array(video.to_json_string()),
        "values": values.astype(np.float32),
        "codes": codes.reshape(-1).astype(np.uint16),
        "shape": np.array(pixels.shape),
        "text": np.array(seen["text"][0]),
        "fps": np.array(FPS),
    }
    assert np.array_equal(out["values"][out["codes"]].reshape(pixels.shape), pixels.numpy())
    if family != "llava":
        out["grid"] = alone["video_grid_thw"][0].numpy()
    if family == "qwen2_5_vl":
        out["second_per_grid_ts"] = np.asarray(together["second_per_grid_ts"], dtype=np.float64)
    return out


def main() -> None:
    arrays = {
        "versions": np.array(
            json.dumps({"transformers": transformers.__version__, "torch": torch.__version__})
        )
    }
    for name, family, settings, clip in CASES:
        for key, value in run(family, settings, clip).items():
            arrays[f"{name}/{key}"] = value
        arrays[f"{name}/family"] = np.array(family)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB, {len(CASES)} cases)")


if __name__ == "__main__":
    main()
