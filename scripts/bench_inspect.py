"""What one click of the token inspector costs, served from a trace already computed (no model).

    python scripts/bench_inspect.py [--frames 32] [--grid 14] [--side 640] [--clicks 50]

A trace of `frames` frames of grid x grid tokens from stage 1 on random features (the paper's
settings) and stage 2's per-set budget on random scores, with a compared method's trace beside
it; display frames of `side` pixels (the page's DISPLAY_SIDE) and their overlays drawn once, as
the page keeps them (and their thumbnails). Timed per click, as the page runs it: the clicked
cell, `inspect` (the explanation of both methods, every frame's thumbnail lit and tiled), the
frame view lit, and the JSON download with the selected token. Printed apart: what Gradio adds
to send the two pictures (the sheet as JPEG, the frame view as PNG, encoded by PIL as Gradio does).
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from prunevid.app import inspector
from prunevid.config import PruneVidConfig
from prunevid.merge import merge_tokens
from prunevid.select import keep_by_budget, keep_counts
from prunevid.trace import PruningTrace
from prunevid.visualizations import overlay_frames


def make_trace(frames: int, grid: int, seed: int = 0) -> PruningTrace:
    """Stage 1 on random features (a still half and a changing half), stage 2 on random scores."""
    generator = torch.Generator().manual_seed(seed)
    tokens = grid * grid
    still = torch.randn(1, tokens // 2, 64, generator=generator).expand(frames, -1, -1)
    moving = torch.randn(frames, tokens - tokens // 2, 64, generator=generator)
    features = torch.cat([still, moving], 1) + 0.05 * torch.randn(frames, tokens, 64, generator=generator)
    config = PruneVidConfig(num_frames=frames)
    merge = merge_tokens(features, config, (grid, grid))
    scores = torch.rand(merge.num_tokens, generator=generator)
    kept = torch.zeros(merge.num_tokens, dtype=torch.bool)
    kept[keep_by_budget(scores, merge.groups, keep_counts(merge.groups, config, merge.num_tokens))] = True
    trace = PruningTrace.from_stages(merge, kept.numpy(), scores.numpy(), config=config.to_dict())
    trace.similarity = merge.similarity.numpy().reshape(trace.static.shape)
    trace.group = merge.groups.numpy()
    trace.question_attention = torch.rand(24, merge.num_tokens, generator=generator).numpy()
    trace.question_tokens = [f"word{q}" for q in range(24)]
    return trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--grid", type=int, default=14)
    parser.add_argument("--side", type=int, default=640)
    parser.add_argument("--clicks", type=int, default=50)
    args = parser.parse_args()

    trace, other = make_trace(args.frames, args.grid), make_trace(args.frames, args.grid, seed=1)
    other.method = "evs"
    height = args.side * 9 // 16
    rng = np.random.default_rng(0)
    # Smooth random frames (noise at 1/10 size, enlarged): PNG compresses them like real video.
    small = rng.integers(0, 256, (args.frames, height // 10, args.side // 10, 3), dtype=np.uint8)
    frames = np.stack([cv2.resize(f, (args.side, height), interpolation=cv2.INTER_CUBIC) for f in small])
    images = overlay_frames(frames, trace)  # drawn once per answer, as the page keeps them
    thumbs = inspector.thumbnails(images)
    record = {**trace.to_dict(), "comparison": other.to_dict()}
    times = np.arange(args.frames) * 0.5
    folder = Path(tempfile.mkdtemp(prefix="bench-inspect-"))

    clicks, encodes = [], []
    for i in range(args.clicks):
        x, y = rng.uniform(0, 2 * args.side + inspector.FRAME_GAP), rng.uniform(0, height)
        frame = i % args.frames
        tic = time.perf_counter()
        token = inspector.clicked_token(x, y, frame, (height, args.side), trace.grid)
        found = inspector.inspect(trace, thumbs, token, times, other, "evs")
        view = inspector.lit_frame(trace, images[frame], token, frame)
        inspector.save_record(folder / "prunevid_trace.json", record, found.facts)
        clicks.append(time.perf_counter() - tic)
        tic = time.perf_counter()  # what Gradio then does with the two pictures
        Image.fromarray(found.sheet).save(io.BytesIO(), format="jpeg")
        Image.fromarray(np.concatenate([frames[frame], view], 1)).save(io.BytesIO(), format="png")
        encodes.append(time.perf_counter() - tic)

    ms = sorted(1000 * s for s in clicks)
    print(
        f"{args.frames} frames of {args.grid}x{args.grid} tokens ({trace.num_visual_tokens} tokens, "
        f"{trace.num_after_stage1} after stage 1), frames {args.side}x{height}: one click "
        f"median {statistics.median(ms):.0f} ms, max {ms[-1]:.0f} ms over {args.clicks} clicks "
        f"(explain {1000 * _explain_s(trace, times):.1f} ms of it); "
        f"Gradio's encoding of the two pictures: {1000 * statistics.median(encodes):.0f} ms more"
    )


def _explain_s(trace: PruningTrace, times: np.ndarray, repeats: int = 50) -> float:
    tic = time.perf_counter()
    for i in range(repeats):
        trace.explain(i % trace.num_frames, i % trace.grid[0], (3 * i) % trace.grid[1], times)
    return (time.perf_counter() - tic) / repeats


if __name__ == "__main__":
    main()
