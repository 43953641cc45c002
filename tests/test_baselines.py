"""The baselines' rules on inputs whose right answer is known by construction, the registry behind
`prunevid.patch(method=...)`, and a pre-LLM method run through the patch against the stock
language model fed the same tokens."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

import prunevid
from prunevid import PruneVidConfig
from prunevid.baselines import (
    METHODS,
    dycoke,
    evs,
    fastv,
    get_method,
    grid_cells,
    random_tokens,
    uniform_pool,
)
from prunevid.models import llava_onevision, qwen2_vl
from prunevid.testing import tiny_model, tiny_qwen_vl, tiny_tokenizer
from prunevid.trace import PruningTrace

STAGE1_ONLY = PruneVidConfig(stage2=False)


def still_video(frames: int, tokens: int, seed: int = 0, channels: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, channels, generator=generator).expand(frames, -1, -1).clone()


@pytest.mark.parametrize(
    ("grid", "count"), [((14, 14), 20), ((6, 6), 5), ((4, 6), 24), ((3, 3), 1), ((2, 7), 9)]
)
def test_grid_cells_cut_the_grid_into_near_equal_rectangles(grid, count):
    cells = grid_cells(grid, count).view(grid)
    assert sorted(cells.unique().tolist()) == list(range(count))
    sizes = torch.bincount(cells.flatten())
    for cell in range(count):
        rows, cols = (cells == cell).nonzero().T
        height, width = int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
        assert height * width == sizes[cell], f"cell {cell} is not a rectangle"
    assert sizes.max() <= 2 * sizes.min() + 1
    first_seen = [int((cells.flatten() == c).nonzero()[0]) for c in range(count)]
    assert first_seen == sorted(first_seen), "cells are numbered in row-major order"


def test_evs_keeps_the_first_frame_and_the_tokens_that_changed_most():
    features = still_video(6, 9)
    changed = [(2, 4), (3, 0), (5, 8)]
    for t, p in changed:  # a new value from frame t on: a change at t only
        features[t:, p] = -features[t:, p]
    merge = evs(features, STAGE1_ONLY.replace(retention=12 / 54), (3, 3))
    kept = (merge.assignment >= 0).nonzero().tolist()
    assert kept == [[0, p] for p in range(9)] + [list(c) for c in sorted(changed)]
    assert merge.num_tokens == 12 and (merge.assignment < 0).sum() == 54 - 12
    kept_tokens = features[merge.assignment >= 0]
    torch.testing.assert_close(merge.tokens, kept_tokens)
    trace = PruningTrace.from_stages(merge)
    assert not trace.kept[merge.assignment.view(6, 3, 3).numpy() < 0].any(), "dropped tokens are not kept"
    assert trace.num_after_stage1 == trace.num_after_stage2 == 12


def test_evs_below_one_frame_keeps_evenly_spread_first_frame_tokens():
    merge = evs(still_video(4, 16), STAGE1_ONLY.replace(retention=4 / 64), (4, 4))
    assert (merge.assignment >= 0).nonzero().tolist() == [[0, 0], [0, 4], [0, 8], [0, 12]]


def test_dycoke_merges_the_tokens_most_like_their_window_anchor():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(8, 4, 8, generator=generator)
    features[1:4] = features[0] + 0.01 * torch.randn(3, 4, 8, generator=generator)  # window 0: still
    features[5:8, :2] = features[4, :2]  # window 1: positions 0-1 still, 2-3 new every frame
    # 32 tokens -> 14: 18 merges, exactly the 12 near-copies in window 0 and the 6 in window 1.
    merge = dycoke(features, STAGE1_ONLY.replace(retention=14 / 32), (2, 2))
    assert merge.num_tokens == 14 and merge.segments.tolist() == [0] * 4 + [1] * 4
    into_anchor = merge.assignment[:4] == merge.assignment[0]
    assert into_anchor.all()
    assert (merge.assignment[5:, :2] == merge.assignment[4, :2]).all()
    assert len(merge.assignment[4:, 2:].unique()) == 8, "changing tokens stay their own"
    torch.testing.assert_close(merge.tokens[merge.assignment[0, 0]], features[:4, 0].mean(0))
    assert merge.static[:4].all() and merge.static[4:, :2].all() and not merge.static[4:, 2:].any()


def test_dycoke_below_one_frame_pools_the_merged_frame():
    features = still_video(8, 16)
    merge = dycoke(features, STAGE1_ONLY.replace(retention=2 / 128), (4, 4))
    cells = grid_cells((4, 4), 2)  # left and right halves
    assert merge.num_tokens == 2 and torch.equal(merge.assignment, cells.expand(8, -1))
    torch.testing.assert_close(merge.tokens[0], features[:, cells == 0].mean((0, 1)))


def test_uniform_pooling_averages_grid_cells_and_runs_of_frames():
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(4, 16, 8, generator=generator)
    merge = uniform_pool(features, STAGE1_ONLY.replace(retention=16 / 64), (4, 4))
    assert merge.num_tokens == 16 and not merge.static.any()
    cells = grid_cells((4, 4), 4)
    for t in range(4):
        for c in range(4):
            torch.testing.assert_close(merge.tokens[4 * t + c], features[t, cells == c].mean(0))
    few = uniform_pool(features, STAGE1_ONLY.replace(retention=2 / 64), (4, 4))
    torch.testing.assert_close(few.tokens, features.view(2, 32, 8).mean(1))
    assert few.segments.tolist() == [0, 0, 1, 1] and few.static.all()


def test_in_llm_rules_keep_the_requested_number():
    attention = torch.rand(3, 5, 40, generator=torch.Generator().manual_seed(0)).softmax(-1)
    groups, counts = torch.arange(40) // 10, torch.tensor([3, 2, 2, 1])
    scores, kept = fastv(attention, groups, counts)
    assert kept.sum() == 8 and torch.equal(scores, attention[:, -1].mean(0))
    assert set(kept.nonzero().squeeze(1).tolist()) == set(scores.topk(8).indices.tolist())
    first, second = random_tokens(attention, groups, counts)[1], random_tokens(attention, groups, counts)[1]
    assert first.sum() == 8 and torch.equal(first, second)


def test_the_registry_names_and_refuses_clearly():
    assert list(METHODS) == ["prunevid", "stage1", "stage2", "fastv", "random", "uniform", "evs", "dycoke"]
    with pytest.raises(ValueError, match="unknown method 'tome'; choose one of prunevid, stage1"):
        get_method("tome")
    model = tiny_model(0)
    with pytest.raises(ValueError, match=r"the evs method needs a retention, e\.g\. retention=0\.1"):
        prunevid.patch(model, method="evs")
    prunevid.patch(model, PruneVidConfig(selected_layer=1), method="fastv")  # alpha per frame
    assert model.model._prunevid.config.stage1 is False and model.model._prunevid.config.stage2 is True


# ---- a pre-LLM method through the patch == the stock language model fed its tokens -------------
#
# The vision features are replaced by hand-built ones (through `mm_encoder_outputs`) whose
# reduction is known by construction: the expected labelling is written out here, and the merged
# tokens are averaged here, so nothing on the expected side comes from the method under test.


@dataclass
class HandMerge:
    """A labelling built by hand and its merged tokens. assignment: (T, N), -1 where dropped."""

    tokens: torch.Tensor  # (M, C)
    assignment: torch.Tensor
    first: list[int]  # flat index t * N + n of each merged token's first member

    def first_members(self) -> list[int]:
        return self.first


def hand_merge(features: torch.Tensor, owner) -> HandMerge:
    """features: (T, N, C); owner(t, n): the key of the token that (t, n) goes into (equal keys
    merge), None when it is dropped. Tokens are numbered in the order of their first members
    (frame, then position) and each is the plain mean of its members."""
    frames, positions, _ = features.shape
    labels, members = {}, []
    assignment = torch.full((frames, positions), -1, dtype=torch.long)
    for t in range(frames):
        for n in range(positions):
            key = owner(t, n)
            if key is None:
                continue
            if key not in labels:
                labels[key] = len(labels)
                members.append([])
            assignment[t, n] = labels[key]
            members[labels[key]].append((t, n))
    tokens = torch.stack([sum(features[t, n] for t, n in group) / len(group) for group in members])
    return HandMerge(tokens, assignment, [t * positions + n for t, n in (group[0] for group in members)])


def hand_built(method: str, frames: int, positions: int, channels: int) -> tuple[torch.Tensor, HandMerge]:
    """Features (T, N, C) on which `method`'s right answer is known by construction, and that answer."""
    generator = torch.Generator().manual_seed(5)
    if method == "evs":
        # A still video in which a few tokens take a new value (their negation) from one frame on:
        # each is the only change at its position, the largest possible (1 - cos = 2); EVS keeps
        # the first frame and exactly these.
        features = torch.randn(positions, channels, generator=generator).expand(frames, -1, -1).clone()
        changes = (
            [(1 + i % (frames - 1), 2 * i + 1) for i in range(20)]
            if positions == 49
            else [(1, 5), (2, 10), (3, 0)]
        )
        for t, n in changes:
            features[t:, n] = -features[t:, n]
        kept = {(0, n) for n in range(positions)} | set(changes)
        return features, hand_merge(features, lambda t, n: (t, n) if (t, n) in kept else None)
    features = torch.randn(frames, positions, channels, generator=generator)
    if method == "uniform":
        if positions == 49:  # a budget of one token per frame: each frame's mean
            return features, hand_merge(features, lambda t, n: t)
        # 4 x 4 grids, 4 tokens per frame: the four 2 x 2 quadrants
        return features, hand_merge(features, lambda t, n: (t, n // 8, n % 4 // 2))
    # dycoke: windows of 4 frames. Some positions repeat their window's first frame (near copies
    # in the first window, exact in the second); the rest are new noise every frame (cosine ~0).
    # The budget is exactly the tokens left when every repeat merges into its window's first frame.
    still = {0: positions if positions == 49 else 8, 4: 20}  # window start -> positions 0 .. k-1 repeat
    for start, count in still.items():
        for t in range(start + 1, min(start + 4, frames)):
            noise = 0.01 * torch.randn(count, channels, generator=generator) if start == 0 else 0
            features[t, :count] = features[start, :count] + noise
    return features, hand_merge(
        features, lambda t, n: (t - t % 4, n) if n < still.get(t - t % 4, 0) else (t, n)
    )


def stock_logits_on(model, inputs, merge: HandMerge, newline=None, grid_positions=None):
    """The unpatched model's last logits on the prompt whose video span holds `merge.tokens`
    (LLaVA-OneVision: then `newline`), positions numbered afresh (1-D) or each token at its
    first member's stock (t, h, w) (M-RoPE)."""
    ids = inputs["input_ids"][0]
    is_video = ids == model.config.video_token_id
    start, end = is_video.nonzero()[0].item(), is_video.nonzero()[-1].item() + 1
    embed = model.get_input_embeddings()
    with torch.no_grad():
        if grid_positions is None:  # LLaVA-OneVision: the video's last placeholder is its newline
            video = torch.cat([merge.tokens, newline])
            embeds = torch.cat([embed(ids[:start]), video, embed(ids[end:])])[None]
            return model(inputs_embeds=embeds).logits[0, -1]
        video_positions = grid_positions[:, is_video][:, merge.first_members()]
        positions = torch.cat([grid_positions[:, :start], video_positions, grid_positions[:, end:]], 1)
        embeds = torch.cat([embed(ids[:start]), merge.tokens, embed(ids[end:])])[None]
        return model(inputs_embeds=embeds, position_ids=positions[:, None]).logits[0, -1]


@pytest.mark.parametrize("method", ["evs", "dycoke", "uniform"])
@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl"])
def test_pre_llm_method_equals_the_stock_model_on_its_tokens(family, method):
    tokenizer = tiny_tokenizer()
    frames = np.zeros((8, 112, 112, 3), dtype=np.uint8)  # the pixels only size the prompt
    if family == "llava_onevision":
        model = tiny_model(0, tokenizer)
        inputs = llava_onevision.build_inputs(tokenizer, model.config, frames, "what colour ?")
        video = model.model.get_video_features(inputs["pixel_values_videos"], return_dict=True)
        grid, positions = (7, 7), None
    else:
        model = tiny_qwen_vl(family, 0, tokenizer, initializer_range=0.1)
        patchify = qwen2_vl.VideoPatchify(min_pixels=112 * 112, max_pixels=112 * 112)
        inputs = qwen2_vl.build_inputs(tokenizer, model.config, frames, "what colour ?", patchify)
        video = model.model.get_video_features(
            inputs["pixel_values_videos"], inputs["video_grid_thw"], return_dict=True
        )
        grid = (4, 4)
        positions, _ = model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], video_grid_thw=inputs["video_grid_thw"]
        )
        positions = positions[:, 0]
    num_frames = 8 if family == "llava_onevision" else 4  # Qwen: two frames per temporal patch
    features, expected = hand_built(
        method, num_frames, grid[0] * grid[1], model.config.text_config.hidden_size
    )
    if family == "llava_onevision":  # (1, T * N + 1, C): the video's tokens, then its newline
        pooled = torch.cat([features.flatten(0, 1), video.pooler_output[0, -1:]])[None]
    else:  # one (T * N, C) tensor per video
        pooled = (features.flatten(0, 1),)
    encoded = {"video": BaseModelOutputWithPooling(pooler_output=pooled)}
    del inputs["pixel_values_videos"]

    count = expected.tokens.shape[0]
    config = PruneVidConfig(selected_layer=1, retention=count / features.shape[:2].numel())
    prunevid.patch(model, config, method=method)
    with torch.no_grad():
        patched = model(**inputs, mm_encoder_outputs=encoded).logits[0, -1]
    trace = prunevid.last_trace(model)
    prunevid.unpatch(model)

    assert count < features.shape[:2].numel() and trace.num_after_stage2 == count
    assert np.array_equal(trace.merged_index.reshape(-1), expected.assignment.flatten().numpy())
    newline = video.pooler_output[0, -1:] if family == "llava_onevision" else None
    stock = stock_logits_on(model, inputs, expected, newline, positions)
    torch.testing.assert_close(patched, stock, atol=1e-4, rtol=0)
