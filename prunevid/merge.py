"""Stage 1: spatial-temporal token merging (ALGORITHM.md §2-4).

`merge_tokens` turns the per-frame visual tokens of one video, (T, N, C), into a shorter
sequence (M, C) and records where every original token went. Pure torch, no model code.

Output order: segment by segment; inside a segment its static tokens first, then frame by
frame its dynamic tokens; inside a set, merged tokens come in cluster-label order (as the
reference implementation), unclustered sets keep grid (row-major) order.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch

from .cluster import cluster_means, dpc_knn
from .config import PruneVidConfig


@dataclass
class MergeResult:
    """What stage 1 did to one video.

    tokens: (M, C) merged tokens, in the order they enter the language model.
    assignment: (T, N) index into `tokens` of the merged token each original token went into.
    segments: (T,) temporal segment id of each frame (0, 1, ... in time order).
    static: (T, N) whether each original token was merged over time as static.
    groups: (M,) stage-2 budget set of each merged token: one set per segment for its static
        tokens and one per frame for its dynamic tokens, numbered in output order.
    grid: (H, W) of the per-frame token grid, N = H * W.
    """

    tokens: torch.Tensor
    assignment: torch.Tensor
    segments: torch.Tensor
    static: torch.Tensor
    groups: torch.Tensor
    grid: tuple[int, int]

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]


def merge_tokens(
    features: torch.Tensor, config: PruneVidConfig, grid: tuple[int, int] | None = None
) -> MergeResult:
    """Stage 1 on one video. features: (T, N, C) per-frame tokens (row-major H x W grid).

    With `config.stage1` off the tokens pass through unchanged and every frame is its own
    segment and budget set. `grid` defaults to a square grid.
    """
    num_tokens = features.shape[1]
    grid = grid or _square_grid(num_tokens)
    if grid[0] * grid[1] != num_tokens:
        raise ValueError(f"grid {grid} does not hold the {num_tokens} tokens per frame")
    if not config.stage1:
        return _identity(features, grid)

    noise = _Noise(config)
    # Centring matters to cosines only: the clustering's Euclidean distances do not depend on it.
    reference = features - features.mean((0, 1), keepdim=True) if config.centre else features
    segments = temporal_segments(features.mean(1), config, noise)
    parts, assignment, static, groups = [], [], [], []
    offset = 0
    for segment in segments.unique_consecutive():
        frames = (segments == segment).nonzero().squeeze(1)
        part = _merge_segment(features[frames], reference[frames], config, noise)
        parts.append(part.tokens)
        assignment.append(part.assignment + offset)
        static.append(part.static)
        groups.append(part.groups + (groups[-1].max() + 1 if groups else 0))
        offset += part.tokens.shape[0]
    return MergeResult(
        tokens=torch.cat(parts),
        assignment=torch.cat(assignment),
        segments=segments,
        static=torch.cat(static),
        groups=torch.cat(groups),
        grid=grid,
    )


def temporal_segments(
    descriptors: torch.Tensor, config: PruneVidConfig, noise: _Noise | None = None
) -> torch.Tensor:
    """Contiguous temporal segments. descriptors: (T, C) one per frame -> segment id per frame (T,)."""
    num_frames = descriptors.shape[0]
    num_clusters = max(1, int(num_frames * config.temporal_segment_ratio))
    draw = noise(1, num_frames) if noise is not None else None
    labels = dpc_knn(descriptors[None], num_clusters, config.k, draw)[0]
    contiguous = make_contiguous(labels.tolist())
    # Segment ids count the maximal runs of the relabelled sequence.
    changes = torch.tensor([0] + [int(a != b) for a, b in pairwise(contiguous)])
    return changes.cumsum(0).to(descriptors.device)


def make_contiguous(labels: list[int]) -> list[int]:
    """ALGORITHM.md §2.3: relabel frames so that every label forms long contiguous runs.

    Example: [0, 0, 5, 1, 1, 1, 6, 2, 2, 2, 2] -> [0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2].
    """
    runs = _runs(labels)
    longest: dict[int, int] = {}
    for label, start, end in runs:
        longest[label] = max(longest.get(label, 0), end - start)
    out: list[int | None] = list(labels)
    for label, start, end in runs:
        if longest[label] == 1 or end - start < longest[label]:
            out[start:end] = [None] * (end - start)
    if all(v is None for v in out):
        return [0] * len(labels)

    i = 0
    while i < len(out):
        if out[i] is not None:
            i += 1
            continue
        end = i
        while end < len(out) and out[end] is None:
            end += 1
        left = out[i - 1] if i > 0 else None
        right = out[end] if end < len(out) else None
        if left is None or right is None:
            fill = right if left is None else left
        else:
            left_len = _run_length(out, i - 1, step=-1)
            right_len = _run_length(out, end, step=1)
            fill = left if left_len >= right_len else right
        out[i:end] = [fill] * (end - i)
        i = end
    return [int(v) for v in out]  # type: ignore[arg-type]


def static_positions(frames: torch.Tensor, tau: float) -> torch.Tensor:
    """Static grid positions of one segment. frames: (W, N, C) -> (N,) bool.

    Mean pairwise cosine similarity over the W frames, self-pairs excluded, strictly above tau.
    """
    num_frames = frames.shape[0]
    if num_frames < 2:
        return torch.zeros(frames.shape[1], dtype=torch.bool, device=frames.device)
    unit = torch.nn.functional.normalize(frames.float(), dim=-1, eps=1e-12)
    gram = torch.einsum("anc,bnc->nab", unit, unit)  # (N, W, W)
    off_diagonal = gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(-1)
    return off_diagonal / (num_frames * (num_frames - 1)) > tau


def merge_spatial(
    tokens: torch.Tensor, config: PruneVidConfig, noise: _Noise | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """ALGORITHM.md §4: merge each of B sets of n tokens by DPC-KNN when n > threshold.

    tokens: (B, n, C) -> (merged (B, K, C), labels (B, n)); small sets pass through with
    labels = arange(n).
    """
    batch, n, _ = tokens.shape
    if n <= config.spatial_merge_threshold:
        return tokens, torch.arange(n, device=tokens.device).expand(batch, -1)
    num_clusters = max(1, int(n * config.cluster_ratio))
    draw = noise(batch, n) if noise is not None else None
    labels = dpc_knn(tokens, num_clusters, config.k, draw)
    return cluster_means(tokens, labels, num_clusters), labels


def _merge_segment(
    frames: torch.Tensor, reference: torch.Tensor, config: PruneVidConfig, noise: _Noise
) -> MergeResult:
    """Stage 1 inside one segment. frames: (W, N, C); reference: the tokens static similarity
    is measured on (`frames`, or centred). Indices in the result are segment-local."""
    width, num_tokens, _ = frames.shape
    static = static_positions(reference, config.tau)  # (N,)
    static_idx, dynamic_idx = static.nonzero().squeeze(1), (~static).nonzero().squeeze(1)
    assignment = torch.empty(width, num_tokens, dtype=torch.long, device=frames.device)

    # Static positions: the mean over time, then one spatial merge for the whole segment.
    static_tokens, static_labels = merge_spatial(frames[:, static_idx].mean(0, keepdim=True), config, noise)
    num_static = static_tokens.shape[1]
    assignment[:, static_idx] = static_labels

    # Dynamic positions: one spatial merge per frame, batched over the segment's frames.
    dynamic_tokens, dynamic_labels = merge_spatial(frames[:, dynamic_idx], config, noise)
    num_dynamic = dynamic_tokens.shape[1]
    frame_offsets = num_static + num_dynamic * torch.arange(width, device=frames.device)
    assignment[:, dynamic_idx] = dynamic_labels + frame_offsets[:, None]

    groups = torch.cat(
        [
            torch.zeros(num_static, dtype=torch.long),
            torch.arange(width).repeat_interleave(num_dynamic) + (1 if num_static else 0),
        ]
    ).to(frames.device)
    return MergeResult(
        tokens=torch.cat([static_tokens[0], dynamic_tokens.flatten(0, 1)]),
        assignment=assignment,
        segments=torch.zeros(width, dtype=torch.long, device=frames.device),
        static=static.expand(width, -1),
        groups=groups,
        grid=(0, 0),
    )


def _identity(features: torch.Tensor, grid: tuple[int, int]) -> MergeResult:
    num_frames, num_tokens, channels = features.shape
    frame_ids = torch.arange(num_frames, device=features.device)
    return MergeResult(
        tokens=features.reshape(-1, channels),
        assignment=torch.arange(num_frames * num_tokens, device=features.device).view(num_frames, num_tokens),
        segments=frame_ids,
        static=torch.zeros(num_frames, num_tokens, dtype=torch.bool, device=features.device),
        groups=frame_ids.repeat_interleave(num_tokens),
        grid=grid,
    )


class _Noise:
    """The seeded DPC tie-break noise of one `merge_tokens` call (ALGORITHM.md §1.3)."""

    def __init__(self, config: PruneVidConfig):
        self.scale = config.dpc_noise
        self.generator = torch.Generator().manual_seed(config.seed)

    def __call__(self, *shape: int) -> torch.Tensor | None:
        if self.scale == 0:
            return None
        return self.scale * torch.rand(*shape, generator=self.generator)


def _runs(labels: list) -> list[tuple[int, int, int]]:
    """Maximal runs of equal values: (value, start, end)."""
    runs, start = [], 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            runs.append((labels[start], start, i))
            start = i
    return runs


def _run_length(values: list, index: int, step: int) -> int:
    """Length of the run containing values[index], counted from index in direction step."""
    length, i = 0, index
    while 0 <= i < len(values) and values[i] == values[index]:
        length += 1
        i += step
    return length


def _square_grid(num_tokens: int) -> tuple[int, int]:
    side = round(num_tokens**0.5)
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} tokens per frame is not a square grid; pass grid=(H, W)")
    return side, side
