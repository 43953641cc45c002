"""Every way of shortening the visual tokens that PruneVid is compared with, and PruneVid's own,
behind one registry (`METHODS`) that `prunevid.patch(model, config, method=...)` and the
benchmarks use.

A method is a rule at one of two places (or both):

* before the language model, a `Reduce`: (T, N, C) video tokens -> `MergeResult` (which token
  went where; -1 for a token dropped), with exactly `budget.stage1_count(T * N, config)` tokens
  under `config.retention`;
* inside it, at `selected_layer`, a `Rule` (see `prunevid.select`): the question rows'
  attention over the visual tokens -> the kept ones.

| name      | before the LLM                                         | at `selected_layer`          |
|-----------|--------------------------------------------------------|------------------------------|
| prunevid  | PruneVid stage 1 (`merge.merge_tokens`)                | PruneVid stage 2             |
| stage1    | PruneVid stage 1                                       | -                            |
| stage2    | -                                                      | PruneVid stage 2             |
| fastv     | -                                                      | FastV-style: last token's attention |
| random    | -                                                      | seeded random tokens         |
| uniform   | average pooling of each frame over a grid of cells     | -                            |
| evs       | EVS-style: the tokens that changed most since the previous frame | -                  |
| dycoke    | DyCoke-style: tokens merged into their window's first frame | -                       |

The baselines are written from their papers' descriptions (FastV, ECCV 2024; EVS, as vLLM's
`--video-pruning-rate`; DyCoke, CVPR 2025, its temporal merging only); no code of theirs.
`uniform`, `evs` and `dycoke` have no count of their own: they need a retention.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .budget import stage1_count
from .cluster import cluster_means
from .config import PruneVidConfig
from .merge import MergeResult, merge_tokens
from .select import Rule, question_guided

# (features (T, N, C), config, grid (H, W)) -> MergeResult
Reduce = Callable[[torch.Tensor, PruneVidConfig, tuple[int, int]], MergeResult]
DYCOKE_WINDOW = 4  # frames per window in DyCoke's temporal merging


@dataclass(frozen=True)
class Method:
    """A named way of pruning: `reduce` runs before the language model, `select` at
    `selected_layer`; None where the method does nothing."""

    name: str
    reduce: Reduce | None = None
    select: Rule | None = None
    needs_retention: bool = False

    def configure(self, config: PruneVidConfig) -> PruneVidConfig:
        """The settings this method runs with: a stage runs where the method has a rule and
        `config` leaves it on (so the budget knows which stages share the reduction)."""
        if self.needs_retention and config.retention is None:
            raise ValueError(f"the {self.name} method needs a retention, e.g. retention=0.1")
        return config.replace(
            stage1=config.stage1 and self.reduce is not None,
            stage2=config.stage2 and self.select is not None,
        )


# ---- rules inside the language model -------------------------------------------------------
# Both keep counts.sum() tokens by a rank test on the device (`_top`), so the count, which may be
# a device tensor, never has to reach the host.


def fastv(
    attention: torch.Tensor, groups: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """FastV-style: rank by the attention the last prompt token pays, averaged over heads, and
    keep counts.sum() tokens overall (the sets do not matter)."""
    scores = attention[:, -1].mean(0)
    return scores, _top(scores, counts.sum())


def random_tokens(
    attention: torch.Tensor, groups: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """counts.sum() uniformly random tokens, the same ones for the same number of tokens (drawn
    on the CPU, so on every device)."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(attention.shape[-1], generator=generator)
    if attention.is_cuda:  # a copy from pinned memory does not wait for the queued work
        scores = scores.pin_memory()
    scores = scores.to(attention.device, non_blocking=True)
    return scores, _top(scores, counts.sum())


def _top(scores: torch.Tensor, count: int | torch.Tensor) -> torch.Tensor:
    """(n,) bool: the `count` highest scores (all n when count > n), equal scores keeping the
    lower index. `count` may be a 0-d tensor: it is compared with each token's rank, never read."""
    order = scores.sort(descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=scores.device))
    return rank < count


# ---- rules before the language model -------------------------------------------------------
# Every count here follows from T, N and the retention, which the host knows; the content only
# decides which tokens, on the device, with no value read back and no loop over frames.


def uniform_pool(features: torch.Tensor, config: PruneVidConfig, grid: tuple[int, int]) -> MergeResult:
    """Average pooling: the budget shared evenly among the frames, each frame cut into that
    many near-equal rectangles of its grid (`grid_cells`), one token per rectangle. With fewer
    tokens than frames, runs of consecutive frames pool into one token each."""
    num_frames, num_tokens, _ = features.shape
    count = stage1_count(num_frames * num_tokens, config)
    frames = torch.arange(num_frames, device=features.device)
    if count >= num_frames:
        # `allocate` of T equal frames: count // T cells each, one more in the first count % T.
        cells, more = divmod(count, num_frames)
        starts = frames * cells + frames.clamp(max=more)  # (T,) first token of each frame
        labels = grid_cells(grid, cells, features.device)
        if more:
            labels = torch.where(
                (frames < more)[:, None], grid_cells(grid, cells + 1, features.device), labels
            )
        labels = starts[:, None] + labels  # (T, N)
        segments = frames
    else:
        segments = _runs(num_frames, count, features.device)
        labels = segments[:, None].expand(-1, num_tokens)
    return _reduced(features, labels, segments, grid, count)


def evs(features: torch.Tensor, config: PruneVidConfig, grid: tuple[int, int]) -> MergeResult:
    """EVS-style pruning: every token of the first frame, then the tokens of later frames that
    differ most (1 - cosine) from the same position in the previous frame; the rest are dropped.
    A budget below one frame keeps that many tokens of the first frame, evenly spread."""
    num_frames, num_tokens, _ = features.shape
    count = stage1_count(num_frames * num_tokens, config)
    device = features.device
    if count <= num_tokens:
        kept = torch.arange(count, device=device) * num_tokens // count
    else:
        unit = F.normalize(features.float(), dim=-1, eps=1e-12)
        change = 1 - (unit[1:] * unit[:-1]).sum(-1)  # (T - 1, N)
        later = change.flatten().sort(descending=True, stable=True).indices[: count - num_tokens]
        kept = torch.cat([torch.arange(num_tokens, device=device), later + num_tokens]).sort().values
    labels = torch.full((num_frames * num_tokens,), -1, device=device)
    labels = labels.scatter(0, kept, torch.arange(count, device=device)).view(num_frames, num_tokens)
    return _reduced(features, labels, torch.arange(num_frames, device=device), grid, count)


def dycoke(features: torch.Tensor, config: PruneVidConfig, grid: tuple[int, int]) -> MergeResult:
    """DyCoke-style temporal merging: frames form windows of `DYCOKE_WINDOW` (fewer, longer ones
    when the budget holds fewer first frames); the tokens most similar (cosine) to the same
    position in their window's first frame are merged into it (a merged token is the mean of
    its members) until the budget is met. A budget below one frame merges every later frame
    into the first and pools that frame over `grid_cells`."""
    num_frames, num_tokens, _ = features.shape
    total = num_frames * num_tokens
    count = stage1_count(total, config)
    device = features.device
    windows = max(1, min(math.ceil(num_frames / DYCOKE_WINDOW), count // num_tokens))
    segments = _runs(num_frames, windows, device)
    first = torch.searchsorted(segments, segments)  # (T,) first frame of each frame's window
    flat = torch.arange(total, device=device).view(num_frames, num_tokens)
    anchor = flat[first]  # (T, N) the token each token may merge into
    unit = F.normalize(features.float(), dim=-1, eps=1e-12)
    similarity = (unit * unit[first]).sum(-1).masked_fill(anchor == flat, -torch.inf)
    merged = similarity.flatten().sort(descending=True, stable=True).indices[: total - max(count, num_tokens)]
    owner = flat.flatten().scatter(0, merged, anchor.flatten()[merged])  # (T * N,)
    if count < num_tokens:  # one window: pool its first frame's grid, which holds every token now
        cells = grid_cells(grid, count, device)
        first_of_cell = torch.full((count,), num_tokens, device=device).scatter_reduce(
            0, cells, torch.arange(num_tokens, device=device), "amin"
        )
        owner = first_of_cell[cells[owner % num_tokens]]
    # Each owner is its token's first member: number the `count` owners in increasing order.
    owns = torch.zeros(total, dtype=torch.long, device=device).scatter_(0, owner, 1)
    labels = (owns.cumsum(0) - 1)[owner].view(num_frames, num_tokens)
    return _reduced(features, labels, segments, grid, count)


def grid_cells(grid: tuple[int, int], count: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(H * W,) cell of each position when an H x W grid is cut into `count` near-equal
    rectangles: bands of rows, each cut into runs of columns; cells numbered row-major."""
    height, width = grid
    if not 1 <= count <= height * width:
        raise ValueError(f"cannot cut a {height} x {width} grid into {count} cells")
    bands = min(height, count, max(1, round(math.sqrt(count * height / width))))
    while bands * width < count:
        bands += 1
    # `allocate` of equal bands: count // bands cells each, one more in the first count % bands.
    cells, more = divmod(count, bands)
    band = _runs(height, bands, device)[:, None]  # (H, 1)
    starts = band * cells + band.clamp(max=more)  # (H, 1) first cell of each row's band
    columns = torch.where(band < more, _runs(width, cells + 1, device), _runs(width, cells, device))
    return (starts + columns).flatten()


def _runs(length: int, parts: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(length,) run of each item when `length` items are cut into `parts` near-equal runs in
    order, as `torch.tensor_split` cuts them: the first length % parts runs one item longer."""
    items = torch.arange(length, device=device)
    size, longer = divmod(length, parts)
    edge = longer * (size + 1)  # items before it are in the longer runs
    return torch.where(items < edge, items // (size + 1), longer + (items - edge) // max(size, 1))


def _reduced(
    features: torch.Tensor, labels: torch.Tensor, segments: torch.Tensor, grid: tuple[int, int], count: int
) -> MergeResult:
    """The MergeResult of a labelling into `count` tokens. labels: (T, N) the token each original
    token goes into, numbered in the order of their first members, -1 where it is dropped;
    segments: (T,). Each token is the mean of its members, static when they span more than one
    frame, and in the budget set of its first member's frame."""
    num_frames, num_tokens, channels = features.shape
    device = features.device
    # Dropped tokens go into one extra token, `count`, cut off at the end: no boolean mask.
    into = labels.flatten().where(labels.flatten() >= 0, count)
    tokens = cluster_means(features.reshape(1, -1, channels), into[None], count + 1)[0, :count]
    frame = torch.arange(num_frames * num_tokens, device=device) // num_tokens
    first = torch.full((count + 1,), num_frames, device=device).scatter_reduce(0, into, frame, "amin")[:count]
    last = torch.zeros(count + 1, dtype=torch.long, device=device).scatter_reduce(0, into, frame, "amax")[
        :count
    ]
    static = (last > first)[labels.clamp(min=0)] & (labels >= 0)
    return MergeResult(tokens, labels, segments, static, first, grid)


# ---- the registry --------------------------------------------------------------------------

METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("prunevid", merge_tokens, question_guided),
        Method("stage1", merge_tokens, None),
        Method("stage2", None, question_guided),
        Method("fastv", None, fastv),
        Method("random", None, random_tokens),
        Method("uniform", uniform_pool, None, needs_retention=True),
        Method("evs", evs, None, needs_retention=True),
        Method("dycoke", dycoke, None, needs_retention=True),
    )
}


def get_method(method: str | Method) -> Method:
    """A method by name (or itself); an unknown name is an error listing the known ones."""
    if isinstance(method, Method):
        return method
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[method]
