"""The Gradio app end to end: `python app.py` on 127.0.0.1 with the offline tiny model, called the
way other tools call it (gradio_client, api_name="/answer", video and question first)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
QUICK = {"max_new_tokens": 4}  # the tiny model's answers are noise: keep them short

# Outputs of the answer endpoint, in order.
ANSWER, UNPRUNED, SPEED, STATS, GALLERY, SLIDER, FRAME, TIMELINE, BUDGET, TRACE, FILES, COMPARED = range(12)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(log_path: Path, **env: str) -> tuple[subprocess.Popen, str]:
    """Run `python app.py` from the repo root; returns the process and its URL once it answers."""
    port = free_port()
    environment = {
        **os.environ,
        "PRUNEVID_MODEL": "tiny",
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        **env,
    }
    log = open(log_path, "w")  # noqa: SIM115 (closed with the process)
    process = subprocess.Popen(
        [sys.executable, "app.py"], cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"app.py did not answer within 180 s:\n{log_path.read_text()}")


def stop_app(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


UPLOAD_MB, VIDEO_MINUTES = 2, 0.5  # the test server's limits (the assets are 5 s, a few KB)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("app") / "server.log"
    limits = {"PRUNEVID_MAX_UPLOAD_MB": str(UPLOAD_MB), "PRUNEVID_MAX_VIDEO_MINUTES": str(VIDEO_MINUTES)}
    process, url = start_app(log, **limits)
    yield url
    stop_app(process)


@pytest.fixture(scope="module")
def client(server):
    return Client(server, verbose=False)


def ask(client: Client, video: str | Path, question: str, **settings):
    return client.predict(handle_file(str(video)), question, **{**QUICK, **settings}, api_name="/answer")


def speed_counts(markdown: str) -> tuple[int, int, int]:
    match = re.search(r"\*\*(\d+)\*\* → stage 1: \*\*(\d+)\*\*.*?stage 2: \*\*(\d+)\*\*", markdown)
    assert match, markdown
    return tuple(int(group) for group in match.groups())


def test_answer_endpoint_matches_trace(client):
    import torch
    from PIL import Image
    from reference import budget_sets

    import prunevid
    from prunevid import PruneVidConfig
    from prunevid.models.llava_onevision import build_inputs
    from prunevid.pipeline import load_model, preset
    from prunevid.video import load_video

    question = "What colour is the object moving to the right?"
    out = ask(client, ASSETS / "shapes.mp4", question)
    assert isinstance(out[ANSWER], str) and out[ANSWER].strip()
    assert out[UNPRUNED] == ""  # not compared

    trace = json.loads(Path(out[TRACE]).read_text())
    stats = out[STATS]
    counts = (trace["num_visual_tokens"], trace["num_after_stage1"], trace["num_after_stage2"])
    assert counts == (stats["num_visual_tokens"], stats["num_after_stage1"], stats["num_after_stage2"])
    assert speed_counts(out[SPEED]) == counts
    assert counts[0] == 16 * 7 * 7 and counts[0] > counts[1] > counts[2] > 0
    assert len(trace["tokens"]["merged_index"]) == counts[0]
    assert len(set(trace["tokens"]["merged_index"])) == counts[1]
    # Stage 2 kept max(1, int(alpha * size)) of each of stage 1's sets (ALGORITHM.md §5.4), the
    # sets read off the trace's per-token columns: the counts are not the trace's own summary.
    config = PruneVidConfig.from_dict(trace["config"])
    assert config.retention is None and config.stage1 and config.stage2
    column = {name: torch.tensor(trace["tokens"][name]).view(16, 49) for name in ("merged_index", "static")}
    sets = budget_sets(column["merged_index"], column["static"], torch.tensor(trace["segment_of_frame"]))
    assert counts[2] == sum(max(1, int(config.alpha * int(n))) for n in sets.bincount())
    tokens = trace["tokens"]
    assert len({m for m, kept in zip(tokens["merged_index"], tokens["kept"]) if kept}) == counts[2]
    # The answer is the patched model's own greedy answer at those settings, computed here
    # without the app.
    loaded = load_model("tiny", device="cpu")  # the model the app serves (PRUNEVID_MODEL=tiny)
    assert config == preset("tiny", loaded.num_layers).replace(num_frames=16), "the page's defaults ran"
    frames = load_video(ASSETS / "shapes.mp4", trace["num_frames"]).frames
    inputs = build_inputs(loaded.tokenizer, loaded.model.config, frames, question)
    prunevid.patch(loaded.model, config)
    with torch.no_grad():
        ids = loaded.model.generate(**inputs, max_new_tokens=QUICK["max_new_tokens"], do_sample=False)
    new = ids[0, inputs["input_ids"].shape[1] :]
    assert out[ANSWER] == loaded.tokenizer.decode(new, skip_special_tokens=True).strip()
    assert prunevid.last_trace(loaded.model).num_after_stage2 == counts[2]
    assert "FLOPs" in out[SPEED] and 0 < stats["flops_ratio"] < 1

    height, width = load_video(ASSETS / "shapes.mp4").frames.shape[1:3]
    gallery = out[GALLERY]
    assert len(gallery) == trace["num_frames"] == 16
    for item in gallery:
        with Image.open(item["image"]) as image:
            assert image.size == (width, height)
    with Image.open(out[FRAME]) as image:  # original | overlay side by side
        assert image.size[1] == height and image.size[0] > 2 * width
    for chart in (out[TIMELINE], out[BUDGET]):
        with Image.open(chart) as image:
            assert image.size[0] > 300
    names = sorted(Path(p).name for p in out[FILES])
    assert names == ["prunevid_contact_sheet.png", "prunevid_overlay.mp4"]


def test_follow_up_question_uses_the_cache(client):
    video = ASSETS / "small_object.mp4"
    first = ask(client, video, "What colour is the small moving object?", num_frames=6)
    assert first[STATS]["cache_used"] is False and "cache used" not in first[SPEED]
    assert first[STATS]["timings"]["vision_s"] > 0
    second = ask(client, video, "Where is it?", num_frames=6)
    assert second[STATS]["cache_used"] is True and "cache used" in second[SPEED]
    assert second[STATS]["timings"]["vision_s"] == 0
    assert second[STATS]["num_frames"] == len(second[GALLERY]) == 6


def test_compare_with_unpruned(client):
    """The unpruned answer is the stock model's own greedy answer, computed here without the app
    or the patch; the panel shows the speedups the stats hold, stage 1's time counted in one."""
    import torch

    from prunevid.models.llava_onevision import build_inputs
    from prunevid.pipeline import load_model
    from prunevid.video import load_video

    question = "Does the scene change?"
    out = ask(client, ASSETS / "scene_cut.mp4", question, compare="unpruned")
    stats = out[STATS]
    stock = load_model("tiny", device="cpu")  # the model the app serves (PRUNEVID_MODEL=tiny)
    frames = load_video(ASSETS / "scene_cut.mp4", stats["num_frames"]).frames
    inputs = build_inputs(stock.tokenizer, stock.model.config, frames, question)
    with torch.no_grad():
        ids = stock.model.generate(**inputs, max_new_tokens=QUICK["max_new_tokens"], do_sample=False)
    new = ids[0, inputs["input_ids"].shape[1] :]
    assert out[UNPRUNED] == stock.tokenizer.decode(new, skip_special_tokens=True).strip()
    assert stats["prefill_speedup_with_stage1"] < stats["prefill_speedup"], "stage 1's time is counted"
    assert (
        f"measured speedup **{stats['prefill_speedup']:.1f}x** "
        f"({stats['prefill_speedup_with_stage1']:.1f}x counting stage 1)"
    ) in out[SPEED]


def test_compare_with_a_method_at_a_token_budget(client):
    """EVS-style pruning beside PruneVid at exactly 10% of the tokens: both answers (EVS's as the
    library gives it alone), both token pictures and both traces."""
    from prunevid.pipeline import answer, load_model
    from prunevid.video import load_video

    video, question = ASSETS / "shapes.mp4", "What colour is the object moving to the right?"
    out = ask(client, video, question, compare="evs", retention=0.1)
    stats, trace = out[STATS], json.loads(Path(out[TRACE]).read_text())
    final = round(0.1 * stats["num_visual_tokens"])
    assert stats["num_after_stage2"] == stats["comparison"]["num_after_stage2"] == final
    assert stats["retention_target"] == 0.1 and stats["comparison"]["method"] == "evs"
    assert trace["comparison"]["method"] == "evs" and trace["comparison"]["num_after_stage2"] == final
    # EVS drops tokens before the language model; PruneVid merges them.
    assert -1 in trace["comparison"]["tokens"]["merged_index"] and -1 not in trace["tokens"]["merged_index"]
    assert len(out[COMPARED]) == len(out[GALLERY]) == 16
    assert "Visual tokens (EVS-style)" in out[SPEED]

    tiny = load_model("tiny", device="cpu")
    frames = load_video(video, stats["num_frames"]).frames
    config = tiny_preset(tiny).replace(retention=0.1)
    alone = answer(tiny, frames, question, config, QUICK["max_new_tokens"], method="evs")
    assert out[UNPRUNED] == alone.text


def test_compare_without_a_budget_gives_the_method_prunevids_count(client):
    out = ask(
        client, ASSETS / "shapes.mp4", "What colour is the object moving to the right?", compare="fastv"
    )
    stats = out[STATS]
    assert stats["retention_target"] is None
    assert stats["comparison"]["num_after_stage2"] == stats["num_after_stage2"]
    assert stats["comparison"]["num_after_stage1"] == stats["num_visual_tokens"], "FastV prunes inside"


def tiny_preset(loaded):
    from prunevid.pipeline import preset

    return preset(loaded.name, loaded.num_layers)


def _text_file(folder: Path) -> Path:
    path = folder / "notes.mp4"
    path.write_text("This is a text file with a video's name.\n")
    return path


def _empty_file(folder: Path) -> Path:
    path = folder / "empty.mp4"
    path.write_bytes(b"")
    return path


def _truncated_mp4(folder: Path) -> Path:
    path = folder / "truncated.mp4"
    data = (ASSETS / "shapes.mp4").read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


def _long_video(folder: Path) -> Path:
    """40 s at 1 frame a second: small on disk, longer than the server's 30 s limit."""
    import numpy as np

    from prunevid.video import write_video

    path = folder / "long.mp4"
    write_video(path, np.full((40, 32, 32, 3), 90, np.uint8), fps=1.0)
    return path


BAD_INPUTS = {
    "text file named .mp4": (_text_file, "Why?", {}, "cannot be used as a video"),
    "empty question": (None, "   ", {}, "question is empty"),
    "0-byte file": (_empty_file, "Why?", {}, "empty"),
    "corrupt mp4": (_truncated_mp4, "Why?", {}, "corrupt"),
    "alpha out of range": (None, "Why?", {"alpha": 5}, "alpha must be in"),
    "layer beyond the model": (None, "Why?", {"selected_layer": 10}, "selected_layer must be below"),
    "absurd frame count": (None, "Why?", {"num_frames": 100000}, "num_frames must be"),
    "longer than the server accepts": (_long_video, "Why?", {}, "40 s long, more than the 30 s this server"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_readable_message_and_server_keeps_serving(client, tmp_path, case):
    make, question, settings, expected = BAD_INPUTS[case]
    video = make(tmp_path) if make else ASSETS / "shapes.mp4"
    with pytest.raises(AppError) as caught:
        ask(client, video, question, **settings)
    message = str(caught.value)
    assert expected in message
    assert "Traceback" not in message and "\n" not in message.strip() and len(message) < 400
    assert str(tmp_path) not in message  # upload folders are cut down to the file name
    good = ask(client, ASSETS / "shapes.mp4", "Is it still working?")
    assert good[ANSWER].strip()


def test_upload_over_the_size_limit_is_refused_in_one_sentence(server):
    import httpx

    payload = ("big.mp4", b"\0" * (UPLOAD_MB * 2**20 + 1), "video/mp4")
    response = httpx.post(server + "gradio_api/upload", files={"files": payload}, timeout=60)
    assert response.status_code == 413
    assert response.text == f"File size exceeded maximum allowed size of {UPLOAD_MB * 2**20} bytes."


def test_unavailable_model_gives_one_sentence(client):
    from prunevid.app.catalog import LARGE_MODEL
    from prunevid.app.models import cached_on_disk

    if cached_on_disk(LARGE_MODEL):
        pytest.skip(f"{LARGE_MODEL} is cached on this machine")
    with pytest.raises(AppError) as caught:
        ask(client, ASSETS / "shapes.mp4", "Why?", model=LARGE_MODEL)
    message = str(caught.value)
    assert LARGE_MODEL in message and "PRUNEVID_MODEL" in message and message.count(". ") == 0


def test_startup_falls_back_to_the_trained_tiny_model_with_a_banner(monkeypatch):
    from prunevid.app.models import cached_on_disk
    from prunevid.app.ui import KNOBS, App, banner_markdown, inline_html
    from prunevid.pipeline import DEFAULT_MODEL, TINY_MODEL, TRAINED_TINY_MODEL, preset

    if cached_on_disk(DEFAULT_MODEL):
        pytest.skip(f"{DEFAULT_MODEL} is cached on this machine")
    monkeypatch.delenv("PRUNEVID_MODEL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    app = App()
    assert app.model == TRAINED_TINY_MODEL
    assert app.failure.startswith(f"The model `{DEFAULT_MODEL}` is neither cached nor downloadable here")
    assert app.failure.endswith("; meanwhile the page uses the offline tiny demo model.")
    assert "\n" not in app.failure and app.failure.count(". ") == 0
    banner = banner_markdown(app.model, app.failure)
    assert DEFAULT_MODEL in banner and "trained only on synthetic shape videos" in banner
    # picking an unavailable model later: same sentence, the dropdown goes back, knobs untouched
    active, banner, dropdown, *_ = app.on_model(DEFAULT_MODEL, TRAINED_TINY_MODEL)
    assert active == dropdown == TRAINED_TINY_MODEL
    assert inline_html(app.failure) in banner
    # picking the random tiny model loads its preset into the knobs, and says what it is
    active, banner, dropdown, stage1, stage2, *knobs = app.on_model(TINY_MODEL, TRAINED_TINY_MODEL)
    assert active == dropdown == TINY_MODEL and DEFAULT_MODEL not in banner and "meaningless" in banner
    assert (stage1, stage2) == (preset(TINY_MODEL).stage1, preset(TINY_MODEL).stage2)
    assert dict(zip(KNOBS, knobs)) == {name: getattr(preset(TINY_MODEL), name) for name in KNOBS}

    monkeypatch.setenv("PRUNEVID_MODEL", "tiny")
    direct = App()
    assert direct.model == TINY_MODEL and direct.failure is None
