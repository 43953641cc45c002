"""Random settings, videos and batches on every family: what must hold whatever the input.

Each case draws a family, a config anywhere in its valid ranges (stages on or off, tau, k,
ratios, thresholds, selected layer, a retention or not, a per-step budget), a batch of one to
three videos (Qwen-VL rows of different lengths and sizes) and questions of any length, then
checks the traces against the counts the config promises, computed here from the trace itself.
"""

import dataclasses
import random

import numpy as np
import pytest
from helpers import QUESTIONS, QWEN_PATCHIFY, greedy, moving_square, num_placeholders, tiny

import prunevid
from prunevid import PruneVidConfig
from prunevid.budget import final_count, stage1_count
from prunevid.models import llava_onevision, qwen2_vl
from prunevid.testing import tiny_tokenizer

FAMILIES = ["llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
LAYERS = 4  # the tiny models' decoder layers


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def models(tokenizer):
    return {family: tiny(family, tokenizer) for family in FAMILIES}


def random_config(rng: random.Random, frames: int) -> PruneVidConfig:
    # The paper's mode, a budget anywhere, a tiny one (a token or two), every token.
    retention = rng.choices([None, round(rng.uniform(0.01, 1), 3), 0.002, 1.0], weights=[4, 4, 1, 1])[0]
    return PruneVidConfig(
        stage1=rng.random() < 0.85,
        stage2=rng.random() < 0.85,
        tau=rng.uniform(-1, 1),
        temporal_segment_ratio=rng.uniform(0.01, 1),
        cluster_ratio=rng.uniform(0.01, 1),
        k=rng.randint(1, 10),
        spatial_merge_threshold=rng.choice([0, 1, 3, 14, 100]),
        dpc_noise=rng.choice([1e-6, 0.0]),
        seed=rng.randint(0, 5),
        selected_layer=rng.randrange(LAYERS),
        alpha=rng.uniform(0, 1),
        num_frames=frames,
        centre=rng.random() < 0.3,
        retention=retention,
        per_step_budget=retention is not None and rng.random() < 0.25,
    )


def random_video(rng: random.Random, frames: int, size: int) -> np.ndarray:
    """(T, size, size, 3) uint8: a moving square, noise, a still picture or black."""
    kind, seed = rng.choice(["square", "noise", "still", "black"]), rng.randrange(100)
    if kind == "square":
        return moving_square(seed, frames, size)
    pixels = np.random.default_rng(seed).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
    if kind == "still":
        return np.repeat(pixels[:1], frames, axis=0)
    return pixels if kind == "noise" else np.zeros_like(pixels)


def random_batch(rng: random.Random, model, tokenizer, family: str) -> tuple[dict, int]:
    """Inputs for one to three videos, and the frames of the first."""
    rows = rng.choice([1, 1, 2, 3])
    questions = [rng.choice([*QUESTIONS, "?", "what " * 40]) for _ in range(rows)]
    if family == "llava_onevision":  # one frame count and size per batch
        frames = rng.choice([1, 2, 3, 5, 8, 12, 16])
        videos = [random_video(rng, frames, 112) for _ in range(rows)]
        return llava_onevision.build_batch(tokenizer, model.config, videos, questions), frames
    patchify = QWEN_PATCHIFY[family]
    unit = patchify.patch * patchify.merge
    if family != "qwen3_vl":  # let each row keep its own size
        patchify = dataclasses.replace(patchify, min_pixels=(2 * unit) ** 2, max_pixels=(5 * unit) ** 2)
    sizes = [unit * rng.choice([2, 3, 4, 5]) for _ in range(rows)]
    videos = [random_video(rng, rng.choice([2, 4, 6, 8, 10, 16]), size) for size in sizes]
    inputs = qwen2_vl.build_batch(tokenizer, model.config, videos, questions, patchify)
    return inputs, len(videos[0])


def expected_counts(config: PruneVidConfig, trace) -> tuple[int | None, int]:
    """(stage 1's count, or None where the content decides it; the final count): what the
    config promises for the trace's video, its stage-1 tokens in the trace's budget sets."""
    num_visual = trace.num_visual_tokens
    if config.retention is not None:
        first = stage1_count(num_visual, config)
        return first, final_count(num_visual, config.retention) if config.stage2 else first
    first = None if config.stage1 else num_visual
    if not config.stage2:
        return first, trace.num_after_stage1
    return first, sum(max(1, int(config.alpha * size)) for size in np.bincount(trace.group) if size)


def generate(model, inputs, config):
    prunevid.patch(model, config)
    try:
        return greedy(model, inputs, steps=2).sequences, prunevid.last_traces(model)
    finally:
        prunevid.unpatch(model)


@pytest.mark.parametrize("case", range(32))
def test_random_settings_keep_their_promises(case, models, tokenizer):
    rng = random.Random(case)
    family = FAMILIES[case % len(FAMILIES)]
    model = models[family]
    inputs, frames = random_batch(rng, model, tokenizer, family)
    config = random_config(rng, frames)
    visual = num_placeholders(model, inputs) - int(family == "llava_onevision")  # its newline token
    try:
        tokens, traces = generate(model, inputs, config)
    except ValueError as error:  # the one refusal a valid config may meet: too few tokens for the steps
        assert config.per_step_budget and "a per-step budget needs a token per time step" in str(error)
        return
    again, traces_again = generate(model, inputs, config)
    assert (tokens == again).all()
    assert len(traces) == len(visual)
    for trace, repeat, num_visual in zip(traces, traces_again, visual.tolist()):
        assert trace.num_visual_tokens == num_visual
        merged = trace.merged_index.ravel()
        # Every stage-1 token has members, and no original token is dropped.
        assert np.array_equal(np.unique(merged), np.arange(trace.num_after_stage1))
        # A merged token is kept or not as a whole.
        kept = np.zeros(trace.num_after_stage1, dtype=bool)
        kept[merged[trace.kept.ravel()]] = True
        assert np.array_equal(kept[merged], trace.kept.ravel())
        first, final = expected_counts(config, trace)
        if first is not None:
            assert trace.num_after_stage1 == first
        assert trace.num_after_stage2 == final
        assert np.array_equal(trace.merged_index, repeat.merged_index)
        assert np.array_equal(trace.kept, repeat.kept)
