"""A bounded soak of `python app.py` on 127.0.0.1 (stops by itself; about a minute on 2 cores).

* A crowd: 8 gradio_client users at once, each asking 2 questions about 2 clips of its own
  (16 distinct synthetic clips whose 16 answers are distinct words), all answered, each with the
  answer the library gives alone (no user gets another's answer).
* A run of distinct 1920x1080 uploads on a server with PRUNEVID_CACHE_MB=32: after two warm-up
  answers, its resident memory grows by less than the cache budget plus RSS_MARGIN_MB = 64 MB,
  what the interpreter, Gradio and the allocator may keep besides (measured: 22-45 MB in all over
  the 8 uploads; before, with an 8-entry cache of full-size frames, ~75 MB per upload here, and
  ~20 MB per upload from glibc's per-thread arenas alone). With PRUNEVID_FILE_TTL_S=8, Gradio's
  copies of the uploads and of our outputs are deleted, and our own output folders never hold
  more than the last few answers'.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from test_app import start_app, stop_app  # noqa: E402

from prunevid.app.limits import KEPT_ANSWER_FOLDERS  # noqa: E402
from prunevid.video import write_video  # noqa: E402

USERS, QUESTIONS = 8, 2
CACHE_MB, RSS_MARGIN_MB, TTL_S = 32, 64, 8
HD_UPLOADS, HD_FRAMES = 10, 12
OUTPUTS = ("prunevid_trace.json", "prunevid_contact_sheet.png", "prunevid_overlay.mp4")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Both servers start together (they load in parallel); yields {name: (process, url, folder)}."""
    started = {}
    folders = {name: tmp_path_factory.mktemp(name) for name in ("crowd", "uploads")}
    for name in folders:
        (folders[name] / "gradio").mkdir()
        (folders[name] / "tmp").mkdir()
    environments = {
        "crowd": {"PRUNEVID_MODEL": "tiny-trained"},
        "uploads": {
            "PRUNEVID_MODEL": "tiny",
            "PRUNEVID_CACHE_MB": str(CACHE_MB),
            "PRUNEVID_FILE_TTL_S": str(TTL_S),
        },
    }
    with ThreadPoolExecutor(2) as pool:
        futures = {
            name: pool.submit(
                start_app,
                folders[name] / "server.log",
                GRADIO_TEMP_DIR=str(folders[name] / "gradio"),
                TMPDIR=str(folders[name] / "tmp"),
                **environments[name],
            )
            for name in folders
        }
        for name, future in futures.items():
            process, url = future.result()
            started[name] = (process, url, folders[name])
    yield started
    for process, _, _ in started.values():
        stop_app(process)


# 16 distinct known-answer clips (prunevid.synthetic seeds) and the question asked of each, chosen
# so that the offline model's 16 answers are 16 different words (five shapes, four directions,
# three counts, yes and no, two colours): a user given another's answer cannot pass unseen.
CROWD = [
    (500, "shape"), (501, "shape"), (502, "shape"), (503, "direction"), (504, "direction"),
    (505, "count"), (506, "direction"), (507, "shape"), (508, "shape"), (509, "count"),
    (510, "scene"), (511, "direction"), (512, "scene"), (513, "count"), (514, "colour"),
    (515, "colour"),
]  # fmt: skip


def synthetic_clips(folder: Path) -> list[tuple[Path, str]]:
    """The CROWD clips, written as videos, with their questions."""
    from prunevid.synthetic import QUESTIONS as ASKED
    from prunevid.synthetic import make_sample

    clips = []
    for seed, family in CROWD:
        path = folder / f"crowd_{seed}.mp4"
        write_video(path, make_sample(seed, num_frames=8, size=96).frames, fps=4.0)
        clips.append((path, ASKED[family]))
    return clips


def test_eight_users_at_once_are_all_answered_each_with_their_own_answer(servers, tmp_path):
    from prunevid.pipeline import answer, load_model, preset

    _, url, _ = servers["crowd"]
    clips = synthetic_clips(tmp_path)
    assert len(clips) == USERS * QUESTIONS
    loaded = load_model("tiny-trained")
    expected = [answer(loaded, str(path), q, preset("tiny-trained"), 4).text for path, q in clips]
    assert len(set(expected)) >= 14, f"the answers must tell the users apart: {expected}"

    def user(index: int) -> list[str]:
        client = Client(url, verbose=False)
        mine = clips[index * QUESTIONS : (index + 1) * QUESTIONS]
        return [
            client.predict(handle_file(str(path)), question, max_new_tokens=4, api_name="/answer")[0]
            for path, question in mine
        ]

    with ThreadPoolExecutor(USERS) as pool:
        answers = [text for texts in pool.map(user, range(USERS)) for text in texts]
    assert answers == expected
    assert all(text.strip() for text in answers)


def hd_clip(path: Path, seed: int) -> None:
    """A distinct 1920x1080 clip: a coloured gradient with a moving square (compresses well)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, 3)
    ramp = np.linspace(0, 55, 1920, dtype=np.float32)[None, :, None]
    frames = np.empty((HD_FRAMES, 1080, 1920, 3), np.uint8)
    for t in range(HD_FRAMES):
        frames[t] = (base + ramp).astype(np.uint8)
        x = 100 + 120 * t
        frames[t, 400:700, x : x + 300] = rng.integers(0, 255, 3)
    write_video(path, frames, fps=4.0)


def test_distinct_hd_uploads_keep_memory_and_temp_files_bounded(servers, tmp_path):
    process, url, folder = servers["uploads"]
    client = Client(url, verbose=False)
    clips = []
    for i in range(HD_UPLOADS):
        clips.append(tmp_path / f"upload_{i}.mp4")
        hd_clip(clips[-1], seed=i)

    def ask(path: Path) -> None:
        out = client.predict(
            handle_file(str(path)), "What moves?", num_frames=HD_FRAMES, max_new_tokens=2, api_name="/answer"
        )
        assert out[0].strip() and out[3]["num_frames"] == HD_FRAMES

    for path in clips[:2]:  # first answers allocate what every later one reuses
        ask(path)
    before = rss_mb(process.pid)
    for path in clips[2:]:
        ask(path)
    growth = rss_mb(process.pid) - before
    assert growth < CACHE_MB + RSS_MARGIN_MB, f"RSS grew by {growth:.0f} MB over {HD_UPLOADS - 2} uploads"

    answer_folders = [p for root in (folder / "tmp").glob("prunevid-app-*") for p in root.iterdir()]
    assert len(answer_folders) == KEPT_ANSWER_FOLDERS, "our output folders are kept for the last answers only"

    def ours() -> list[str]:
        names = {path.name for path in clips} | set(OUTPUTS)
        return sorted(p.name for p in (folder / "gradio").rglob("*") if p.is_file() and p.name in names)

    assert ours(), "Gradio holds the uploads and outputs while they are fresh"
    deadline = time.monotonic() + 3 * TTL_S
    while ours() and time.monotonic() < deadline:
        time.sleep(1)
    assert ours() == [], f"temporary files outlived PRUNEVID_FILE_TTL_S={TTL_S}: {ours()}"
    assert os.path.isdir(folder / "gradio")
