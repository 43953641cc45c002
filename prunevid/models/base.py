"""What every family adapter shares: the runtime a patched model carries, the class swap, and
the video prefill (stage 1 into a shorter prompt, then `decoder.prefill` with stage 2).

An adapter only says where its video tokens are, how they form per-time-step grids, and which
positions they have; see `llava_onevision.py` and `qwen2_vl.py`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..baselines import METHODS, Method
from ..cluster import cluster_means
from ..config import PruneVidConfig
from ..lru import ByteLRU, shared_cache
from ..merge import MergeResult, merge_tokens
from ..select import keep_counts, kept_total, question_guided
from ..trace import PendingTrace, PruningTrace, materialize
from .decoder import DecodeState, VisualSpan, positions_from_mask, prefill
from .timing import Interval

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
    "per_step_budget",
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
    traces: list[PendingTrace | PruningTrace | None] | None = None
    stage1_cache: ByteLRU = field(default_factory=shared_cache)

    def decode_arguments(
        self, cache, num_new: int, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A decode step on the pruned cache gets the physical mask and the logical positions;
        any other call keeps its own arguments."""
        if self.state is None or cache is None or cache is not self.state.cache:
            return attention_mask, position_ids
        return self.state.decode_inputs(attention_mask, position_ids, num_new)

    def read_traces(self) -> list[PruningTrace | None] | None:
        """The last prefill's traces as numpy, copied from the device in one transfer on the
        first read (generate() leaves them on the device)."""
        if self.traces is not None:
            self.traces = materialize(self.traces)
        return self.traces

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
    extras: torch.Tensor | None = None  # (D, T * N, C) features merged alike (deepstack levels)


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
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, DynamicCache | None]:
    """Prefill with PruneVid. embeds: (B, L, C) stock prompt embeddings; mask: (B, L) or None
    (no padding); is_video: (B, L) its video placeholders (at most one video per row, filled in
    order by `videos`: one run, or one run per time step).

    positions: the stock positions (R, B, L) for M-RoPE models, kept for every token and given
    to each merged token from its representative member (the first of its members in time,
    then row-major order); None for 1-D RoPE, where the shorter prompt is numbered afresh
    (ALGORITHM.md §4.5); then `position_ids` (B, L) are the caller's positions of the unpruned
    prompt (generate()'s), which decode steps map onto the shorter one. Sets `runtime.state` and
    `runtime.traces` (device tensors until read); returns the final hidden states (B, P, C) of
    the kept tokens and the cache. Reads nothing back to the host beyond the kept counts.
    """
    config = runtime.config
    check_cache(cache)
    rows = video_rows(is_video, len(videos))
    merges, stage1_s = [], []
    for video in videos:
        timer = Interval(embeds.device)
        merge, reused = runtime.merge(video.tokens, video.grid)
        stage1_s.append((timer.stop(), reused))
        merges.append(merge)
    layout = _layout(is_video, mask, rows, videos, merges)
    spans: list[VisualSpan | None] = [None] * embeds.shape[0]
    for b, video, merge, index, question_start in zip(
        rows, videos, merges, layout.index, layout.question_start
    ):
        num_frames, num_visual = video.tokens.shape[0], video.tokens.shape[:2].numel()
        # Counted on the device (an upload of host-known counts would wait for the GPU too); a
        # video has at most a static set per segment and a dynamic set per frame: 2T bounds them.
        counts = keep_counts(merge.groups, config, num_visual, num_sets=2 * num_frames)
        num_kept = kept_total(config, num_visual, merge.num_tokens, merge.set_sizes)
        if num_kept is None:  # a paper-mode reducer that reported no set sizes: count on the host
            num_kept = min(int(counts.sum()), merge.num_tokens)
        spans[b] = VisualSpan(index, merge.groups, counts, question_start, num_kept)
    merged = [
        torch.cat([m.tokens.to(embeds.dtype), v.suffix.to(embeds.dtype)]) for v, m in zip(videos, merges)
    ]
    logical = layout.gather(embeds, merged)
    mask = layout.mask(mask)
    if positions is None:
        positions = _numbered(mask, logical)
        offset = None if position_ids is None else (position_ids[:, -1] - positions[:, -1])[:, None]
    else:
        positions, offset = (
            positions.gather(-1, layout.position_source.expand(positions.shape[0], -1, -1)),
            None,
        )
    residuals = _merged_extras(layout, embeds, videos, merges)
    if cache is None and use_cache is not False:
        cache = DynamicCache(config=lm.config)
    timer = Interval(embeds.device)
    rule = runtime.method.select or question_guided
    hidden, selection = prefill(
        lm, logical, mask, positions, cache, spans, config, rule, residuals, layout.lengths
    )
    prefill_s = timer.stop()

    last = positions[..., -1]  # every row ends with a real token (left padding)
    runtime.state = None if cache is None else DecodeState(cache, selection.mask, last + 1, offset)
    runtime.traces = [None] * embeds.shape[0]
    for b, merge, (seconds, reused) in zip(rows, merges, stage1_s):
        runtime.traces[b] = PendingTrace.of(
            merge,
            kept=selection.visual_kept[b],
            scores=selection.visual_scores[b],
            timings={"stage1_s": seconds, "stage2_s": selection.seconds, "llm_prefill_s": prefill_s},
            config=config.to_dict(),
            stage1_reused=reused,
            method=runtime.method.name,
            num_layers=len(lm.layers),
            question_attention=selection.visual_attention[b],
        )
    return hidden, cache


def _merged_extras(
    layout: _Layout, embeds: torch.Tensor, videos: list[VideoGrid], merges: list[MergeResult]
) -> list[torch.Tensor] | None:
    """(B, W, C) per level of the videos' `extras`: merged as their tokens were and laid out
    as the logical prompt (zero elsewhere), every level in one gather; None without extras."""
    if videos[0].extras is None:
        return None
    levels, channels = videos[0].extras.shape[0], embeds.shape[-1]
    own = [  # (E_b, D * C): each token's levels side by side
        torch.cat([merged_means(v.extras, m), v.extras.new_zeros(levels, len(v.suffix), channels)], 1)
        .transpose(0, 1)
        .reshape(-1, levels * channels)
        .to(embeds.dtype)
        for v, m in zip(videos, merges)
    ]
    laid_out = layout.gather(embeds.new_zeros(*embeds.shape[:2], levels * channels), own)
    return list(laid_out.view(*laid_out.shape[:2], levels, channels).unbind(2))


def video_rows(is_video: torch.Tensor, num_videos: int) -> list[int]:
    """The rows of a (B, L) placeholder mask that hold a video: all of them when there is one
    video per row (nothing read back), else one read."""
    if num_videos == is_video.shape[0]:
        return list(range(num_videos))
    return [b for b, has in enumerate(is_video.any(1).tolist()) if has]


def video_placeholders(model: torch.nn.Module, input_ids, inputs_embeds: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the video placeholder tokens, from the ids (or, without them, by stock's
    comparison of the embeddings). Unlike stock's `get_placeholder_mask`, whose count check reads
    the count twice, nothing is read: the caller checks the count (`check_placeholders`) in a
    read it makes anyway."""
    if input_ids is not None:
        return (input_ids == model.config.video_token_id).to(inputs_embeds.device)
    return model.get_placeholder_mask(None, inputs_embeds)[1][..., 0]


def check_placeholders(count: int, num_features: int) -> None:
    """Stock's check that a prompt has one video placeholder per video feature."""
    if count != num_features:
        raise ValueError(
            f"Video features and video tokens do not match, tokens: {count}, features: {num_features}"
        )


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


def resize_float(frames: np.ndarray, size: tuple[int, int], device: torch.device | str) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, h, w) float32 whole levels in [0, 255] on `device`: the
    frames cross as uint8 (a quarter of the bytes) and are resized there, bicubic with antialias,
    as `resize_uint8` does on the CPU: width first, then height, rounded and clipped after each
    pass (clipping between the passes matters: bicubic overshoots on sharp edges). It differs
    from `resize_uint8`'s fixed-point weights by at most 2 levels on under 1.1% of the values
    (measured on the processor fixtures and on noise: tests/test_bench_gpu_ready.py)."""
    video = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.uint8)).to(device)
    video = video.permute(0, 3, 1, 2).float()
    for step in ((video.shape[2], size[1]), tuple(size)):
        if tuple(video.shape[-2:]) != step:
            video = torch.nn.functional.interpolate(video, size=step, mode="bicubic", antialias=True)
            video = video.round_().clamp_(0, 255)
    return video


def frame_pixels(
    frames: np.ndarray,
    size: tuple[int, int],
    mean,
    std,
    rescale: float,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, h, w) float32 normalised pixels. Without a `device`, on the
    CPU and equal to the processors' pixels (`resize_uint8`); with one, resized and normalised
    there (`resize_float`), so that a GPU does not wait for the host's resize."""
    if device is None:
        return normalize(resize_uint8(frames, size), mean, std, rescale)
    return normalize(resize_float(frames, size, device), mean, std, rescale)


def for_device(processing, device: torch.device | str):
    """A family's frame preprocessing (`FrameProcessing`, `VideoPatchify`) that runs on `device`
    when that is a GPU; for the CPU, `processing` itself (the processors' exact pixels)."""
    device = torch.device(device)
    return processing if device.type == "cpu" else replace(processing, device=str(device))


def normalize(video: torch.Tensor, mean, std, rescale: float) -> torch.Tensor:
    """(x * rescale - mean) / std in the processors' fused form, (x - mean / rescale) / (std / rescale)."""
    mean = torch.tensor(mean, dtype=torch.float32, device=video.device)[:, None, None] * (1.0 / rescale)
    std = torch.tensor(std, dtype=torch.float32, device=video.device)[:, None, None] * (1.0 / rescale)
    return (video.float() - mean) / std


@dataclass
class _Layout:
    """Where every token of the logical prompt (stage 1's tokens in place of the video
    placeholders) comes from, right-aligned in W columns (a row's left padding first).

    source: (B, W) index into a table of a row's stock tokens (L), then its video's own tokens
    (merged tokens, then suffix; `extra` columns, the longest video's), then one padding slot;
    position_source: (B, W) the stock token whose position each takes (a merged token: its
    first member's placeholder); lengths: each row's real tokens (W the longest); per video row (`rows`):
    index (M,) its merged tokens' columns, question_start () the first column after the video.
    """

    source: torch.Tensor
    position_source: torch.Tensor
    length: int
    extra: int
    lengths: list[int]
    rows: list[int]
    index: list[torch.Tensor]
    question_start: list[torch.Tensor]

    def gather(self, stock: torch.Tensor, own: list[torch.Tensor]) -> torch.Tensor:
        """(B, L, C) stock rows and each video row's own (E_b, C) tokens -> (B, W, C)."""
        batch, _, channels = stock.shape
        table = stock.new_zeros(batch, self.extra + 1, channels)
        for b, tokens in zip(self.rows, own):
            table[b, : len(tokens)] = tokens
        table = torch.cat([stock, table], 1)
        return table.gather(1, self.source[..., None].expand(-1, -1, channels))

    def mask(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The logical prompt's (B, W) mask from the stock (B, L) one; None: no padding."""
        if mask is None and len(set(self.lengths)) == 1:
            return None
        if mask is None:
            mask = self.source.new_ones(self.source.shape[0], self.length)
        batch = mask.shape[0]
        table = torch.cat([mask, mask.new_ones(batch, self.extra), mask.new_zeros(batch, 1)], 1)
        return table.gather(1, self.source)


def _layout(
    is_video: torch.Tensor,
    mask: torch.Tensor | None,
    rows: list[int],
    videos: list[VideoGrid],
    merges: list[MergeResult],
) -> _Layout:
    """The logical prompt's layout from the (B, L) placeholder mask, on the device. Each row's
    length follows from its video's size and stage 1's count; a padded batch's padding is
    dropped (its real lengths: one read, for padded batches only)."""
    batch, length = is_video.shape
    extra = max(m.num_tokens + len(v.suffix) for v, m in zip(videos, merges))
    lengths = [length] * batch if mask is None else mask.sum(1).tolist()
    for b, video, merge in zip(rows, videos, merges):
        lengths[b] += merge.num_tokens - video.tokens.shape[:2].numel()
    width = max(lengths)
    pad_slot = length + extra
    source = is_video.new_full((batch, width), pad_slot, dtype=torch.long)
    position_source = torch.zeros_like(source)
    at = torch.arange(length, device=is_video.device)
    for b in set(range(batch)) - set(rows):  # rows without a video keep their real tokens
        real = torch.ones_like(is_video[b]) if mask is None else mask[b].bool()
        column = (width - real.flip(0).cumsum(0).flip(0)).where(real, width)
        source[b] = at.new_full((width + 1,), pad_slot).scatter_(0, column, at)[:width]
        position_source[b] = at.new_zeros(width + 1).scatter_(0, column, at)[:width]
    index, question_start = [], []
    for b, video, merge in zip(rows, videos, merges):
        real = None if mask is None else mask[b].bool()
        row, positions, columns, start = _place(is_video[b], real, video, merge, width, lengths[b], pad_slot)
        source[b], position_source[b] = row, positions
        index.append(columns)
        question_start.append(start)
    return _Layout(source, position_source, length, extra, lengths, rows, index, question_start)


def _place(
    flags: torch.Tensor,
    real: torch.Tensor | None,
    video: VideoGrid,
    merge: MergeResult,
    width: int,
    count: int,
    pad_slot: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row's layout. flags: (L,) its video placeholders: one run, or one run per time step
    (models that put text, e.g. timestamps, between frames), the suffix's placeholders last;
    real: (L,) its mask, None for no padding (padding is dropped); count: the row's tokens.

    Text and suffix tokens keep their order; each merged token goes into the run of its first
    member's time step (stage 1 emits them in that time order), before the run's suffix. The
    row is right-aligned in W columns. Returns its (W,) source and position source, its merged
    tokens' (M,) columns and the first column after the video ().
    """
    length = flags.shape[0]
    frames, per_frame = video.tokens.shape[:2]
    num_merged = merge.num_tokens
    at = torch.arange(length, device=flags.device)
    rank = flags.cumsum(0) - 1  # (L,) index of each placeholder among the video's
    suffix = flags & (rank >= frames * per_frame)
    stay = ~flags | suffix  # tokens that keep their place
    if real is not None:
        stay &= real
    starts = flags & ~torch.nn.functional.pad(flags[:-1], (1, 0))  # the previous token is no placeholder
    runs = starts.cumsum(0)  # (L,) runs begun up to each token
    run_start = at.new_zeros(frames + 1).scatter_(0, (runs - 1).clamp(max=frames).where(starts, frames), at)
    first = merge.first_members().to(flags.device)  # (M,) flat t * N + n of the first member
    single = runs[-1:] == 1  # one run for the whole video, else one per time step
    run_of = torch.where(single, 0, first // per_frame)  # (M,) each merged token's run
    run_begins = run_start.gather(0, run_of)  # (M,) its run's first placeholder
    stock_first = run_begins + torch.where(single, first, first % per_frame)
    # Every token that stays sorts by its index, every merged token by its run's first
    # placeholder (which does not stay), in order; what does not stay (key L) sorts last.
    keys = torch.cat([at.masked_fill(~stay, length), run_begins])  # (L + M,)
    order = keys.argsort(stable=True)
    own = rank + (length + num_merged - frames * per_frame)  # a suffix token's slot in the table
    sources = torch.cat([torch.where(suffix, own, at), length + torch.arange(num_merged, device=at.device)])
    padding = width - count
    source = torch.cat([at.new_full((padding,), pad_slot), sources[order[:count]]])
    positions = torch.cat([at.new_zeros(padding), torch.cat([at, stock_first])[order[:count]]])
    columns = order.argsort()[length:] + padding
    last = (at * flags).amax(0, keepdim=True)  # (1,) the video's last placeholder
    return source, positions, columns, padding + (keys <= last).sum()


def _numbered(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """1-D positions of a (B, W) prompt: generate()'s convention (`positions_from_mask`)."""
    if mask is None:
        return torch.arange(like.shape[1], device=like.device).expand(like.shape[0], -1)
    return positions_from_mask(mask)


def merged_means(features: torch.Tensor, merge: MergeResult) -> torch.Tensor:
    """(D, T * N, C) per-original-token features of D levels -> (D, M, C) the plain mean over
    each merged token's members: what stage 1 does to the tokens themselves (a merged token is
    its members' mean). Tokens dropped before the language model go to a spare cluster."""
    index = merge.assignment.flatten().to(features.device)
    spare = merge.num_tokens
    labels = index.where(index >= 0, spare)
    return cluster_means(features, labels.expand(len(features), -1), spare + 1)[:, :spare]
