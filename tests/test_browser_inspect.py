"""The token inspector in a real browser (Debian's Chromium driven by Playwright, as in
tests/test_browser.py): on a clip whose answer is known by construction (a still background, one
moving square), click a static token and a dynamic one on the frame view, type in a dropped one,
and check the lit tokens and the card against a trace computed here, without the page.

With every overlay layer off, the pictures are the frames themselves, so a lit cell keeps the
frame's pixels and a dimmed one is darker by a known factor: the lit set can be read back from
the page's own images. A screenshot is saved (also to $PRUNEVID_INSPECT_SCREENSHOT when set).
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import chromium, needs_chromium
from test_app import start_app, stop_app
from test_inspect import still_background_clip

from prunevid.pipeline import answer, load_model, preset
from prunevid.video import load_video, write_video

QUESTION = "what colour is the moving object ?"
LAYER_LABELS = [
    "Merged clusters (mean colour)",
    "Static tokens (cyan hatching)",
    "Pruned by stage 2 (darkened)",
    "Cluster outlines",
]
pytestmark = needs_chromium


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "still_background.mp4"
    write_video(path, still_background_clip(), fps=4)
    return path


@pytest.fixture(scope="module")
def expected(clip):
    """The trace and frames of the same question, computed without the page."""
    loaded = load_model("tiny-trained")
    config = preset("tiny-trained", loaded.num_layers)
    video = load_video(clip, config.num_frames)
    return answer(loaded, video, QUESTION, config, 64).trace, video


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    with chromium() as browser:  # skips before the server starts where Playwright is absent
        process, url = start_app(
            tmp_path_factory.mktemp("server") / "server.log", PRUNEVID_MODEL="tiny-trained"
        )
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.goto(url)
        page.locator("#answer-button").wait_for(timeout=60_000)
        yield page
        stop_app(process)


def image_of(page, selector: str, index: int = 0) -> np.ndarray:
    """The picture the page shows at `selector` (its full-size file), as (h, w, 3) uint8."""
    from PIL import Image

    source = page.locator(selector).nth(index).get_attribute("src")
    body = page.request.get(source).body()
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))


def lit_cells(shown: np.ndarray, frame: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: the cells of `shown` at the frame's own brightness (the centre half of each
    cell, away from outlines), where the others are dimmed to at most 0.35 of it."""
    height, width = frame.shape[:2]
    lit = np.zeros(grid, dtype=bool)
    for r in range(grid[0]):
        for c in range(grid[1]):
            rows = slice(
                r * height // grid[0] + height // (4 * grid[0]),
                (r + 1) * height // grid[0] - height // (4 * grid[0]),
            )
            cols = slice(
                c * width // grid[1] + width // (4 * grid[1]),
                (c + 1) * width // grid[1] - width // (4 * grid[1]),
            )
            ratio = shown[rows, cols].astype(float).mean() / max(frame[rows, cols].astype(float).mean(), 1.0)
            assert ratio > 0.9 or ratio < 0.45, f"cell ({r}, {c}) is neither lit nor dimmed ({ratio:.2f})"
            lit[r, c] = ratio > 0.9
    return lit


def click_token(page, row: int, col: int, grid: tuple[int, int], overlay_half: bool) -> float:
    """Click the centre of cell (row, col) on the frame view; returns the seconds until the card changed."""
    view = page.locator("#frame-view img")
    size = view.evaluate("img => [img.naturalWidth, img.naturalHeight, img.clientWidth, img.clientHeight]")
    natural_w, natural_h, shown_w, shown_h = size
    frame_w = (natural_w - 6) / 2
    x = (col + 0.5) * frame_w / grid[1] + (frame_w + 6 if overlay_half else 0)
    y = (row + 0.5) * natural_h / grid[0]
    tic = time.perf_counter()
    view.click(position={"x": x * shown_w / natural_w, "y": y * shown_h / natural_h})
    wait_for_card(page, f"row {row}, column {col}")
    return time.perf_counter() - tic


def wait_for_card(page, token: str) -> None:
    """Until the card names `token` ("row r, column c"), its progress text gone."""
    page.wait_for_function(
        """token => {
            const text = document.querySelector('#token-card').innerText;
            return text.includes(token) && !text.includes('processing');
        }""",
        arg=token,
        timeout=30_000,
    )


def check_page_against(page, trace, frames: np.ndarray, token: tuple[int, int, int]) -> str:
    """The card names the token and its fate; the lit cells of the frame view and of every
    thumbnail of the video are the token's stage-1 members in that frame (none outside its
    segment). Returns the card's text."""
    card = page.locator("#token-card").inner_text()
    facts = trace.explain(*token)
    frame, row, col = token
    assert f"frame {frame}" in card and f"row {row}, column {col}" in card
    assert facts["fate"].capitalize() in card
    assert ("static (merged over time)" if facts["stage1"]["static"] else "dynamic") in card
    count = facts["stage1"]["members"]
    assert f"holds {count} original token{'s' if count != 1 else ''} (" in card
    members = trace.members(*token)
    height, width = frames.shape[1:3]  # 96 x 96: the thumbnails are the frames' own size
    page.wait_for_timeout(500)  # the pictures' new files
    view = image_of(page, "#frame-view img")
    assert (lit_cells(view[:, width + 6 :], frames[frame], trace.grid) == members[frame]).all()
    sheet = image_of(page, "#token-video img")
    for t in range(trace.num_frames):  # one row of 8 thumbnails, 4 pixels apart
        left = 4 + t * (width + 4)
        lit = lit_cells(sheet[4 : 4 + height, left : left + width], frames[t], trace.grid)
        assert (lit == members[t]).all(), (
            f"frame {t}: lit {lit.astype(int).tolist()}, members {members[t].astype(int).tolist()}"
        )
    return card


def test_inspect_static_dynamic_and_dropped_tokens_in_the_browser(page, clip, expected, tmp_path):
    trace, video = expected
    grid = trace.grid
    for label in LAYER_LABELS:  # the pictures are then the frames themselves
        page.get_by_label(label).uncheck()
    page.locator("input[type=file]").first.set_input_files(str(clip))
    page.locator("#prunevid-question textarea").fill(QUESTION)
    page.locator("#answer-button").click()
    page.wait_for_function(
        "() => document.querySelector('#answer-pruned textarea')?.value.trim().length > 0", timeout=120_000
    )
    page.wait_for_function(
        "n => document.querySelectorAll('#overlay-gallery img').length >= n", arg=trace.num_frames
    )
    page.locator("#frame-view img").wait_for(timeout=30_000)
    assert "Visual tokens" in page.locator("#speed-panel").inner_text()

    # A static token of the still background (frame 0, top-left), clicked on the original half.
    static = (0, 0, 0)
    assert trace.explain(*static)["stage1"]["static"], "by construction: the background never moves"
    seconds = [click_token(page, 0, 0, grid, overlay_half=False)]
    card = check_page_against(page, trace, video.frames, static)
    assert f"tau {trace.config['tau']:g}" in card

    # A dynamic token: the square's cell at frame 0 (columns 4-28 of 96: cell column 0 or 1, row 3).
    dynamic = (0, 3, 1)
    assert not trace.explain(*dynamic)["stage1"]["static"]
    seconds.append(click_token(page, 3, 1, grid, overlay_half=True))
    check_page_against(page, trace, video.frames, dynamic)

    # A token stage 2 dropped, typed in (the keyboard path), with its question words.
    dropped = tuple(int(i) for i in np.argwhere(~trace.kept & ~trace.static)[0])
    facts = trace.explain(*dropped)
    for name, value in zip(("#inspect-frame", "#inspect-row", "#inspect-col"), dropped):
        page.locator(f"{name} input").fill(str(value))
    page.locator("#inspect-button").focus()
    page.keyboard.press("Enter")
    wait_for_card(page, f"row {dropped[1]}, column {dropped[2]}")
    card = check_page_against(page, trace, video.frames, dropped)
    two = facts["stage2"]
    assert "Dropped by stage 2" in card and f"rank {two['rank']} of {two['set_size']}" in card
    assert "Why dropped?" in card and two["question_words"][0]["token"].strip() in card

    # Another frame picked on the slider: the frame view keeps the selection lit there too.
    other = (dropped[0] + 1) % trace.num_frames
    slider = page.locator("#frame-slider input[type=number]")
    slider.fill(str(other))
    slider.press("Enter")
    page.wait_for_timeout(1500)
    width = video.frames.shape[2]
    view = image_of(page, "#frame-view img")
    assert view.shape[1] == 2 * width + 6
    assert (view[:, :width] == video.frames[other]).all(), "the frame view shows the frame picked"
    lit = lit_cells(view[:, width + 6 :], video.frames[other], grid)
    assert (lit == trace.members(*dropped)[other]).all()

    for label in LAYER_LABELS:  # the usual pictures, with the selection kept lit
        page.get_by_label(label).check()
    page.wait_for_timeout(1500)
    screenshot = tmp_path / "inspect.png"
    page.locator("#frame-view").scroll_into_view_if_needed()
    page.screenshot(path=str(screenshot), full_page=True)
    if os.environ.get("PRUNEVID_INSPECT_SCREENSHOT"):
        Path(os.environ["PRUNEVID_INSPECT_SCREENSHOT"]).write_bytes(screenshot.read_bytes())
    print(f"click to card: {', '.join(f'{s * 1000:.0f} ms' for s in seconds)}")
