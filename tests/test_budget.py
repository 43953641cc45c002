"""The retention budget: exact token counts for any video, shape and setting, on every family."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import greedy

import prunevid
from prunevid import PruneVidConfig, merge_tokens
from prunevid.baselines import METHODS
from prunevid.budget import allocate, final_count, stage1_count, step_counts
from prunevid.merge import static_similarity
from prunevid.models import llava_onevision, qwen2_vl
from prunevid.select import keep_counts
from prunevid.testing import tiny_model, tiny_qwen_vl, tiny_tokenizer

RETENTIONS = [1.0, 0.5, 0.25, 0.2, 0.15, 0.1, 0.03, 0.001]


# ---- arithmetic ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sizes", "total"),
    [([5, 1, 1], 3), ([196] * 16, 314), ([10, 30, 60], 7), ([3, 0, 7], 5), ([1] * 9, 9), ([8, 8, 8], 4)],
)
def test_allocate_is_proportional_within_bounds_and_exact(sizes, total):
    counts = allocate(sizes, total)
    assert sum(counts) == total
    whole = sum(sizes)
    for size, count in zip(sizes, counts):
        assert min(1, size) <= count <= size
        if count > 1:  # not held up by the floor: within one token of its proportional share
            assert abs(count - total * size / whole) < 1


def test_allocate_breaks_ties_towards_earlier_sets_and_refuses_impossible_shares():
    assert allocate([4, 4, 4], 4) == [2, 1, 1]
    assert allocate([4, 4, 4], 2, minimum=0) == [1, 1, 0]
    with pytest.raises(ValueError, match="cannot share 2 tokens among sets of sizes"):
        allocate([4, 4, 4], 2)
    with pytest.raises(ValueError, match="cannot share 13 tokens"):
        allocate([4, 4, 4], 13)


def _greedy_shares(sizes: list[int], total: int, minimum: int) -> list[int]:
    """allocate's documented rule, step by step on the host: start every set at
    max(min(minimum, size), floor(quota)), then close the gap a token at a time, adding to the
    set furthest below its quota (removing from the one furthest above it), ties to the earlier.
    Quotas are Python floats, as the allocation's own (so 4/3 - 1 < 10/3 - 3)."""
    whole = max(sum(sizes), 1)
    quotas = [total * size / whole for size in sizes]
    counts = [max(min(minimum, size), math.floor(q)) for size, q in zip(sizes, quotas)]
    while sum(counts) < total:
        open_sets = [i for i, size in enumerate(sizes) if counts[i] < size]
        best = max(open_sets, key=lambda i: (quotas[i] - counts[i], -i))
        counts[best] += 1
    while sum(counts) > total:
        open_sets = [i for i, size in enumerate(sizes) if counts[i] > min(minimum, size)]
        best = max(open_sets, key=lambda i: (counts[i] - quotas[i], -i))
        counts[best] -= 1
    return counts


def test_allocate_equals_the_greedy_rule_it_documents():
    rng = np.random.default_rng(0)
    for _ in range(400):
        sizes = rng.integers(0, 12, rng.integers(1, 9)).tolist()
        minimum = int(rng.integers(0, 4))
        low, high = sum(min(minimum, size) for size in sizes), sum(sizes)
        if low > high:
            continue
        total = int(rng.integers(low, high + 1))
        assert allocate(sizes, total, minimum) == _greedy_shares(sizes, total, minimum), (
            sizes,
            total,
            minimum,
        )


def test_counts_follow_the_documented_split():
    n = 3136
    assert final_count(n, 0.1) == 314 and final_count(n, 1e-6) == 1
    both = PruneVidConfig(retention=0.1)
    assert stage1_count(n, both) == round(n * math.sqrt(0.1))  # stage1_share 0.5: an even split
    assert stage1_count(n, both.replace(stage1_share=1.0)) == 314  # stage 1 does it all
    assert stage1_count(n, both.replace(stage1_share=0.0)) == n  # stage 2 does it all
    assert stage1_count(n, both.replace(stage2=False)) == 314
    assert stage1_count(n, both.replace(stage1=False)) == n
    with pytest.raises(ValueError, match="needs a config with a retention"):
        stage1_count(n, PruneVidConfig())


def test_stage2_counts_share_the_final_count_among_the_sets():
    groups = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    counts = keep_counts(groups, PruneVidConfig(retention=0.1), 400)  # final count 40 of 100 merged
    assert counts.tolist() == [20, 12, 8]
    # Fewer tokens than sets: the largest sets get them.
    assert keep_counts(groups, PruneVidConfig(retention=0.005), 400).tolist() == [1, 1, 0]


# ---- stage 1 under a budget ----------------------------------------------------------------


def video(kind: str, frames: int, tokens: int, seed: int, channels: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(frames, tokens, channels, generator=generator)
    if kind == "random":
        return noise
    still = torch.randn(tokens, channels, generator=generator).expand(frames, -1, -1)
    if kind == "still":
        return still + 0.01 * noise
    mixed = still.clone()  # a third of the positions change every frame, the rest stay
    mixed[:, : tokens // 3] = noise[:, : tokens // 3]
    return mixed


@pytest.mark.parametrize("kind", ["random", "still", "mixed"])
@pytest.mark.parametrize(
    ("frames", "grid"), [(16, (14, 14)), (8, (6, 6)), (5, (4, 6)), (2, (3, 3)), (1, (5, 5))]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_stage1_hits_the_budget_and_every_token_is_in_one_merged_token(kind, frames, grid, seed):
    n = grid[0] * grid[1]
    features = video(kind, frames, n, seed)
    for retention in RETENTIONS if frames * n < 1000 else (0.25, 0.1, 0.001):
        for stage2 in (True, False):
            config = PruneVidConfig(retention=retention, stage2=stage2, seed=seed)
            merge = merge_tokens(features, config, grid)
            expected = stage1_count(frames * n, config)
            assert merge.num_tokens == expected, (retention, stage2)
            assignment = merge.assignment.flatten()
            assert sorted(assignment.unique().tolist()) == list(range(expected))
            # Each merged token is the plain mean of its members.
            members = torch.nn.functional.one_hot(assignment, expected).T.float()
            means = members @ features.reshape(-1, features.shape[-1]) / members.sum(1, keepdim=True)
            torch.testing.assert_close(merge.tokens, means, atol=1e-5, rtol=1e-5)
            assert merge.groups.max() + 1 == len(merge.groups.unique()), "budget sets numbered densely"


def test_tau_still_decides_what_is_static_when_the_budget_has_room():
    features = video("mixed", 16, 196, seed=0)
    paper = merge_tokens(features, PruneVidConfig(dpc_noise=0.0))
    # sqrt(0.1) * 3136 = 992 tokens: fewer than averaging the static positions leaves (over 1,500).
    budget = merge_tokens(features, PruneVidConfig(retention=0.1, dpc_noise=0.0))
    assert torch.equal(budget.static, paper.static)
    assert budget.static[:, 196 // 3 :].all() and not budget.static[:, : 196 // 3].any()


def test_a_budget_above_what_averaging_leaves_turns_the_least_similar_static_positions_dynamic():
    generator = torch.Generator().manual_seed(0)
    frames = torch.randn(36, 8, generator=generator).expand(4, -1, -1).clone()
    wobble = torch.linspace(0.0, 0.3, 36)  # position p drifts by wobble[p]: less similar as p grows
    frames += wobble[None, :, None] * torch.randn(4, 36, 8, generator=generator)
    config = PruneVidConfig(retention=0.5, stage2=False, temporal_segment_ratio=0.25, tau=0.0, dpc_noise=0.0)
    merge = merge_tokens(frames, config, (6, 6))
    assert merge.num_tokens == 72 and merge.segments.tolist() == [0, 0, 0, 0]
    # All 36 positions pass tau; averaging them all would leave 36 tokens. 72 needs 12 positions
    # back as dynamic (each gives 3), and they are the 12 least similar ones.
    similarity = static_similarity(frames)
    dynamic = (~merge.static[0]).nonzero().squeeze(1)
    assert sorted(dynamic.tolist()) == sorted(similarity.argsort()[:12].tolist())


def test_a_budget_below_one_token_per_set_still_fits_every_video():
    # Below one frame's tokens: the video merges as one static segment.
    features = video("random", 16, 196, seed=0)
    merge = merge_tokens(features, PruneVidConfig(retention=0.002, stage2=False), (14, 14))
    assert merge.num_tokens == final_count(16 * 196, 0.002) == 6
    assert merge.segments.unique().tolist() == [0] and merge.static.all()
    # Above one frame's tokens, fewer than frames: runs of frames, each one static segment.
    still = video("still", 16, 4, seed=0)
    merge = merge_tokens(still, PruneVidConfig(retention=0.15, stage2=False), (2, 2))
    assert merge.num_tokens == 10 and merge.static.all()
    assert merge.segments.tolist() == [0] * 6 + [1] * 5 + [2] * 5  # ceil(10 / 4) runs
    # A token per frame but fewer than the sets: every frame its own set, nothing static.
    mixed = video("mixed", 16, 4, seed=0)
    for retention in (0.25, 0.3, 0.35):
        merge = merge_tokens(mixed, PruneVidConfig(retention=retention, stage2=False), (2, 2))
        assert merge.num_tokens == round(retention * 64)


def test_step_counts_share_the_budget_equally_in_time_order():
    # 4 steps of 4 x 4 tokens at 0.25, stage 1 alone: 16 tokens, 4 a step.
    assert step_counts(4, 16, PruneVidConfig(retention=0.25, stage2=False, per_step_budget=True)) == [4] * 4
    # 16 steps of 196 at 0.1 with stage 2: stage 1 keeps round(3136 * sqrt(0.1)) = 992 = 16 * 62.
    assert step_counts(16, 196, PruneVidConfig(retention=0.1, per_step_budget=True)) == [62] * 16
    # 8 steps of 144 at 0.1, stage 1 alone: 115 tokens = 8 * 14 + 3, the first three get one more.
    assert step_counts(8, 144, PruneVidConfig(retention=0.1, stage2=False, per_step_budget=True)) == (
        [15] * 3 + [14] * 5
    )
    assert step_counts(3, 9, PruneVidConfig(retention=3 / 27, stage2=False, per_step_budget=True)) == [1] * 3
    with pytest.raises(ValueError, match="a per-step budget needs a token per time step"):
        step_counts(3, 9, PruneVidConfig(retention=2 / 27, stage2=False, per_step_budget=True))
    with pytest.raises(ValueError, match="set retention too"):
        PruneVidConfig(per_step_budget=True)


@pytest.mark.parametrize("kind", ["random", "still", "mixed"])
@pytest.mark.parametrize(
    ("frames", "grid"), [(16, (14, 14)), (8, (6, 6)), (5, (4, 6)), (2, (3, 3)), (1, (5, 5))]
)
def test_a_per_step_budget_gives_every_frame_its_share(kind, frames, grid):
    """Under `per_step_budget` each frame holds exactly its share of the merged tokens (counted
    at their first members), the tokens come in frame order, each is its members' mean, and a
    still video still merges over time where the shares leave room."""
    n = grid[0] * grid[1]
    features = video(kind, frames, n, seed=0)
    for retention in (1.0, 0.5, 0.25, 0.1, frames / (frames * n)):
        for stage2 in (True, False):
            config = PruneVidConfig(retention=retention, stage2=stage2, per_step_budget=True)
            merge = merge_tokens(features, config, grid)
            frame_of_first = merge.first_members() // n
            assert torch.equal(frame_of_first, frame_of_first.sort().values), "frame order"
            assert torch.bincount(frame_of_first, minlength=frames).tolist() == step_counts(frames, n, config)
            assignment = merge.assignment.flatten()
            members = torch.nn.functional.one_hot(assignment, merge.num_tokens).T.float()
            means = members @ features.reshape(-1, features.shape[-1]) / members.sum(1, keepdim=True)
            torch.testing.assert_close(merge.tokens, means, atol=1e-5, rtol=1e-5)
            if retention == 1.0:
                assert torch.equal(merge.tokens, features.reshape(-1, features.shape[-1]))
            if kind == "still" and frames > 1 and retention == 0.25 and not stage2:
                assert merge.static.any(), "shares with room keep static positions"


def test_without_a_retention_nothing_changes():
    """The budget code path must not touch the paper's: same tokens as cluster_ratio/alpha give."""
    features = video("mixed", 16, 196, seed=3)
    for config in (PruneVidConfig(), PruneVidConfig(cluster_ratio=1.0, spatial_merge_threshold=0)):
        first, second = (
            merge_tokens(features, config),
            merge_tokens(features, config.replace(stage1_share=0.9)),
        )
        assert torch.equal(first.tokens, second.tokens) and torch.equal(first.assignment, second.assignment)


# ---- end to end: exactly the requested count on every family and method ----------------------


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def llava_case(tokenizer):
    model = tiny_model(0, tokenizer)
    frames = np.random.default_rng(0).integers(0, 256, (16, 112, 112, 3), dtype=np.uint8)
    return model, llava_onevision.build_inputs(tokenizer, model.config, frames, "what colour ?")


def qwen_case(family, tokenizer):
    """16 frames of 8 x 8 patches: 8 time steps of 4 x 4 tokens."""
    model = tiny_qwen_vl(family, 0, tokenizer)
    if family == "qwen3_vl":
        size = 128
        patchify = qwen2_vl.VideoPatchify(
            min_pixels=16 * size * size, max_pixels=16 * size * size, patch=16, video_budget=True
        )
    else:
        size = 112
        patchify = qwen2_vl.VideoPatchify(min_pixels=size * size, max_pixels=size * size)
    frames = np.random.default_rng(1).integers(0, 256, (16, size, size, 3), dtype=np.uint8)
    return model, qwen2_vl.build_inputs(tokenizer, model.config, frames, "what colour ?", patchify)


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl", "qwen3_vl"])
def test_every_method_sends_exactly_the_budget_past_the_selected_layer(family, tokenizer):
    model, inputs = llava_case(tokenizer) if family == "llava_onevision" else qwen_case(family, tokenizer)
    prompt = inputs["input_ids"].shape[1]
    for name in METHODS:
        for retention in (0.25, 0.1, 0.03):
            prunevid.patch(model, PruneVidConfig(selected_layer=1), method=name, retention=retention)
            out = greedy(model, inputs, steps=2)
            trace = prunevid.last_trace(model)
            final = final_count(trace.num_visual_tokens, retention)
            assert trace.num_after_stage2 == final, (name, retention)
            assert trace.summary()["retention_target"] == retention and trace.method == name
            # The cache of the last layer holds the text, the kept visual tokens and the new token.
            text = prompt - trace.num_visual_tokens
            assert out.cache.layers[-1].keys.shape[2] == text + final + 1, (name, retention)
    prunevid.unpatch(model)
