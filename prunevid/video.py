"""Video loading and writing for PruneVid.

`load_video` samples a fixed number of frames uniformly over a video file (decord, with PyAV as
fallback when decord is not installed) and turns every bad input into a `VideoError` with a one
sentence message. `write_video` writes browser-playable H.264 / yuv420p mp4 files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

MAX_FRAMES = 10**7
MAX_SIDE = 8192


class VideoError(ValueError):
    """A video file is missing, empty, corrupt or otherwise unusable."""


@dataclass(frozen=True)
class Video:
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    timestamps: np.ndarray  # (T,) float seconds
    fps: float
    duration: float
    path: str


def sample_indices(total: int, num_frames: int) -> np.ndarray:
    """`num_frames` sorted indices in [0, total) at the centres of equal-length bins (repeats if total < n)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if total <= 0:
        raise VideoError(f"cannot sample frames from a video with {total} frames")
    return ((np.arange(num_frames) + 0.5) * total / num_frames).astype(np.int64)


def check_file(path: str) -> None:
    """One sentence when `path` is missing, a folder or empty (before any decoding)."""
    if not os.path.exists(path):
        raise VideoError(f"video file not found: {path}")
    if os.path.isdir(path):
        raise VideoError(f"expected a video file but got a directory: {path}")
    if os.path.getsize(path) == 0:
        raise VideoError(f"video file is empty (0 bytes): {path}")


@dataclass(frozen=True)
class VideoInfo:
    """What a video's container says about it, read without decoding a frame (0: not stated)."""

    width: int
    height: int
    frames: int
    duration: float  # seconds


def probe(path: str | os.PathLike) -> VideoInfo:
    """Read a video's size, frame count and duration from its container, without decoding.

    Rejects (VideoError) missing, empty and corrupt files, files without a video stream and
    absurd sizes: what a server checks before it spends time and memory on decoding.
    """
    import av

    path = os.fspath(path)
    check_file(path)
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoError(f"video has no frames (no video stream found): {path}")
            stream = container.streams.video[0]
            width, height, frames = stream.codec_context.width, stream.codec_context.height, stream.frames
            duration = _duration(container, stream)
    except av.FFmpegError as e:
        raise VideoError(f"could not decode {path} as a video (corrupt or not a video file)") from e
    _check_size(path, frames, width, height)
    return VideoInfo(width, height, frames, duration)


def _duration(container, stream) -> float:
    """Seconds from the stream's header, else the container's, else frames / rate (0 if unknown)."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000  # av.time_base: microseconds
    rate = float(stream.average_rate or 0)
    return stream.frames / rate if stream.frames and rate > 0 else 0.0


def _check_size(path: str, frames: int, width: int, height: int) -> None:
    if frames > MAX_FRAMES:
        raise VideoError(f"video reports {frames} frames, more than the supported {MAX_FRAMES}: {path}")
    if max(width, height) > MAX_SIDE:
        raise VideoError(
            f"video is {width}x{height}, larger than the supported {MAX_SIDE} pixels a side: {path}"
        )


def _decode_decord(path: str, num_frames: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    import decord

    vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    total = len(vr)
    if total <= 0:
        raise VideoError(f"video has no frames: {path}")
    _check_size(path, total, 0, 0)
    indices = sample_indices(total, num_frames)
    frames = vr.get_batch(indices).asnumpy()
    timestamps = np.round(np.asarray(vr.get_frame_timestamp(indices), dtype=np.float64)[:, 0], 6)
    fps = float(vr.get_avg_fps())
    duration = round(float(vr.get_frame_timestamp(total - 1)[1]), 6)
    return frames, timestamps, fps, duration


def _decode_av(path: str, num_frames: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        total = stream.frames or sum(1 for p in container.demux(stream) if p.size)
        if total <= 0:
            raise VideoError(f"video has no frames: {path}")
        container.seek(0)
        indices = sample_indices(total, num_frames)
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        fps = float(stream.average_rate or 0.0)
        picked: dict[int, tuple[np.ndarray, float]] = {}
        wanted = set(indices.tolist())
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                time = frame.time - start if frame.time is not None else i / (fps or 1.0)
                picked[i] = (frame.to_ndarray(format="rgb24"), time)
            if i >= indices[-1]:
                break
    if len(picked) < len(wanted):
        raise VideoError(f"could not decode {path} as a video (corrupt or not a video file)")
    frames = np.stack([picked[i][0] for i in indices.tolist()])
    timestamps = np.array([picked[i][1] for i in indices.tolist()], dtype=np.float64)
    duration = total / fps if fps > 0 else float(timestamps[-1])
    return frames, timestamps, fps, duration


def downscale(frames: np.ndarray, max_side: int) -> np.ndarray:
    """(T, h, w, 3) frames scaled down (never up) so that the longer side is at most `max_side`."""
    import cv2

    height, width = frames.shape[1:3]
    scale = max_side / max(height, width)
    if scale >= 1:
        return frames
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames])


def load_video(path: str | os.PathLike, num_frames: int = 16, max_side: int | None = None) -> Video:
    """Decode `num_frames` uniformly sampled RGB frames; optionally downscale so the longer side <= max_side."""
    path = os.fspath(path)
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    probe(path)
    try:
        import decord  # noqa: F401

        decode = _decode_decord
    except ImportError:
        decode = _decode_av
    try:
        frames, timestamps, fps, duration = decode(path, num_frames)
    except VideoError:
        raise
    except Exception as e:  # decord raises DECORDError / RuntimeError, PyAV raises FFmpegError
        raise VideoError(f"could not decode {path} as a video (corrupt or not a video file)") from e
    if frames.ndim != 4 or frames.shape[0] != num_frames or frames.shape[-1] != 3:
        raise VideoError(f"could not decode {path} as a video (unexpected frame shape {frames.shape})")
    if not np.isfinite(fps) or fps <= 0:
        fps = num_frames / duration if duration > 0 else 1.0
    if max_side is not None:
        frames = downscale(frames, max_side)
    return Video(
        frames=np.ascontiguousarray(frames, dtype=np.uint8),
        timestamps=timestamps,
        fps=fps,
        duration=max(duration, float(timestamps[-1])),
        path=path,
    )


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float, crf: int = 23) -> None:
    """Write (T, H, W, 3) uint8 RGB frames as browser-playable H.264 yuv420p mp4 (odd sides are edge-padded)."""
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(
            f"frames must be a non-empty (T, H, W, 3) uint8 array, got {frames.shape} {frames.dtype}"
        )
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    height, width = frames.shape[1:3]
    pad = ((0, 0), (0, height % 2), (0, width % 2), (0, 0))
    if height % 2 or width % 2:
        frames = np.pad(frames, pad, mode="edge")
    with av.open(os.fspath(path), "w", format="mp4", options={"movflags": "+faststart"}) as container:
        # mbtree off: with it, this x264 build reads uninitialised memory and output bytes vary run to run.
        options = {"crf": str(crf), "mbtree": "0"}
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001), options=options)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
