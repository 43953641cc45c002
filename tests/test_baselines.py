"""The baselines' rules on inputs whose right answer is known by construction, the registry behind
`prunevid.patch(method=...)`, and a pre-LLM method run through the patch against the stock
language model fed the same tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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


def stock_logits_on(model, inputs, merge, grid_positions=None):
    """The unpatched model's last logits on the prompt whose video span holds `merge.tokens`
    (LLaVA-OneVision: and its newline), positions numbered afresh (1-D) or each token at its
    first member's stock (t, h, w) (M-RoPE)."""
    ids = inputs["input_ids"][0]
    is_video = ids == model.config.video_token_id
    start, end = is_video.nonzero()[0].item(), is_video.nonzero()[-1].item() + 1
    embed = model.get_input_embeddings()
    with torch.no_grad():
        if grid_positions is None:  # LLaVA-OneVision: the video's last placeholder is its newline
            features = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output[0]
            video = torch.cat([merge.tokens, features[-1:]])
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
    rng = np.random.default_rng(3)
    frames = np.repeat(rng.integers(0, 256, (1, 112, 112, 3), dtype=np.uint8), 8, axis=0)
    frames[:, 40:70, 10:40] = rng.integers(0, 256, (8, 30, 30, 3), dtype=np.uint8)  # a changing patch
    if family == "llava_onevision":
        model = tiny_model(0, tokenizer)
        inputs = llava_onevision.build_inputs(tokenizer, model.config, frames, "what colour ?")
    else:
        model = tiny_qwen_vl(family, 0, tokenizer, initializer_range=0.1)
        patchify = qwen2_vl.VideoPatchify(min_pixels=112 * 112, max_pixels=112 * 112)
        inputs = qwen2_vl.build_inputs(tokenizer, model.config, frames, "what colour ?", patchify)
    config = PruneVidConfig(selected_layer=1, retention=0.3)
    prunevid.patch(model, config, method=method)
    with torch.no_grad():
        patched = model(**inputs).logits[0, -1]
    trace = prunevid.last_trace(model)
    prunevid.unpatch(model)

    with torch.no_grad():
        if family == "llava_onevision":
            features = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output[0, :-1]
            grid, positions = (7, 7), None
        else:
            features = model.model.get_video_features(
                inputs["pixel_values_videos"], inputs["video_grid_thw"]
            ).pooler_output[0]
            grid = (4, 4)
            positions, _ = model.model.get_rope_index(
                inputs["input_ids"], inputs["mm_token_type_ids"], video_grid_thw=inputs["video_grid_thw"]
            )
            positions = positions[:, 0]
    merge = METHODS[method].reduce(
        features.view(-1, grid[0] * grid[1], features.shape[-1]), get_method(method).configure(config), grid
    )
    assert trace.num_after_stage2 == merge.num_tokens == round(0.3 * features.shape[0])
    assert np.array_equal(trace.merged_index.reshape(-1), merge.assignment.flatten().numpy())
    torch.testing.assert_close(patched, stock_logits_on(model, inputs, merge, positions), atol=1e-4, rtol=0)
