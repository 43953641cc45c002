"""FrameProcessing (our torchvision-free frame preprocessing) and the video prompt length.

Two kinds of test:

* always run: hand-computable properties of `FrameProcessing` (a constant colour survives any
  resize, shape/dtype, no resampling at the target size, resized values on the uint8 grid) and the
  video placeholder count against transformers' own `LlavaOnevisionProcessor.replace_video_token`;
* only where torchvision imports (skipped in the project's main environment, whose CPU torch has
  no working torchvision; CI runs them in `.ci/processors`): `FrameProcessing` against transformers' `LlavaOnevisionVideoProcessor`
  with the llava-hf/llava-onevision-qwen2-*-ov-hf settings, and `build_inputs` against
  `LlavaOnevisionProcessor`. docs/processing_check.md says how to make such an environment.

What runs everywhere against the processors' own outputs is tests/test_processor_fixtures.py.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

from prunevid.models.llava_onevision import (
    PROMPT,
    FrameProcessing,
    build_inputs,
    pooled_grid,
    tokens_per_video,
)
from prunevid.testing import tiny_tokenizer

# Sizes (H, W) of the clips compared: upscales, downscales, mixed, and the identity size.
SIZES = [(240, 320), (180, 320), (384, 384), (500, 700), (384, 512), (720, 1280), (100, 100)]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def random_clip(h: int, w: int, t: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def smooth_clip(h: int, w: int, t: int = 4) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    frames = [
        np.stack([127.5 + 100 * np.sin(x / 37 + i + c) * np.cos(y / 23 - c) for c in range(3)], axis=-1)
        for i in range(t)
    ]
    return np.clip(np.round(frames), 0, 255).astype(np.uint8)


def normalised(values, mean=(0.5,) * 3, std=(0.5,) * 3) -> np.ndarray:
    """(v / 255 - mean) / std in float64, channels first: the exact answer for unresampled pixels."""
    v = np.moveaxis(np.asarray(values, dtype=np.float64), -1, -3)
    mean = np.asarray(mean, dtype=np.float64)[:, None, None]
    std = np.asarray(std, dtype=np.float64)[:, None, None]
    return (v / 255 - mean) / std


def real_size_config(tokenizer) -> LlavaOnevisionConfig:
    """A config with the real checkpoints' vision geometry (384 px, 14 px patches); no weights are built."""
    return LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(image_size=384, patch_size=14).to_dict(),
        text_config=Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=1).to_dict(),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="full",
    )


# --- always run: hand-computable cases ---------------------------------------------------------------


@pytest.mark.parametrize(("h", "w"), [(240, 320), (500, 700), (100, 100), (384, 384), (37, 911)])
@pytest.mark.parametrize("rgb", [(0, 0, 0), (255, 255, 255), (1, 128, 254), (37, 200, 90)])
def test_constant_colour_survives_any_resize(h: int, w: int, rgb: tuple[int, int, int]) -> None:
    frames = np.broadcast_to(np.asarray(rgb, dtype=np.uint8), (3, h, w, 3))
    out = FrameProcessing()(frames)
    expected = normalised(np.broadcast_to(np.asarray(rgb, dtype=np.float64), (3, 384, 384, 3)))
    assert out.shape == (3, 3, 384, 384)
    # Exact up to float32 rounding of the normalisation: (v / 255 - 0.5) / 0.5 per channel.
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-6)


def test_constant_colour_with_clip_mean_std() -> None:
    rgb = (12, 130, 250)
    frames = np.broadcast_to(np.asarray(rgb, dtype=np.uint8), (2, 50, 80, 3))
    out = FrameProcessing(size=(112, 112), mean=CLIP_MEAN, std=CLIP_STD)(frames)
    expected = normalised(
        np.broadcast_to(np.asarray(rgb, dtype=np.float64), (2, 112, 112, 3)), CLIP_MEAN, CLIP_STD
    )
    assert out.shape == (2, 3, 112, 112)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("t", "h", "w", "size"),
    [
        (4, 240, 320, (384, 384)),
        (1, 500, 700, (384, 384)),
        (16, 384, 384, (384, 384)),
        (3, 96, 128, (112, 112)),
    ],
)
def test_shape_dtype_and_range(t: int, h: int, w: int, size: tuple[int, int]) -> None:
    out = FrameProcessing(size=size)(random_clip(h, w, t))
    assert out.shape == (t, 3, *size)
    assert out.dtype == torch.float32
    assert float(out.min()) >= -1.0 and float(out.max()) <= 1.0


@pytest.mark.parametrize(("h", "w"), [(240, 320), (500, 700), (100, 100)])
def test_resized_values_are_on_the_uint8_grid(h: int, w: int) -> None:
    # Like the torchvision processor, the resize result is rounded back to uint8 levels before normalising.
    levels = FrameProcessing()(random_clip(h, w)).double() * 127.5 + 127.5
    np.testing.assert_allclose(levels.numpy(), levels.round().numpy(), rtol=0, atol=1e-4)
    assert float(levels.min()) >= 0 and float(levels.max()) <= 255


@pytest.mark.parametrize(
    ("h", "w", "size"), [(384, 384, (384, 384)), (112, 112, (112, 112)), (96, 160, (96, 160))]
)
def test_target_size_frames_are_not_resampled(h: int, w: int, size: tuple[int, int]) -> None:
    frames = random_clip(h, w, t=2, seed=1)
    out = FrameProcessing(size=size)(frames)
    # Random noise: any resampling would move most pixels by many levels.
    np.testing.assert_allclose(out.numpy(), normalised(frames), rtol=0, atol=1e-6)


def test_channel_order_and_frame_order() -> None:
    frames = np.zeros((3, 20, 30, 3), dtype=np.uint8)
    for i in range(3):
        frames[i] = (10 * i, 100 + 10 * i, 250 - i)
    out = FrameProcessing(size=(8, 8))(frames)
    for i in range(3):
        for c, v in enumerate(frames[i, 0, 0]):
            np.testing.assert_allclose(out[i, c].numpy(), (int(v) / 255 - 0.5) / 0.5, rtol=0, atol=1e-6)


def test_video_token_count_matches_transformers_formula() -> None:
    """16 frames at 384 px: 16 x 14 x 14 pooled tokens + 1 newline = 3137, as the processor writes."""
    from transformers import LlavaOnevisionProcessor

    config = real_size_config(tiny_tokenizer())
    assert pooled_grid(config) == (14, 14)
    assert tokens_per_video(config, 16) == 16 * 196 + 1 == 3137
    # The processor derives the grid from num_image_tokens (729 = 27 x 27 in the checkpoints'
    # processor_config.json); vision_feature_select_strategy does not enter the video count.
    fake = SimpleNamespace(num_image_tokens=729, video_token="<video>")
    for frames in (1, 8, 16, 32):
        text = LlavaOnevisionProcessor.replace_video_token(
            fake, {"pixel_values_videos": [[None] * frames]}, 0
        )
        assert text == "<video>" * tokens_per_video(config, frames)
    side = config.vision_config.image_size // config.vision_config.patch_size
    assert side * side == 729 and math.ceil(side / 2) == 14


# --- only where torchvision works: against transformers' processors ----------------------------------

TORCHVISION_ABSENT = "torchvision does not import here (CPU torch): CI runs these in `bash .ci/processors`"


def _video_processor():
    pytest.importorskip("torchvision", reason=TORCHVISION_ABSENT)
    from transformers import LlavaOnevisionVideoProcessor

    # llava-hf/llava-onevision-qwen2-0.5b-ov-hf's video_preprocessor_config.json, set explicitly (no download).
    return LlavaOnevisionVideoProcessor(
        size={"height": 384, "width": 384},
        resample=3,  # bicubic
        do_resize=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )


@pytest.mark.parametrize("kind", ["random", "smooth"])
@pytest.mark.parametrize(("h", "w"), SIZES)
def test_frame_processing_matches_transformers_video_processor(kind: str, h: int, w: int) -> None:
    processor = _video_processor()
    frames = random_clip(h, w) if kind == "random" else smooth_clip(h, w)
    theirs = processor(videos=[frames], return_tensors="pt")["pixel_values_videos"][0]
    ours = FrameProcessing()(frames)
    assert ours.shape == theirs.shape == (4, 3, 384, 384)
    assert ours.dtype == theirs.dtype == torch.float32
    # Only float32 rounding of the normalisation may differ (one ulp, ~1.2e-7); one uint8 level is 7.8e-3.
    diff = float((ours - theirs).abs().max())
    assert diff <= 1e-6, f"max abs difference {diff:.3e} ({diff * 127.5:.1f} uint8 levels)"


def test_build_inputs_matches_transformers_processor() -> None:
    video_processor = _video_processor()
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor

    tokenizer = tiny_tokenizer()
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(),  # required by the constructor, unused for video
        tokenizer=tokenizer,
        video_processor=video_processor,
        num_image_tokens=729,
        vision_feature_select_strategy="full",
    )
    config = real_size_config(tokenizer)
    frames = random_clip(384, 384, t=16, seed=2)
    question = "what is the colour"
    theirs = processor(text=[PROMPT.format(question=question)], videos=[frames], return_tensors="pt")
    ours = build_inputs(tokenizer, config, frames, question)
    assert int((theirs["input_ids"] == config.video_token_id).sum()) == 3137
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    assert float((ours["pixel_values_videos"] - theirs["pixel_values_videos"]).abs().max()) <= 1e-6
