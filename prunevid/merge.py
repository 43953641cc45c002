"""Stage 1: spatial-temporal token merging (ALGORITHM.md §2-4).

`merge_tokens` turns the per-frame visual tokens of one video, (T, N, C), into a shorter
sequence (M, C) and records where every original token went. Pure torch, no model code.

Output order: segment by segment; inside a segment its static tokens first, then frame by
frame its dynamic tokens; inside a set, merged tokens come in cluster-label order (as the
reference implementation), unclustered sets keep grid (row-major) order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

import torch

from .budget import allocate, stage1_count
from .cluster import cluster_means, dpc_knn
from .config import PruneVidConfig


@dataclass
class MergeResult:
    """What stage 1 did to one video.

    tokens: (M, C) merged tokens, in the order they enter the language model (the time order
        of their first members).
    assignment: (T, N) index into `tokens` of the merged token each original token went into;
        -1 for a token dropped before the language model (pruning baselines such as EVS; stage 1
        itself drops nothing).
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

    def first_members(self) -> torch.Tensor:
        """(M,) flat index t * N + n of each merged token's first member (earliest frame, then
        row-major): the member whose position a merged token takes."""
        flat = self.assignment.flatten()
        kept = flat >= 0
        index = torch.arange(flat.numel(), device=flat.device)
        first = torch.full((self.num_tokens,), flat.numel(), dtype=torch.long, device=flat.device)
        return first.scatter_reduce(0, flat[kept], index[kept], "amin")


def merge_tokens(
    features: torch.Tensor, config: PruneVidConfig, grid: tuple[int, int] | None = None
) -> MergeResult:
    """Stage 1 on one video. features: (T, N, C) per-frame tokens (row-major H x W grid).

    With `config.stage1` off the tokens pass through unchanged and every frame is its own
    segment and budget set. With `config.retention` the output has exactly
    `budget.stage1_count(T * N, config)` tokens (see `_budget_plan`). `grid` defaults to a
    square grid.
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
    frames = [(segments == s).nonzero().squeeze(1) for s in segments.unique_consecutive()]
    similarity = [static_similarity(reference[f]) for f in frames]
    if config.retention is None:
        plans = [_paper_plan(f, s > config.tau, config) for f, s in zip(frames, similarity)]
    else:
        plans = _budget_plan(frames, similarity, config, num_tokens)
        segments = torch.cat([torch.full_like(p.frames, i) for i, p in enumerate(plans)])

    parts, assignment, static, groups = [], [], [], []
    offset = 0
    for plan in plans:
        part = _merge_segment(features[plan.frames], plan, config, noise)
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


@dataclass
class _SegmentPlan:
    """How one segment is merged. frames: (W,) its frame indices; static: (N,) its static
    positions; static_clusters / dynamic_clusters: the cluster count of its static set and of
    each frame's dynamic set, None where a set is kept as it is."""

    frames: torch.Tensor
    static: torch.Tensor
    static_clusters: int | None
    dynamic_clusters: list[int | None]


def _paper_plan(frames: torch.Tensor, static: torch.Tensor, config: PruneVidConfig) -> _SegmentPlan:
    """ALGORITHM.md §4: sets above `spatial_merge_threshold` keep int(n * cluster_ratio) clusters."""

    def clusters(n: int) -> int | None:
        return max(1, int(n * config.cluster_ratio)) if n > config.spatial_merge_threshold else None

    num_static = int(static.sum())
    dynamic = clusters(len(static) - num_static)
    return _SegmentPlan(frames, static, clusters(num_static), [dynamic] * len(frames))


def _budget_plan(
    frames: list[torch.Tensor], similarity: list[torch.Tensor], config: PruneVidConfig, num_tokens: int
) -> list[_SegmentPlan]:
    """Plans whose token counts add up to exactly `budget.stage1_count(T * N, config)`, for any
    content.

    tau marks the static positions; when averaging them over time would leave fewer tokens than
    the budget, the least similar of them turn dynamic until it fits. The count is then shared
    among the static and per-frame dynamic sets in proportion to their sizes. A budget smaller
    than the number of sets drops the static sets (every frame its own set) while it holds a
    token per frame, and below that merges runs of consecutive frames as static segments (one
    run per N tokens of budget, at least one).
    frames: per segment (W,) frame indices; similarity: per segment (N,) static similarity.
    """
    widths = [len(f) for f in frames]
    total = sum(widths) * num_tokens
    target = stage1_count(total, config)
    static = _fit_static(similarity, widths, config.tau, total - target)
    sizes, owners = _sets(widths, static, num_tokens)
    if len(sizes) > target:
        if target < sum(widths):
            return _static_runs(torch.cat(frames), num_tokens, target)
        static = [torch.zeros_like(mask) for mask in static]
        sizes, owners = _sets(widths, static, num_tokens)
    counts = allocate(sizes, target)
    plans = [_SegmentPlan(f, m, None, [None] * len(f)) for f, m in zip(frames, static)]
    for (w, frame), size, count in zip(owners, sizes, counts):
        if frame is None:
            plans[w].static_clusters = _below(count, size)
        else:
            plans[w].dynamic_clusters[frame] = _below(count, size)
    return plans


def _sets(
    widths: list[int], static: list[torch.Tensor], num_tokens: int
) -> tuple[list[int], list[tuple[int, int | None]]]:
    """Every set's size, and its owner: (segment, frame), or (segment, None) for a static set."""
    sizes, owners = [], []
    for w, (width, mask) in enumerate(zip(widths, static)):
        num_static = int(mask.sum())
        if num_static:
            sizes.append(num_static)
            owners.append((w, None))
        if num_static < num_tokens:
            sizes += [num_tokens - num_static] * width
            owners += [(w, i) for i in range(width)]
    return sizes, owners


def _static_runs(frames: torch.Tensor, num_tokens: int, target: int) -> list[_SegmentPlan]:
    """Fewer tokens than frames: ceil(target / N) runs of consecutive frames, each one static
    segment, sharing the target. frames: (T,) all frame indices."""
    runs = torch.tensor_split(frames, math.ceil(target / num_tokens))
    static = torch.ones(num_tokens, dtype=torch.bool, device=frames.device)
    counts = allocate([num_tokens] * len(runs), target)
    return [
        _SegmentPlan(run, static, _below(c, num_tokens), [None] * len(run)) for run, c in zip(runs, counts)
    ]


def _fit_static(
    similarity: list[torch.Tensor], widths: list[int], tau: float, room: int
) -> list[torch.Tensor]:
    """Static masks (N,) per segment: similarity above tau, unless averaging them over time
    would save more than `room` tokens (T * N minus the budget); then the least similar static
    positions turn dynamic until it does not (one in a segment of W frames gives back W - 1)."""
    static = [s > tau for s in similarity]
    excess = sum((width - 1) * int(m.sum()) for width, m in zip(widths, static)) - room
    if excess <= 0:
        return static
    device = similarity[0].device
    segment = torch.cat([torch.full((len(s),), w, device=device) for w, s in enumerate(similarity)])
    position = torch.cat([torch.arange(len(s), device=device) for s in similarity])
    gain = torch.tensor(widths, device=device)[segment] - 1
    values = torch.cat(similarity).masked_fill(~torch.cat(static), torch.inf)  # static ones first
    order = values.sort(stable=True).indices
    needed = int((gain[order].cumsum(0) < excess).sum()) + 1
    for w, p in zip(segment[order[:needed]].tolist(), position[order[:needed]].tolist()):
        static[w][p] = False
    return static


def _below(count: int, size: int) -> int | None:
    """A set's cluster count, None when it keeps all its tokens."""
    return count if count < size else None


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


def static_similarity(frames: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine similarity of each grid position over a segment's frames, self-pairs
    excluded. frames: (W, N, C) -> (N,) float32; -inf for a one-frame segment (nothing is static)."""
    num_frames = frames.shape[0]
    if num_frames < 2:
        return torch.full((frames.shape[1],), -torch.inf, device=frames.device)
    unit = torch.nn.functional.normalize(frames.float(), dim=-1, eps=1e-12)
    gram = torch.einsum("anc,bnc->nab", unit, unit)  # (N, W, W)
    off_diagonal = gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(-1)
    return off_diagonal / (num_frames * (num_frames - 1))


def static_positions(frames: torch.Tensor, tau: float) -> torch.Tensor:
    """Static grid positions of one segment: similarity strictly above tau. (W, N, C) -> (N,) bool."""
    return static_similarity(frames) > tau


def merge_spatial(
    tokens: torch.Tensor, num_clusters: int | None, k: int, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """ALGORITHM.md §4: merge each of B sets of n tokens into `num_clusters` by DPC-KNN.

    tokens: (B, n, C) -> (merged (B, K, C), labels (B, n)); `num_clusters` None keeps the sets
    as they are (labels = arange(n)). noise: (B, n) tie-break values or None.
    """
    batch, n, _ = tokens.shape
    if num_clusters is None:
        return tokens, torch.arange(n, device=tokens.device).expand(batch, -1)
    labels = dpc_knn(tokens, num_clusters, k, noise)
    return cluster_means(tokens, labels, num_clusters), labels


def _merge_segment(
    frames: torch.Tensor, plan: _SegmentPlan, config: PruneVidConfig, noise: _Noise
) -> MergeResult:
    """Stage 1 inside one segment, as `plan` says. frames: (W, N, C). Indices in the result are
    segment-local."""
    width, num_tokens, _ = frames.shape
    static = plan.static
    static_idx, dynamic_idx = static.nonzero().squeeze(1), (~static).nonzero().squeeze(1)
    assignment = torch.empty(width, num_tokens, dtype=torch.long, device=frames.device)

    # Static positions: the mean over time, then one spatial merge for the whole segment.
    static_set = frames[:, static_idx].mean(0, keepdim=True)
    draw = noise(1, len(static_idx)) if plan.static_clusters is not None else None
    static_tokens, static_labels = merge_spatial(static_set, plan.static_clusters, config.k, draw)
    num_static = static_tokens.shape[1]
    assignment[:, static_idx] = static_labels

    # Dynamic positions: one spatial merge per frame, batched over the frames that get the same
    # cluster count (all of them, but under a budget), with one noise draw for the segment.
    dynamic_set = frames[:, dynamic_idx]  # (W, n_d, C)
    clustered = any(c is not None for c in plan.dynamic_clusters)
    draw = noise(width, len(dynamic_idx)) if clustered else None
    per_frame: list[torch.Tensor] = [dynamic_set[0, :0]] * width  # (K_i, C) merged tokens of frame i
    labels = torch.empty(width, len(dynamic_idx), dtype=torch.long, device=frames.device)
    for count in dict.fromkeys(plan.dynamic_clusters):
        rows = [i for i, c in enumerate(plan.dynamic_clusters) if c == count]
        merged, labels[rows] = merge_spatial(
            dynamic_set[rows], count, config.k, None if draw is None else draw[rows]
        )
        for i, tokens in zip(rows, merged):
            per_frame[i] = tokens
    sizes = torch.tensor([len(tokens) for tokens in per_frame])
    starts = num_static + sizes.cumsum(0) - sizes
    assignment[:, dynamic_idx] = labels + starts.to(frames.device)[:, None]

    groups = torch.cat(
        [
            torch.zeros(num_static, dtype=torch.long),
            torch.arange(width).repeat_interleave(sizes) + (1 if num_static else 0),
        ]
    ).to(frames.device)
    return MergeResult(
        tokens=torch.cat([static_tokens[0], *per_frame]),
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
