"""Stage 1 and the retention budget against the independent reference (tests/stage1_reference.py,
which imports nothing from prunevid.merge / cluster / budget / select).

The reference is first checked against the authors' worked example; then the library's
`merge_tokens` must give the same merged tokens (allclose), the same assignment, order,
segments, static mask and budget sets (exactly) on token videos of known structure, for the
LLaVA-OneVision grid (14 x 14) and Qwen-style non-square grids, with and without the density
noise, in the paper's mode and at many budgets.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from stage1_reference import (
    dpc_knn,
    final_count,
    keep_top,
    largest_remainder,
    make_contiguous,
    stage1_reference,
    stage1_target,
    stage2_counts,
)

from prunevid import PruneVidConfig, merge_tokens

EXAMPLE = Path(__file__).parent / "data" / "stage1_stage2_example.npz"
SHAPES = [(16, (14, 14)), (8, (4, 6)), (16, (6, 10))]  # (frames, grid): LLaVA-OneVision, Qwen-style
KINDS = ["random", "still", "scene_cut", "small_object"]


def token_video(kind: str, frames: int, grid: tuple[int, int], seed: int, channels: int = 16) -> torch.Tensor:
    """(T, N, C) tokens of known structure.

    random: every token independent (one segment, nothing static). still: a fixed background,
    each position wobbling by its own amount (0.02 .. 0.8), so static similarities are spread out
    and never tie. scene_cut: the background changes at 3/8 of the video. small_object: the still
    background with a two-token object moving one cell per frame along the middle row.
    """
    generator = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    noise = torch.randn(frames, n, channels, generator=generator)
    if kind == "random":
        return noise
    wobble = torch.linspace(0.02, 0.8, n)[torch.randperm(n, generator=generator)][None, :, None]
    video = torch.randn(n, channels, generator=generator) + wobble * noise
    if kind == "scene_cut":
        cut = frames * 3 // 8
        video[cut:] = torch.randn(n, channels, generator=generator) + wobble[0] * noise[cut:]
    if kind == "small_object":
        row, width = grid[0] // 2, grid[1]
        for t in range(frames):
            start = row * width + t % (width - 1)
            video[t, start : start + 2] = 3 * torch.randn(2, channels, generator=generator)
    return video


def assert_same_stage1(features: torch.Tensor, config: PruneVidConfig, grid: tuple[int, int]) -> None:
    library = merge_tokens(features, config, grid)
    reference = stage1_reference(features, config)
    where = f"{config}"
    assert torch.equal(library.segments, reference.segments), f"segments differ: {where}"
    assert torch.equal(library.static, reference.static), f"static positions differ: {where}"
    assert library.num_tokens == len(reference.tokens), f"token count differs: {where}"
    assert torch.equal(library.assignment, reference.assignment), f"assignment or order differs: {where}"
    assert torch.equal(library.groups, reference.groups), f"budget sets differ: {where}"
    torch.testing.assert_close(library.tokens, reference.tokens, atol=1e-5, rtol=1e-5, msg=where)


# ---- the reference itself ------------------------------------------------------------------


def test_reference_reproduces_the_authors_worked_example():
    data = np.load(EXAMPLE)
    features = torch.from_numpy(data["input"])
    config = PruneVidConfig(dpc_noise=0.0)
    assert dpc_knn(data["input"].mean(1), 4, 7) == data["temporal_labels_raw"][0].tolist()
    assert (
        make_contiguous(data["temporal_labels_raw"][0].tolist())
        == data["temporal_labels_refined"][0].tolist()
    )
    result = stage1_reference(features, config)
    torch.testing.assert_close(result.tokens, torch.from_numpy(data["output"]), atol=1e-5, rtol=1e-5)
    widths = torch.bincount(result.segments)
    assert widths.tolist() == data["window_sizes"].tolist()
    starts = (widths.cumsum(0) - widths).tolist()
    assert (result.static[starts].numpy() == data["static_masks"]).all()
    # Sets in output order per segment: one static set, then one per frame.
    sizes = torch.bincount(result.groups).tolist()
    static_sizes, dynamic_sizes, g = [], [], 0
    for width in widths.tolist():
        static_sizes.append(sizes[g])
        dynamic_sizes.append(sum(sizes[g + 1 : g + 1 + width]))
        g += 1 + width
    assert static_sizes == data["static_sizes"].tolist() and dynamic_sizes == data["dynamic_sizes"].tolist()
    # Stage 2's budget on the authors' made-up attention: max over heads and queries, then
    # max(1, int(0.4 * size)) per set.
    scores = torch.from_numpy(data["stage2_attn"]).amax(dim=(0, 1, 2))
    kept = keep_top(scores, result.groups, stage2_counts(result.groups, config, 16 * 196))
    assert kept.nonzero().squeeze(1).tolist() == data["stage2_keep_idx_sorted"].tolist()


def test_make_contiguous_follows_the_documented_example():
    assert make_contiguous([0, 0, 5, 1, 1, 1, 6, 2, 2, 2, 2]) == [0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2]
    assert make_contiguous([3, 1, 2, 0]) == [0, 0, 0, 0]  # every label a single frame: one segment


def test_reference_budget_arithmetic_by_hand():
    assert final_count(3136, 0.1) == 314 and final_count(3136, 1e-6) == 1
    assert stage1_target(3136, PruneVidConfig(retention=0.1)) == 992  # round(3136 * 0.1 ** 0.5)
    assert stage1_target(3136, PruneVidConfig(retention=0.1, stage2=False)) == 314
    assert stage1_target(3136, PruneVidConfig(retention=0.1, stage1=False)) == 3136
    # Quotas 2.4 / 1.2 / 2.4 (floors 2 / 1 / 2, remainders .4 / .2 / .4): the earlier .4 wins.
    assert largest_remainder([4, 2, 4], 6) == [3, 1, 2]
    assert largest_remainder([5, 1, 1], 3) == [1, 1, 1]  # the floors of one take from the big set
    assert largest_remainder([50, 30, 20], 2, minimum=0) == [1, 1, 0]
    assert largest_remainder([196] * 16, 314) == [20] * 10 + [19] * 6


# ---- the library against the reference ------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("frames", "grid"), SHAPES)
@pytest.mark.parametrize(("seed", "dpc_noise"), [(0, 0.0), (0, 1e-6), (2, 1e-6), (3, 0.5)])
def test_stage1_equals_the_reference(kind, frames, grid, seed, dpc_noise):
    """dpc_noise 0.5 makes the noise decide the clusters, so every draw must come in order."""
    features = token_video(kind, frames, grid, seed)
    assert_same_stage1(features, PruneVidConfig(dpc_noise=dpc_noise, seed=seed), grid)


@pytest.mark.parametrize(
    "config", [PruneVidConfig(centre=True), PruneVidConfig(tau=0.95, k=3, cluster_ratio=0.3)]
)
def test_stage1_equals_the_reference_at_other_settings(config):
    for kind in KINDS:
        assert_same_stage1(token_video(kind, 8, (6, 10), seed=3) + 2.0, config, (6, 10))


RETENTIONS = [0.5, 0.25, 0.1, 0.03, 0.01, 0.003, 0.001]
BUDGET_CASES = [
    (kind, frames, grid, seed, dpc_noise)
    for kind in KINDS
    for frames, grid in SHAPES
    for seed, dpc_noise in [(0, 0.0), (1, 1e-6), (2, 0.5)]
    # The big grid (time): default noise for every kind, decisive noise for two.
    if grid != (14, 14) or seed == 1 or (seed == 2 and kind in ("scene_cut", "small_object"))
]


@pytest.mark.parametrize(("kind", "frames", "grid", "seed", "dpc_noise"), BUDGET_CASES)
def test_stage1_equals_the_reference_under_a_budget(kind, frames, grid, seed, dpc_noise):
    """Many budgets, down to fewer tokens than frames (static runs) and between one token per
    frame and one per set (static sets dropped); stage 2 on and off; other stage-1 shares."""
    features = token_video(kind, frames, grid, seed)
    total = frames * grid[0] * grid[1]
    # Exactly T and T + 1 tokens: a token per frame, fewer than the sets when anything is static.
    retentions = [*RETENTIONS, frames / total, (frames + 1) / total]
    if grid == (14, 14):
        retentions = [0.25, 0.03, 0.001, frames / total, (frames + 1) / total]
    for retention in retentions:
        for stage2 in (True, False):
            config = PruneVidConfig(retention=retention, stage2=stage2, dpc_noise=dpc_noise, seed=seed)
            assert_same_stage1(features, config, grid)
    for share in (0.0, 0.3, 1.0):
        config = PruneVidConfig(retention=0.1, stage1_share=share, dpc_noise=dpc_noise, seed=seed)
        assert_same_stage1(features, config, grid)


@pytest.mark.parametrize(("kind", "frames", "grid", "seed", "dpc_noise"), BUDGET_CASES)
def test_stage1_equals_the_reference_with_a_budget_per_time_step(kind, frames, grid, seed, dpc_noise):
    """`per_step_budget` at many budgets: exactly a token per frame and two, shares that leave
    room for static positions or none, stage 2 on and off."""
    features = token_video(kind, frames, grid, seed)
    total = frames * grid[0] * grid[1]
    retentions = [0.9, 0.5, 0.25, 0.1, 0.03, frames / total, 2 * frames / total, (2 * frames + 1) / total]
    if grid == (14, 14):
        retentions = [0.25, 0.03, frames / total]
    for retention in retentions:
        for stage2 in (True, False):
            config = PruneVidConfig(
                retention=retention, stage2=stage2, per_step_budget=True, dpc_noise=dpc_noise, seed=seed
            )
            if stage1_target(total, config) >= frames:
                assert_same_stage1(features, config, grid)


@pytest.mark.parametrize("kind", KINDS)
def test_a_segment_whose_frames_are_partly_clustered_draws_noise_for_all_of_them(kind):
    """Near a retention of 1 some frames of a segment keep their dynamic set and others are
    clustered; the segment's dynamic sets still take one draw of W x n_d noise values (the
    convention the reference documents), which a strong noise makes visible."""
    features = token_video(kind, 8, (4, 6), seed=5)
    config = PruneVidConfig(retention=0.99, stage2=False, dpc_noise=0.5, seed=5)
    reference = stage1_reference(features, config)
    frame_sets = [s for s in torch.bincount(reference.groups).tolist()]
    assert max(frame_sets) == 24 and min(frame_sets) == 23, "some frames kept, some clustered"
    assert_same_stage1(features, config, (4, 6))


def test_a_similarity_equal_to_tau_is_not_static():
    """Two frames whose tokens are exactly orthogonal at every position: similarity 0, and tau 0
    is not exceeded (static means strictly above tau)."""
    generator = torch.Generator().manual_seed(0)
    video = torch.zeros(2, 24, 16)
    video[0, :, :8] = torch.randn(24, 8, generator=generator)
    video[1, :, 8:] = torch.randn(24, 8, generator=generator)
    for config in (PruneVidConfig(tau=0.0), PruneVidConfig(tau=0.0, retention=0.5)):
        assert not stage1_reference(video, config).static.any()
        assert_same_stage1(video, config, (4, 6))


@pytest.mark.parametrize("kind", KINDS)
def test_fewer_tokens_than_frames_on_a_small_grid(kind):
    """16 frames of 2 x 2 tokens, every final count from 1 to 20: one or more runs of frames
    merged as static segments (counts that are exact multiples of N included), then a token
    per frame and more."""
    features = token_video(kind, 16, (2, 2), seed=4)
    for target in range(1, 21):
        config = PruneVidConfig(retention=target / 64, stage2=False, dpc_noise=0.5, seed=4)
        assert final_count(64, config.retention) == target
        assert_same_stage1(features, config, (2, 2))
