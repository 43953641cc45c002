"""Our transformers path on one video request, for tests/test_vllm.py to hold vLLM against.

Runs in prunevid's main environment (the transformers adapter needs transformers>=5.24; vLLM's
environment has vLLM's older pin), so the test starts it with that interpreter
(`PRUNEVID_REFERENCE_PYTHON`):

    python tests/vllm_reference.py CHECKPOINT REQUEST.pt OUT.pt

REQUEST (torch.save'd dict): input_ids (L,) with one placeholder per video token,
pixel_values_videos, video_grid_thw (1, 3), second_per_grid_ts (1,) (Qwen2.5-VL only),
settings (the plugin's `prunevid` mapping, and for Qwen3-VL `per_step_budget`). OUT:
stock_positions (3, L), transformers' M-RoPE positions of the whole prompt; embeds (L', C) and positions (3, L'), what the decoder layers receive from
`prunevid.patch` with stage 1 only (`PruneVidConfig(stage2=False, **settings)`); features
(T * N, C), the vision tower's output; logical_embeds and logical_positions, the same prompt
written out independently of the adapter and of `MergeResult.first_members` by
`tests/reference.py`'s `logical_prompt` (stage 1's merge, then each merged token at the stock
position of the first token its assignment names). A Qwen3-VL checkpoint (one run of
placeholders per time step) gives the same, plus deepstack and logical_deepstack: per deepstack
level, (L', C) what the adapter adds to the hidden states after the first layers (the merged
tokens' members' mean, zero on text), and the reference's own.

A LLaVA-OneVision checkpoint (1-D RoPE) takes input_ids (L,) with T * h * w + 1 placeholders
(the pooled grids and the newline), pixel_values_videos (1, T, 3, H, W) and settings, and gives
embeds (L', C), positions (L',), features (T * h * w + 1, C) and logical_embeds /
logical_positions (L',).
"""

from __future__ import annotations

import sys

import torch
from reference import logical_prompt  # tests/reference.py: run as a script, its folder is on the path
from transformers import (
    AutoConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)

import prunevid
from prunevid.config import PruneVidConfig
from prunevid.models import base
from prunevid.models.qwen2_vl import VIDEO_MODALITY


def reference(checkpoint: str, request: dict) -> dict[str, torch.Tensor]:
    qwen3 = AutoConfig.from_pretrained(checkpoint).model_type == "qwen3_vl"
    family = Qwen3VLForConditionalGeneration if qwen3 else Qwen2_5_VLForConditionalGeneration
    model = family.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = request["input_ids"][None]
    # Qwen3-VL spaces time steps with timestamps in the text, not with second_per_grid_ts.
    timing = {} if qwen3 else {"second_per_grid_ts": request["second_per_grid_ts"]}
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == model.config.video_token_id).long() * VIDEO_MODALITY,
        "pixel_values_videos": request["pixel_values_videos"],
        "video_grid_thw": request["video_grid_thw"],
        **timing,
    }
    stock, _ = model.model.get_rope_index(
        ids,
        inputs["mm_token_type_ids"],
        video_grid_thw=inputs["video_grid_thw"],
        attention_mask=inputs["attention_mask"],
        **timing,
    )
    with torch.no_grad():
        features = model.model.get_video_features(
            inputs["pixel_values_videos"], inputs["video_grid_thw"], return_dict=True
        ).pooler_output[0]
    captured: dict[str, torch.Tensor] = {}
    decoder_prefill = base.prefill

    def recording(lm, embeds, mask, positions, cache, spans, config, rule, residuals, *args):
        captured.update(embeds=embeds[0].clone(), positions=positions[:, 0].clone())
        captured["deepstack"] = [r[0].clone() for r in residuals or []]
        return decoder_prefill(lm, embeds, mask, positions, cache, spans, config, rule, residuals, *args)

    config = PruneVidConfig(stage2=False, selected_layer=0, **request["settings"])
    logical = logical_prompt(model, inputs, config)  # the stock model, before it is patched
    base.prefill = recording
    try:
        prunevid.patch(model, config)
        with torch.no_grad():
            model(**inputs)
    finally:
        base.prefill = decoder_prefill
    return {
        "stock_positions": stock[:, 0],
        "features": features,
        "logical_embeds": logical.embeds,
        "logical_positions": logical.positions,
        "logical_deepstack": logical.deepstack,
        **captured,
    }


def llava_reference(checkpoint: str, request: dict) -> dict[str, torch.Tensor]:
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = request["input_ids"][None]
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values_videos": request["pixel_values_videos"],
    }
    with torch.no_grad():
        features = model.model.get_video_features(
            inputs["pixel_values_videos"], return_dict=True
        ).pooler_output[0]
    captured: dict[str, torch.Tensor] = {}
    decoder_prefill = base.prefill

    def recording(lm, embeds, mask, positions, *args):
        captured.update(embeds=embeds[0].clone(), positions=positions[0].clone())
        return decoder_prefill(lm, embeds, mask, positions, *args)

    config = PruneVidConfig(stage2=False, selected_layer=0, **request["settings"])
    logical = logical_prompt(model, inputs, config)  # the stock model, before it is patched
    base.prefill = recording
    try:
        prunevid.patch(model, config)
        with torch.no_grad():
            model(**inputs)
    finally:
        base.prefill = decoder_prefill
    return {
        "features": features,
        "logical_embeds": logical.embeds,
        "logical_positions": logical.positions[0],
        **captured,
    }


if __name__ == "__main__":
    checkpoint, request_path, out_path = sys.argv[1:]
    llava = AutoConfig.from_pretrained(checkpoint).model_type == "llava_onevision"
    torch.save((llava_reference if llava else reference)(checkpoint, torch.load(request_path)), out_path)
