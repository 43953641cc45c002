"""PruneVid for `transformers.LlavaOnevisionForConditionalGeneration` (video input path).

The patch swaps a subclass onto the inner `LlavaOnevisionModel` whose `forward` does three
things and otherwise defers to the stock one:

* prefill with a video: stage 1 on the pooled per-frame grids (T x 14 x 14 for the real
  models), the shorter visual span written into the prompt embeddings (the video's single
  trailing newline token kept), then the decoder stack with stage 2 (`decoder.prefill`);
* decode steps on that cache: the physical mask and the logical positions from `DecodeState`;
* anything else (text only, images): the stock forward, untouched.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel
from transformers.cache_utils import DynamicCache
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModelOutputWithPast

from ..config import PruneVidConfig
from ..merge import merge_tokens
from ..select import question_guided
from ..trace import PruningTrace
from .decoder import DecodeState, Rule, VisualSpan, positions_from_mask, prefill

# The chat format of the llava-hf LLaVA-OneVision checkpoints (their processor's template).
PROMPT = "<|im_start|>user <video>\n{question}<|im_end|><|im_start|>assistant\n"


@dataclass
class Runtime:
    """What a patched model carries: its settings, the decode state and the last traces."""

    config: PruneVidConfig
    rule: Rule = question_guided
    state: DecodeState | None = None
    traces: list[PruningTrace | None] | None = None


class PruneVidLlavaOnevisionModel(LlavaOnevisionModel):
    """The inner model with PruneVid; only swapped onto instances by `patch`."""

    _prunevid: Runtime

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_sizes_videos: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        mm_encoder_outputs: dict | None = None,
        **kwargs,
    ):
        runtime = self._prunevid
        encoded = mm_encoder_outputs or {}
        has_video = pixel_values_videos is not None or encoded.get("video") is not None
        if has_video and (cache is None or cache.get_seq_length() == 0):
            if pixel_values is not None or encoded.get("image") is not None:
                raise NotImplementedError("PruneVid handles prompts with a video and no image")
            return self._prefill(
                input_ids,
                pixel_values_videos,
                attention_mask,
                cache,
                inputs_embeds,
                use_cache,
                encoded,
                kwargs,
            )
        state = runtime.state
        if state is not None and cache is not None and cache is state.cache:
            num_new = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            attention_mask, position_ids = state.decode_inputs(attention_mask, num_new)
        return super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )

    def _prefill(
        self, input_ids, pixel_values_videos, attention_mask, cache, inputs_embeds, use_cache, encoded, kwargs
    ):
        runtime = self._prunevid
        config = runtime.config
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        video = encoded.get("video")
        if video is None:
            video = self.get_video_features(
                pixel_values_videos,
                vision_feature_layer=kwargs.get("vision_feature_layer"),
                vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
                return_dict=True,
            )
        features = video.pooler_output.to(inputs_embeds.device, inputs_embeds.dtype)  # (V, T*N + 1, C)
        _, is_video = self.get_placeholder_mask(
            input_ids, inputs_embeds, video_features=features.flatten(0, 1)
        )
        is_video = is_video[..., 0]
        if attention_mask is None:
            attention_mask = torch.ones(
                inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device
            )

        grid = pooled_grid(self.config)
        rows, spans, merges, stage1_s = [], [], [], []
        videos = iter(features)
        for b in range(inputs_embeds.shape[0]):
            real = attention_mask[b].bool()
            where = is_video[b].nonzero().squeeze(1)
            if where.numel() == 0:
                rows.append(inputs_embeds[b, real])
                spans.append(None)
                merges.append(None)
                continue
            start, end = int(where[0]), int(where[-1]) + 1
            tokens = next(videos)
            if end - start != where.numel() or not real[start:end].all():
                raise ValueError(
                    "each prompt must hold at most one video, as one contiguous run of video tokens"
                )
            frames = tokens[:-1].view(-1, grid[0] * grid[1], tokens.shape[-1])  # (T, N, C)
            tic = _clock(frames)
            merge = merge_tokens(frames, config, grid)
            stage1_s.append(_clock(frames) - tic)
            before = inputs_embeds[b, :start][real[:start]]
            after = inputs_embeds[b, end:][real[end:]]
            rows.append(torch.cat([before, merge.tokens, tokens[-1:], after]))
            spans.append(
                VisualSpan(
                    start=len(before), groups=merge.groups, question_start=len(before) + merge.num_tokens + 1
                )
            )
            merges.append(merge)

        embeds, mask, pads = _left_pad_rows(rows)
        spans = [
            None if s is None else VisualSpan(s.start + p, s.groups, s.question_start + p)
            for s, p in zip(spans, pads)
        ]
        positions = positions_from_mask(mask)
        if cache is None and use_cache is not False:
            cache = DynamicCache(config=self.language_model.config)
        tic = _clock(embeds)
        hidden, selection = prefill(
            self.language_model, embeds, mask, positions, cache, spans, config, runtime.rule
        )
        prefill_s = _clock(embeds) - tic

        runtime.state = None if cache is None else DecodeState(cache, selection.mask, mask.sum(1))
        seconds = iter(stage1_s)
        runtime.traces = [
            None
            if merge is None
            else PruningTrace.from_stages(
                merge,
                kept=selection.visual_kept[b].cpu().numpy(),
                scores=None
                if selection.visual_scores[b] is None
                else selection.visual_scores[b].cpu().numpy(),
                timings={
                    "stage1_s": next(seconds),
                    "stage2_s": selection.seconds,
                    "llm_prefill_s": prefill_s,
                },
                config=config.to_dict(),
            )
            for b, merge in enumerate(merges)
        ]
        return LlavaOnevisionModelOutputWithPast(last_hidden_state=hidden, cache=cache, video_outputs=video)


def patch(
    model: LlavaOnevisionForConditionalGeneration, config: PruneVidConfig, rule: Rule = question_guided
) -> None:
    """Swap the PruneVid forward onto `model.model` (in place); patching again updates the settings."""
    inner = model.model
    layers = model.config.text_config.num_hidden_layers
    if config.selected_layer >= layers:
        raise ValueError(
            f"selected_layer must be in [0, {layers - 1}] for this model ({layers} decoder layers), "
            f"got {config.selected_layer}"
        )
    if not isinstance(inner, PruneVidLlavaOnevisionModel):
        inner._prunevid_stock_class = type(inner)
        inner.__class__ = _subclass(type(inner))
    inner._prunevid = Runtime(config, rule)


def unpatch(model: LlavaOnevisionForConditionalGeneration) -> None:
    inner = model.model
    if isinstance(inner, PruneVidLlavaOnevisionModel):
        inner.__class__ = inner._prunevid_stock_class
        del inner._prunevid, inner._prunevid_stock_class


def runtime(model: LlavaOnevisionForConditionalGeneration) -> Runtime | None:
    return getattr(model.model, "_prunevid", None)


def pooled_grid(config) -> tuple[int, int]:
    """The per-frame token grid after the model's 2x2 bilinear pooling (14 x 14 for 384 px / 14)."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    return math.ceil(side / 2), math.ceil(side / 2)


def tokens_per_video(config, num_frames: int) -> int:
    """Video placeholder tokens in the prompt: T pooled grids and one trailing newline."""
    height, width = pooled_grid(config)
    return num_frames * height * width + 1


@dataclass(frozen=True)
class FrameProcessing:
    """The video processor's settings: resize (bicubic, antialiased), rescale, normalise."""

    size: tuple[int, int] = (384, 384)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale: float = 1 / 255

    @classmethod
    def from_json(cls, path: str) -> FrameProcessing:
        """Read a checkpoint's (video_)preprocessor_config.json."""
        with open(path) as f:
            data = json.load(f)
        size = data.get("size", {})
        height = size.get("height", size.get("shortest_edge", 384))
        return cls(
            size=(height, size.get("width", height)),
            mean=tuple(data.get("image_mean", cls.mean)),
            std=tuple(data.get("image_std", cls.std)),
            rescale=data.get("rescale_factor", cls.rescale),
        )

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        """(T, H, W, 3) uint8 RGB -> (T, 3, h, w) float32 pixel values.

        Same steps as transformers' torchvision-based video processor: resize the uint8 frames
        (bicubic, antialias, rounded back to uint8), then (x * rescale - mean) / std.
        """
        video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
        if tuple(video.shape[-2:]) != self.size:
            video = torch.nn.functional.interpolate(video, size=self.size, mode="bicubic", antialias=True)
            video = video.round().clamp(0, 255)
        mean = torch.tensor(self.mean)[:, None, None]
        std = torch.tensor(self.std)[:, None, None]
        return (video * self.rescale - mean) / std


def build_inputs(
    tokenizer, config, frames: np.ndarray, question: str, processing: FrameProcessing | None = None
) -> dict[str, torch.Tensor]:
    """Model inputs for one video and question: input_ids, attention_mask, pixel_values_videos."""
    return build_batch(tokenizer, config, [frames], [question], processing)


def build_batch(
    tokenizer,
    config,
    videos: list[np.ndarray],
    questions: list[str],
    processing: FrameProcessing | None = None,
) -> dict[str, torch.Tensor]:
    """A left-padded batch of (video, question) prompts; all videos need the same frame count and size."""
    processing = processing or FrameProcessing(size=(config.vision_config.image_size,) * 2)
    video_token = tokenizer.convert_ids_to_tokens(config.video_token_id)
    prompts = [
        PROMPT.format(question=q).replace("<video>", video_token * tokens_per_video(config, len(v)))
        for v, q in zip(videos, questions)
    ]
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    pixels = torch.stack([processing(v) for v in videos])
    return {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "pixel_values_videos": pixels,
    }


def _subclass(stock: type) -> type:
    if issubclass(stock, PruneVidLlavaOnevisionModel):
        return stock
    if stock is LlavaOnevisionModel:
        return PruneVidLlavaOnevisionModel
    return type(f"PruneVid{stock.__name__}", (PruneVidLlavaOnevisionModel, stock), {})


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
