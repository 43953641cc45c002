"""Procedural videos with known answers: accuracy measured offline, without downloads.

Every video is drawn from one integer seed (numpy + OpenCV only, byte-identical per seed):

* a textured still background (so stage 1 has static tokens to merge); in half of the videos
  a scene cut swaps it for another texture midway;
* one large **moving** object crossing most of the frame left, right, up or down;
* one **small** static object (about a tenth of the frame wide) somewhere off the path;
* zero to two static distractors, present from the first frame;
* one or two **newcomers** that appear during the video and stay.

All objects of a video have distinct colours. Every video answers seven question families
(single-word answers, all in the vocabulary of `prunevid.testing.tiny_tokenizer`):

colour (of the moving object), shape (of the moving object), direction (of its motion),
count (objects at the end), first (colour of the first newcomer), scene (did the background
change: yes/no) and small (colour of the small object: evidence in one small part of the frame).

Seeds >= `TRAIN_SEED_START` are for training only; every seed below it is held out for
evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

TRAIN_SEED_START = 1_000_000_000

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (40, 185, 50),
    "blue": (35, 70, 230),
    "yellow": (245, 225, 35),
    "white": (250, 250, 250),
    "orange": (250, 135, 10),
    "purple": (150, 45, 190),
    "cyan": (40, 215, 225),
}
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
DIRECTIONS = ("left", "right", "up", "down")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
# Muted background base colours (low saturation, mid-dark) so objects stand out.
BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (90, 90, 90),
    (110, 85, 60),
    (60, 80, 70),
    (65, 70, 100),
    (120, 110, 90),
    (45, 45, 50),
)

QUESTIONS: dict[str, str] = {
    "colour": "what colour is the moving object ?",
    "shape": "what shape is the moving object ?",
    "direction": "which direction does the moving object move ?",
    "count": "how many objects are there ?",
    "first": "what colour appears first ?",
    "scene": "did the scene change ?",
    "small": "what colour is the small object ?",
}
FAMILIES = tuple(QUESTIONS)
ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "direction": DIRECTIONS,
    "count": NUMBERS[3:7],
    "first": tuple(COLOURS),
    "scene": ("yes", "no"),
    "small": tuple(COLOURS),
}


@dataclass(frozen=True)
class SceneObject:
    """One object: its colour, shape, size (pixels across), centre per frame and visibility."""

    role: str  # "moving", "small", "static" or "newcomer"
    colour: str
    shape: str
    size: int
    centres: np.ndarray  # (T, 2) float (x, y)
    visible: np.ndarray  # (T,) bool


@dataclass(frozen=True)
class Sample:
    """One video and its questions: frames (T, H, W, 3) uint8 RGB; questions (family, text, answer).

    object_map (T, H, W) int8: index into `objects` of the object drawn at each pixel, -1 for
    background; background (T,) int: the background texture index shown in each frame.
    """

    seed: int
    frames: np.ndarray
    questions: list[tuple[str, str, str]]
    objects: list[SceneObject]
    object_map: np.ndarray
    background: np.ndarray

    def answer(self, family: str) -> str:
        return next(a for f, _, a in self.questions if f == family)


def make_sample(seed: int, num_frames: int = 8, size: int = 96) -> Sample:
    """The video and questions of `seed` (deterministic: same arguments, same bytes)."""
    if num_frames < 6:
        raise ValueError(f"num_frames must be at least 6, got {num_frames}")
    if size < 48:
        raise ValueError(f"size must be at least 48 pixels, got {size}")
    rng = np.random.default_rng(seed)
    objects = _layout(rng, num_frames, size)
    styles = rng.choice(len(BACKGROUNDS), size=2, replace=False)
    cut = int(rng.integers(2, num_frames - 1)) if rng.random() < 0.5 else num_frames
    background = np.where(np.arange(num_frames) < cut, styles[0], styles[1])
    textures = {int(s): _texture(rng, BACKGROUNDS[int(s)], size) for s in styles}
    frames, object_map = _render(objects, background, textures, size)
    return Sample(
        seed=seed,
        frames=frames,
        questions=_questions(objects, cut < num_frames),
        objects=objects,
        object_map=object_map,
        background=background,
    )


def cell_labels(sample: Sample, grid: tuple[int, int], min_fraction: float = 0.15) -> dict[str, np.ndarray]:
    """Per-frame labels of a `grid` of cells (e.g. the model's pooled token grid), for
    auxiliary training: "colour" and "shape" (0 = no object, else 1 + index) of the object
    covering the largest part of each cell (at least `min_fraction` of it), and "background"
    (the texture index). Each array is (T, gh, gw) int64."""
    frames, height, width = sample.object_map.shape
    gh, gw = grid
    ids = sample.object_map.astype(np.int64) + 1  # 0 = background
    cells = ids.reshape(frames, gh, height // gh, gw, width // gw).transpose(0, 1, 3, 2, 4)
    cells = cells.reshape(frames, gh, gw, -1)
    counts = np.stack([(cells == k).mean(-1) for k in range(len(sample.objects) + 1)], -1)
    counts[..., 0] = 0.0
    best = counts.argmax(-1)
    best = np.where(counts.max(-1) >= min_fraction, best, 0)
    colour_of = np.array([0] + [1 + list(COLOURS).index(o.colour) for o in sample.objects])
    shape_of = np.array([0] + [1 + SHAPES.index(o.shape) for o in sample.objects])
    background = np.broadcast_to(sample.background[:, None, None], best.shape)
    return {"colour": colour_of[best], "shape": shape_of[best], "background": background.astype(np.int64)}


def _questions(objects: list[SceneObject], scene_cut: bool) -> list[tuple[str, str, str]]:
    mover = objects[0]
    small = next(o for o in objects if o.role == "small")
    newcomers = sorted((o for o in objects if o.role == "newcomer"), key=lambda o: int(o.visible.argmax()))
    answers = {
        "colour": mover.colour,
        "shape": mover.shape,
        "direction": _direction(mover.centres),
        "count": NUMBERS[len(objects)],
        "first": newcomers[0].colour,
        "scene": "yes" if scene_cut else "no",
        "small": small.colour,
    }
    return [(f, QUESTIONS[f], answers[f]) for f in FAMILIES]


def _direction(centres: np.ndarray) -> str:
    dx, dy = centres[-1] - centres[0]
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def _layout(rng: np.random.Generator, num_frames: int, size: int) -> list[SceneObject]:
    """The moving object first, then small, static and newcomer objects placed off its path."""
    colours = [str(c) for c in rng.permutation(list(COLOURS))]
    mover, band = _mover(rng, num_frames, size, colours.pop())
    objects = [mover]
    boxes: list[tuple[float, float, float, float]] = [band]
    roles = ["small"] + ["static"] * int(rng.integers(0, 3)) + ["newcomer"] * int(rng.integers(1, 3))
    appear = _appearance_frames(rng, num_frames, roles.count("newcomer"))
    for role in roles:
        obj_size = round(size * (rng.uniform(0.09, 0.11) if role == "small" else rng.uniform(0.15, 0.19)))
        centre = _free_spot(rng, size, obj_size, boxes)
        boxes.append(_box(centre, obj_size))
        visible = np.ones(num_frames, bool)
        if role == "newcomer":
            visible[: appear.pop(0)] = False
        shape = str(rng.choice(SHAPES))
        centres = np.repeat(np.array(centre, float)[None], num_frames, 0)
        objects.append(SceneObject(role, colours.pop(), shape, obj_size, centres, visible))
    return objects


def _mover(
    rng: np.random.Generator, num_frames: int, size: int, colour: str
) -> tuple[SceneObject, tuple[float, float, float, float]]:
    obj_size = round(size * rng.uniform(0.2, 0.25))
    direction = str(rng.choice(DIRECTIONS))
    margin = obj_size / 2 + 2
    travel = rng.uniform(0.55, 0.7) * (size - 2 * margin)
    start = rng.uniform(margin, size - margin - travel)
    along = start + travel * np.linspace(0.0, 1.0, num_frames)
    if direction in ("left", "up"):
        along = along[::-1]
    across = rng.uniform(margin, size - margin)
    if direction in ("left", "right"):
        centres = np.stack([along, np.full(num_frames, across)], 1)
    else:
        centres = np.stack([np.full(num_frames, across), along], 1)
    low, high = centres.min(0) - obj_size / 2 - 3, centres.max(0) + obj_size / 2 + 3
    shape = str(rng.choice(SHAPES))
    mover = SceneObject("moving", colour, shape, obj_size, centres, np.ones(num_frames, bool))
    return mover, (low[0], low[1], high[0], high[1])


def _appearance_frames(rng: np.random.Generator, num_frames: int, count: int) -> list[int]:
    """First visible frame of each newcomer: distinct, at least two frames apart, none at frame 0."""
    first = int(rng.integers(1, num_frames // 2))
    if count == 1:
        return [first]
    return [first, int(rng.integers(first + 2, num_frames - 1))]


def _box(centre: tuple[float, float], obj_size: int) -> tuple[float, float, float, float]:
    half = obj_size / 2 + 2
    return centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half


def _free_spot(
    rng: np.random.Generator, size: int, obj_size: int, boxes: list[tuple[float, float, float, float]]
) -> tuple[float, float]:
    """A centre whose box overlaps none of `boxes` (the least overlapping of 200 tries otherwise)."""
    margin = obj_size / 2 + 2
    best, best_overlap = (size / 2, size / 2), np.inf
    for _ in range(200):
        centre = (float(rng.uniform(margin, size - margin)), float(rng.uniform(margin, size - margin)))
        overlap = sum(_overlap(_box(centre, obj_size), b) for b in boxes)
        if overlap == 0:
            return centre
        if overlap < best_overlap:
            best, best_overlap = centre, overlap
    return best


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return max(width, 0.0) * max(height, 0.0)


def _texture(rng: np.random.Generator, base: tuple[int, int, int], size: int) -> np.ndarray:
    """A still, smooth-plus-grainy texture around a muted base colour, (size, size, 3) float32."""
    coarse = rng.normal(0.0, 1.0, (6, 6, 1)).astype(np.float32)
    smooth = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)[..., None]
    stripes = np.sin(np.arange(size, dtype=np.float32) * rng.uniform(0.3, 0.8) + rng.uniform(0, 6.28))
    grain = rng.normal(0.0, 1.0, (size, size, 1)).astype(np.float32)
    texture = np.array(base, np.float32) + 14 * smooth + 6 * stripes[None, :, None] + 5 * grain
    return texture


def _render(
    objects: list[SceneObject], background: np.ndarray, textures: dict[int, np.ndarray], size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Frames (T, H, W, 3) uint8 and the object map (T, H, W) int8; the moving object on top."""
    num_frames = len(background)
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    object_map = np.full((num_frames, size, size), -1, np.int8)
    order = [*list(range(1, len(objects))), 0]
    for t in range(num_frames):
        frame = textures[int(background[t])].copy()
        for index in order:
            obj = objects[index]
            if not obj.visible[t]:
                continue
            mask = _shape_mask(obj.shape, obj.centres[t], obj.size, size)
            frame[mask] = COLOURS[obj.colour]
            object_map[t][mask] = index
        frames[t] = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
    return frames, object_map


def _shape_mask(shape: str, centre: np.ndarray, obj_size: int, size: int) -> np.ndarray:
    """A boolean (size, size) mask of one filled shape."""
    canvas = np.zeros((size, size), np.uint8)
    x, y = float(centre[0]), float(centre[1])
    r = obj_size / 2
    if shape == "circle":
        cv2.circle(canvas, (round(x), round(y)), max(1, round(r)), 1, -1)
    elif shape == "square":
        cv2.rectangle(canvas, (round(x - r), round(y - r)), (round(x + r) - 1, round(y + r) - 1), 1, -1)
    elif shape == "triangle":
        points = [(x, y - r), (x + r, y + r), (x - r, y + r)]
        cv2.fillPoly(canvas, [np.round(np.array(points)).astype(np.int32)], 1)
    elif shape == "diamond":
        points = [(x, y - r), (x + r, y), (x, y + r), (x - r, y)]
        cv2.fillPoly(canvas, [np.round(np.array(points)).astype(np.int32)], 1)
    elif shape == "cross":
        arm = max(1, round(r / 3))
        cv2.rectangle(canvas, (round(x - r), round(y) - arm), (round(x + r) - 1, round(y) + arm - 1), 1, -1)
        cv2.rectangle(canvas, (round(x) - arm, round(y - r)), (round(x) + arm - 1, round(y + r) - 1), 1, -1)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return canvas.astype(bool)
