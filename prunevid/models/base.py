"""What every family adapter shares: the runtime a patched model carries, the class swap, and
the video prefill (stage 1 into a shorter prompt, then `decoder.prefill` with stage 2).

An adapter only says where its video tokens are, how they form per-time-step grids, and which
positions they have; see `llava_onevision.py` and `qwen2_vl.py`.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..baselines import METHODS, Method
from ..cluster import cluster_means
from ..config import PruneVidConfig
from ..lru import ByteLRU, shared_cache
from ..merge import MergeResult, merge_tokens
from ..select import keep_counts, question_guided
from ..trace import PruningTrace, segment_similarity
from .decoder import DecodeState, Selection, VisualSpan, positions_from_mask, prefill

STAGE1_FIELDS = (
    "stage1",
    "tau",
    "temporal_segment_ratio",
    "cluster_ratio",
    "k",
    "spatial_merge_threshold",
    "dpc_noise",
    "seed",
    "centre",
    "retention",
    "stage1_share",
    "stage2",  # under a retention, stage 1's count depends on whether stage 2 runs
)


@dataclass
class Runtime:
    """What a patched model carries: its settings and method, the decode state, the last traces
    and recent stage-1 results (stage 1 does not depend on the question), in the process's
    shared byte budget."""

    config: PruneVidConfig
    method: Method = METHODS["prunevid"]
    state: DecodeState | None = None
    traces: list[PruningTrace | None] | None = None
    stage1_cache: ByteLRU = field(default_factory=shared_cache)

    def decode_arguments(
        self, cache, num_new: int, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A decode step on the pruned cache gets the physical mask and the logical positions;
        any other call keeps its own arguments."""
        if self.state is None or cache is None or cache is not self.state.cache:
            return attention_mask, position_ids
        return self.state.decode_inputs(attention_mask, num_new)

    def merge(self, tokens: torch.Tensor, grid: tuple[int, int]) -> tuple[MergeResult, bool]:
        """Stage 1 on (T, N, C) tokens, reused when the same feature tensor comes back (an app
        asking a follow-up question passes its cached features; never under `torch.inference_mode`,
        whose tensors keep no version counter). Returns (result, reused)."""
        reduce = self.method.reduce if self.config.stage1 and self.method.reduce else merge_tokens
        if tokens.is_inference():
            return reduce(tokens, self.config, grid), False
        settings = (self.method.name, *(getattr(self.config, name) for name in STAGE1_FIELDS))
        # The entry holds `tokens`, so its memory cannot be reused by another tensor meanwhile;
        # `_version` changes on every in-place write, so a refilled buffer is not taken for the old one.
        key = (
            "stage1",
            tokens.data_ptr(),
            tokens._version,
            tuple(tokens.shape),
            tokens.stride(),
            tokens.dtype,
            grid,
            settings,
        )
        cached = self.stage1_cache.get(key)
        if cached is not None:
            return cached[1], True
        merge = reduce(tokens, self.config, grid)
        self.stage1_cache.put(key, (tokens, merge))
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
    extras: list[torch.Tensor] = field(default_factory=list)  # (T * N, C) features merged alike (deepstack)


def patch_inner(
    inner: torch.nn.Module, pruned: type, config: PruneVidConfig, method: Method, num_layers: int
) -> None:
    """Make `inner` an instance of a subclass of its class that mixes in `pruned`'s forward and
    give it a runtime; patching again only changes the settings (cached stage-1 results stay).
    `config` is the method's own (`Method.configure`)."""
    if config.stage2 and config.selected_layer >= num_layers:
        raise ValueError(
            f"selected_layer must be in [0, {num_layers - 1}] for this model ({num_layers} decoder layers), "
            f"got {config.selected_layer}"
        )
    if isinstance(inner, pruned):
        inner._prunevid.config, inner._prunevid.method = config, method
        return
    stock = type(inner)
    inner._prunevid_stock_class = stock
    inner.__class__ = pruned if pruned.__bases__ == (stock,) else _mixed(pruned, stock)
    inner._prunevid = Runtime(config, method)


@functools.cache
def _mixed(pruned: type, stock: type) -> type:
    return type(f"PruneVid{stock.__name__}", (pruned, stock), {})


class GenerateGuard:
    """Mixed into the outer model by `patch`: `generate(use_cache=False)` would run a full
    prefill at every step, pruning the video again with the tokens generated so far counted as
    question, and so silently decode differently from the cached path; it fails instead."""

    def generate(self, *args, **kwargs):
        settings = kwargs.get("generation_config") or self.generation_config
        if kwargs.get("use_cache", settings.use_cache) is False:
            raise ValueError(
                "PruneVid needs generate() with use_cache=True: it prunes the KV cache once, and "
                "without a cache every step would prune the video again with the generated tokens as question."
            )
        return super().generate(*args, **kwargs)


def guard_generate(model: torch.nn.Module) -> None:
    """Mix `GenerateGuard` into `model`'s class, under the stock class's name (a saved config
    keeps its architecture); `restore_class` undoes it."""
    if isinstance(model, GenerateGuard):
        return
    model._prunevid_stock_class = stock = type(model)
    model.__class__ = _guarded(stock)


@functools.cache
def _guarded(stock: type) -> type:
    return type(stock.__name__, (GenerateGuard, stock), {"__module__": stock.__module__})


def restore_class(module: torch.nn.Module) -> None:
    stock = getattr(module, "_prunevid_stock_class", None)
    if stock is not None:
        module.__class__ = stock
        del module._prunevid_stock_class
        if "_prunevid" in module.__dict__:
            del module._prunevid


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
    check_cache(cache)
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    rows, spans, merges, stage1_s = [], [], [], []
    pending = iter(videos)
    for b in range(embeds.shape[0]):
        real = mask[b].bool()
        pos = positions[:, b] if positions is not None else None  # (R, L)
        if not is_video[b].any():
            rows.append(_Row(embeds[b, real], None if pos is None else pos[:, real], []))
            spans.append(None)
            merges.append(None)
            continue
        video = next(pending)
        tic = clock(embeds.device)
        merge, reused = runtime.merge(video.tokens, video.grid)
        stage1_s.append((clock(embeds.device) - tic, reused))
        row, span = _splice(embeds[b], real, is_video[b], pos, video, merge, config)
        rows.append(row)
        spans.append(span)
        merges.append(merge)

    embeds, mask, pads = _left_pad_rows([r.embeds for r in rows])
    spans = [None if s is None else s.shifted(p) for s, p in zip(spans, pads)]
    if positions is None:
        positions = positions_from_mask(mask)
    else:
        positions = torch.stack([F.pad(r.positions, (pad, 0)) for r, pad in zip(rows, pads)], 1)
    num_extras = max(len(r.extras) for r in rows)
    residuals = [
        torch.stack(
            [
                F.pad(r.extras[i] if r.extras else torch.zeros_like(r.embeds), (0, 0, pad, 0))
                for r, pad in zip(rows, pads)
            ]
        )
        for i in range(num_extras)
    ] or None
    if cache is None and use_cache is not False:
        cache = DynamicCache(config=lm.config)
    tic = clock(embeds.device)
    rule = runtime.method.select or question_guided
    hidden, selection = prefill(lm, embeds, mask, positions, cache, spans, config, rule, residuals)
    prefill_s = clock(embeds.device) - tic

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
                method=runtime.method.name,
                num_layers=len(lm.layers),
            )
        )
    record_facts(runtime.traces, merges, videos, selection, config)
    return hidden, cache


def record_facts(
    traces: list[PruningTrace | None],
    merges: list[MergeResult | None],
    videos: list[VideoGrid],
    selection: Selection,
    config: PruneVidConfig,
) -> None:
    """Add what `PruningTrace.explain` reads beyond the decisions to each video's trace: the
    static similarity of every token, the stage-2 budget sets, and the question rows' attention
    to each stage-1 token (max over heads) where stage 2 ran."""
    grids = iter(videos)
    attentions = selection.visual_attention or [None] * len(traces)
    for trace, merge, attention in zip(traces, merges, attentions):
        if trace is None or merge is None:
            continue
        tokens = next(grids).tokens  # (T, N, C)
        similarity = segment_similarity(tokens, merge.segments.to(tokens.device), config.centre)
        trace.similarity = similarity.cpu().numpy().reshape(trace.static.shape)
        trace.group = merge.groups.cpu().numpy()
        trace.question_attention = None if attention is None else attention.float().cpu().numpy()


def check_cache(cache) -> None:
    """Stage 2 crops the cache in place and decoding reads it through a 2-D mask: only a
    DynamicCache of full-attention layers can do that (a StaticCache, e.g. from
    `generate(cache_implementation="static")`, gets a 4-D mask and fixed slots)."""
    if cache is not None and not all(type(layer) is DynamicLayer for layer in cache.layers):
        kinds = sorted({type(layer).__name__ for layer in cache.layers})
        raise ValueError(
            f"PruneVid needs a DynamicCache of full-attention layers, not a {type(cache).__name__} "
            f"({', '.join(kinds)}): leave generate()'s cache_implementation unset."
        )


def chat_prompt(tokenizer, question: str, video: str, fallback: str) -> str:
    """The user turn (one video, then `question`) and the assistant's tag, as text.

    In the checkpoint's own chat template when the tokenizer carries one that renders the
    video item as `video` exactly once; otherwise (no template, or a text-only one, as the
    language model's tokenizer often carries) in our built-in `fallback` format.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # a text-only template that cannot render a list of content items
            text = ""
        if isinstance(text, str) and text.count(video) == 1:
            return text
    return fallback.format(question=question)


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


@dataclass
class _Row:
    """One sample's logical prompt: embeds (L, C), positions (R, L) or None, extras [(L, C)]."""

    embeds: torch.Tensor
    positions: torch.Tensor | None
    extras: list[torch.Tensor]


def _splice(
    embeds: torch.Tensor,
    real: torch.Tensor,
    is_video: torch.Tensor,
    positions: torch.Tensor | None,
    video: VideoGrid,
    merge: MergeResult,
    config: PruneVidConfig,
) -> tuple[_Row, VisualSpan]:
    """Replace one sample's video placeholders by stage 1's merged tokens.

    embeds: (L, C), real / is_video: (L,), positions: (R, L) or None. The placeholders form one
    run, or one run per time step (models that put text, e.g. timestamps, between frames); then
    each merged token goes into the run of its first member's time step. The video's suffix
    tokens (the last placeholders of its last run) stay. Text keeps its place and positions;
    merged tokens take their first member's positions.
    """
    runs = runs_of(is_video)
    num_frames = video.tokens.shape[0]
    first = merge.first_members()  # (M,) flat t * N + n of each merged token's first member
    if len(runs) == 1:
        run_of = torch.zeros_like(first)
    elif len(runs) == num_frames:
        run_of = first // video.tokens.shape[1]
    else:
        raise ValueError("a video's placeholders must form one run, or one run per frame")
    if not real[is_video].all():
        raise ValueError("video placeholders cannot be padding")
    video_positions = None if positions is None else positions[:, is_video]  # (R, T * N + k)
    extras = [merged_means(x, merge) for x in video.extras]

    pieces, piece_positions, piece_extras, visual = [], [], [], []
    cursor, length = 0, 0
    for r, (start, end) in enumerate(runs):
        text = torch.zeros_like(real)
        text[cursor:start] = real[cursor:start]
        members = (run_of == r).nonzero().squeeze(1)
        members_suffix = len(video.suffix) if r == len(runs) - 1 else 0
        count_text = int(text.sum())
        visual.append(torch.arange(length + count_text, length + count_text + len(members)))
        pieces += [
            embeds[text],
            merge.tokens[members].to(embeds.dtype),
            video.suffix if members_suffix else embeds[:0],
        ]
        if positions is not None:
            tail = (
                video_positions[:, video_positions.shape[1] - members_suffix :]
                if members_suffix
                else positions[:, :0]
            )
            piece_positions += [positions[:, text], video_positions[:, first[members]], tail]
        piece_extras.append((count_text, members, members_suffix))
        length += count_text + len(members) + members_suffix
        cursor = end
    after = torch.zeros_like(real)
    after[cursor:] = real[cursor:]
    pieces.append(embeds[after])
    if positions is not None:
        piece_positions.append(positions[:, after])
    row_extras = [_extra_row(x, piece_extras, int(after.sum()), embeds) for x in extras]
    # Stage 1 emits tokens in time order of their first member, so the runs take consecutive
    # merged tokens and the visual tokens stay in merged-token order (as the trace assumes).
    assert bool((run_of.diff() >= 0).all()), "stage-1 output must be in time order"
    counts = keep_counts(merge.groups, config, video.tokens.shape[:2].numel())
    span = VisualSpan(torch.cat(visual).to(embeds.device), merge.groups, counts, length)
    row = _Row(
        torch.cat(pieces), None if positions is None else torch.cat(piece_positions, dim=1), row_extras
    )
    return row, span


def _extra_row(
    merged: torch.Tensor, layout: list[tuple[int, torch.Tensor, int]], tail: int, like: torch.Tensor
) -> torch.Tensor:
    """A (L, C) row that holds `merged` (M, C) at the visual tokens and zeros elsewhere."""
    parts = []
    for count_text, members, count_suffix in layout:
        parts += [
            like.new_zeros(count_text, like.shape[1]),
            merged[members].to(like.dtype),
            like.new_zeros(count_suffix, like.shape[1]),
        ]
    parts.append(like.new_zeros(tail, like.shape[1]))
    return torch.cat(parts)


def merged_means(features: torch.Tensor, merge: MergeResult) -> torch.Tensor:
    """(T * N, C) per-original-token features -> (M, C) the plain mean over each merged token's
    members: what stage 1 does to the tokens themselves (a merged token is its members' mean)."""
    index = merge.assignment.flatten().to(features.device)
    kept = index >= 0
    return cluster_means(features[kept][None], index[kept][None], merge.num_tokens)[0]


def runs_of(flags: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of True in a (L,) bool tensor."""
    edges = torch.diff(F.pad(flags.long(), (1, 1))).nonzero().squeeze(1).tolist()
    return list(zip(edges[::2], edges[1::2]))


def _left_pad_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Stack (L_b, C) rows into (B, L, C) with left padding; returns embeds, mask, pads."""
    width = max(len(r) for r in rows)
    pads = [width - len(r) for r in rows]
    embeds = torch.stack([torch.cat([r.new_zeros(p, r.shape[1]), r]) for r, p in zip(rows, pads)])
    mask = torch.stack([torch.arange(width, device=embeds.device) >= p for p in pads]).long()
    return embeds, mask, pads


def clock(device: torch.device) -> float:
    """Wall time, after `device` has finished its queued work (accelerators run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
