"""The pruning pictures on a synthetic trace whose every token's fate is known."""

from __future__ import annotations

import numpy as np
import pytest

from prunevid.trace import PruningTrace
from prunevid.visualizations import (
    Layers,
    Style,
    budget_counts,
    budget_figure,
    cell_of_pixel,
    contact_sheet,
    figure_to_image,
    overlay_frame,
    overlay_frames,
    save_animation,
    static_share,
    timeline_figure,
)
from prunevid.visualizations.overlay import OUTLINE_COLOR, STATIC_COLOR

T, H, W = 4, 4, 4  # frames, grid rows, grid cols
SIDE = 80  # frame pixels: every token cell is 20 x 20
ONLY = {name: False for name in ("clusters", "heatmap", "static", "pruned", "outlines")}


def layers(**on: bool) -> Layers:
    return Layers(**{**ONLY, **on})


def make_trace() -> PruningTrace:
    """Two segments of two frames. Segment 0: cells (0,0),(0,1) are one static token; segment 1:
    cell (3,3) is static. Every frame: cells rows 2-3 x cols 0-1 form one merged token; the rest
    are their own tokens. Tokens with id % 3 == 1 are pruned; score = id."""
    merged = np.full((T, H, W), -1)
    static = np.zeros((T, H, W), dtype=bool)
    next_id = 0
    for frames, static_cells in (([0, 1], [(0, 0), (0, 1)]), ([2, 3], [(3, 3)])):
        for f in frames:
            for r, c in static_cells:
                merged[f, r, c] = next_id
                static[f, r, c] = True
        next_id += 1
        for f in frames:
            merged[f, 2:, :2] = next_id
            next_id += 1
            for r in range(H):
                for c in range(W):
                    if merged[f, r, c] < 0:
                        merged[f, r, c] = next_id
                        next_id += 1
    kept_token = np.arange(next_id) % 3 != 1
    return PruningTrace(
        segment=np.array([0, 0, 1, 1]),
        static=static,
        merged_index=merged,
        kept=kept_token[merged],
        score=merged.astype(np.float32),
    )


def make_frames(seed: int = 0) -> np.ndarray:
    """(T, SIDE, SIDE, 3) random mid-grey-ish frames (never pure white or the static cyan)."""
    rng = np.random.default_rng(seed)
    return rng.integers(60, 200, size=(T, SIDE, SIDE, 3), dtype=np.uint8)


def cell_pixels(image: np.ndarray, r: int, c: int, margin: int = 0) -> np.ndarray:
    size = SIDE // H
    return image[r * size + margin : (r + 1) * size - margin, c * size + margin : (c + 1) * size - margin]


def test_synthetic_trace_is_consistent():
    trace = make_trace()
    assert trace.num_visual_tokens == T * H * W
    assert trace.num_after_stage1 == (1 + 2 * 11) + (1 + 2 * 12)  # static + per frame: block + singles
    assert 0 < trace.num_after_stage2 < trace.num_after_stage1


def test_cell_mapping_covers_frame_evenly():
    assert cell_of_pixel(80, 4).tolist() == [i // 20 for i in range(80)]
    counts = np.bincount(cell_of_pixel(83, 4))
    assert counts.sum() == 83 and counts.max() - counts.min() <= 1


def test_pruned_token_pixels_are_darker():
    trace, frames = make_trace(), make_frames()
    for t in range(T):
        image = overlay_frame(frames[t], trace, t, layers(pruned=True))
        for r in range(H):
            for c in range(W):
                before = cell_pixels(frames[t], r, c).astype(float)
                after = cell_pixels(image, r, c).astype(float)
                if trace.kept[t, r, c]:
                    assert np.array_equal(before, after)
                else:
                    assert after.mean() < 0.5 * before.mean()
                    assert (after <= before).all()
    # with every layer on, a pruned dynamic cell is still darker than in the source frame
    t, (r, c) = 0, next((r, c) for r in range(H) for c in range(W) if not trace.kept[0, r, c])
    full = overlay_frame(frames[t], trace, t)
    assert cell_pixels(full, r, c, margin=3).mean() < 0.5 * cell_pixels(frames[t], r, c, margin=3).mean()


def test_static_tokens_get_the_static_marker():
    trace, frames = make_trace(), make_frames()
    for t in range(T):
        image = overlay_frame(frames[t], trace, t, layers(static=True))
        marker = np.all(image == STATIC_COLOR, axis=-1)  # (SIDE, SIDE)
        for r in range(H):
            for c in range(W):
                share = cell_pixels(marker, r, c).mean()
                if trace.static[t, r, c]:
                    assert 0.05 < share < 0.6  # hatching: marked, but the frame still shows through
                else:
                    assert share == 0
                    assert np.array_equal(cell_pixels(image, r, c), cell_pixels(frames[t], r, c))
    # the kept static token (id 0) keeps its bright marker with every layer drawn
    full = overlay_frame(frames[0], trace, 0)
    assert trace.kept[0, 0, 0] and np.all(cell_pixels(full, 0, 0, margin=2) == STATIC_COLOR, axis=-1).any()


def test_cluster_outlines_fall_on_cluster_boundaries():
    trace, frames = make_trace(), make_frames()
    size = SIDE // H
    for t in range(T):
        image = overlay_frame(frames[t], trace, t, layers(outlines=True), Style(line_width=1))
        outline = np.all(image == OUTLINE_COLOR, axis=-1)
        labels = np.kron(trace.merged_index[t], np.ones((size, size), dtype=int))  # (SIDE, SIDE)
        # every outline pixel touches a pixel of another merged token
        padded = np.pad(labels, 1, mode="edge")
        differs = np.zeros_like(outline)
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            differs |= padded[dy : dy + SIDE, dx : dx + SIDE] != labels
        assert outline.any() and not (outline & ~differs).any()
        # every border between different tokens is drawn, none between cells of one token (corners aside)
        for r in range(H):
            for c in range(W - 1):
                border = outline[r * size + 1 : (r + 1) * size - 1, (c + 1) * size - 1 : (c + 1) * size + 1]
                same = trace.merged_index[t, r, c] == trace.merged_index[t, r, c + 1]
                assert (not border.any()) if same else border.all()
        for r in range(H - 1):
            for c in range(W):
                border = outline[(r + 1) * size - 1 : (r + 1) * size + 1, c * size + 1 : (c + 1) * size - 1]
                same = trace.merged_index[t, r, c] == trace.merged_index[t, r + 1, c]
                assert (not border.any()) if same else border.all()


def test_clusters_are_filled_with_their_mean_colour():
    trace, frames = make_trace(), make_frames()
    t = 2
    image = overlay_frame(frames[t], trace, t, layers(clusters=True), Style(fill_opacity=1.0))
    block = frames[t, 2 * 20 :, : 2 * 20].reshape(-1, 3).astype(float)  # the 2 x 2-cell merged token
    expected = np.round(block.mean(axis=0))
    assert np.all(image[2 * 20 :, : 2 * 20] == expected)
    single = cell_pixels(frames[t], 0, 3).reshape(-1, 3).astype(float).mean(axis=0)
    assert np.all(cell_pixels(image, 0, 3) == np.round(single))


def test_tokens_dropped_before_the_llm_are_darkened_and_not_filled():
    """EVS-style pruning drops tokens before the language model (merged index -1)."""
    trace, frames = make_trace(), make_frames()
    trace.merged_index[1, 1:3, 2:] = -1
    trace.kept[1, 1:3, 2:] = False
    image = overlay_frame(frames[1], trace, 1, layers(clusters=True, pruned=True), Style(fill_opacity=1.0))
    for r, c in ((1, 2), (1, 3), (2, 2), (2, 3)):
        expected = np.round(cell_pixels(frames[1], r, c).astype(np.float32) * Style().pruned_brightness)
        assert np.array_equal(cell_pixels(image, r, c), expected), "dropped: the frame, darkened"
    block = frames[1, 2 * 20 :, : 2 * 20].reshape(-1, 3).astype(float)
    assert np.all(image[2 * 20 :, : 2 * 20] == np.round(block.mean(axis=0))), "kept tokens still filled"


def test_heatmap_is_brighter_for_higher_scores():
    trace, frames = make_trace(), make_frames()
    grey = np.full_like(frames, 128)
    image = overlay_frame(grey[3], trace, 3, layers(heatmap=True))
    low, high = (
        np.unravel_index(trace.score[3].argmin(), (H, W)),
        np.unravel_index(trace.score[3].argmax(), (H, W)),
    )
    assert cell_pixels(image, *high).astype(float).sum() > cell_pixels(image, *low).astype(float).sum() + 60
    no_scores = PruningTrace(
        trace.segment, trace.static, trace.merged_index, trace.kept, np.full((T, H, W), np.nan)
    )
    assert np.array_equal(overlay_frame(grey[3], no_scores, 3, layers(heatmap=True)), grey[3])


def test_overlay_frames_shapes_and_checks():
    trace = make_trace()
    frames = np.random.default_rng(1).integers(0, 256, size=(T, 77, 83, 3), dtype=np.uint8)
    images = overlay_frames(frames, trace, Layers(heatmap=True))
    assert images.shape == frames.shape and images.dtype == np.uint8
    with pytest.raises(ValueError, match="frames"):
        overlay_frames(frames[:3], trace)
    with pytest.raises(ValueError, match="outside"):
        overlay_frame(frames[0], trace, T)


def test_budget_chart_matches_trace_counts():
    trace = make_trace()
    figure = budget_figure(trace)
    bars = figure.axes[0].containers[0].patches
    expected = [trace.num_visual_tokens, trace.num_after_stage1, trace.num_after_stage2]
    assert [bar.get_width() for bar in bars] == expected == budget_counts(trace)
    texts = [text.get_text() for text in figure.axes[0].texts]
    assert any(f"{trace.num_after_stage2}  ({100 * trace.num_after_stage2 / 64:.0f}%)" in s for s in texts)
    image = figure_to_image(figure)
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8


def test_timeline_matches_segments_and_static_share():
    trace = make_trace()
    figure = timeline_figure(trace, timestamps=np.arange(T) * 0.5)
    bars = figure.axes[0].containers[0].patches
    assert len(bars) == T
    heights = np.array([bar.get_height() for bar in bars])
    np.testing.assert_allclose(heights, [200 / 16, 200 / 16, 100 / 16, 100 / 16])
    np.testing.assert_allclose(heights, static_share(trace) * 100)
    colours = [bar.get_facecolor() for bar in bars]
    assert colours[0] == colours[1] and colours[2] == colours[3] and colours[0] != colours[2]
    assert {"seg 0", "seg 1"} <= {text.get_text().split("\n")[0] for text in figure.axes[0].texts}


def test_contact_sheet_shape():
    images = np.zeros((5, 30, 40, 3), dtype=np.uint8)
    sheet = contact_sheet(images, columns=2, pad=3, captions=[str(i) for i in range(5)])
    assert sheet.shape == (3 * 30 + 4 * 3, 2 * 40 + 3 * 3, 3) and sheet.dtype == np.uint8
    assert (sheet[:3] == 255).all() and (sheet[3 + 2 * 33 :, 3 + 40 + 3 :] == 255).all()  # empty slot
    assert contact_sheet(images, columns=8, pad=0).shape == (30, 5 * 40, 3)


def test_animation_files(tmp_path):
    from prunevid.video import load_video

    images = overlay_frames(make_frames(), make_trace())
    gif = save_animation(tmp_path / "overlay.gif", images, fps=4)
    from PIL import Image

    with Image.open(gif) as picture:
        assert picture.n_frames == T and picture.size == (SIDE, SIDE)
    mp4 = save_animation(tmp_path / "overlay.mp4", images, fps=4)
    assert load_video(mp4, num_frames=T).frames.shape == (T, SIDE, SIDE, 3)
    with pytest.raises(ValueError, match=r"\.mp4 or \.gif"):
        save_animation(tmp_path / "overlay.avi", images)
