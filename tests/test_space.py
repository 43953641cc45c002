"""What a public Space needs from the page, called without a server (the page's modules and the App's
events): ZeroGPU through `spaces.GPU`, hardware-aware defaults and announced waits, bounded
memory (display-size frames, one byte budget, one real model), capped uploads, and failures
reported in one sentence. `spaces` is the real package from PyPI; off ZeroGPU it changes nothing."""

from __future__ import annotations

import gc
import pickle
import re
import weakref
from pathlib import Path

import numpy as np
import pytest

gr = pytest.importorskip("gradio")
spaces = pytest.importorskip("spaces")

from prunevid.app import estimates, hardware, limits, models, runs, ui  # noqa: E402
from prunevid.app.limits import Limits, ScratchFolders  # noqa: E402
from prunevid.app.ui import KNOBS, App  # noqa: E402
from prunevid.lru import ByteLRU  # noqa: E402
from prunevid.pipeline import answer, load_model, preset  # noqa: E402
from prunevid.testing import tiny_model, tiny_tokenizer  # noqa: E402
from prunevid.video import load_video, write_video  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "assets"
EXAMPLE = ASSETS / "synthetic_first.mp4"  # tiny-trained answers "orange" (assets/examples.json)
QUESTION = "What colour appears first?"


def save_checkpoint(folder: Path, seed: int) -> str:
    """A tiny LLaVA-OneVision saved like a Hub checkpoint: the page treats it as a real model."""
    tiny_model(seed=seed).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("real-a"), seed=3)


@pytest.fixture(scope="module")
def hd_clip(tmp_path_factory):
    """Eight 1280x720 frames of moving noise (distinct content per frame)."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (8, 720, 1280, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("clips") / "hd.mp4"
    write_video(path, frames, fps=4.0)
    return str(path)


def ask(app: App, model: str, video, question=QUESTION, compare="", tokens=8, progress=None, **changes):
    config = app.preset(model).replace(**changes)
    knobs = {name: getattr(config, name) for name in KNOBS}
    return app.on_answer(
        str(video),
        question,
        compare,
        model,
        config.stage1,
        config.stage2,
        knobs,
        tokens,
        ["clusters"],
        progress,
    )


class Recorder:
    """Stands in for gr.Progress: keeps every (fraction, text)."""

    def __init__(self):
        self.calls: list[tuple[float, str]] = []

    def __call__(self, fraction, desc=None):
        self.calls.append((fraction, desc))


# ---- ZeroGPU ---------------------------------------------------------------------------------------


def test_off_zero_gpu_spaces_gpu_changes_nothing():
    assert not hardware.zero_gpu(), "these tests run off ZeroGPU (SPACES_ZERO_GPU unset)"

    def task(job, progress):
        return job

    assert hardware.on_gpu(task, lambda job, progress: 60) is task
    app = App("tiny")
    assert app.work == app.registry.work


def test_on_zero_gpu_each_answer_runs_through_spaces_gpu_and_still_answers_on_cpu(monkeypatch):
    """`spaces.GPU` as ZeroGPU uses it: a decorator whose duration is called with the task's own
    arguments, which (like the result) cross to a worker process by pickle."""
    calls = []

    def zero_gpu_decorator(task=None, *, duration=None, size=None):
        def decorate(function):
            def on_a_gpu(*args, **kwargs):
                args, kwargs = pickle.loads(pickle.dumps((args, kwargs)))
                calls.append((duration(*args, **kwargs), args[0]))
                return pickle.loads(pickle.dumps(function(*args, **kwargs)))

            return on_a_gpu

        return decorate

    monkeypatch.setattr(spaces, "GPU", zero_gpu_decorator)
    monkeypatch.setattr(hardware, "zero_gpu", lambda: True)
    app = App("tiny-trained")
    assert app.registry.speeds == {}, "no warm-up in ZeroGPU's main process (CUDA lives in the worker)"
    page = app.build()
    event = next(function.fn for function in page.fns.values() if function.api_name == "answer")
    config = app.preset("tiny-trained")
    knobs = [getattr(config, name) for name in KNOBS]
    settings = ["tiny-trained", config.stage1, config.stage2, *knobs, config.stage1_share, 8, ["clusters"]]
    first = event(str(EXAMPLE), QUESTION, "", 0, *settings, progress=Recorder())  # the page's Answer button
    again = ask(app, "tiny-trained", EXAMPLE, question="What colour appears first ?")
    assert first[0] == again[0] == "orange"
    assert len(calls) == 2, "every answer's model work went through the decorated function"
    (seconds, job), (seconds_again, job_again) = calls
    sampled = load_video(EXAMPLE, 8).frames
    assert job.model == "tiny-trained" and job.features is None and (job.frames == sampled).all()
    assert job_again.frames is None and job_again.features is not None, (
        "a follow-up sends the cached features"
    )
    assert job_again.frame_shape == sampled.shape[:3]
    assert 15 <= seconds_again <= seconds <= app.limits.gpu_max_s


def test_gpu_reservation_grows_with_frames_tokens_model_size_and_comparison():
    registry = models.ModelRegistry(warm=False, gpu_max_s=600)
    registry.sizes.update({"0.5B": 500_000_000, "7B": 7_000_000_000})
    config = preset("x")

    def seconds(model="7B", frames=32, tokens=128, compare="", cached=False):
        job = runs.Job(model, "q", config, tokens, compare, (frames, 480, 640))
        job.features = object() if cached else None
        return registry.gpu_seconds(job)

    base = seconds()
    assert seconds(frames=64) > base and seconds(tokens=512) > base and seconds(compare="unpruned") > base
    assert seconds(model="0.5B") < base
    assert seconds(cached=True) < base, "cached features skip the vision tower"
    assert seconds(model="0.5B", frames=1, tokens=1) == 15, "never less than a worker's start"
    registry.gpu_max_s = 40
    assert seconds(frames=64, tokens=512, compare="unpruned") == 40, "never more than PRUNEVID_GPU_MAX_S"


# ---- hardware-aware defaults, announced waits, phases -----------------------------------------------


def test_a_cpu_only_server_starts_a_real_checkpoint_at_8_frames_and_says_so(checkpoint, monkeypatch):
    monkeypatch.setattr(hardware, "has_gpu", lambda: False)
    app = App(checkpoint)
    assert preset(checkpoint, 4).num_frames == 16
    assert app.preset(checkpoint).num_frames == estimates.CPU_FRAMES == 8
    banner = app.banner(checkpoint)
    assert (
        "This server has no GPU, so the page starts at 8 frames instead of the model's 16 (up to about"
        in banner
    )
    page = app.build()
    frames_box = next(b for b in page.blocks.values() if getattr(b, "label", None) == "num_frames")
    assert frames_box.value == 8
    assert app.preset("tiny").num_frames == preset("tiny").num_frames, "the offline models keep their preset"

    monkeypatch.setattr(hardware, "has_gpu", lambda: True)
    assert app.preset(checkpoint).num_frames == 16 and "no GPU" not in app.banner(checkpoint)


def test_a_long_run_is_announced_with_its_estimate_and_progress_names_each_phase(checkpoint, monkeypatch):
    monkeypatch.setattr(hardware, "has_gpu", lambda: False)
    monkeypatch.setattr(estimates, "LONG_WAIT_S", 0.0)  # the tiny checkpoint is fast: announce every run
    notices = []
    monkeypatch.setattr(ui.gr, "Info", lambda message, **kwargs: notices.append(message))
    app = App(checkpoint)
    speed = app.registry.speeds[checkpoint]  # measured at warm-up
    assert min(speed.vision_per_frame, speed.pruned_per_frame, speed.unpruned_per_frame, speed.per_token) > 0
    # Speeds chosen here, so that the estimates are hand-computed: per frame 1.0 s in the vision
    # tower, 0.5 s pruned, 2.0 s unpruned; 0.3 s per generated token.
    app.registry.speeds[checkpoint] = estimates.Speed(
        vision_per_frame=1.0, pruned_per_frame=0.5, unpruned_per_frame=2.0, per_token=0.3
    )

    progress = Recorder()
    ask(app, checkpoint, EXAMPLE, compare="unpruned", tokens=6, progress=progress)
    ask(app, checkpoint, EXAMPLE, compare="", tokens=6)
    said = [re.search(r"up to about (.+?) on this server \(8 frames", notice).group(1) for notice in notices]
    # 8 frames: 8 x (1.0 + 0.5 + 2.0) + 2 answers x 6 tokens x 0.3 = 31.6 s; then, the features
    # cached and nothing compared, 8 x 0.5 + 6 x 0.3 = 5.8 s.
    assert said == ["32 s", "6 s"]

    texts = [text for _, text in progress.calls]
    order = ["Decode:", "Vision tower:", "Stage 1:", "Prefill:", "Generation (PruneVid)", "Prefill:",
             "Generation (unpruned model)", "Drawing"]  # fmt: skip
    position = 0
    for step in order:
        matches = [i for i in range(position, len(texts)) if texts[i].startswith(step)]
        assert matches, f"no {step!r} after position {position} in {texts}"
        position = matches[0] + 1
    fractions = [fraction for fraction, _ in progress.calls]
    assert fractions == sorted(fractions) and fractions[-1] < 1


# ---- memory ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["checkpoint", "tiny-qwen"])
def test_frames_are_cached_at_display_size_and_follow_ups_answer_alike(model, request, hd_clip):
    """Qwen's prompt depends on the frame size: a follow-up must answer as the first question did."""
    model = request.getfixturevalue("checkpoint") if model == "checkpoint" else model
    registry = models.ModelRegistry(cache=ByteLRU(10**9), warm=False)
    config = preset(model, registry.get(model).num_layers).replace(num_frames=4)
    first = runs.run_question(registry, model, hd_clip, "what colour is it ?", config, max_new_tokens=4)
    (key,) = [key for key in registry.cache._entries if key[0] == "video"]
    cached = registry.cache.get(key)
    assert cached.video.frames.shape == (4, 360, 640, 3) and cached.frame_shape == (4, 720, 1280)
    assert first.video.frames.shape == (4, 360, 640, 3), "the page draws on the display-size frames"

    again = runs.run_question(registry, model, hd_clip, "what colour is it ?", config, max_new_tokens=4)
    direct = answer(registry.get(model), load_video(hd_clip, 4), "what colour is it ?", config, 4)
    assert again.cache_used and again.result.timings["vision_s"] == 0
    assert again.result.text == first.result.text == direct.text
    assert (again.trace.merged_index == direct.trace.merged_index).all()


def test_features_and_frames_stay_within_the_byte_budget(checkpoint, tmp_path):
    budget = 2_500_000  # two of these videos (921,600 bytes of display frames each), not three
    registry = models.ModelRegistry(cache=ByteLRU(budget), warm=False)
    config = preset(checkpoint, registry.get(checkpoint).num_layers).replace(num_frames=4)
    rng = np.random.default_rng(1)
    for i in range(4):
        path = tmp_path / f"clip{i}.mp4"
        write_video(path, rng.integers(0, 255, (4, 240, 320, 3), dtype=np.uint8), fps=4.0)
        runs.run_question(registry, checkpoint, str(path), "what is it ?", config, max_new_tokens=2)
        assert registry.cache.nbytes <= budget
    # A video holds 921,600 bytes of display frames and, from this tiny model, 251,168 bytes of
    # vision features: two (2,345,536 bytes) fit the budget, three (at least 2,764,800) do not.
    # The two most recent stay.
    videos = [key for key in registry.cache._entries if key[0] == "video"]
    assert videos == [
        ("video", limits.file_digest(str(tmp_path / f"clip{i}.mp4")), checkpoint, 4) for i in (2, 3)
    ]


def test_one_real_model_resident_the_previous_one_freed_with_its_features(checkpoint, tmp_path):
    other = save_checkpoint(tmp_path / "real-b", seed=4)
    registry = models.ModelRegistry(max_real=1, cache=ByteLRU(10**8), warm=False)
    registry.get("tiny")
    config = preset(checkpoint, registry.get(checkpoint).num_layers).replace(num_frames=4)
    runs.run_question(registry, checkpoint, str(EXAMPLE), "what colour ?", config, max_new_tokens=2)
    freed = weakref.ref(registry.get(checkpoint).model)
    assert any(key[0] == "video" and key[2] == checkpoint for key in registry.cache._entries)

    registry.get(other)
    gc.collect()
    assert checkpoint not in registry and other in registry and "tiny" in registry
    assert freed() is None, "the previous real model is still in memory"
    assert not any(key[0] == "video" and key[2] == checkpoint for key in registry.cache._entries)

    roomy = models.ModelRegistry(max_real=2, cache=ByteLRU(10**8), warm=False)
    roomy.get(checkpoint), roomy.get(other)
    assert checkpoint in roomy and other in roomy


def test_limits_come_from_the_environment_and_bad_values_are_one_sentence(monkeypatch):
    monkeypatch.setenv("PRUNEVID_MAX_MODELS", "2")
    monkeypatch.setenv("PRUNEVID_MAX_UPLOAD_MB", "50")
    limits = Limits.from_env()
    assert (limits.max_models, limits.max_upload_mb, limits.max_video_minutes) == (2, 50.0, 10.0)
    assert App("tiny").registry.max_real == 2
    monkeypatch.setenv("PRUNEVID_MAX_MODELS", "many")
    with pytest.raises(ValueError, match=r"^PRUNEVID_MAX_MODELS must be a whole number above 0, got 'many'$"):
        Limits.from_env()


def test_uploads_over_the_caps_are_refused_before_decoding(monkeypatch, tmp_path):
    def no_decoding(*args, **kwargs):
        raise AssertionError("a refused upload must not be decoded")

    monkeypatch.setattr(runs, "load_video", no_decoding)
    registry = models.ModelRegistry(cache=ByteLRU(10**8), warm=False)
    config = preset("tiny")

    def refused(path, limits) -> str:
        with pytest.raises(ValueError) as caught:
            runs.run_question(registry, "tiny", str(path), "why ?", config, limits=limits)
        return str(caught.value)

    size_mb = EXAMPLE.stat().st_size / 2**20
    assert refused(EXAMPLE, Limits(max_upload_mb=0.01)) == (
        f"The file is {size_mb:.0f} MB, more than the 0.01 MB this server accepts (PRUNEVID_MAX_UPLOAD_MB): "
        "trim or compress it and upload it again."
    )
    long = tmp_path / "long.mp4"
    write_video(long, np.zeros((90, 16, 16, 3), np.uint8), fps=1.0)  # 1 min 30 s, a few KB
    assert refused(long, Limits(max_video_minutes=1)) == (
        "The video is 1 min 30 s long, more than the 60 s this server accepts (PRUNEVID_MAX_VIDEO_MINUTES): "
        "trim it and upload it again."
    )


def test_answer_outputs_are_kept_for_the_last_answers_only(tmp_path):
    scratch = ScratchFolders(keep=3, root=str(tmp_path))
    folders = [scratch.new() for _ in range(5)]
    assert [folder.exists() for folder in folders] == [False, False, True, True, True]
    assert sorted(tmp_path.iterdir()) == sorted(folders[2:])


# ---- failures while answering or drawing --------------------------------------------------------------


def test_out_of_memory_while_answering_and_failures_while_drawing_are_one_sentence(monkeypatch):
    import torch

    app = App("tiny")

    def out_of_memory(job, progress):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(app, "work", out_of_memory)
    with pytest.raises(gr.Error) as caught:
        ask(app, "tiny", EXAMPLE)
    assert caught.value.message == (
        "The server ran out of memory while answering: try fewer frames, a shorter answer or a smaller "
        "model, or ask again when the server is less busy."
    )

    def broken_sheet(*args, **kwargs):
        raise ValueError("images must share one size. got (2, 3)")

    monkeypatch.setattr(app, "work", app.registry.work)
    monkeypatch.setattr(ui, "contact_sheet", broken_sheet)
    with pytest.raises(gr.Error) as caught:
        ask(app, "tiny", EXAMPLE)
    assert caught.value.message == (
        "Something went wrong while drawing the pictures (ValueError: images must share one size; got (2, 3))."
    )


def test_a_corrupt_checkpoint_picked_in_the_menu_keeps_the_page_on_its_model(checkpoint, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"\0" * 64)
    app = App("tiny-trained")
    active, banner, dropdown, *_ = app.on_model(str(broken), "tiny-trained")
    assert active == dropdown == "tiny-trained"
    assert f"The checkpoint of <code>{broken}</code> is corrupt or incomplete" in banner
    assert "meanwhile the page uses the offline tiny demo model." in banner
    assert load_model("tiny-trained") is not None
