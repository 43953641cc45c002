"""PruneVid's Qwen3-VL for vLLM: subclasses of vLLM's model and multimodal processor that run
stage 1 at vLLM's video pruning hook (what `vllm.py` registers; see its docstring).

Qwen3-VL writes a video as one run of placeholders per time step, each after its timestamp
(`<0.5 seconds><|vision_start|><|video_pad|>...<|vision_end|>`), and numbers each run afresh: the
run's tokens at (s, s + row, s + column) from the run's start s, the text after it from s +
max(h', w'). vLLM fixes every run's length in the front-end, before the video is encoded, so
the plugin gives every time step a fixed share of the budget (`PruneVidConfig.per_step_budget`):

* The processor lays each video out with `vllm.step_quotas` placeholders per run (stage 1's
  budget split equally among the steps, the earlier ones one more), at its request's own
  retention if `mm_processor_kwargs` holds one (`vllm.REQUEST_RETENTION`), which it passes on
  to the model as a per-video field. Only the video tokens are embeddings (timestamps and
  vision start/end stay text), as in stock vLLM.
* The model merges each video's tower output (`vllm.merged_qwen3_video`): stage 1 under
  `per_step_budget` leaves exactly each step's quota of merged tokens whose first member lies in
  that step, in time order, so they fill the runs in their own order, as the transformers
  adapter places them; deepstack features are merged as the members' mean; each merged token
  carries its first member's position relative to its run's start as channels (images carry
  their stock ones). The first numbering (`get_mrope_input_positions`) is exact for every text
  token, from the layout alone; `recompute_mrope_positions` strips the channels and places each
  media token at its run's start plus its channels (`vllm.place_media_positions`). So a
  prefix-cache hit over a whole video leaves the text after it where it belongs.

With retention 1 (or stage 1 off) it is vLLM's Qwen3-VL unchanged. Images are not pruned.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from .vllm import (
    CHANNELS,
    REQUEST_RETENTION,
    RequestRetentions,
    RetentionField,
    check_config_hook,
    grid_positions,
    media_with_positions,
    merged_qwen3_video,
    place_media_positions,
    prompt_positions,
    prunes,
    qwen3_settings,
    request_settings,
    step_quotas,
    token_runs,
    with_request_retention,
)


class PruneVidQwen3VLProcessor(RetentionField, Qwen3VLMultiModalProcessor):
    """vLLM's Qwen3-VL processor with each time step's run cut to its share of the budget."""

    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        """The stock processing without the request's retention (Hugging Face's processor does
        not take it); each video then carries that retention to the model (a per-video field)."""
        stock = {k: v for k, v in hf_kwargs.items() if k != REQUEST_RETENTION}
        processed = super()._apply_hf_processor_main(mm_items, stock)
        engine = qwen3_settings(getattr(self.info.get_hf_config(), "prunevid", None))
        return with_request_retention(processed, "video_grid_thw", engine, hf_kwargs.get(REQUEST_RETENTION))

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        hf_config = self.info.get_hf_config()
        engine = qwen3_settings(getattr(hf_config, "prunevid", None))
        stock = {k: v for k, v in hf_processor_mm_kwargs.items() if k != REQUEST_RETENTION}
        updates = list(super()._get_prompt_updates(mm_items, stock, out_mm_kwargs))
        if not prunes(engine):
            return updates
        tokenizer = self.info.get_tokenizer()

        def video_tokens(item: int):
            fields = out_mm_kwargs["video"][item]
            retention = fields.get(REQUEST_RETENTION)
            config = engine if retention is None else request_settings(engine, float(retention.data))
            grid = tuple(fields["video_grid_thw"].data.tolist())
            # Stock vLLM's layout (timestamp, start, the run, end per step) with each run's quota.
            return Qwen3VLMultiModalProcessor.get_video_repl(
                tokens_per_frame=step_quotas(grid, hf_config.vision_config.spatial_merge_size, config),
                timestamps=fields["timestamps"].data,
                tokenizer=tokenizer,
                vision_start_token_id=hf_config.vision_start_token_id,
                vision_end_token_id=hf_config.vision_end_token_id,
                video_token_id=hf_config.video_token_id,
                select_token_id=True,
            )

        return [
            PromptReplacement(modality=u.modality, target=u.target, replacement=video_tokens)
            if u.modality == "video"
            else u
            for u in updates
        ]


@MULTIMODAL_REGISTRY.register_processor(
    PruneVidQwen3VLProcessor, info=Qwen3VLProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class PruneVidQwen3VLForConditionalGeneration(RequestRetentions, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL whose video embeddings are PruneVid stage 1's merged tokens."""

    def __init__(self, *, vllm_config, prefix: str = "model"):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.prunevid = qwen3_settings(getattr(self.config, "prunevid", None))
        self.is_multimodal_pruning_enabled = prunes(self.prunevid)
        check_config_hook(vllm_config, self.prunevid)

    def _postprocess_video_embeds_evs(self, video_embeds_split, video_input) -> tuple[torch.Tensor, ...]:
        grids = video_input["video_grid_thw"].tolist()
        retentions = self.video_retentions or [None] * len(grids)
        return tuple(
            merged_qwen3_video(
                features,
                tuple(grid),
                self.visual.spatial_merge_size,
                self.config.vision_config.out_hidden_size,  # the main features; deepstack levels follow
                request_settings(self.prunevid, retention),
            )
            for features, grid, retention in zip(video_embeds_split, grids, retentions)
        )

    def _postprocess_image_embeds_evs(self, image_embeds_split, image_input) -> tuple[torch.Tensor, ...]:
        if not self.is_multimodal_pruning_enabled:
            return image_embeds_split
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
        """Strip the channels of this prefill chunk's media and place its media tokens. vLLM
        0.32's runner keeps the positions on the host, so the chunk's channels come back once;
        the rope delta (vLLM's definition) is read off the positions, final for every text token."""
        stripped = [mm[:, :-CHANNELS] for mm in multimodal_embeddings]
        positions = mrope_positions
        if multimodal_embeddings:
            channels = torch.cat([mm[:, -CHANNELS:] for mm in multimodal_embeddings])
            media = (self.config.image_token_id, self.config.video_token_id)
            positions = place_media_positions(
                input_ids, media, channels, mrope_positions, num_computed_tokens
            )
        return stripped, positions, int(positions.max()) + 1 - positions.shape[1]

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[torch.Tensor, int]:
        """Every text token's stock position, from the layout alone; each media token at its
        run's start until its channels place it (`recompute_mrope_positions`)."""
        if not self.is_multimodal_pruning_enabled:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        merge_size = self.config.vision_config.spatial_merge_size
        media = []
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            start, length = feature.mm_position.offset, feature.mm_position.length
            grid = feature.data[f"{feature.modality}_grid_thw"].data.tolist()
            _, extent = grid_positions(tuple(grid), merge_size, 0.0, device="meta")
            if feature.modality == "image":
                media.append((start, length, extent))
            else:  # one run per time step, after its timestamp
                tokens = input_tokens[start : start + length]
                runs = token_runs(tokens, self.config.video_token_id)
                media += [(start + offset, count, extent) for offset, count in runs]
        return prompt_positions(len(input_tokens), media)
