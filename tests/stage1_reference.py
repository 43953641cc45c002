"""An independent reference for PruneVid's stage 1 and its token budgets (tests only).

Written from shared/ALGORITHM.md §1-4 and the prose of the retention budget (docs/budgets.md and
the docstrings of `PruneVidConfig`): plain numpy loops, one set and one token at a time, readable
rather than fast (only the float32 distances and densities use torch's cdist and exp, so that
rounding-level ties fall the same way: see `dpc_knn`). Nothing here imports `prunevid.merge`, `cluster`, `budget` or `select`, so a
bug there cannot show up on both sides of a comparison. It is the check that keeps any rewrite
of stage 1 (batched, GPU) honest.

* `dpc_knn`: ALGORITHM.md §1 for one set of tokens.
* `make_contiguous`: §2.3.
* `stage1_reference`: the whole of stage 1 on one video (T, N, C), with the seeded density noise
  drawn in the documented order (a segment's per-frame dynamic sets are one batched call: one
  draw of W x n_d values whenever any of them is clustered), in the paper's mode (`cluster_ratio`,
  `spatial_merge_threshold`) or under `config.retention`, shared among the sets or, with
  `per_step_budget`, equally among the frames.
* `largest_remainder`, `final_count`, `stage1_target`, `stage2_counts`, `keep_top`: the budget
  arithmetic and stage 2's per-set selection (ALGORITHM.md §5.4), in exact fractions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from prunevid import PruneVidConfig


@dataclass
class Stage1:
    """Stage 1's output for one video of T frames of N tokens.

    tokens: (M, C) merged tokens in output order (segment by segment: its static set, then its
    frames' dynamic sets in time order; inside a clustered set by cluster label, an unclustered
    set in row-major order). assignment: (T, N) merged token of every original token.
    segments: (T,) segment of each frame. static: (T, N). groups: (M,) stage-2 budget set of each
    merged token, numbered in output order.
    """

    tokens: torch.Tensor
    assignment: torch.Tensor
    segments: torch.Tensor
    static: torch.Tensor
    groups: torch.Tensor


# ---- §1: DPC-KNN on one set ----------------------------------------------------------------


def dpc_knn(x: np.ndarray, num_clusters: int, k: int, noise: np.ndarray | None = None) -> list[int]:
    """Labels (n,) of one set of tokens x (n, C); label r is the centre of rank r."""
    n, channels = x.shape
    assert 1 <= num_clusters <= n
    # D[i, j]: Euclidean distance / sqrt(C), in float32. torch.cdist and torch's float32 exp
    # rather than numpy's: on nearly identical frames (tiny random towers) the densities sit
    # within a few float32 steps of 1, and only the same rounding decides them the same way.
    points = torch.from_numpy(np.ascontiguousarray(x)).float()
    dist = (torch.cdist(points, points) / math.sqrt(channels)).numpy()

    # Density: the mean squared distance to the k nearest (its own zero among them).
    nearest = torch.from_numpy(np.sort(dist, axis=1)[:, : min(k, n)])
    density = torch.exp(-(nearest**2).mean(-1)).numpy()
    if noise is not None:
        density = density + noise.astype(np.float32)

    separation = np.zeros(n, dtype=np.float32)
    for i in range(n):
        denser = density > density[i]  # strictly
        separation[i] = dist[i, denser].min() if denser.any() else dist.max()

    score = density * separation
    # Highest score first; equal scores: lower token index first.
    ranked = sorted(range(n), key=lambda i: (-float(score[i]), i))
    centres = ranked[:num_clusters]

    rank_of = {centre: rank for rank, centre in enumerate(centres)}
    labels = []
    for i in range(n):
        if i in rank_of:
            labels.append(rank_of[i])  # a centre keeps its own label
        else:
            labels.append(int(np.argmin(dist[i, centres])))  # first minimum: ties to the lower label
    return labels


class _Noise:
    """ALGORITHM.md §1.3: one torch.Generator seeded with config.seed per video; one draw of n
    values per clustering call, in call order."""

    def __init__(self, config: PruneVidConfig):
        self.scale = config.dpc_noise
        self.generator = torch.Generator().manual_seed(config.seed)

    def draw(self, n: int) -> np.ndarray | None:
        if self.scale == 0:
            return None
        return (self.scale * torch.rand(n, generator=self.generator)).numpy()


def _cluster(
    tokens: np.ndarray, count: int | None, k: int, noise: np.ndarray | None
) -> tuple[np.ndarray, list[int]]:
    """Merge one set (n, C) into `count` clusters (None: keep it): (merged (K, C), labels (n,))."""
    n = len(tokens)
    if count is None:
        return tokens, list(range(n))
    labels = dpc_knn(tokens, count, k, noise)
    members = np.array(labels)
    merged = np.stack([tokens[members == r].mean(0) for r in range(count)])
    return merged, labels


# ---- §2: temporal segments -----------------------------------------------------------------


def _runs(values: list) -> list[tuple[object, int, int]]:
    """Maximal runs (value, start, end) of equal consecutive values."""
    runs = []
    for i, value in enumerate(values):
        if runs and runs[-1][0] == value and runs[-1][2] == i:
            runs[-1] = (value, runs[-1][1], i + 1)
        else:
            runs.append((value, i, i + 1))
    return runs


def make_contiguous(labels: list[int]) -> list[int]:
    """§2.3: drop labels whose longest run is one frame and the shorter runs of the others, then
    fill each unassigned stretch from the longer neighbouring run (left wins ties)."""
    longest: dict[int, int] = {}
    for label, start, end in _runs(labels):
        longest[label] = max(longest.get(label, 0), end - start)
    out: list[int | None] = list(labels)
    for label, start, end in _runs(labels):
        if longest[label] == 1 or end - start < longest[label]:
            for t in range(start, end):
                out[t] = None
    if all(v is None for v in out):
        return [0] * len(labels)

    t = 0
    while t < len(out):
        if out[t] is not None:
            t += 1
            continue
        end = t
        while end < len(out) and out[end] is None:
            end += 1
        if t == 0:
            fill = out[end]
        elif end == len(out):
            fill = out[t - 1]
        else:
            left = 0  # the left run as relabelled so far
            while t - 1 - left >= 0 and out[t - 1 - left] == out[t - 1]:
                left += 1
            right = 0
            while end + right < len(out) and out[end + right] == out[end]:
                right += 1
            fill = out[t - 1] if left >= right else out[end]
        for i in range(t, end):
            out[i] = fill
        t = end
    return [int(v) for v in out]  # type: ignore[arg-type]


def temporal_labels(descriptors: np.ndarray, config: PruneVidConfig, noise: _Noise) -> list[int]:
    """§2.2: DPC-KNN labels of the frame descriptors (T, C) (float32 means of the frames)."""
    frames = len(descriptors)
    return dpc_knn(
        descriptors, max(1, int(frames * config.temporal_segment_ratio)), config.k, noise.draw(frames)
    )


def segments_of(labels: list[int]) -> list[list[int]]:
    """§2.3-2.4: the frames of each segment, in time order."""
    return [list(range(start, end)) for _, start, end in _runs(make_contiguous(labels))]


# ---- §3: static positions ------------------------------------------------------------------


def static_similarity(frames: np.ndarray) -> np.ndarray:
    """§3.1: mean cosine over the ordered pairs a != b of each position's W tokens. (W, N, C) -> (N,);
    -inf for one frame."""
    width = len(frames)
    if width < 2:
        return np.full(frames.shape[1], -np.inf)
    unit = frames.astype(np.float32)
    unit = unit / np.maximum(np.linalg.norm(unit, axis=-1, keepdims=True), np.float32(1e-12))
    total = np.zeros(frames.shape[1], dtype=np.float32)
    for a in range(width):
        for b in range(width):
            if a != b:
                total += (unit[a] * unit[b]).sum(-1)
    return total / (width * (width - 1))


# ---- budgets -------------------------------------------------------------------------------


def largest_remainder(sizes: list[int], total: int, minimum: int = 1) -> list[int]:
    """Split `total` among sets in proportion to `sizes`, every set between min(minimum, size) and
    size: floors of the exact quotas (raised to the minimum), then one token at a time to the set
    furthest below its quota (or from the one furthest above it); ties: the earlier set."""
    floor = [min(minimum, size) for size in sizes]
    assert sum(floor) <= total <= sum(sizes), (sizes, total, minimum)
    whole = sum(sizes)
    quota = [Fraction(total * size, whole) if whole else Fraction(0) for size in sizes]
    counts = [max(f, math.floor(q)) for f, q in zip(floor, quota)]
    while sum(counts) < total:
        open_ = [i for i in range(len(sizes)) if counts[i] < sizes[i]]
        best = min(open_, key=lambda i: (counts[i] - quota[i], i))
        counts[best] += 1
    while sum(counts) > total:
        open_ = [i for i in range(len(sizes)) if counts[i] > floor[i]]
        best = min(open_, key=lambda i: (quota[i] - counts[i], i))
        counts[best] -= 1
    return counts


def final_count(num_visual: int, retention: float) -> int:
    """Visual tokens past stage 2 under a retention: max(1, round(retention * N))."""
    return max(1, round(retention * num_visual))


def stage1_target(num_visual: int, config: PruneVidConfig) -> int:
    """Tokens after stage 1 under config.retention: everything with stage 1 off, the final count
    with stage 2 off, else round(N * retention ** stage1_share) within [final count, N]."""
    final = final_count(num_visual, config.retention)
    if not config.stage1:
        return num_visual
    if not config.stage2:
        return final
    return min(num_visual, max(final, round(num_visual * config.retention**config.stage1_share)))


def stage2_counts(groups: torch.Tensor, config: PruneVidConfig, num_visual: int) -> list[int]:
    """ALGORITHM.md §5.4: tokens stage 2 keeps per budget set (sets 0 .. max(groups)).

    Paper: max(1, int(alpha * size)). Retention: the final count shared in proportion to the
    sizes, at least one per set while there are at least as many tokens as sets."""
    sizes = [int((groups == g).sum()) for g in range(int(groups.max()) + 1)]
    if config.retention is None:
        return [max(1, int(config.alpha * size)) if size else 0 for size in sizes]
    total = min(final_count(num_visual, config.retention), sum(sizes))
    minimum = 1 if total >= sum(1 for size in sizes if size) else 0
    return largest_remainder(sizes, total, minimum)


def keep_top(scores: torch.Tensor, groups: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Kept mask (M,): per set its `counts[g]` best scores; equal scores keep the lower index."""
    kept = torch.zeros(len(scores), dtype=torch.bool)
    for g, count in enumerate(counts):
        members = (groups == g).nonzero().squeeze(1).tolist()
        best = sorted(members, key=lambda i: (-float(scores[i]), i))[:count]
        kept[best] = True
    return kept


# ---- §3-4: how each segment is merged ------------------------------------------------------


@dataclass
class _Plan:
    """One segment: its frames, static positions (N,) and cluster counts (None: keep the set)."""

    frames: list[int]
    static: np.ndarray
    static_count: int | None
    dynamic_counts: list[int | None]


def _paper_plans(
    segments: list[list[int]], similarity: list[np.ndarray], config: PruneVidConfig
) -> list[_Plan]:
    """§4.1-4.2: a set of n > spatial_merge_threshold tokens keeps max(1, int(n * cluster_ratio))."""

    def count(n: int) -> int | None:
        return max(1, int(n * config.cluster_ratio)) if n > config.spatial_merge_threshold else None

    plans = []
    for frames, s in zip(segments, similarity):
        static = s > config.tau
        num_static = int(static.sum())
        dynamic = count(len(static) - num_static)
        plans.append(_Plan(frames, static, count(num_static), [dynamic] * len(frames)))
    return plans


def _budget_plans(
    segments: list[list[int]], similarity: list[np.ndarray], config: PruneVidConfig, num_tokens: int
) -> list[_Plan]:
    """Cluster counts adding up to exactly `stage1_target(T * N)` (docs/budgets.md):

    * tau marks the static positions; while averaging them over time saves more tokens than the
      budget allows (T * N - target), the least similar static position (over all segments;
      ties: earlier segment, then lower position) turns dynamic, giving back W - 1 tokens;
    * the sets are each segment's static set (if any) and its frames' dynamic sets (if any);
      the target is shared among them by largest remainder, at least one each;
    * more sets than the target: with at least a token per frame, nothing is static (each frame
      one set); with fewer tokens than frames, ceil(target / N) runs of consecutive frames
      (near-equal, the longer runs first), each a static segment of one set.
    """
    frames_total = sum(len(f) for f in segments)
    target = stage1_target(frames_total * num_tokens, config)
    static = [s > config.tau for s in similarity]
    room = frames_total * num_tokens - target
    saved = sum((len(f) - 1) * int(m.sum()) for f, m in zip(segments, static))
    candidates = sorted(
        (float(s[p]), w, p)
        for w, (s, m) in enumerate(zip(similarity, static))
        for p in range(num_tokens)
        if m[p]
    )
    for _, w, p in candidates:
        if saved <= room:
            break
        static[w][p] = False
        saved -= len(segments[w]) - 1

    def sets_of(masks: list[np.ndarray]) -> list[tuple[int, int | None, int]]:
        """(segment, frame or None for the static set, size) of every set, in output order."""
        out = []
        for w, (frames, mask) in enumerate(zip(segments, masks)):
            num_static = int(mask.sum())
            if num_static:
                out.append((w, None, num_static))
            if num_static < num_tokens:
                out += [(w, i, num_tokens - num_static) for i in range(len(frames))]
        return out

    sets = sets_of(static)
    if len(sets) > target:
        if target < frames_total:
            return _static_runs(frames_total, num_tokens, target)
        static = [np.zeros(num_tokens, dtype=bool) for _ in segments]
        sets = sets_of(static)
    counts = largest_remainder([size for _, _, size in sets], target)
    plans = [_Plan(frames, mask, None, [None] * len(frames)) for frames, mask in zip(segments, static)]
    for (w, frame, size), count in zip(sets, counts):
        kept = count if count < size else None
        if frame is None:
            plans[w].static_count = kept
        else:
            plans[w].dynamic_counts[frame] = kept
    return plans


def _step_plans(
    segments: list[list[int]], similarity: list[np.ndarray], config: PruneVidConfig, num_tokens: int
) -> list[_Plan]:
    """`per_step_budget` (PruneVidConfig's docstring): frame t ends with shares[t] tokens, the
    target split equally (the earlier frames one more), each merged token counted in the frame of
    its first member:

    * a segment's static positions are tau's, but at most N minus the largest share among its
      later frames (their dynamic sets hold those shares), and none when its first frame's share
      is below 2; the least similar (ties: the lower position) turn dynamic first;
    * its first frame's share is split between the static set and that frame's dynamic set in
      proportion to their sizes, rounded half up, at least one each; a later frame's share is its
      dynamic set's count.
    """
    frames_total = sum(len(f) for f in segments)
    target = stage1_target(frames_total * num_tokens, config)
    assert target >= frames_total, "a token per frame at least"
    shares = [target // frames_total + (1 if t < target % frames_total else 0) for t in range(frames_total)]
    plans = []
    for frames, s in zip(segments, similarity):
        first_share = shares[frames[0]]
        room = num_tokens - max((shares[t] for t in frames[1:]), default=0) if first_share >= 2 else 0
        candidates = sorted((float(s[p]), p) for p in range(num_tokens) if s[p] > config.tau)
        mask = np.zeros(num_tokens, dtype=bool)
        for _, p in candidates[max(0, len(candidates) - room) :]:
            mask[p] = True
        num_static = int(mask.sum())
        static_count = 0
        if num_static:
            half_up = math.floor(Fraction(first_share * num_static, num_tokens) + Fraction(1, 2))
            static_count = min(max(1, half_up), first_share - 1)
        dynamic = num_tokens - num_static
        counts = [shares[t] - (static_count if i == 0 else 0) for i, t in enumerate(frames)]
        plans.append(
            _Plan(
                frames,
                mask,
                static_count if static_count < num_static else None,
                [c if c < dynamic else None for c in counts],
            )
        )
    return plans


def _static_runs(num_frames: int, num_tokens: int, target: int) -> list[_Plan]:
    """Fewer tokens than frames: ceil(target / N) near-equal runs of frames (longer runs first),
    each all static, sharing the target in proportion (all runs have N tokens)."""
    runs = math.ceil(target / num_tokens)
    lengths = [num_frames // runs + (1 if r < num_frames % runs else 0) for r in range(runs)]
    counts = largest_remainder([num_tokens] * runs, target)
    plans, start = [], 0
    for length, count in zip(lengths, counts):
        frames = list(range(start, start + length))
        plans.append(
            _Plan(
                frames,
                np.ones(num_tokens, dtype=bool),
                count if count < num_tokens else None,
                [None] * length,
            )
        )
        start += length
    return plans


# ---- the whole of stage 1 ------------------------------------------------------------------


def stage1_reference(features: torch.Tensor, config: PruneVidConfig) -> Stage1:
    """Stage 1 of ALGORITHM.md §1-4 on one video. features: (T, N, C), row-major grid."""
    x = features.detach().cpu().double().numpy()
    num_frames, num_tokens, channels = x.shape
    if not config.stage1:  # every frame its own segment and budget set
        frame_of = torch.arange(num_frames)
        return Stage1(
            tokens=features.reshape(-1, channels),
            assignment=torch.arange(num_frames * num_tokens).view(num_frames, num_tokens),
            segments=frame_of,
            static=torch.zeros(num_frames, num_tokens, dtype=torch.bool),
            groups=frame_of.repeat_interleave(num_tokens),
        )

    noise = _Noise(config)
    segments = segments_of(temporal_labels(features.detach().cpu().float().mean(1).numpy(), config, noise))
    cosine_input = x - x.mean((0, 1)) if config.centre else x
    similarity = [static_similarity(cosine_input[frames]) for frames in segments]
    if config.retention is None:
        plans = _paper_plans(segments, similarity, config)
    elif config.per_step_budget:
        plans = _step_plans(segments, similarity, config, num_tokens)
    else:
        plans = _budget_plans(segments, similarity, config, num_tokens)

    tokens, groups = [], []
    assignment = np.full((num_frames, num_tokens), -1)
    segment_of = np.zeros(num_frames, dtype=np.int64)
    static = np.zeros((num_frames, num_tokens), dtype=bool)
    for w, plan in enumerate(plans):
        static_positions = [p for p in range(num_tokens) if plan.static[p]]
        dynamic_positions = [p for p in range(num_tokens) if not plan.static[p]]
        for t in plan.frames:
            segment_of[t] = w
            static[t] = plan.static
        if static_positions:
            # §3.3: the mean over the frames (clustered as float32 torch computes it: see dpc_knn).
            averaged = features[plan.frames][:, static_positions].detach().cpu().float().mean(0).numpy()
            draw = noise.draw(len(static_positions)) if plan.static_count is not None else None
            merged, labels = _cluster(averaged, plan.static_count, config.k, draw)
            for p, label in zip(static_positions, labels):
                assignment[plan.frames, p] = len(tokens) + label
            group = max(groups, default=-1) + 1
            tokens += list(merged)
            groups += [group] * len(merged)
        if dynamic_positions:
            # The frames' dynamic sets are one (batched) clustering call: one draw of W x n_d
            # values, row i for frame i, whenever any of them is clustered (under a budget some
            # frames may keep their set as it is and leave their row unused).
            width, size = len(plan.frames), len(dynamic_positions)
            clustered = any(count is not None for count in plan.dynamic_counts)
            draws = noise.draw(width * size) if clustered else None
            for i, (t, count) in enumerate(zip(plan.frames, plan.dynamic_counts)):
                draw = None if draws is None else draws[i * size : (i + 1) * size]
                merged, labels = _cluster(x[t, dynamic_positions], count, config.k, draw)
                for p, label in zip(dynamic_positions, labels):
                    assignment[t, p] = len(tokens) + label
                group = max(groups, default=-1) + 1
                tokens += list(merged)
                groups += [group] * len(merged)
    assert (assignment >= 0).all()
    return Stage1(
        tokens=torch.from_numpy(np.stack(tokens)).to(features.dtype),
        assignment=torch.from_numpy(assignment),
        segments=torch.from_numpy(segment_of),
        static=torch.from_numpy(static),
        groups=torch.tensor(groups),
    )
