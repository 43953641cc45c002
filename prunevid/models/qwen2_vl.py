"""PruneVid for Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`,
`Qwen2_5_VLForConditionalGeneration`): 3-D M-RoPE positions.

The vision merger emits, per video, a (t, h, w) grid of tokens (t = frames / 2, h and w = the
patch grid / 2), row-major. Stage 1 runs on those per-time-step grids. Positions are never
recomputed on the shortened prompt (`get_rope_index` assumes full grids): every kept text token
keeps its stock (t, h, w) position, each merged token takes the position of its first member
(earliest time step, then row-major), and decoding continues from the stock positions, i.e.
the unpruned rope delta.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import torch
from transformers.modeling_outputs import MultimodalBaseModelOutputWithPast

from .base import (
    Runtime,
    VideoGrid,
    chat_prompt,
    check_placeholders,
    frame_pixels,
    video_placeholders,
    video_prefill,
    video_rows,
)

# Qwen-VL chat format for one video and a question (Qwen2-VL / Qwen2.5-VL template): the
# fallback for a tokenizer without a chat template of its own.
PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|video_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
)
VIDEO_SLOT = "<|vision_start|><|video_pad|><|vision_end|>"  # what the chat templates write for a video
VIDEO_MODALITY = 2  # mm_token_type_ids: text 0, image 1, video 2


class PruneVidQwenVLModel(torch.nn.Module):
    """Mixed into the stock inner `Qwen2VLModel` / `Qwen2_5_VLModel` / `Qwen3VLModel` by `patch`."""

    _prunevid: Runtime

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        mm_encoder_outputs: dict | None = None,
        **kwargs,
    ):
        runtime = self._prunevid
        encoded = mm_encoder_outputs or {}
        has_video = pixel_values_videos is not None or encoded.get("video") is not None
        if has_video and (cache is None or cache.get_seq_length() == 0):
            if pixel_values is not None or encoded.get("image") is not None:
                raise NotImplementedError("PruneVid handles prompts with a video and no image")
            if position_ids is None:
                if mm_token_type_ids is None:
                    raise ValueError(
                        "Qwen-VL needs mm_token_type_ids to place video tokens in 3-D positions "
                        "(without them transformers silently falls back to 1-D positions)"
                    )
                position_ids = self.compute_3d_position_ids(
                    input_ids=input_ids,
                    image_grid_thw=None,
                    video_grid_thw=video_grid_thw,
                    inputs_embeds=self.get_input_embeddings()(input_ids),
                    attention_mask=attention_mask,
                    cache=None,
                    mm_token_type_ids=mm_token_type_ids,
                    **(
                        {"second_per_grid_ts": kwargs["second_per_grid_ts"]}
                        if "second_per_grid_ts" in kwargs
                        else {}
                    ),
                )
            if position_ids.ndim != 3:
                raise ValueError(
                    "Qwen-VL prefill needs 3-D (M-RoPE) position_ids of shape (3 or 4, batch, length)"
                )
            if inputs_embeds is None:
                inputs_embeds = self.get_input_embeddings()(input_ids)
            video = encoded.get("video")
            if video is None:
                video = self.get_video_features(pixel_values_videos, video_grid_thw, return_dict=True)
            features = [f.to(inputs_embeds.device, inputs_embeds.dtype) for f in video.pooler_output]
            is_video = video_placeholders(self, input_ids, inputs_embeds)
            # generate() consumes video_grid_thw when it encodes the video, so each grid comes
            # off the stock 3-D positions of its tokens instead: one read, the placeholder count
            # with all the grids.
            deepstack = getattr(video, "deepstack_features", None) or []  # Qwen3-VL: per layer, per video
            rows = video_rows(is_video, len(features))
            every = len(rows) == len(is_video)
            grid = grid_sizes(position_ids[-2:] if every else position_ids[-2:, rows], is_video[rows])
            count, *flat = torch.cat([is_video.sum().view(1), grid.flatten()]).tolist()
            check_placeholders(count, sum(len(f) for f in features))
            sizes = list(zip(flat[::2], flat[1::2]))
            grids = [
                _video_grid(f, size, [layer[v] for layer in deepstack])
                for v, (f, size) in enumerate(zip(features, sizes))
            ]
            hidden, cache = video_prefill(
                runtime,
                self.language_model,
                inputs_embeds,
                attention_mask,
                is_video,
                grids,
                position_ids,
                cache,
                use_cache,
            )
            return MultimodalBaseModelOutputWithPast(
                last_hidden_state=hidden, cache=cache, video_outputs=video
            )
        num_new = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        attention_mask, position_ids = runtime.decode_arguments(cache, num_new, attention_mask, position_ids)
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )


def grid_sizes(positions: torch.Tensor, is_video: torch.Tensor) -> torch.Tensor:
    """(2, V, L) stock (h, w) positions of V rows and their (V, L) video placeholders -> (V, 2)
    each video's per-time-step grid (height, width), on the device: the span of its first run's
    positions (Qwen3-VL numbers each time step's run afresh)."""
    starts = is_video & ~torch.nn.functional.pad(is_video[:, :-1], (1, 0))  # the previous token is text
    elsewhere = ~(is_video & (starts.cumsum(1) == 1))  # outside the first run
    big = torch.iinfo(positions.dtype).max
    high = positions.masked_fill(elsewhere, -big).amax(-1)
    low = positions.masked_fill(elsewhere, big).amin(-1)
    return (high - low + 1).T


def _video_grid(features: torch.Tensor, size: tuple[int, int], extras: list[torch.Tensor]) -> VideoGrid:
    """(t * h * w, C) merger output of one video, row-major -> per-time-step (h, w) grids."""
    tokens = features.view(-1, size[0] * size[1], features.shape[-1])
    return VideoGrid(tokens, size, features[:0], torch.stack(extras).to(features) if extras else None)


@dataclass(frozen=True)
class VideoPatchify:
    """The Qwen2-VL video processor's preprocessing, without torchvision.

    Frames are resized (bicubic, antialiased, on uint8, as the processors do) to the nearest size whose
    sides are multiples of patch * merge (28) and whose area is within [min_pixels, max_pixels];
    rescaled and normalised with the CLIP mean/std; padded in time to a multiple of the temporal
    patch by repeating the last frame; cut into (temporal 2 x 14 x 14) patches ordered so that
    each 2 x 2 block of patches (one merged token) is contiguous.
    """

    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    patch: int = 14
    merge: int = 2
    temporal_patch: int = 2
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    rescale: float = 1 / 255
    video_budget: bool = False
    device: str | None = (
        None  # None: the processors' pixels on the CPU; a device: resized there (`base.for_device`)
    )

    @classmethod
    def for_config(cls, config) -> VideoPatchify:
        vision = config.vision_config
        sizes = dict(
            patch=vision.patch_size,
            merge=vision.spatial_merge_size,
            temporal_patch=vision.temporal_patch_size,
        )
        if config.model_type == "qwen3_vl":  # its video processor's defaults
            return cls(
                min_pixels=128 * 32 * 32,
                max_pixels=768 * 32 * 32,
                mean=(0.5,) * 3,
                std=(0.5,) * 3,
                video_budget=True,
                **sizes,
            )
        return cls(**sizes)

    @classmethod
    def from_json(cls, path: str) -> VideoPatchify:
        """Read a checkpoint's (video_)preprocessor_config.json."""
        with open(path) as f:
            data = json.load(f)
        size = data.get("size") or {}
        return cls(
            min_pixels=data.get("min_pixels", size.get("shortest_edge", cls.min_pixels)),
            max_pixels=data.get("max_pixels", size.get("longest_edge", cls.max_pixels)),
            patch=data.get("patch_size", cls.patch),
            merge=data.get("merge_size", cls.merge),
            temporal_patch=data.get("temporal_patch_size", cls.temporal_patch),
            mean=tuple(data.get("image_mean", cls.mean)),
            std=tuple(data.get("image_std", cls.std)),
            rescale=data.get("rescale_factor", cls.rescale),
            video_budget=data.get("video_processor_type") == "Qwen3VLVideoProcessor",
        )

    def target_size(self, height: int, width: int, num_frames: int = 1) -> tuple[int, int]:
        """Qwen-VL's `smart_resize` rule: per frame (Qwen2-VL, Qwen2.5-VL) or, with
        `video_budget`, over the whole clip's rounded frame count (Qwen3-VL)."""
        factor = self.patch * self.merge
        if self.video_budget and min(height, width) < factor:
            scale = max(factor / height, factor / width)
            height, width = int(height * scale), int(width * scale)
        if max(height, width) / min(height, width) > 200:
            raise ValueError(
                f"aspect ratio {max(height, width) / min(height, width):.0f} is above Qwen-VL's limit of 200"
            )
        frames = round(num_frames / self.temporal_patch) * self.temporal_patch if self.video_budget else 1
        area = height * width * (num_frames if self.video_budget else 1)
        h, w = round(height / factor) * factor, round(width / factor) * factor
        if frames * h * w > self.max_pixels:
            beta = math.sqrt(area / self.max_pixels)
            h = max(factor, math.floor(height / beta / factor) * factor)
            w = max(factor, math.floor(width / beta / factor) * factor)
        elif frames * h * w < self.min_pixels:
            beta = math.sqrt(self.min_pixels / area)
            h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
        return h, w

    def __call__(self, frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, H, W, 3) uint8 -> (pixel_values_videos (n_patches, 3 * 2 * 14 * 14), grid_thw (3,))."""
        size = self.target_size(*frames.shape[1:3], len(frames))
        video = frame_pixels(frames, size, self.mean, self.std, self.rescale, self.device)
        if pad := -len(video) % self.temporal_patch:
            video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
        tp, p, m = self.temporal_patch, self.patch, self.merge
        t, h, w = len(video) // tp, size[0] // p, size[1] // p
        patches = video.view(t, tp, 3, h // m, m, p, w // m, m, p)
        patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, h/m, w/m, m, m, C, tp, p, p)
        return patches.reshape(t * h * w, 3 * tp * p * p), torch.tensor([t, h, w])


def build_inputs(
    tokenizer,
    config,
    frames: np.ndarray,
    question: str,
    patchify: VideoPatchify | None = None,
    seconds_per_frame: float | None = None,
) -> dict[str, torch.Tensor]:
    """Inputs for one video and question: input_ids, attention_mask, mm_token_type_ids,
    pixel_values_videos, video_grid_thw, and for Qwen2.5-VL given `seconds_per_frame` (the time
    between sampled frames) second_per_grid_ts, which spaces the temporal positions as its
    processor does (Qwen3-VL: the timestamps written before each frame). Without it the model
    assumes one second per temporal patch."""
    return build_batch(tokenizer, config, [frames], [question], patchify, seconds_per_frame)


def build_batch(
    tokenizer,
    config,
    videos: list[np.ndarray],
    questions: list[str],
    patchify: VideoPatchify | None = None,
    seconds_per_frame: float | None = None,
) -> dict[str, torch.Tensor]:
    """A left-padded batch of (video, question) prompts, laid out as the processor lays out a
    batch: every video's patches concatenated in `pixel_values_videos`, one `video_grid_thw`
    row each. Videos may differ in frame count and size."""
    patchify = patchify or VideoPatchify.for_config(config)
    patched = [patchify(frames) for frames in videos]
    prompts = [
        video_prompt(tokenizer, config, thw, question, seconds_per_frame, patchify.temporal_patch)
        for (_, thw), question in zip(patched, questions)
    ]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    ids = encoded["input_ids"]
    inputs = {
        "input_ids": ids,
        "attention_mask": encoded["attention_mask"],
        "mm_token_type_ids": (ids == config.video_token_id).long() * VIDEO_MODALITY,
        "pixel_values_videos": torch.cat([pixels for pixels, _ in patched]),
        "video_grid_thw": torch.stack([thw for _, thw in patched]),
    }
    if seconds_per_frame is not None and config.model_type == "qwen2_5_vl":
        inputs["second_per_grid_ts"] = torch.full((len(videos),), patchify.temporal_patch * seconds_per_frame)
    return inputs


def video_prompt(
    tokenizer,
    config,
    grid_thw: torch.Tensor,
    question: str,
    seconds_per_frame: float | None = None,
    temporal_patch: int = 2,
) -> str:
    """The prompt text for one video of patch grid (t, h, w) and a question: the tokenizer's
    chat template (else `PROMPT`) with its video slot expanded to t * h * w / merge^2
    placeholders; Qwen3-VL: one run per temporal patch, each after its timestamp (its frames'
    mean time), replacing the whole slot as Qwen3-VL's own processor did (transformers 5 keeps
    the slot's outer start/end tokens around the runs; docs/processing_check.md)."""
    merge = config.vision_config.spatial_merge_size
    video_token = tokenizer.convert_ids_to_tokens(config.video_token_id)
    prompt = chat_prompt(tokenizer, question, VIDEO_SLOT, PROMPT)
    t, h, w = (int(v) for v in grid_thw)
    per_step = h * w // merge**2
    if config.model_type == "qwen3_vl":
        seconds = seconds_per_frame or 1.0
        video = "".join(
            f"<{(temporal_patch * i + (temporal_patch - 1) / 2) * seconds:.1f} seconds>"
            f"<|vision_start|>{video_token * per_step}<|vision_end|>"
            for i in range(t)
        )
    else:
        video = f"<|vision_start|>{video_token * (t * per_step)}<|vision_end|>"
    return prompt.replace(VIDEO_SLOT, video)


Preprocessing = VideoPatchify


def video_features(model: torch.nn.Module, inputs: dict[str, torch.Tensor]):
    """The vision tower's output for `inputs` (what `generate(mm_encoder_outputs={"video": ...})` takes)."""
    return model.model.get_video_features(
        inputs["pixel_values_videos"], inputs["video_grid_thw"], return_dict=True
    )


PrunedModel = PruneVidQwenVLModel
