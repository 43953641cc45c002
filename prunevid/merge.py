"""Stage 1: spatial-temporal token merging (ALGORITHM.md §2-4).

`merge_tokens` turns the per-frame visual tokens of one video, (T, N, C), into a shorter
sequence (M, C) and records where every original token went. Pure torch, no model code.

Output order: segment by segment; inside a segment its static tokens first, then frame by
frame its dynamic tokens; inside a set, merged tokens come in cluster-label order (as the
reference implementation), unclustered sets keep grid (row-major) order.

Written for a GPU (DESIGN.md "On a GPU: no host stalls"): every step runs once over all
segments and frames, as padded batches, with no loop over them. The host reads the temporal
labels (T ints, to know the segments) and, in the paper's mode, the merged token counts of the
sets in one transfer at the end (the output length is content-dependent); under a retention the
output length follows from N and r, and nothing else is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .budget import allocate_tensor, stage1_count, step_counts
from .cluster import dpc_knn, dpc_knn_sets
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
    set_sizes: the number of merged tokens in each budget set (`groups` numbering) where the
        host knows them without a read (the paper's mode, stage 1 off); None where they stay on
        the device (under a retention). `select.kept_total` takes them.
    similarity: (T, N) float32 static similarity of each token's grid position over its
        temporal segment (ALGORITHM.md §3.1; -inf in one-frame segments), what `tau` was
        compared with; None where stage 1 did not run.
    density, separation: (T, N) float32 DPC-KNN density (noise included) and separation of
        each token in the set it was clustered in (a static token: its time-averaged position
        in its segment's static set), whose product chose the centres; NaN where its set was
        kept as it is; None where stage 1 did not run.
    """

    tokens: torch.Tensor
    assignment: torch.Tensor
    segments: torch.Tensor
    static: torch.Tensor
    groups: torch.Tensor
    grid: tuple[int, int]
    set_sizes: list[int] | None = None
    similarity: torch.Tensor | None = None
    density: torch.Tensor | None = None
    separation: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]

    def first_members(self) -> torch.Tensor:
        """(M,) flat index t * N + n of each merged token's first member (earliest frame, then
        row-major): the member whose position a merged token takes."""
        flat = self.assignment.flatten()
        target = flat.where(flat >= 0, self.num_tokens)  # dropped tokens go to a spare slot
        index = torch.arange(flat.numel(), device=flat.device)
        first = torch.full((self.num_tokens + 1,), flat.numel(), dtype=torch.long, device=flat.device)
        return first.scatter_reduce(0, target, index, "amin")[: self.num_tokens]


def merge_tokens(
    features: torch.Tensor, config: PruneVidConfig, grid: tuple[int, int] | None = None
) -> MergeResult:
    """Stage 1 on one video. features: (T, N, C) per-frame tokens (row-major H x W grid).

    With `config.stage1` off the tokens pass through unchanged and every frame is its own
    segment and budget set. With `config.retention` the output has exactly
    `budget.stage1_count(T * N, config)` tokens (see `_budget_plan`), and with
    `config.per_step_budget` too, exactly `budget.step_counts(T, N, config)[t]` of them have
    their first member in frame t (`_step_plan`). `grid` defaults to a square grid.
    """
    num_frames, num_tokens, _ = features.shape
    grid = grid or _square_grid(num_tokens)
    if grid[0] * grid[1] != num_tokens:
        raise ValueError(f"grid {grid} does not hold the {num_tokens} tokens per frame")
    if not config.stage1:
        return _identity(features, grid)

    noise = _Noise(config)
    # Centring matters to cosines only: the clustering's Euclidean distances do not depend on it.
    reference = features - features.mean((0, 1), keepdim=True) if config.centre else features
    segments = [_segment_bounds(features.mean(1), config, noise)]  # the host read of the labels
    target = None if config.retention is None else stage1_count(num_frames * num_tokens, config)
    if config.per_step_budget:
        step_counts(num_frames, num_tokens, config)  # refuses a budget below a token per frame
    elif target is not None and target < num_frames:  # the fallback a small budget may need
        segments.append(_even_runs(num_frames, math.ceil(target / num_tokens)))
    layouts = _layouts(segments, num_frames, features.device)  # the one upload
    temporal = _layout(layouts[0], num_frames)
    max_width = max(max(widths) for _, widths in segments)
    table = _frame_table(temporal.starts, temporal.widths, max(segments[0][1]), num_frames)  # (S, W)
    similarity = _similarity(reference, table, temporal.widths)  # (S, N)
    if target is None:
        plan = _paper_plan(temporal, similarity, config, max_width)
    elif config.per_step_budget:
        plan = _step_plan(temporal, similarity, config.tau, target, max_width)
    else:
        plan = _budget_plan(layouts, temporal, similarity, config, target, max_width)
    if plan.starts is temporal.starts and plan.max_width == table.shape[1]:
        plan.table = table  # the temporal segments' frames, already indexed
    result = _merge(features, plan, config, noise, grid, target)
    result.similarity = similarity[temporal.segment]
    return result


class _Layout(NamedTuple):
    """Segments padded to S (width 0 after the last one): views of one row of `_layouts`.
    starts, widths: (S,) first frame and frame count of each segment; slots: (S + T,) each
    set's place in output order (S static sets, then T dynamic ones: per segment its static
    set, then its frames); by_slot: (S + T,) the set in each place (the inverse of slots);
    segment: (T,) segment of each frame."""

    starts: torch.Tensor
    widths: torch.Tensor
    slots: torch.Tensor
    by_slot: torch.Tensor
    segment: torch.Tensor


def _layout(row: torch.Tensor, num_frames: int) -> _Layout:
    """The `_Layout` of one row (4S + 3T,) of `_layouts`."""
    num_segments = (len(row) - 3 * num_frames) // 4
    sets = num_segments + num_frames
    return _Layout(*row.split([num_segments, num_segments, sets, sets, num_frames]))


def _layouts(
    segments: list[tuple[list[int], list[int]]], num_frames: int, device: torch.device
) -> torch.Tensor:
    """(P, 4S + 3T): each candidate segmentation's starts, widths, slots, sets by slot and frame segments
    (`_Layout`), worked out on the host from its (first frames, widths), segments padded to a
    common count, and uploaded at once."""
    padded = max(len(starts) for starts, _ in segments)
    rows = []
    for starts, widths in segments:
        segment = [s for s, width in enumerate(widths) for _ in range(width)]
        starts = starts + [num_frames] * (padded - len(starts))
        slots = [start + s for s, start in enumerate(starts)] + [t + s + 1 for t, s in enumerate(segment)]
        by_slot = sorted(range(len(slots)), key=slots.__getitem__)
        rows.append(starts + widths + [0] * (padded - len(widths)) + slots + by_slot + segment)
    return torch.tensor(rows, device=device)


@dataclass
class _Plan:
    """How a video is merged, on the device. Segments are padded to S (width 0 after the last
    one); a video has S + T sets ("rows"): S static sets, then the T frames' dynamic sets.

    starts, widths: (S,) first frame and frame count of each segment; max_width: the largest
    width (host-known); segment: (T,) segment of each frame; static: (S, N) static positions;
    sizes: (S + T,) tokens in each set; slots: (S + T,) each set's place in output order (per
    segment its static set, then its frames), by_slot: its inverse; counts: (S + T,) merged tokens each set yields;
    clustered: (S + T,) whether it is clustered (else kept as it is, counts == sizes).
    """

    starts: torch.Tensor
    widths: torch.Tensor
    max_width: int
    segment: torch.Tensor
    static: torch.Tensor
    sizes: torch.Tensor
    slots: torch.Tensor
    by_slot: torch.Tensor
    counts: torch.Tensor | None = None
    clustered: torch.Tensor | None = None
    table: torch.Tensor | None = None  # (S, max_width) `_frame_table`, where already built


def _plan(layout: _Layout, static: torch.Tensor, max_width: int) -> _Plan:
    """The sets of segments `layout` with static positions `static` (S, N)."""
    num_static = static.sum(1)
    sizes = torch.cat([num_static, (static.shape[1] - num_static)[layout.segment]])
    return _Plan(
        layout.starts, layout.widths, max_width, layout.segment, static, sizes, layout.slots, layout.by_slot
    )


def _paper_plan(layout: _Layout, similarity: torch.Tensor, config: PruneVidConfig, max_width: int) -> _Plan:
    """ALGORITHM.md §3-4: tau marks the static positions; sets above `spatial_merge_threshold`
    keep max(1, int(n * cluster_ratio)) clusters."""
    plan = _plan(layout, similarity > config.tau, max_width)
    plan.clustered = plan.sizes > config.spatial_merge_threshold
    clusters = (plan.sizes.double() * config.cluster_ratio).long().clamp(min=1)  # float64, as int(n * r)
    plan.counts = torch.where(plan.clustered, clusters, plan.sizes)
    return plan


def _budget_plan(
    layouts: torch.Tensor,
    temporal: _Layout,
    similarity: torch.Tensor,
    config: PruneVidConfig,
    target: int,
    max_width: int,
) -> _Plan:
    """A plan whose token counts add up to exactly `target` (`budget.stage1_count(T * N,
    config)`), for any content.

    tau marks the static positions; when averaging them over time would leave fewer tokens than
    the budget, the least similar of them turn dynamic until it fits. The count is then shared
    among the static and per-frame dynamic sets in proportion to their sizes. A budget smaller
    than the number of sets drops the static sets (every frame its own set) while it holds a
    token per frame, and below that merges runs of consecutive frames as static segments (one
    run per N tokens of budget, at least one). Which of these applies depends on the content,
    so the device chooses (`torch.where`), and the host never learns which.
    layouts: (P, 3S + 2T) `_layouts` of the temporal segments (`temporal`, the first) and,
    where the budget is below T, of the runs; similarity: (S, N).
    """
    num_frames, num_tokens = len(temporal.segment), similarity.shape[1]
    room = num_frames * num_tokens - target
    plan = _plan(temporal, _fit_static(similarity, temporal.widths, config.tau, room), max_width)
    too_many = (plan.sizes > 0).sum() > target
    if len(layouts) == 1:  # a token per frame fits: frames fall back to their own sets
        plan = _plan(temporal, plan.static & ~too_many, max_width)
    else:  # fewer tokens than frames: runs of frames fall back to static segments
        runs = _layout(layouts[1], num_frames)
        static = torch.where(too_many, (runs.widths > 0)[:, None], plan.static)
        plan = _plan(_layout(torch.where(too_many, layouts[1], layouts[0]), num_frames), static, max_width)
    shares = plan.sizes[plan.by_slot]  # in output order
    plan.counts = allocate_tensor(shares, target)[plan.slots]
    plan.clustered = plan.counts < plan.sizes
    return plan


def _step_plan(layout: _Layout, similarity: torch.Tensor, tau: float, target: int, max_width: int) -> _Plan:
    """`config.per_step_budget`: a plan where each frame t ends with exactly its share of
    `target` (`budget.step_counts`), counting every merged token in the frame of its first member.

    A segment's static tokens begin in its first frame, so that frame's share is split between
    the static set and the frame's dynamic set (in proportion to their sizes, rounded half up,
    at least one each), and a later frame's share is its dynamic set's count. Hence a segment
    keeps at most N minus its later frames' largest share of tau's static positions (their
    dynamic sets must hold that share), and none where its first frame's share is below 2;
    beyond that its least similar static positions turn dynamic. similarity: (S, N)."""
    num_frames, num_tokens = len(layout.segment), similarity.shape[1]
    frames = torch.arange(num_frames, device=similarity.device)
    base, longer = divmod(target, num_frames)
    shares = base + (frames < longer).long()  # (T,) `budget.step_counts` on the device
    is_first = frames == layout.starts[layout.segment]  # (T,) a segment's first frame
    later = torch.zeros_like(layout.starts).scatter_reduce(
        0, layout.segment, shares.masked_fill(is_first, 0), "amax"
    )  # (S,)
    first_share = shares[layout.starts.clamp(max=num_frames - 1)]  # (S,) padding segments start at T
    room = (num_tokens - later) * (first_share >= 2)
    static = similarity > tau
    # The least similar static positions turn dynamic first (ties: the lower position first).
    rank = similarity.masked_fill(~static, torch.inf).sort(dim=1, stable=True).indices.argsort(dim=1)
    excess = (static.sum(1) - room).clamp(min=0)
    plan = _plan(layout, static & (rank >= excess[:, None]), max_width)
    num_static = plan.sizes[: len(layout.starts)]
    static_count = ((2 * first_share * num_static + num_tokens) // (2 * num_tokens)).clamp(min=1)
    static_count = torch.minimum(static_count, first_share - 1) * (num_static > 0)
    plan.counts = torch.cat([static_count, shares - static_count[layout.segment] * is_first])
    plan.clustered = plan.counts < plan.sizes
    return plan


def _fit_static(similarity: torch.Tensor, widths: torch.Tensor, tau: float, room: int) -> torch.Tensor:
    """Static masks (S, N): similarity above tau, unless averaging them over time would save
    more than `room` tokens (T * N minus the budget); then the least similar static positions
    turn dynamic until it does not (one in a segment of W frames gives back W - 1).
    similarity: (S, N); widths: (S,)."""
    static = similarity > tau
    gain = widths - 1  # (S,)
    excess = (gain[:, None] * static).sum() - room
    values = similarity.masked_fill(~static, torch.inf).flatten()  # static ones first
    order = values.sort(stable=True).indices  # (S * N,)
    needed = (gain[order // similarity.shape[1]].cumsum(0) < excess).sum() + 1
    needed = needed * (excess > 0)  # none turn dynamic where the static ones fit
    return static & (order.argsort().view_as(static) >= needed)


def _even_runs(num_frames: int, num_runs: int) -> tuple[list[int], list[int]]:
    """(first frames, widths) of `num_runs` runs of consecutive frames, as torch.tensor_split
    cuts them (the first T % runs one frame longer)."""
    base, longer = divmod(num_frames, num_runs)
    widths = [base + 1] * longer + [base] * (num_runs - longer)
    return [sum(widths[:i]) for i in range(num_runs)], widths


def _merge(
    features: torch.Tensor,
    plan: _Plan,
    config: PruneVidConfig,
    noise: _Noise,
    grid: tuple[int, int],
    num_merged: int | None,
) -> MergeResult:
    """Merge every set of `plan` in one batch. features: (T, N, C). `num_merged`: the output
    length where the host knows it (under a retention); else it is read, with the sets' sizes."""
    num_frames, num_tokens, channels = features.shape
    device = features.device
    num_segments = len(plan.starts)
    ids = torch.arange(num_tokens, device=device)

    # Rows of the batch: each set's members gathered to the front, in grid order: one stable
    # sort of 0/1 keys, 0 for a static set's static positions and a frame's dynamic ones (uint8:
    # older CUDA builds of torch refuse to sort bool).
    static = plan.static[plan.segment]  # (T, N)
    keys = torch.cat([~plan.static, static]).byte()  # (S + T, N)
    members = keys.argsort(dim=1, stable=True)  # (S + T, N) grid position of each set's m-th member
    sources = torch.cat([_static_means(features, plan), features])  # (S + T, N, C)
    rows = sources.gather(1, members[:, :, None].expand(-1, -1, channels))  # (S + T, N, C)
    draw = _row_noise(noise, plan, num_frames, num_tokens)
    clustering = dpc_knn_sets(rows, plan.sizes, plan.counts.clamp(min=1), config.k, draw)
    clustered = plan.clustered[:, None]  # (S + T, 1)
    labels = torch.where(clustered, clustering.labels, ids)  # unclustered: grid order

    # Output order: sets in slot order, each set's merged tokens in label order.
    per_slot = plan.counts[plan.by_slot]
    set_sizes = None
    if num_merged is None:  # the paper's mode: the one read of the output length
        per_slot_host = per_slot.tolist()
        num_merged = sum(per_slot_host)
        set_sizes = [count for count in per_slot_host if count]
    slot_ends = per_slot.cumsum(0)
    slot_starts = slot_ends - per_slot
    padding = ids >= plan.sizes[:, None]
    target = (slot_starts[plan.slots][:, None] + labels).masked_fill(padding, num_merged).flatten()

    # Each merged token is the plain mean of its members (summed in float32); padding goes to a
    # spare row that is dropped.
    sums = rows.new_zeros(num_merged + 1, channels, dtype=torch.float32)
    sums.index_add_(0, target, rows.flatten(0, 1).float())
    count = sums.new_zeros(num_merged + 1, 1).index_add_(0, target, sums.new_ones(len(target), 1))
    tokens = (sums / count)[:num_merged].to(features.dtype)

    # Where every original token went: its place in the batch, row (its segment's static set or
    # its frame's dynamic set) times N plus its member index there (the members' inverse).
    first_at = torch.arange(0, members.numel(), num_tokens, device=device)  # (S + T,) row * N
    rows_at = members.argsort(dim=1) + first_at[:, None]
    place = torch.where(static, rows_at[:num_segments][plan.segment], rows_at[num_segments:])  # (T, N)
    assignment = target[place]
    facts = torch.stack([clustering.density, clustering.separation]).where(clustered, torch.nan)
    density, separation = facts.flatten(1)[:, place].unbind()

    # Budget sets: the non-empty slots, numbered densely in output order.
    slot = torch.searchsorted(slot_ends, torch.arange(num_merged, device=device), right=True)
    groups = ((per_slot > 0).cumsum(0) - 1)[slot]
    return MergeResult(
        tokens=tokens,
        assignment=assignment,
        segments=plan.segment,
        static=static,
        groups=groups,
        grid=grid,
        set_sizes=set_sizes,
        density=density,
        separation=separation,
    )


def _static_means(features: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """(T, N, C) -> (S, N, C): each position's mean over its segment's frames (a plain mean,
    accumulated in float32 at least, as `Tensor.mean` does)."""
    table = plan.table
    if table is None:
        table = _frame_table(plan.starts, plan.widths, plan.max_width, features.shape[0])
    accumulate = torch.float64 if features.dtype == torch.float64 else torch.float32
    sums = _with_zero_frame(features)[table].sum(1, dtype=accumulate)  # (S, N, C)
    return (sums / plan.widths.clamp(min=1).view(-1, 1, 1)).to(features.dtype)


def _row_noise(noise: _Noise, plan: _Plan, num_frames: int, num_tokens: int) -> torch.Tensor | None:
    """(S + T, N) each set's DPC tie-break noise, the values ALGORITHM.md §1.3's order of draws
    gives it: per segment its static set (if clustered), then its frames' dynamic sets (if any
    is clustered). One draw covers the most any content can take, and a set's N more (the
    generator is local to the call, so drawing more than is used changes nothing); a set that
    draws nothing gets values that are never used."""
    num_segments = len(plan.starts)
    stream = noise((num_segments + num_frames + 1) * num_tokens)
    if stream is None:
        return None
    stream = stream.to(plan.sizes.device)
    # Draws of each set: a static set its size if clustered; a frame its size if any frame of
    # its segment is clustered.
    any_clustered = torch.zeros_like(plan.starts).scatter_reduce_(
        0, plan.segment, plan.clustered[num_segments:].long(), "amax"
    )  # (S,) 0 or 1
    drawing = torch.cat([plan.clustered[:num_segments], any_clustered[plan.segment]])
    draws = plan.sizes * drawing  # (S + T,)
    # Sets draw in output order (`slots`): where each set's draws begin.
    in_order = draws[plan.by_slot]
    first = (in_order.cumsum(0) - in_order)[plan.slots]
    return stream[first[:, None] + torch.arange(num_tokens, device=stream.device)]


def _frame_table(starts: torch.Tensor, widths: torch.Tensor, max_width: int, num_frames: int) -> torch.Tensor:
    """(S, W) frame index of each segment's w-th frame; T (`_with_zero_frame`'s zeros) where
    the segment is shorter."""
    steps = torch.arange(max_width, device=starts.device)
    return (starts[:, None] + steps).masked_fill(steps >= widths[:, None], num_frames)


def _with_zero_frame(frames: torch.Tensor) -> torch.Tensor:
    """(T, N, C) -> (T + 1, N, C): a frame of zeros after the last, what padding reads."""
    return torch.nn.functional.pad(frames, (0, 0, 0, 0, 0, 1))


def _similarity(frames: torch.Tensor, table: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """`static_similarity` of every segment at once. frames: (T, N, C); table: (S, W) its
    `_frame_table`; widths: (S,) -> (S, N) float32; -inf in a segment of fewer than two frames."""
    frames = frames.float()
    # torch.nn.functional.normalize's arithmetic, without its expand.
    unit = frames / torch.linalg.vector_norm(frames, dim=-1, keepdim=True).clamp_min(1e-12)
    padded = _with_zero_frame(unit)[table]  # (S, W, N, C)
    gram = _frame_products(padded)  # (S, N, W, W)
    off_diagonal = gram.sum((2, 3)) - gram.diagonal(dim1=2, dim2=3).sum(-1)
    # A segment of fewer than two frames has no pairs, and its off-diagonal sum is an exact 0
    # (its one product less itself, or nothing): 0 / 0 is NaN, which becomes -inf.
    pairs = (widths * (widths - 1))[:, None]
    return (off_diagonal / pairs).nan_to_num(nan=-torch.inf)


def _frame_products(padded: torch.Tensor) -> torch.Tensor:
    """(S, W, N, C) -> (S, N, W, W): every segment's dot products of its frames' tokens, position
    by position. The one matrix product torch.einsum("sanc,sbnc->snab") runs, on the same
    operands (a view where the layout allows, else a copy; so the same bits), without the
    einsum's half-dozen bookkeeping views."""
    segments, width, positions, channels = padded.shape
    left = padded.permute(0, 2, 1, 3).reshape(segments * positions, width, channels)
    right = padded.permute(0, 2, 3, 1).reshape(segments * positions, channels, width)
    return torch.bmm(left, right).view(segments, positions, width, width)


def _segment_bounds(
    descriptors: torch.Tensor, config: PruneVidConfig, noise: _Noise | None = None
) -> tuple[list[int], list[int]]:
    """(first frames, widths) of the temporal segments, on the host: the one read of stage 1's
    content (T labels). descriptors: (T, C) one per frame."""
    num_frames = descriptors.shape[0]
    num_clusters = max(1, int(num_frames * config.temporal_segment_ratio))
    draw = noise(1, num_frames) if noise is not None else None
    labels = dpc_knn(descriptors[None], num_clusters, config.k, draw)[0]
    runs = _runs(make_contiguous(labels.tolist()))
    return [start for _, start, _ in runs], [end - start for _, start, end in runs]


def temporal_segments(
    descriptors: torch.Tensor, config: PruneVidConfig, noise: _Noise | None = None
) -> torch.Tensor:
    """Contiguous temporal segments. descriptors: (T, C) one per frame -> segment id per frame (T,)."""
    _, widths = _segment_bounds(descriptors, config, noise)
    segment = torch.arange(len(widths)).repeat_interleave(torch.tensor(widths), output_size=len(descriptors))
    return segment.to(descriptors.device)


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
    bounds = torch.tensor([0, frames.shape[0]], device=frames.device)
    table = _frame_table(bounds[:1], bounds[1:], frames.shape[0], frames.shape[0])
    return _similarity(frames, table, bounds[1:])[0]


def static_positions(frames: torch.Tensor, tau: float) -> torch.Tensor:
    """Static grid positions of one segment: similarity strictly above tau. (W, N, C) -> (N,) bool."""
    return static_similarity(frames) > tau


def _identity(features: torch.Tensor, grid: tuple[int, int]) -> MergeResult:
    num_frames, num_tokens, channels = features.shape
    frame_ids = torch.arange(num_frames, device=features.device)
    return MergeResult(
        tokens=features.reshape(-1, channels),
        assignment=torch.arange(num_frames * num_tokens, device=features.device).view(num_frames, num_tokens),
        segments=frame_ids,
        static=torch.zeros(num_frames, num_tokens, dtype=torch.bool, device=features.device),
        groups=frame_ids[:, None].expand(-1, num_tokens).flatten(),
        grid=grid,
        set_sizes=[num_tokens] * num_frames,
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
