"""Tests for prunevid.video: sampling, decoding, writing, and clear errors for bad inputs."""

from __future__ import annotations

import sys
from pathlib import Path

import av
import numpy as np
import pytest

from prunevid.video import Video, VideoError, load_video, sample_indices, write_video

T, H, W, FPS = 30, 96, 128, 10.0


def pattern(t: int = T, h: int = H, w: int = W) -> np.ndarray:
    """Smooth moving colour gradient, easy for H.264 to reproduce closely."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = [
        np.stack([x / w * 200 + 4 * i, y / h * 200, np.full_like(x, 40 + 5 * i)], axis=-1) for i in range(t)
    ]
    return np.clip(frames, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def video_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vid") / "pattern.mp4"
    write_video(path, pattern(), FPS)
    return path


# --- sample_indices ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("total", "n"), [(100, 16), (16, 16), (17, 16), (1000, 7), (5, 16), (1, 4)])
def test_sample_indices_properties(total: int, n: int) -> None:
    idx = sample_indices(total, n)
    assert len(idx) == n
    assert np.all(np.diff(idx) >= 0)
    assert idx.min() >= 0 and idx.max() < total
    if total >= n:
        assert len(np.unique(idx)) == n  # no repeats when there are enough frames
        gaps = np.diff(idx)
        assert gaps.max() - gaps.min() <= 1  # uniform spacing up to rounding
    else:
        assert len(np.unique(idx)) == total  # every frame is used, some repeat


def test_sample_indices_bin_centres() -> None:
    assert sample_indices(100, 4).tolist() == [12, 37, 62, 87]
    assert sample_indices(2, 4).tolist() == [0, 0, 1, 1]
    assert sample_indices(100, 1).tolist() == [50]


def test_sample_indices_bad_arguments() -> None:
    with pytest.raises(VideoError):
        sample_indices(0, 4)
    with pytest.raises(ValueError, match="num_frames"):
        sample_indices(10, 0)


# --- load_video / write_video -------------------------------------------------------------------------


def test_load_video_shape_and_timestamps(video_path: Path) -> None:
    video = load_video(video_path, num_frames=8)
    assert isinstance(video, Video)
    assert video.frames.shape == (8, H, W, 3)
    assert video.frames.dtype == np.uint8
    assert video.timestamps.shape == (8,)
    assert np.all(np.diff(video.timestamps) > 0)
    assert video.timestamps[0] >= 0 and video.timestamps[-1] < video.duration
    assert video.fps == pytest.approx(FPS)
    assert video.duration == pytest.approx(T / FPS, abs=0.05)
    assert video.path == str(video_path)
    np.testing.assert_allclose(video.timestamps, sample_indices(T, 8) / FPS, atol=1e-3)


def test_load_video_more_frames_than_video(video_path: Path) -> None:
    video = load_video(video_path, num_frames=2 * T + 3)
    assert video.frames.shape[0] == 2 * T + 3
    assert np.all(np.diff(video.timestamps) >= 0)


def test_load_video_is_deterministic(video_path: Path) -> None:
    a, b = load_video(video_path, num_frames=5), load_video(video_path, num_frames=5)
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.timestamps, b.timestamps)


def test_load_video_max_side(video_path: Path) -> None:
    assert load_video(video_path, num_frames=3, max_side=64).frames.shape == (3, 48, 64, 3)
    assert load_video(video_path, num_frames=3, max_side=1000).frames.shape == (3, H, W, 3)


def test_written_video_matches_input(video_path: Path) -> None:
    decord = pytest.importorskip("decord")
    vr = decord.VideoReader(str(video_path), ctx=decord.cpu(0), num_threads=1)
    assert len(vr) == T
    decoded = vr.get_batch(list(range(T))).asnumpy()
    assert np.abs(decoded.astype(int) - pattern()).mean() < 10


def test_written_video_is_browser_playable(video_path: Path) -> None:
    with av.open(str(video_path)) as container:
        ctx = container.streams.video[0].codec_context
        assert (ctx.name, ctx.pix_fmt) == ("h264", "yuv420p")


def test_write_video_odd_size_and_is_deterministic(tmp_path: Path) -> None:
    frames = pattern(t=5, h=35, w=51)
    write_video(tmp_path / "a.mp4", frames, 7.5)
    write_video(tmp_path / "b.mp4", frames, 7.5)
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()
    video = load_video(tmp_path / "a.mp4", num_frames=5)
    assert video.frames.shape == (5, 36, 52, 3)  # padded to even sides
    assert video.fps == pytest.approx(7.5)


def test_write_video_rejects_bad_frames(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "x.mp4", np.zeros((2, 8, 8, 3), np.float32), 10)
    with pytest.raises(ValueError, match="fps"):
        write_video(tmp_path / "x.mp4", np.zeros((2, 8, 8, 3), np.uint8), 0)


def test_pyav_fallback_decodes_the_written_frames(video_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without decord, PyAV returns the frames that were written, at the sampled indices: H.264
    (crf 23) on the smooth gradient is ~1.4 levels off on average, a neighbouring frame ~4."""
    monkeypatch.setitem(sys.modules, "decord", None)  # makes `import decord` raise ImportError
    video = load_video(video_path, num_frames=6)
    indices = sample_indices(T, 6)
    error = np.abs(video.frames.astype(int) - pattern()[indices])
    assert error.mean() < 2.5 and error.max() <= 16
    np.testing.assert_allclose(video.timestamps, indices / FPS, atol=1e-3)
    assert video.fps == pytest.approx(FPS)


# --- bad inputs -----------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="video file not found"):
        load_video(tmp_path / "nope.mp4")


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match=r"video file is empty \(0 bytes\)"):
        load_video(tmp_path / "empty.mp4")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="directory"):
        load_video(tmp_path)


def test_text_file_renamed_mp4(tmp_path: Path) -> None:
    (tmp_path / "notes.mp4").write_text("this is not a video\n" * 50)
    with pytest.raises(VideoError, match=r"could not decode .* as a video"):
        load_video(tmp_path / "notes.mp4")


def test_truncated_mp4(tmp_path: Path, video_path: Path) -> None:
    data = video_path.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 3])
    with pytest.raises(VideoError, match=r"could not decode .* as a video"):
        load_video(tmp_path / "cut.mp4")


def test_garbled_mp4(tmp_path: Path, video_path: Path) -> None:
    data = bytearray(video_path.read_bytes())
    lo, hi = len(data) // 4, 3 * len(data) // 4
    data[lo:hi] = np.random.default_rng(0).integers(0, 256, hi - lo, dtype=np.uint8).tobytes()
    (tmp_path / "garbled.mp4").write_bytes(bytes(data))
    with pytest.raises(VideoError, match=r"could not decode .* as a video"):
        load_video(tmp_path / "garbled.mp4")


def test_no_video_stream(tmp_path: Path) -> None:
    path = tmp_path / "silence.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 4096), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    with pytest.raises(VideoError, match="video has no frames"):
        load_video(path)


def test_bad_arguments(video_path: Path) -> None:
    with pytest.raises(ValueError, match="num_frames"):
        load_video(video_path, num_frames=0)
    with pytest.raises(ValueError, match="max_side"):
        load_video(video_path, max_side=0)


def test_absurd_sizes_are_rejected(video_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import prunevid.video as video_module

    monkeypatch.setattr(video_module, "MAX_SIDE", 100)
    with pytest.raises(VideoError, match=r"128x96, larger than the supported 100 pixels"):
        load_video(video_path)
    monkeypatch.setattr(video_module, "MAX_SIDE", 8192)
    monkeypatch.setattr(video_module, "MAX_FRAMES", 20)
    with pytest.raises(VideoError, match="reports 30 frames"):
        load_video(video_path)
