"""Qwen-VL video preprocessing (`VideoPatchify`) and prompt (`build_inputs`) vs transformers.

Two kinds of test:

* always run: hand-computable properties of `VideoPatchify` beyond
  tests/test_qwen2_vl.py::test_patchify_layout_and_sizes (the smart_resize arithmetic for the
  compared clip sizes, Python's round-half-to-even, the max branch ending below min_pixels, the
  channel / time / in-patch order of a patch row, a constant colour through a resize) and the
  video placeholder count against `Qwen2_5_VLProcessor.replace_video_token`;
* only where torchvision imports (`pytest.importorskip`, skipped in the main environment; CI runs
  them in `.ci/processors`):
  `VideoPatchify` against `Qwen2VLVideoProcessor` (Qwen2-VL and Qwen2.5-VL) with its class
  defaults, with and without `cap_pixels_per_frame`, the cap's rule with a small
  `max_video_tokens`, and `build_inputs` against `Qwen2_5_VLProcessor` / `Qwen2VLProcessor`.
  docs/processing_check.md gives the numbers and how to make such an environment.

What runs everywhere against the processors' own outputs is tests/test_processor_fixtures.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from prunevid.models.qwen2_vl import PROMPT, VideoPatchify, build_inputs
from prunevid.testing import tiny_qwen_vl, tiny_tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# (H, W) of the compared clips -> the target size under the defaults (128 .. 768 tokens of 28 x 28 px).
TARGETS = {
    (240, 320): (280, 392),
    (180, 320): (252, 448),
    (112, 112): (336, 336),
    (720, 1280): (560, 1008),
    (56, 56): (336, 336),
}
RAW = dict(mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)  # pixel values come out as the uint8 levels


def random_clip(h: int, w: int, t: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def smooth_clip(h: int, w: int, t: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    frames = [
        np.stack([128 + 90 * np.sin(x / 29 + 0.7 * i + c) * np.cos(y / 19 - c) for c in range(3)], axis=-1)
        for i in range(t)
    ]
    return np.clip(np.round(frames), 0, 255).astype(np.uint8)


def capped_max_pixels(patchify: VideoPatchify, num_frames: int, max_video_tokens: int = 128_000) -> int:
    """transformers' `cap_pixels_per_frame=True` rule (Qwen2VLVideoProcessor.resize, 5.24): the
    per-frame max_pixels becomes an even share of 90 % of `max_video_tokens` tokens' pixels
    (times the temporal patch, since two frames make one token), never below
    1.05 * min_pixels. num_frames is the count given, before padding to the temporal patch."""
    factor = patchify.patch * patchify.merge
    total = int(max_video_tokens * factor * factor * 0.9)
    share = total * patchify.temporal_patch // num_frames
    return max(min(patchify.max_pixels, share), int(patchify.min_pixels * 1.05))


# --- always run: hand-computable cases ---------------------------------------------------------------


def test_target_sizes_of_the_compared_clips():
    patchify = VideoPatchify()
    # 180 x 320 rounds to 168 x 308 = 51,744 px < 100,352: beta = sqrt(100352 / 57600) = 1.3199,
    # ceil(237.6 / 28) = 9 -> 252, ceil(422.4 / 28) = 16 -> 448.
    # 720 x 1280 rounds to 728 x 1288 = 937,664 px > 602,112: beta = sqrt(921600 / 602112) = 1.2372,
    # floor(582.0 / 28) = 20 -> 560, floor(1034.6 / 28) = 36 -> 1008.
    # 56 x 56 and 112 x 112: beta = sqrt(32) and sqrt(8), both give ceil(316.8 / 28) = 12 -> 336.
    for (h, w), size in TARGETS.items():
        assert patchify.target_size(h, w) == size, (h, w)
    for h, w in TARGETS.values():
        assert h % 28 == 0 and w % 28 == 0
        assert patchify.min_pixels <= h * w <= patchify.max_pixels


def test_rounding_is_half_to_even_like_python_round():
    patchify = VideoPatchify()
    # 406 / 28 = 14.5 -> 14 and 518 / 28 = 18.5 -> 18 (half to even): 392 x 504 = 197,568 px, in range.
    assert patchify.target_size(406, 518) == (392, 504)
    # 434 / 28 = 15.5 -> 16.
    assert patchify.target_size(434, 518) == (448, 504)


def test_thin_frames_and_the_max_branch_below_min_pixels():
    patchify = VideoPatchify()
    # 20 x 3000 (ratio 150, under the limit of 200) rounds to 28 x 2996 = 83,888 < 100,352:
    # beta = sqrt(100352 / 60000) = 1.2933, ceil(25.9 / 28) = 1 -> 28, ceil(3879.8 / 28) = 139 -> 3892.
    assert patchify.target_size(20, 3000) == (28, 3892)
    assert patchify.target_size(3000, 20) == (3892, 28)
    assert patchify.target_size(28, 5000) == (28, 5012), "28 x 5012 is in range: only rounded"
    # Shrinking floors each side, so the result can end below min_pixels (as in transformers):
    # max_pixels 105,369: beta = sqrt(921600 / 105369) = 2.9574, floor(8.69) = 8 -> 224,
    # floor(15.46) = 15 -> 420, and 224 x 420 = 94,080 < 100,352.
    assert VideoPatchify(max_pixels=105_369).target_size(720, 1280) == (224, 420)


@pytest.mark.parametrize(("h", "w"), [(240, 320), (720, 1280), (56, 56)])
def test_constant_colour_through_resize_and_channel_blocks(h: int, w: int):
    rgb = (12, 130, 250)
    frames = np.broadcast_to(np.asarray(rgb, dtype=np.uint8), (3, h, w, 3))
    pixels, thw = VideoPatchify()(frames)
    th, tw = TARGETS[(h, w)]
    assert thw.tolist() == [2, th // 14, tw // 14]
    assert pixels.shape == (2 * (th // 14) * (tw // 14), 3 * 2 * 14 * 14)
    assert pixels.dtype == torch.float32
    # A row is 3 channel blocks of 2 x 14 x 14 values; each is (v / 255 - mean) / std of its channel.
    expected = np.repeat([(v / 255 - m) / s for v, m, s in zip(rgb, CLIP_MEAN, CLIP_STD)], 2 * 14 * 14)
    np.testing.assert_allclose(pixels.numpy(), np.broadcast_to(expected, pixels.shape), rtol=0, atol=1e-6)


def test_frame_order_within_a_temporal_patch_and_padding():
    # Constant frames of level 10 * index, 5 frames: time steps (0, 1), (2, 3), (4, 4 repeated).
    frames = (np.arange(5, dtype=np.uint8) * 10)[:, None, None, None] * np.ones((1, 56, 56, 3), np.uint8)
    pixels, thw = VideoPatchify(min_pixels=56 * 56, max_pixels=56 * 56, **RAW)(frames)
    assert thw.tolist() == [3, 4, 4]
    levels = pixels.view(3, 16, 3, 2, 14 * 14).round().int()  # (t, patch, channel, frame, 14 x 14)
    for step, pair in enumerate([(0, 10), (20, 30), (40, 40)]):
        for frame, level in enumerate(pair):
            assert bool((levels[step, :, :, frame] == level).all()), (step, frame)


def test_pixel_order_within_a_patch_is_row_major():
    # Level 14 * (y % 14) + (x % 14): every 14 x 14 patch reads 0, 1, ..., 195 row by row.
    y, x = np.mgrid[0:56, 0:84]
    frame = (14 * (y % 14) + x % 14).astype(np.uint8)
    frames = np.repeat(np.stack([frame, frame, frame], axis=-1)[None], 2, axis=0)
    pixels, thw = VideoPatchify(min_pixels=56 * 84, max_pixels=56 * 84, **RAW)(frames)
    assert thw.tolist() == [1, 4, 6]
    expected = np.tile(np.arange(196), 3 * 2)
    assert np.array_equal(pixels.round().int().numpy(), np.broadcast_to(expected, (24, 1176)))


@pytest.mark.parametrize(("t", "h", "w"), [(4, 240, 320), (5, 180, 320), (16, 720, 1280), (1, 56, 56)])
def test_video_token_count_matches_transformers_formula(t: int, h: int, w: int):
    """build_inputs writes t * h * w / 4 placeholders, as Qwen2_5_VLProcessor.replace_video_token does."""
    from transformers import Qwen2_5_VLProcessor

    tokenizer = tiny_tokenizer()
    config = tiny_qwen_vl(tokenizer=tokenizer).config
    inputs = build_inputs(tokenizer, config, np.zeros((t, h, w, 3), np.uint8), "what is it")
    th, tw = TARGETS[(h, w)]
    count = (t + t % 2) // 2 * (th // 28) * (tw // 28)
    assert inputs["video_grid_thw"].tolist() == [[(t + t % 2) // 2, th // 14, tw // 14]]
    is_video = inputs["input_ids"][0] == config.video_token_id
    assert int(is_video.sum()) == count
    assert torch.equal(inputs["mm_token_type_ids"][0], is_video.int() * 2)
    fake = SimpleNamespace(video_processor=SimpleNamespace(merge_size=2), video_token="<|video_pad|>")
    text = Qwen2_5_VLProcessor.replace_video_token(fake, {"video_grid_thw": inputs["video_grid_thw"]}, 0)
    assert text == "<|video_pad|>" * count


# --- only where torchvision works: against transformers' processors ----------------------------------

TORCHVISION_ABSENT = "torchvision does not import here (CPU torch): CI runs these in `bash .ci/processors`"


def _video_processor(**kwargs):
    pytest.importorskip("torchvision", reason=TORCHVISION_ABSENT)
    from transformers import Qwen2VLVideoProcessor

    # The class defaults (Qwen2-VL and Qwen2.5-VL share this class): 128 .. 768 tokens of
    # 28 x 28 px per frame, CLIP mean/std, bicubic, temporal patch 2, merge 2.
    return Qwen2VLVideoProcessor(**kwargs)


def _theirs(processor, frames: np.ndarray, **kwargs):
    out = processor(videos=[frames], do_sample_frames=False, return_tensors="pt", **kwargs)
    return out["pixel_values_videos"], out["video_grid_thw"][0]


def test_processor_defaults_are_ours():
    processor = _video_processor()
    ours = VideoPatchify()
    assert processor.size.shortest_edge == ours.min_pixels == 128 * 28 * 28
    assert processor.size.longest_edge == ours.max_pixels == 768 * 28 * 28
    assert (processor.patch_size, processor.merge_size, processor.temporal_patch_size) == (14, 2, 2)
    assert tuple(processor.image_mean) == ours.mean and tuple(processor.image_std) == ours.std
    assert processor.rescale_factor == ours.rescale and int(processor.resample) == 3  # bicubic
    # No total-video cap unless asked for: None is read as False (with a one-time warning).
    assert processor.cap_pixels_per_frame is None and processor.max_video_tokens == 128_000


@pytest.mark.parametrize("cap", [None, True])
@pytest.mark.parametrize("kind", ["random", "smooth"])
@pytest.mark.parametrize("t", [4, 5, 16])
@pytest.mark.parametrize(("h", "w"), list(TARGETS))
def test_patchify_matches_transformers_video_processor(h: int, w: int, t: int, kind: str, cap):
    processor = _video_processor()
    frames = random_clip(h, w, t, seed=t) if kind == "random" else smooth_clip(h, w, t)
    theirs, grid = _theirs(processor, frames, **({} if cap is None else {"cap_pixels_per_frame": cap}))
    ours, thw = VideoPatchify()(frames)
    assert thw.tolist() == grid.tolist()
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours, theirs), f"max abs difference {float((ours - theirs).abs().max()):.3e}"


@pytest.mark.parametrize(("h", "w"), [(406, 518), (560, 840), (56, 56), (720, 1280)])
def test_patchify_matches_with_checkpoint_file_pixels(h: int, w: int):
    """min/max pixels 3136 / 12845056, as in the Qwen2.5-VL checkpoints' preprocessor_config.json,
    which AutoVideoProcessor falls back to when a checkpoint has no video processor config;
    56 x 56 is then kept as it is (no resize on either side)."""
    processor = _video_processor(min_pixels=3136, max_pixels=12845056)
    frames = random_clip(h, w, 3, seed=7)
    theirs, grid = _theirs(processor, frames, cap_pixels_per_frame=False)
    ours, thw = VideoPatchify(min_pixels=3136, max_pixels=12845056)(frames)
    assert thw.tolist() == grid.tolist()
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("t", [3, 4, 5, 16])
@pytest.mark.parametrize(("h", "w"), [(720, 1280), (480, 480)])
def test_cap_pixels_per_frame_rule(h: int, w: int, t: int):
    """With a small max_video_tokens the cap binds: the processor then equals VideoPatchify with
    max_pixels = capped_max_pixels(...). With the default 128000 it binds only above 300 frames."""
    processor = _video_processor(max_video_tokens=1000)
    frames = random_clip(h, w, t, seed=t)
    theirs, grid = _theirs(processor, frames, cap_pixels_per_frame=True)
    ours, thw = VideoPatchify(max_pixels=capped_max_pixels(VideoPatchify(), t, 1000))(frames)
    assert thw.tolist() == grid.tolist()
    assert torch.equal(ours, theirs)
    assert capped_max_pixels(VideoPatchify(), 300) == VideoPatchify().max_pixels
    assert capped_max_pixels(VideoPatchify(), 301) < VideoPatchify().max_pixels


def _processor(family: str, tokenizer):
    video_processor = _video_processor()
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor

    processor_class = Qwen2_5_VLProcessor if family == "qwen2_5_vl" else Qwen2VLProcessor
    # The image processor is not used for a video-only prompt but the constructor wants one.
    return processor_class(
        image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer, video_processor=video_processor
    )


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_build_inputs_matches_transformers_processor(family: str):
    tokenizer = tiny_tokenizer()
    processor = _processor(family, tokenizer)
    config = tiny_qwen_vl(family, tokenizer=tokenizer).config
    frames = random_clip(240, 320, 16, seed=2)
    question = "what is the colour"
    # The prompt with one <|video_pad|>: the processor expands it (no chat template involved).
    theirs = processor(
        text=[PROMPT.format(question=question)],
        videos=[frames],
        do_sample_frames=False,
        cap_pixels_per_frame=False,
        return_tensors="pt",
    )
    ours = build_inputs(tokenizer, config, frames, question)
    assert int((theirs["input_ids"] == config.video_token_id).sum()) == 8 * 20 * 28 // 4 == 1120
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "video_grid_thw", "pixel_values_videos"):
        assert torch.equal(ours[key], theirs[key].to(ours[key].dtype)), key


def test_qwen2_5_vl_time_positions_assume_two_frames_per_second():
    """build_inputs gives no second_per_grid_ts, so Qwen2.5-VL takes 1 s per temporal patch: what
    the processor writes for frames sampled at 2 fps. Without metadata it assumes 24 fps."""
    tokenizer = tiny_tokenizer()
    processor = _processor("qwen2_5_vl", tokenizer)
    model = tiny_qwen_vl("qwen2_5_vl", tokenizer=tokenizer)
    frames = random_clip(112, 112, 8, seed=3)
    question = "what is the colour"
    ours = build_inputs(tokenizer, model.config, frames, question)
    assert "second_per_grid_ts" not in ours

    def run(**kwargs):
        return processor(
            text=[PROMPT.format(question=question)],
            videos=[frames],
            do_sample_frames=False,
            cap_pixels_per_frame=False,
            return_tensors="pt",
            **kwargs,
        )

    def positions(inputs):
        return model.model.get_rope_index(
            inputs["input_ids"],
            inputs["mm_token_type_ids"],
            video_grid_thw=inputs["video_grid_thw"],
            second_per_grid_ts=inputs.get("second_per_grid_ts"),
        )[0]

    at_2fps = run(video_metadata=[{"fps": 2.0, "total_num_frames": 8}])
    assert at_2fps["second_per_grid_ts"].tolist() == [1.0]
    assert torch.equal(positions(ours), positions(at_2fps))
    no_metadata = run()
    assert no_metadata["second_per_grid_ts"].tolist() == pytest.approx([2 / 24])
    is_video = ours["input_ids"][0] == model.config.video_token_id
    # 4 temporal patches: 2 positions apart with ours, all at one position at 24 fps (int(t / 6)).
    start = int(positions(ours)[0, 0, is_video].min())
    assert positions(ours)[0, 0, is_video].unique().tolist() == [start, start + 2, start + 4, start + 6]
    assert positions(no_metadata)[0, 0, is_video].unique().tolist() == [start]
