"""Shared by the model tests (pytest puts this folder on sys.path)."""

import os
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from prunevid.models import llava_onevision, qwen2_vl
from prunevid.testing import tiny_model, tiny_qwen_vl

FAMILIES = ["llava_onevision", "qwen2_5_vl", "qwen3_vl"]
# Qwen-VL frames sized to 8 x 8 patches: 4 x 4 tokens per time step (112 px for 14 px patches, 128 for 16).
QWEN_PATCHIFY = {
    "qwen2_vl": qwen2_vl.VideoPatchify(min_pixels=112 * 112, max_pixels=112 * 112),
    "qwen2_5_vl": qwen2_vl.VideoPatchify(min_pixels=112 * 112, max_pixels=112 * 112),
    "qwen3_vl": qwen2_vl.VideoPatchify(
        min_pixels=16 * 128 * 128,
        max_pixels=16 * 128 * 128,
        patch=16,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        video_budget=True,
    ),
}
QUESTIONS = ["what colour is the object ?", "is the object moving left or right or up or down ?"]


def greedy(model, inputs, steps=5, **kwargs):
    """Exactly `steps` greedy tokens, with the logits of every step."""
    with torch.no_grad():
        return model.generate(
            **inputs,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            **kwargs,
        )


def tiny(family: str, tokenizer, **overrides):
    """A tiny random model of `family`; larger-than-default weights give sharp, position-sensitive
    attention, so that a wrong position, mask or kept set shows in the logits."""
    overrides = {"initializer_range": 0.1, **overrides}
    if family == "llava_onevision":
        return tiny_model(seed=0, tokenizer=tokenizer, **overrides)
    return tiny_qwen_vl(family, seed=0, tokenizer=tokenizer, **overrides)


def moving_square(seed: int, frames: int = 16, size: int = 112) -> np.ndarray:
    """A textured still background with a bright square moving right: (T, size, size, 3) uint8."""
    rng = np.random.default_rng(seed)
    video = np.repeat(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)[None], frames, axis=0)
    for t in range(frames):
        x = 4 + 5 * t
        video[t, 30:58, x : x + 28] = (255, 40 * (seed % 5), 0)
    return video


def video_batch(model, tokenizer, seeds: list[int], questions: list[str]) -> dict[str, torch.Tensor]:
    """Inputs for one video per seed (left-padded when the questions differ in length)."""
    family = model.config.model_type
    if family == "llava_onevision":
        videos = [moving_square(s) for s in seeds]
        return llava_onevision.build_batch(tokenizer, model.config, videos, questions)
    videos = [moving_square(s, size=128 if family == "qwen3_vl" else 112) for s in seeds]
    return qwen2_vl.build_batch(tokenizer, model.config, videos, questions, QWEN_PATCHIFY[family])


def num_placeholders(model, inputs) -> torch.Tensor:
    """Video placeholder tokens per row: (B,)."""
    return (inputs["input_ids"] == model.config.video_token_id).sum(1)


# Debian's Chromium, driven by Playwright (no browser download): the browser tests.
CHROMIUM = "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (apt-get install chromium, as .ci/run does)"
)


@contextmanager
def chromium():
    """A headless Chromium (Playwright's sync API), closed on exit."""
    sync_api = pytest.importorskip("playwright.sync_api")
    args = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ]
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            yield browser
        finally:
            browser.close()
