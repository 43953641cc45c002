"""What every family adapter shares: the runtime a patched model carries, the class swap, and
the video prefill (stage 1 into a shorter prompt, then `decoder.prefill` with stage 2).

An adapter only says where its video tokens are, how they form per-time-step grids, and which
positions they have; see `llava_onevision.py` and `qwen2_vl.py`.
"""

from __future__ import annotations

import functools
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers.cache_utils import DynamicCache

from ..config import PruneVidConfig
from ..merge import MergeResult, merge_tokens
from ..select import question_guided
from ..trace import PruningTrace
from .decoder import DecodeState, Rule, VisualSpan, positions_from_mask, prefill

STAGE1_FIELDS = (
    "stage1",
    "tau",
    "temporal_segment_ratio",
    "cluster_ratio",
    "k",
    "spatial_merge_threshold",
    "dpc_noise",
    "seed",
)


@dataclass
class Runtime:
    """What a patched model carries: its settings, the decode state, the last traces and a few
    recent stage-1 results (stage 1 does not depend on the question)."""

    config: PruneVidConfig
    rule: Rule = question_guided
    state: DecodeState | None = None
    traces: list[PruningTrace | None] | None = None
    stage1_cache: OrderedDict = field(default_factory=OrderedDict)
    stage1_cache_size: int = 4

    def merge(self, tokens: torch.Tensor, grid: tuple[int, int]) -> tuple[MergeResult, bool]:
        """Stage 1 on (T, N, C) tokens, reused when the same feature tensor comes back (an app
        asking a follow-up question passes its cached features). Returns (result, reused)."""
        settings = tuple(getattr(self.config, name) for name in STAGE1_FIELDS)
        # The entry holds `tokens`, so its memory cannot be reused by another tensor meanwhile.
        key = (tokens.data_ptr(), tuple(tokens.shape), tokens.dtype, grid, settings)
        if key in self.stage1_cache:
            self.stage1_cache.move_to_end(key)
            return self.stage1_cache[key][1], True
        merge = merge_tokens(tokens, self.config, grid)
        self.stage1_cache[key] = (tokens, merge)
        while len(self.stage1_cache) > self.stage1_cache_size:
            self.stage1_cache.popitem(last=False)
        return merge, False


@dataclass
class VideoGrid:
    """One video's tokens as the language model would receive them.

    tokens: (T, N, C) per time step, N = H * W row-major; grid: (H, W);
    suffix: (k, C) tokens the model appends after the video (LLaVA-OneVision's newline), kept.
    """

    tokens: torch.Tensor
    grid: tuple[int, int]
    suffix: torch.Tensor


def patch_inner(
    inner: torch.nn.Module, pruned: type, config: PruneVidConfig, rule: Rule, num_layers: int
) -> None:
    """Make `inner` an instance of a subclass of its class that mixes in `pruned`'s forward and
    give it a runtime; patching again only changes the settings (cached stage-1 results stay)."""
    if config.selected_layer >= num_layers:
        raise ValueError(
            f"selected_layer must be in [0, {num_layers - 1}] for this model ({num_layers} decoder layers), "
            f"got {config.selected_layer}"
        )
    if isinstance(inner, pruned):
        inner._prunevid.config, inner._prunevid.rule = config, rule
        return
    stock = type(inner)
    inner._prunevid_stock_class = stock
    inner.__class__ = pruned if pruned.__bases__ == (stock,) else _mixed(pruned, stock)
    inner._prunevid = Runtime(config, rule)


@functools.cache
def _mixed(pruned: type, stock: type) -> type:
    return type(f"PruneVid{stock.__name__}", (pruned, stock), {})


def restore_class(inner: torch.nn.Module) -> None:
    stock = getattr(inner, "_prunevid_stock_class", None)
    if stock is not None:
        inner.__class__ = stock
        del inner._prunevid, inner._prunevid_stock_class


def video_prefill(
    runtime: Runtime,
    lm: torch.nn.Module,
    embeds: torch.Tensor,
    mask: torch.Tensor | None,
    is_video: torch.Tensor,
    videos: list[VideoGrid],
    positions: torch.Tensor | None,
    cache,
    use_cache: bool | None,
) -> tuple[torch.Tensor, DynamicCache | None]:
    """Prefill with PruneVid. embeds: (B, L, C) stock prompt embeddings; is_video: (B, L) its
    video placeholders (at most one contiguous run per row, filled in order by `videos`).

    positions: the stock positions (R, B, L) for M-RoPE models, kept for every token and given
    to each merged token from its representative member (the first of its members in time,
    then row-major order); None for 1-D RoPE, where the shorter prompt is numbered afresh
    (ALGORITHM.md §4.5). Sets `runtime.state` and `runtime.traces`; returns the final hidden
    states (B, P, C) of the kept tokens and the cache.
    """
    config = runtime.config
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    rows, row_positions, spans, merges, stage1_s = [], [], [], [], []
    pending = iter(videos)
    for b in range(embeds.shape[0]):
        real = mask[b].bool()
        where = is_video[b].nonzero().squeeze(1)
        pos = positions[:, b] if positions is not None else None  # (R, L)
        if where.numel() == 0:
            rows.append(embeds[b, real])
            row_positions.append(None if pos is None else pos[:, real])
            spans.append(None)
            merges.append(None)
            continue
        start, end = int(where[0]), int(where[-1]) + 1
        if end - start != where.numel() or not real[start:end].all():
            raise ValueError("each prompt must hold at most one video, as one contiguous run of video tokens")
        video = next(pending)
        tic = _clock(embeds)
        merge, reused = runtime.merge(video.tokens, video.grid)
        stage1_s.append((_clock(embeds) - tic, reused))
        before, after = real.clone(), real.clone()
        before[start:], after[:end] = False, False
        rows.append(
            torch.cat([embeds[b, before], merge.tokens.to(embeds.dtype), video.suffix, embeds[b, after]])
        )
        if pos is not None:
            video_pos = pos[:, start:end]
            visual = video_pos[:, _representatives(merge)]
            suffix = video_pos[:, video_pos.shape[1] - len(video.suffix) :]
            row_positions.append(torch.cat([pos[:, before], visual, suffix, pos[:, after]], dim=1))
        n_before = int(before.sum())
        spans.append(VisualSpan(n_before, merge.groups, n_before + merge.num_tokens + len(video.suffix)))
        merges.append(merge)

    embeds, mask, pads = _left_pad_rows(rows)
    spans = [
        None if s is None else VisualSpan(s.start + p, s.groups, s.question_start + p)
        for s, p in zip(spans, pads)
    ]
    if positions is None:
        positions = positions_from_mask(mask)
    else:
        positions = torch.stack(
            [torch.cat([p.new_zeros(p.shape[0], pad), p], dim=1) for p, pad in zip(row_positions, pads)], 1
        )
    if cache is None and use_cache is not False:
        cache = DynamicCache(config=lm.config)
    tic = _clock(embeds)
    hidden, selection = prefill(lm, embeds, mask, positions, cache, spans, config, runtime.rule)
    prefill_s = _clock(embeds) - tic

    last = positions[..., -1]  # every row ends with a real token (left padding)
    runtime.state = None if cache is None else DecodeState(cache, selection.mask, last + 1)
    stage1 = iter(stage1_s)
    runtime.traces = []
    for b, merge in enumerate(merges):
        if merge is None:
            runtime.traces.append(None)
            continue
        seconds, reused = next(stage1)
        scores = selection.visual_scores[b]
        runtime.traces.append(
            PruningTrace.from_stages(
                merge,
                kept=selection.visual_kept[b].cpu().numpy(),
                scores=None if scores is None else scores.float().cpu().numpy(),
                timings={"stage1_s": seconds, "stage2_s": selection.seconds, "llm_prefill_s": prefill_s},
                config=config.to_dict(),
                stage1_reused=reused,
            )
        )
    return hidden, cache


def resize_uint8(frames: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, h, w) uint8, bicubic with antialias.

    Resizing the uint8 tensor itself uses torch's fixed-point two-pass kernel, which rounds
    between the passes: what torchvision does on the CPU, so the pixels match the processors'.
    """
    video = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.uint8)).permute(0, 3, 1, 2)
    if tuple(video.shape[-2:]) == tuple(size):
        return video
    return torch.nn.functional.interpolate(video, size=size, mode="bicubic", antialias=True)


def normalize(video: torch.Tensor, mean, std, rescale: float) -> torch.Tensor:
    """(x * rescale - mean) / std in the processors' fused form, (x - mean / rescale) / (std / rescale)."""
    mean = torch.tensor(mean, dtype=torch.float32)[:, None, None] * (1.0 / rescale)
    std = torch.tensor(std, dtype=torch.float32)[:, None, None] * (1.0 / rescale)
    return (video.float() - mean) / std


def _representatives(merge: MergeResult) -> torch.Tensor:
    """For each merged token, the flat (t * N + n) index of its first member."""
    flat = merge.assignment.flatten()
    first = torch.full((merge.num_tokens,), flat.numel(), dtype=torch.long, device=flat.device)
    return first.scatter_reduce(0, flat, torch.arange(flat.numel(), device=flat.device), "amin")


def _left_pad_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Stack (L_b, C) rows into (B, L, C) with left padding; returns embeds, mask, pads."""
    width = max(len(r) for r in rows)
    pads = [width - len(r) for r in rows]
    embeds = torch.stack([torch.cat([r.new_zeros(p, r.shape[1]), r]) for r, p in zip(rows, pads)])
    mask = torch.stack([torch.arange(width, device=embeds.device) >= p for p in pads]).long()
    return embeds, mask, pads


def _clock(x: torch.Tensor) -> float:
    """Wall time, after the device has finished its queued work."""
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return time.perf_counter()
