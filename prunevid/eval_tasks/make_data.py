"""Regenerate the offline lmms-eval task data: `python -m prunevid.eval_tasks.make_data`.

Writes `prunevid_synth/videos/*.mp4` (held-out `prunevid.synthetic` videos) and
`prunevid_synth/test.jsonl`: one line per (video, question family) with the question, the
one-word answer and the answer choices. Deterministic: the same seeds give the same files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..synthetic import ANSWERS, TRAIN_SEED_START, make_sample
from ..video import write_video

TASK_DIR = Path(__file__).parent / "prunevid_synth"
FIRST_SEED = 7_000_000  # held out: far below TRAIN_SEED_START and the trainer's monitor seeds
NUM_VIDEOS = 12
NUM_FRAMES = 16
SIZE = 96
FPS = 8.0


def records(seed: int, video: str) -> list[dict]:
    """The task lines of one video: every question family, with its choices and answer index."""
    sample = make_sample(seed, NUM_FRAMES, SIZE)
    lines = []
    for family, question, answer in sample.questions:
        choices = list(ANSWERS[family])
        lines.append(
            {
                "id": f"{seed}-{family}",
                "video": video,
                "family": family,
                "question": question,
                "answer": answer,
                "choices": choices,
                "answer_index": choices.index(answer),
            }
        )
    return lines


def write(task_dir: Path = TASK_DIR, num_videos: int = NUM_VIDEOS) -> list[dict]:
    """Write the videos and the JSONL into `task_dir`; returns the lines."""
    assert FIRST_SEED + num_videos < TRAIN_SEED_START
    videos = task_dir / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    lines = []
    for seed in range(FIRST_SEED, FIRST_SEED + num_videos):
        name = f"synth_{seed}.mp4"
        write_video(videos / name, make_sample(seed, NUM_FRAMES, SIZE).frames, FPS)
        lines += records(seed, name)
    with open(task_dir / "test.jsonl", "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=TASK_DIR)
    parser.add_argument("--videos", type=int, default=NUM_VIDEOS)
    args = parser.parse_args(argv)
    lines = write(args.out, args.videos)
    print(f"wrote {len(lines)} questions about {args.videos} videos to {args.out}")


if __name__ == "__main__":
    main()
