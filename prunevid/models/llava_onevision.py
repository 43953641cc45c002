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
from dataclasses import dataclass

import numpy as np
import torch
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModelOutputWithPast

from .base import (
    Runtime,
    VideoGrid,
    chat_prompt,
    check_placeholders,
    frame_pixels,
    video_placeholders,
    video_prefill,
)

# The chat format of the llava-hf LLaVA-OneVision checkpoints (their processor's template): the
# fallback for a tokenizer without a chat template of its own.
PROMPT = "<|im_start|>user <video>\n{question}<|im_end|><|im_start|>assistant\n"


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
            is_video = video_placeholders(self, input_ids, inputs_embeds)
            check_placeholders(int(is_video.sum()), features.shape[:2].numel())  # the one read
            height, width = pooled_grid(self.config)
            grids = [
                VideoGrid(f[:-1].view(-1, height * width, f.shape[-1]), (height, width), f[-1:])
                for f in features
            ]
            hidden, cache = video_prefill(
                runtime,
                self.language_model,
                inputs_embeds,
                attention_mask,
                is_video,
                grids,
                None,
                cache,
                use_cache,
                position_ids,
            )
            return LlavaOnevisionModelOutputWithPast(
                last_hidden_state=hidden, cache=cache, video_outputs=video
            )
        num_new = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        attention_mask, position_ids = runtime.decode_arguments(cache, num_new, attention_mask, position_ids)
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
    device: str | None = (
        None  # None: the processors' pixels on the CPU; a device: resized there (`base.for_device`)
    )

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

    @classmethod
    def for_config(cls, config) -> FrameProcessing:
        """Defaults for a model config: frames resized to the vision tower's input size."""
        return cls(size=(config.vision_config.image_size,) * 2)

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        """(T, H, W, 3) uint8 RGB -> (T, 3, h, w) float32 pixel values, equal to transformers'
        torchvision-based video processor (checked: docs/processing_check.md) on the CPU; on
        `device`, within one level of it."""
        return frame_pixels(frames, self.size, self.mean, self.std, self.rescale, self.device)


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
    processing = processing or FrameProcessing.for_config(config)
    prompts = [video_prompt(tokenizer, config, len(v), q) for v, q in zip(videos, questions)]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    pixels = torch.stack([processing(v) for v in videos])
    return {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "pixel_values_videos": pixels,
    }


def video_prompt(tokenizer, config, num_frames: int, question: str) -> str:
    """The prompt text for a video of `num_frames` frames and a question: the tokenizer's chat
    template (else `PROMPT`), its one video token expanded to the video's placeholders."""
    video_token = tokenizer.convert_ids_to_tokens(config.video_token_id)
    prompt = chat_prompt(tokenizer, question, video_token, PROMPT.replace("<video>", video_token))
    return prompt.replace(video_token, video_token * tokens_per_video(config, num_frames))


Preprocessing = FrameProcessing


def video_features(model: LlavaOnevisionForConditionalGeneration, inputs: dict[str, torch.Tensor]):
    """The vision tower's output for `inputs` (what `generate(mm_encoder_outputs={"video": ...})` takes)."""
    return model.model.get_video_features(inputs["pixel_values_videos"], return_dict=True)


PrunedModel = PruneVidLlavaOnevisionModel
