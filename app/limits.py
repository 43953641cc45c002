"""What one server accepts and keeps: limits from the environment, upload checks before decoding,
the settings a page may ask for, and the scratch folders of the answers' output files.

A public server is shared by strangers, so everything is bounded: uploads capped in size and
duration before decoding, at most MAX_FRAMES frames and MAX_NEW_TOKENS tokens a question, the
output files of the last KEPT_ANSWER_FOLDERS answers (`Limits`, from the environment).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunevid.config import PruneVidConfig
from prunevid.video import probe

MAX_FRAMES = 64  # the library allows more; a shared demo server should not
MAX_NEW_TOKENS = 512

KEPT_ANSWER_FOLDERS = 4  # output files of the last answers (Gradio copies them into its cache on return)


@dataclass(frozen=True)
class Limits:
    """What one server accepts and keeps, from the environment (defaults for a free CPU Space).

    PRUNEVID_MAX_UPLOAD_MB: largest upload; PRUNEVID_MAX_VIDEO_MINUTES: longest video (read from
    the container before decoding); PRUNEVID_MAX_MODELS: real models resident at once (the tiny
    offline ones do not count); PRUNEVID_FILE_TTL_S: how long uploads and output files are kept;
    PRUNEVID_GPU_MAX_S: the longest ZeroGPU reservation one answer may ask for.
    The byte budget of the caches is PRUNEVID_CACHE_MB (`prunevid.lru`).
    """

    max_upload_mb: float = 200.0
    max_video_minutes: float = 10.0
    max_models: int = 1
    file_ttl_s: int = 1800
    gpu_max_s: int = 120

    @classmethod
    def from_env(cls) -> Limits:
        values = {}
        for name in ("max_upload_mb", "max_video_minutes", "max_models", "file_ttl_s", "gpu_max_s"):
            variable = f"PRUNEVID_{name.upper()}"
            text = os.environ.get(variable, "").strip()
            if not text:
                continue
            kind = type(getattr(cls, name))
            try:
                value = kind(text)
            except ValueError:
                value = None
            if value is None or not value > 0:
                number = "a whole number" if kind is int else "a number"
                raise ValueError(f"{variable} must be {number} above 0, got {text!r}")
            values[name] = value
        return cls(**values)


def check_upload(path: str, limits: Limits) -> None:
    """Refuse, before decoding, a file that is gone, too large or too long (one sentence each)."""
    if not os.path.isfile(path):
        raise ValueError("The uploaded video is gone from the server: upload it again.")
    size_mb = os.path.getsize(path) / 2**20
    if size_mb > limits.max_upload_mb:
        raise ValueError(
            f"The file is {size_mb:.0f} MB, more than the {limits.max_upload_mb:g} MB this server accepts "
            "(PRUNEVID_MAX_UPLOAD_MB): trim or compress it and upload it again."
        )
    seconds = probe(path).duration
    if seconds > limits.max_video_minutes * 60:
        raise ValueError(
            f"The video is {duration_text(seconds)} long, more than the {duration_text(limits.max_video_minutes * 60)} "
            "this server accepts (PRUNEVID_MAX_VIDEO_MINUTES): trim it and upload it again."
        )


class ScratchFolders:
    """One folder per answer for its output files, under one root; only the last `keep` stay
    (Gradio copies returned files into its own cache, which PRUNEVID_FILE_TTL_S bounds)."""

    def __init__(self, keep: int = KEPT_ANSWER_FOLDERS, root: str | None = None):
        self.keep = keep
        self.root = Path(root or tempfile.mkdtemp(prefix="prunevid-app-"))
        self._folders: list[Path] = []
        self._lock = threading.Lock()

    def new(self) -> Path:
        folder = Path(tempfile.mkdtemp(dir=self.root))
        with self._lock:
            self._folders.append(folder)
            while len(self._folders) > self.keep:
                shutil.rmtree(self._folders.pop(0), ignore_errors=True)
        return folder

    def __len__(self) -> int:
        return len(self._folders)


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (the upload's name changes every time; its content does not),
    computed once per file version (the wait estimate and the question both ask)."""
    stat = os.stat(path)
    return _digest(os.fspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def make_config(stage1: bool, stage2: bool, **knobs: Any) -> PruneVidConfig:
    """A validated config from UI values; whole floats become ints (number boxes send floats) and
    a retention of 0 means none."""
    values: dict[str, Any] = {}
    for name, value in knobs.items():
        if name == "retention" and not value:  # 0 or empty: no budget, the knobs decide the count
            values[name] = None
            continue
        if value is None:
            raise ValueError(f"{name} is empty: give it a value (the model's preset is a good start).")
        if isinstance(value, float) and value.is_integer() and isinstance(getattr(PruneVidConfig, name), int):
            value = int(value)
        values[name] = value
    config = PruneVidConfig(stage1=bool(stage1), stage2=bool(stage2), **values)
    if config.num_frames > MAX_FRAMES:
        raise ValueError(f"num_frames must be at most {MAX_FRAMES} in this demo, got {config.num_frames}")
    return config


def check_new_tokens(value: float | None) -> int:
    if value is None or not float(value).is_integer() or not 1 <= value <= MAX_NEW_TOKENS:
        raise ValueError(f"max_new_tokens must be a whole number in [1, {MAX_NEW_TOKENS}], got {value!r}")
    return int(value)


def duration_text(seconds: float) -> str:
    total = max(1, round(seconds))
    return f"{total} s" if total < 90 else f"{total // 60} min {total % 60:02d} s"
