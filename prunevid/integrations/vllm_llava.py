"""PruneVid's LLaVA-OneVision for vLLM: subclasses of vLLM's model and multimodal processor that
run stage 1 on each video's pooled frame grids (what `vllm.py` registers; see its docstring).

LLaVA-OneVision lays a video out in the prompt as T pooled grids of h x w tokens (row-major,
frame after frame; 14 x 14 for 384 px frames and 14 px patches) and one trailing newline token,
in vLLM 0.32 as in transformers, and numbers the prompt with 1-D RoPE positions. So:

* The processor gives each video `vllm.visual_token_count(T * h * w) + 1` placeholders (the
  stage-1 budget, and the newline kept), at its request's own retention if `mm_processor_kwargs`
  holds one (`vllm.REQUEST_RETENTION`), which it passes on to the model as a per-video field.
* The model, when the settings prune, runs `merge_tokens` in budget mode on each video's (T, h * w,
  C) tokens after the tower and the pooling, and appends the newline: the merged tokens in their
  own order, then the newline, exactly as the transformers adapter (`models/llava_onevision.py`)
  writes them into the prompt. The prompt is numbered 0, 1, 2, ... by vLLM as by the adapter
  (a shorter prompt numbered afresh), so no position travels with the embeddings and vLLM's own
  pruning path stays off. Every count follows from the grid and the retention: nothing is read
  back from the device.

With retention 1 (or stage 1 off) it is vLLM's LLaVA-OneVision unchanged. Images are untouched.
"""

from __future__ import annotations

from functools import partial

from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from .vllm import (
    REQUEST_RETENTION,
    RequestRetentions,
    RetentionField,
    llava_pooled_grid,
    merged_llava_video,
    prunes,
    request_settings,
    settings,
    visual_token_count,
    with_request_retention,
)


class PruneVidLlavaOnevisionProcessor(RetentionField, LlavaOnevisionMultiModalProcessor):
    """vLLM's LLaVA-OneVision processor with stage 1's budgeted placeholder count for videos."""

    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        """The stock processing without the request's retention (Hugging Face's processor does
        not take it); each video then carries that retention to the model (a per-video field)."""
        stock = {k: v for k, v in hf_kwargs.items() if k != REQUEST_RETENTION}
        processed = super()._apply_hf_processor_main(mm_items, stock)
        engine = settings(getattr(self.info.get_hf_config(), "prunevid", None))
        return with_request_retention(
            processed, "pixel_values_videos", engine, hf_kwargs.get(REQUEST_RETENTION)
        )

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        hf_config = self.info.get_hf_config()
        engine = settings(getattr(hf_config, "prunevid", None))
        height, width = llava_pooled_grid(hf_config.vision_config)
        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))

        def video_tokens(item: int, token: list[int]) -> list[int]:
            frames = len(out_mm_kwargs["video"][item]["pixel_values_videos"].data)
            retention = out_mm_kwargs["video"][item].get(REQUEST_RETENTION)
            config = engine if retention is None else request_settings(engine, float(retention.data))
            return token * (visual_token_count(frames * height * width, config) + 1)  # + the newline

        return [
            PromptReplacement(
                modality=u.modality, target=u.target, replacement=partial(video_tokens, token=list(u.target))
            )
            if u.modality == "video"
            else u
            for u in updates
        ]


@MULTIMODAL_REGISTRY.register_processor(
    PruneVidLlavaOnevisionProcessor,
    info=LlavaOnevisionProcessingInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)
class PruneVidLlavaOnevisionForConditionalGeneration(
    RequestRetentions, LlavaOnevisionForConditionalGeneration
):
    """vLLM's LLaVA-OneVision whose video embeddings are PruneVid stage 1's merged tokens."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.prunevid = settings(getattr(self.config, "prunevid", None))

    def _process_video_pixels(self, inputs):
        videos = super()._process_video_pixels(inputs)  # (1, T * h * w + 1, C) per video, or stacked
        if not prunes(self.prunevid):  # retention 1: vLLM's own output, untouched
            return videos
        retentions = self.video_retentions or [None] * len(videos)
        grid = llava_pooled_grid(self.config.vision_config)
        return [
            merged_llava_video(
                video.reshape(-1, video.shape[-1]), grid, request_settings(self.prunevid, retention)
            )
            for video, retention in zip(videos, retentions)
        ]
