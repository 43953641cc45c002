"""PruneVid's Qwen2.5-VL for vLLM: subclasses of vLLM's model and multimodal processor that run
stage 1 at vLLM's video pruning hook (what `vllm.py` registers; see its docstring).

* The processor gives each video `vllm.video_token_count` placeholders instead of one per token,
  at its request's own retention if `mm_processor_kwargs` holds one (`vllm.REQUEST_RETENTION`),
  which it passes on to the model as a per-video field.
* The model, when the settings prune, merges each video's vision-tower output after the tower
  (`vllm.merged_video`) and appends every media item's positions as channels; its
  `recompute_mrope_positions` strips them and lets vLLM's EVS helper rewrite the prompt's
  positions; `get_mrope_input_positions` numbers the prompt with the pruned lengths from the start
  (so a prefix-cache hit that skips a video's encoding leaves the text after it where it belongs).
  With retention 1 (or stage 1 off) it is vLLM's Qwen2.5-VL unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement
from vllm.multimodal.video_prune.evs import recompute_mrope_positions

from .vllm import (
    CHANNELS,
    REQUEST_RETENTION,
    RequestRetentions,
    RetentionField,
    check_config_hook,
    check_extent,
    decode_positions,
    grid_positions,
    media_with_positions,
    merged_video,
    prompt_positions,
    prunes,
    request_settings,
    settings,
    video_token_count,
    with_request_retention,
)


class PruneVidQwen2_5_VLProcessor(RetentionField, Qwen2_5_VLMultiModalProcessor):
    """vLLM's Qwen2.5-VL processor with stage 1's budgeted placeholder count for videos."""

    def _call_hf_processor(self, hf_data, hf_kwargs):
        return super()._call_hf_processor(
            hf_data, {k: v for k, v in hf_kwargs.items() if k != REQUEST_RETENTION}
        )

    def _postprocess_hf_mm_data(self, mm_inputs, hf_processor_mm_kwargs, processed_data):
        """Each video carries its request's retention to the model (a per-video field)."""
        processed = super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed_data)
        engine = settings(getattr(self.info.get_hf_config(), "prunevid", None))
        return with_request_retention(
            processed, "video_grid_thw", engine, hf_processor_mm_kwargs.get(REQUEST_RETENTION)
        )

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        hf_config = self.info.get_hf_config()
        engine = settings(getattr(hf_config, "prunevid", None))
        merge_size = hf_config.vision_config.spatial_merge_size
        per_second = getattr(hf_config.vision_config, "tokens_per_second", 1.0)
        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))

        def video_tokens(item: int, token: list[int]) -> list[int]:
            fields = out_mm_kwargs["video"][item]
            grid = tuple(fields["video_grid_thw"].data.tolist())
            retention = fields.get(REQUEST_RETENTION)
            config = engine if retention is None else request_settings(engine, float(retention.data))
            if prunes(engine):  # refused in the front-end, it fails this request, not the engine
                seconds = fields.get("second_per_grid_ts")
                check_extent(grid, merge_size, (1.0 if seconds is None else float(seconds.data)) * per_second)
            return token * video_token_count(grid, merge_size, config)

        return [
            PromptReplacement(
                modality=u.modality, target=u.target, replacement=partial(video_tokens, token=list(u.target))
            )
            if u.modality == "video"
            else u
            for u in updates
        ]


@MULTIMODAL_REGISTRY.register_processor(
    PruneVidQwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class PruneVidQwen2_5_VLForConditionalGeneration(RequestRetentions, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL whose video embeddings are PruneVid stage 1's merged tokens."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.prunevid = settings(getattr(self.config, "prunevid", None))
        self.is_multimodal_pruning_enabled = prunes(self.prunevid)
        check_config_hook(vllm_config, self.prunevid)

    def _postprocess_video_embeds_evs(self, video_embeds_split, video_input) -> tuple[torch.Tensor, ...]:
        grids = video_input["video_grid_thw"].tolist()
        seconds = video_input.get("second_per_grid_ts")
        per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        retentions = self.video_retentions or [None] * len(grids)
        return tuple(
            merged_video(
                features,
                tuple(grid),
                self.visual.spatial_merge_size,
                (1.0 if seconds is None else float(seconds[i])) * per_second,
                request_settings(self.prunevid, retentions[i]),
            )
            for i, (features, grid) in enumerate(zip(video_embeds_split, grids))
        )

    def _postprocess_image_embeds_evs(self, image_embeds_split, image_input) -> tuple[torch.Tensor, ...]:
        grids = image_input["image_grid_thw"].tolist()
        merge_size = self.visual.spatial_merge_size
        return tuple(media_with_positions(f, tuple(g), merge_size) for f, g in zip(image_embeds_split, grids))

    def recompute_mrope_positions(
        self,
        input_ids: list[int] | torch.Tensor,
        multimodal_embeddings: Sequence[torch.Tensor],
        mrope_positions: torch.LongTensor,
        num_computed_tokens: int,
    ) -> tuple[Sequence[torch.Tensor], torch.Tensor, int]:
        device = multimodal_embeddings[0].device if multimodal_embeddings else mrope_positions.device
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
        media = [decode_positions(mm[:, -CHANNELS:]) for mm in multimodal_embeddings]
        positions, delta = recompute_mrope_positions(
            ids,
            media,
            mrope_positions,
            num_computed_tokens,
            self.config.vision_start_token_id,
            self.config.image_token_id,
            self.config.video_token_id,
        )
        return [mm[:, :-CHANNELS] for mm in multimodal_embeddings], positions, delta

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[torch.Tensor, int]:
        if not self.is_multimodal_pruning_enabled:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        ordered = sorted(mm_features, key=lambda f: f.mm_position.offset)
        media = []
        for feature, (offset, steps, height, width, factor) in zip(ordered, self.iter_mm_grid_thw(ordered)):
            _, extent = grid_positions((steps, height, width), 1, factor)
            media.append((offset, feature.mm_position.length, extent))
        return prompt_positions(len(input_tokens), media)
