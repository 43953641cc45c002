"""The page in a real browser: Debian's Chromium driven by Playwright (no browser download).

Loads the page served by `python app.py` (the offline tiny-trained model), shows that a bad request
gives one readable message, picks the first example, answers it (rightly), waits for the answer and
the overlay gallery, and saves a screenshot (also to $PRUNEVID_SCREENSHOT when set, e.g. docs/app.png).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import chromium, needs_chromium
from test_app import ASSETS, start_app, stop_app

pytestmark = needs_chromium


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process, url = start_app(tmp_path_factory.mktemp("browser") / "server.log", PRUNEVID_MODEL="tiny-trained")
    yield url
    stop_app(process)


@pytest.fixture(scope="module")
def browser():
    with chromium() as opened:
        yield opened


def test_answer_an_example_in_the_browser(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    page.goto(server)
    button = page.locator("#answer-button")
    button.wait_for(timeout=60_000)
    assert page.get_by_text("trained only on synthetic shape videos").is_visible()  # offline-model notice

    # a bad request (no video yet) shows one readable message and the page keeps working
    page.locator("#prunevid-question textarea").fill("What is this?")
    button.click()
    message = page.get_by_text("No video: upload one or pick an example.")
    message.first.wait_for(timeout=30_000)
    assert message.count() == 1
    page.locator(".toast-close").first.click()
    message.first.wait_for(state="hidden", timeout=10_000)

    example = json.loads((ASSETS / "examples.json").read_text())[0]
    page.get_by_text(example["question"]).first.click()
    page.wait_for_function(
        "q => document.querySelector('#prunevid-question textarea').value === q", arg=example["question"]
    )
    # Ask for exactly 20% of the tokens, with EVS-style pruning at the same budget beside PruneVid.
    budget = page.locator("#token-budget input[type=number]")
    budget.fill("0.2")
    budget.press("Enter")
    page.locator("#compare-with input").click()
    page.get_by_role("option", name="EVS-style, same budget").click()
    button.click()
    page.wait_for_function(
        "() => document.querySelector('#answer-pruned textarea')?.value.trim().length > 0", timeout=120_000
    )
    images = page.locator("#overlay-gallery img")
    images.first.wait_for(timeout=60_000)
    page.wait_for_function("() => document.querySelectorAll('#overlay-gallery img').length >= 8")
    page.wait_for_function("() => document.querySelectorAll('#compared-gallery img').length >= 8")
    page.wait_for_timeout(1500)  # let the images and charts finish painting

    screenshot = tmp_path / "app.png"
    page.screenshot(path=str(screenshot), full_page=True)
    if os.environ.get("PRUNEVID_SCREENSHOT"):  # e.g. docs/app.png: a 256-colour copy, a third of the size
        from PIL import Image

        target = Path(os.environ["PRUNEVID_SCREENSHOT"])
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(screenshot) as image:
            compact = image.convert("RGB").quantize(256, Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
            compact.save(target, optimize=True)

    assert example["model"] == "tiny-trained"
    assert page.locator("#answer-pruned textarea").input_value().strip() == example["answer"]
    assert page.locator("#answer-unpruned textarea").input_value().strip()
    assert page.get_by_text("Answer (EVS-style)").is_visible()
    assert images.count() == page.locator("#compared-gallery img").count() == 8  # the preset's frames
    speed = page.locator("#speed-panel").inner_text()
    # 8 frames of 6 x 6 tokens: 20% is 58 tokens, for PruneVid after stage 2 and for EVS before the LLM.
    assert "288 → stage 1" in speed and "stage 2: 58" in speed and "before the LLM: 58" in speed
    page.close()
