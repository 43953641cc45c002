"""The token inspector: `PruningTrace.explain` on traces whose answers are known by construction,
the recorded facts of a real run (a still background and one moving object), the pictures and
the page's events (without a browser; tests/test_browser.py clicks the real page)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from prunevid.config import PruneVidConfig
from prunevid.merge import merge_tokens, static_similarity
from prunevid.pipeline import answer, load_model, preset
from prunevid.trace import PruningTrace
from prunevid.visualizations.selection import highlight_frame, token_at

# ---- a hand-made trace: 2 frames of 1 x 4 tokens, one segment ----------------------------------
# merged token 0: position 0, static over both frames; frame 0: {1, 2} -> 1, {3} -> 2;
# frame 1: {1} -> 3, {2, 3} -> 4. Budget sets: {0} (static), {1, 2} (frame 0), {3, 4} (frame 1).
MERGED = np.array([[[0, 1, 1, 2]], [[0, 3, 4, 4]]])
SCORES = np.array([0.5, 0.9, 0.1, 0.2, 0.3], dtype=np.float32)
KEPT = np.array([True, True, False, False, True])


def hand_trace(method: str = "prunevid", **extra) -> PruningTrace:
    return PruningTrace(
        segment=np.array([0, 0]),
        static=MERGED == 0,
        merged_index=MERGED,
        kept=KEPT[MERGED],
        score=SCORES[MERGED],
        config={"stage2": True, "tau": 0.8},
        method=method,
        **extra,
    )


def test_explain_a_token_dropped_by_stage_2_gives_its_rank_the_cut_off_and_the_question_words():
    attention = np.zeros((2, 5), dtype=np.float32)
    attention[:, 2] = [0.1, 0.05]
    trace = hand_trace(question_attention=attention, question_tokens=["red", "?"])
    facts = trace.explain(0, 0, 3, times=np.array([0.0, 0.5]))
    assert facts["fate"] == "dropped by stage 2" and facts["merged_index"] == 2
    assert (facts["frame"], facts["row"], facts["col"], facts["time_s"]) == (0, 0, 3, 0.0)
    two = facts["stage2"]
    assert two["scope"] == "budget set" and two["set_size"] == 2 and two["kept_in_set"] == 1
    assert two["rank"] == 2 and two["kept_rank"] is None and not two["kept"]
    assert two["lowest_kept"] == [pytest.approx(0.9)] and two["highest_dropped"] == [pytest.approx(0.1)]
    assert [w["token"] for w in two["question_words"]] == ["red", "?"]
    assert two["question_words"][0]["attention"] == pytest.approx(0.1)
    assert facts["stage1"]["members"] == 1 and not facts["stage1"]["static"]
    json.dumps(facts)  # JSON-ready as it is


def test_explain_a_kept_cluster_and_a_static_token():
    trace = hand_trace()
    cluster = trace.explain(1, 0, 2)
    assert cluster["fate"] == "kept" and cluster["stage2"]["kept_rank"] == 1
    assert cluster["stage2"]["set_size"] == 2 and cluster["stage2"]["rank"] == 1
    assert cluster["stage1"]["members"] == 2 and cluster["stage1"]["members_in_frame"] == 2
    assert cluster["stage1"]["member_frames"] == [1, 1]
    assert cluster["stage2"]["question_words"] is None, "no attention recorded: said, not invented"
    static = trace.explain(1, 0, 0)
    assert static["stage1"]["static"] and static["stage1"]["member_frames"] == [0, 1]
    assert static["stage1"]["members"] == 2 and static["stage1"]["members_in_frame"] == 1
    assert static["stage2"]["set_size"] == 1 and static["stage2"]["kept_rank"] == 1
    lit = trace.members(1, 0, 2)
    assert lit.tolist() == [[[False, False, False, False]], [[False, False, True, True]]]


def test_recorded_budget_sets_win_and_fastv_ranks_the_whole_video():
    # One set for everything, recorded: the dropped token is 5th of 5.
    trace = hand_trace(group=np.zeros(5, dtype=np.int64))
    assert trace.explain(0, 0, 3)["stage2"]["rank"] == 5
    fastv = hand_trace(method="fastv")
    two = fastv.explain(0, 0, 3)["stage2"]
    assert two["scope"] == "video" and two["set_size"] == 5 and two["kept_in_set"] == 3
    assert two["highest_dropped"] == [pytest.approx(0.2), pytest.approx(0.1)]
    assert two["lowest_kept"] == [pytest.approx(0.3), pytest.approx(0.5), pytest.approx(0.9)]
    nearest = fastv.explain(0, 0, 3, neighbours=2)["stage2"]  # the two either side of the cut-off
    assert nearest["lowest_kept"] == [pytest.approx(0.3), pytest.approx(0.5)]
    assert nearest["highest_dropped"] == [pytest.approx(0.2), pytest.approx(0.1)]


def test_explain_a_token_dropped_before_the_language_model_and_bad_positions():
    merged = MERGED.copy()
    merged[1, 0, 1] = -1
    trace = hand_trace()
    trace.merged_index = merged
    trace.kept = np.where(merged < 0, False, trace.kept)
    facts = trace.explain(1, 0, 1)
    assert facts["fate"] == "dropped before the language model" and facts["stage2"] is None
    assert trace.members(1, 0, 1).sum() == 1 and trace.members(1, 0, 1)[1, 0, 1]
    with pytest.raises(ValueError, match=r"outside the trace's 2 frames of 1 x 4 tokens"):
        trace.explain(2, 0, 0)
    stage2_off = hand_trace()
    stage2_off.config = {"stage2": False}
    assert stage2_off.explain(0, 0, 3)["fate"] == "kept" and stage2_off.explain(0, 0, 3)["stage2"] is None


def test_stage1_records_the_similarity_tau_was_compared_with():
    """MergeResult.similarity: per token, its position's mean pairwise cosine over the frames of
    its segment. A position that never changes has similarity 1; the rest equal stage 1's own
    per-segment function."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(8, 16, 8, generator=generator)
    features[4:] += 3 * torch.randn(1, 16, 8, generator=generator)  # a scene cut after frame 3
    features[:, 0] = torch.randn(8, generator=generator)  # position 0 is still throughout
    merge = merge_tokens(features, PruneVidConfig(dpc_noise=0.0), (4, 4))
    assert merge.similarity.shape == (8, 16)
    assert torch.allclose(merge.similarity[:, 0], torch.ones(8), atol=1e-5)
    for segment in merge.segments.unique():
        frames = (merge.segments == segment).nonzero().squeeze(1)
        expected = static_similarity(features[frames])
        assert torch.equal(merge.similarity[frames], expected.expand(len(frames), -1))
    assert ((merge.similarity > 0.8) == merge.static).all()


# ---- a real run: a still background and one moving square ---------------------------------------


def still_background_clip(num_frames: int = 8, size: int = 96) -> np.ndarray:
    """A still random texture; a red square (24 px) crosses rows 36-60 left to right, so on a
    6 x 6 grid rows 0-1 and 4-5 never change (static) and rows 2-3 hold the motion (dynamic)."""
    rng = np.random.default_rng(0)
    background = rng.integers(60, 120, (size, size, 3)).astype(np.uint8)
    frames = np.repeat(background[None], num_frames, 0)
    for t in range(num_frames):
        x = 4 + t * 10
        frames[t, 36:60, x : x + 24] = (225, 30, 30)
    return frames


@pytest.fixture(scope="module")
def run():
    loaded = load_model("tiny-trained")
    config = preset("tiny-trained", loaded.num_layers)
    return answer(loaded, still_background_clip(), "what colour is the moving object ?", config, 2)


def test_a_real_run_records_what_explain_needs_and_the_still_background_is_static(run):
    trace = run.trace
    tau = run.config.tau
    assert trace.grid == (6, 6) and trace.similarity.shape == trace.static.shape
    # The recorded similarity is what decided static (paper's mode: strictly above tau).
    assert ((trace.similarity > tau) == trace.static).all()
    # DPC facts came back with the decisions, for the tokens of clustered sets only.
    assert trace.density is not None and np.isfinite(trace.density).any()
    assert np.isfinite(trace.density).sum() == np.isfinite(trace.separation).sum()
    background = trace.explain(0, 0, 0)
    assert background["stage1"]["static"] and background["stage1"]["similarity"] > tau
    assert background["stage1"]["member_frames"] == [0, trace.num_frames - 1]
    moving = trace.explain(3, 3, 3)  # the square covers columns 34-58 at frame 3: cell column 3
    assert not moving["stage1"]["static"] and moving["stage1"]["similarity"] < tau
    assert trace.members(3, 3, 3)[[t for t in range(trace.num_frames) if t != 3]].sum() == 0
    assert trace.question_tokens[:7] == ["what", "colour", "is", "the", "moving", "object", "?"]


def test_a_dropped_tokens_score_is_its_top_question_word_and_below_its_sets_cut_off(run):
    trace = run.trace
    dropped = [tuple(map(int, i)) for i in np.argwhere(~trace.kept)]
    assert dropped, "alpha 0.5 drops tokens"
    for token in dropped[:: max(1, len(dropped) // 10)]:
        two = trace.explain(*token)["stage2"]
        # PruneVid's score is the max over heads and question rows: the top word's attention.
        assert two["question_words"][0]["attention"] == pytest.approx(two["score"], rel=1e-5)
        assert two["score"] <= min(two["lowest_kept"]) and two["rank"] > two["kept_in_set"]


def test_a_click_maps_to_the_cell_the_overlay_draws_and_highlights_only_its_members():
    # 60 x 90 pixels on a 2 x 3 grid: cells are 30 x 30.
    assert token_at(0, 0, 60, 90, (2, 3)) == (0, 0)
    assert token_at(89, 59, 60, 90, (2, 3)) == (1, 2)
    assert token_at(31, 29, 60, 90, (2, 3)) == (0, 1)
    image = np.full((60, 90, 3), 200, dtype=np.uint8)
    members = np.array([[True, False, False], [False, False, False]])
    lit = highlight_frame(image, members, selected=None)
    assert (lit[10:20, 10:20] == 200).all(), "the member cell keeps its brightness"
    assert (lit[40:50, 70:80] < 100).all(), "other cells are dimmed"
    assert (highlight_frame(image, members, in_segment=False) < 50).all()


def test_the_page_inspects_a_token_from_a_click_and_from_the_keyboard(tmp_path):
    gr = pytest.importorskip("gradio")
    from prunevid.app import inspector
    from prunevid.app.ui import KNOBS, App
    from prunevid.video import write_video

    video = tmp_path / "still.mp4"
    write_video(video, still_background_clip(), fps=4)
    app = App("tiny-trained")
    config = app.preset("tiny-trained")
    knobs = {name: getattr(config, name) for name in [*KNOBS, "retention", "stage1_share"]}
    question = "what colour is the moving object ?"
    out = app.on_answer(str(video), question, "", "tiny-trained", True, True, knobs, 2, ["clusters"])
    shown = out[-2]
    trace = shown.trace
    # The keyboard path: frame 0, row 0, column 0 (the still background).
    frame, row, col, slider, card, sheet, view, path = app.on_inspect(shown, 0, 0, 0)
    assert (frame, row, col, slider) == (0, 0, 0, 0)
    assert "static (merged over time)" in card and f"tau {config.tau:g}" in card
    saved = json.loads(Path(path).read_text())
    assert saved["selected_token"] == json.loads(json.dumps(trace.explain(0, 0, 0, times=shown.times)))
    assert saved["num_after_stage1"] == trace.num_after_stage1, "the rest of the trace is still there"
    height, width = shown.frames.shape[1:3]
    assert view.shape[:2] == (height, 2 * width + inspector.FRAME_GAP)
    pad = inspector.SHEET_PAD  # 8 frames: one row of 8 thumbnails
    assert sheet.shape[:2] == (height + 2 * pad, inspector.SHEET_COLUMNS * (width + pad) + pad)
    # A click on the overlay half of the frame view of frame 3, on row 3 column 3 (the square).
    x = width + inspector.FRAME_GAP + (3.5 * width / 6)
    event = gr.SelectData(None, {"index": [x, 3.5 * height / 6], "value": None})
    clicked = app.on_click(shown, 3, event)
    assert clicked[:3] == [3, 3, 3] and "dynamic" in clicked[4]
    with pytest.raises(gr.Error):
        app.on_inspect(shown, 0, 6, 0)


def test_the_card_says_the_rank_the_cut_off_and_what_the_compared_method_did():
    from prunevid.app import inspector

    trace = hand_trace()
    evs = hand_trace(method="evs")
    evs.config = {"stage1": True, "stage2": False}
    evs.merged_index = np.where(MERGED == 2, -1, MERGED)  # EVS dropped token 2's member
    thumbs = np.full((2, 10, 40, 3), 200, dtype=np.uint8)
    dropped = inspector.inspect(trace, thumbs, (0, 0, 3), other=evs, compare="evs")
    assert dropped.facts["compared"]["kept"] is False
    assert "**EVS-style** did not keep it (dropped before the language model)." in dropped.card
    assert "**dropped**: rank 2 of 2, 1 kept in its budget set" in dropped.card
    assert "lowest kept scores 0.9; highest dropped 0.1" in dropped.card and "Why dropped?" in dropped.card
    kept = inspector.inspect(trace, thumbs, (1, 0, 2), other=evs, compare="evs")
    assert "kept as **1** of 1 in its budget set" in kept.card and "**EVS-style** kept it." in kept.card
    assert "Why dropped?" not in kept.card


def test_stage1_records_each_tokens_dpc_density_and_separation():
    """ALGORITHM.md §1.2 and §1.4 by hand for a frame's dynamic set: rho = exp(-mean of the k
    smallest squared distances), delta = the distance to the nearest denser token (the densest:
    the set's largest distance), distances divided by sqrt(C); NaN where a set is not clustered."""
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(4, 36, 16, generator=generator)  # random: nothing static, 36 > 14
    merge = merge_tokens(features, PruneVidConfig(dpc_noise=0.0), (6, 6))
    assert not merge.static.any()
    for frame in range(4):
        x = features[frame].double()
        dist = torch.cdist(x, x) / 16**0.5
        density = torch.exp(-(dist.sort(1).values[:, :7] ** 2).mean(1))
        denser = density[None, :] > density[:, None]
        separation = torch.where(denser.any(1), dist.masked_fill(~denser, torch.inf).amin(1), dist.max())
        assert torch.allclose(merge.density[frame].double(), density, atol=1e-5)
        assert torch.allclose(merge.separation[frame].double(), separation, atol=1e-5)
    # Sets at or under spatial_merge_threshold (14) are kept as they are: no DPC facts.
    small = merge_tokens(features[:, :9], PruneVidConfig(dpc_noise=0.0), (3, 3))
    assert torch.isnan(small.density).all() and torch.isnan(small.separation).all()
