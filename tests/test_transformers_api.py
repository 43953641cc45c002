"""The transformers API that PruneVid's patch relies on, named one by one.

Run by the main suite and by `.ci/transformers-latest` against the newest transformers 5.x: when
a release moves one of these, the test of that symbol fails and says what moved and where
PruneVid uses it, before the model tests fail in less readable ways.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect

import pytest
import torch
import transformers

from prunevid.testing import tiny_model, tiny_qwen_vl, tiny_tokenizer

VERSION = transformers.__version__
MASK = {"config", "inputs_embeds", "attention_mask", "cache", "position_ids"}
LAYER = {"hidden_states", "attention_mask", "position_ids", "cache", "use_cache", "position_embeddings"}
QWEN_FORWARD = {
    "input_ids",
    "attention_mask",
    "position_ids",
    "cache",
    "inputs_embeds",
    "pixel_values",
    "pixel_values_videos",
    "video_grid_thw",
    "mm_token_type_ids",
    "mm_encoder_outputs",
}
QWEN_POSITIONS = {
    "input_ids",
    "inputs_embeds",
    "video_grid_thw",
    "attention_mask",
    "cache",
    "mm_token_type_ids",
}
QWEN = "prunevid/models/qwen2_vl.py"
LLAVA = "prunevid/models/llava_onevision.py"
DECODER = "prunevid/models/decoder.py"

# (module, attribute path, parameters it must accept, where PruneVid calls it)
SIGNATURES = [
    ("transformers.masking_utils", "create_causal_mask", MASK, DECODER),
    ("transformers.masking_utils", "create_sliding_window_causal_mask", MASK, DECODER),
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2DecoderLayer.forward", LAYER, DECODER),
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VLDecoderLayer.forward", LAYER, DECODER),
    ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLDecoderLayer.forward", LAYER, DECODER),
    ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLTextDecoderLayer.forward", LAYER, DECODER),
    (
        "transformers",
        "LlavaOnevisionModel.forward",
        {"input_ids", "pixel_values", "pixel_values_videos", "attention_mask", "position_ids", "cache"}
        | {"inputs_embeds", "use_cache", "mm_encoder_outputs"},
        LLAVA,
    ),
    (
        "transformers",
        "LlavaOnevisionModel.get_video_features",
        {"pixel_values_videos", "vision_feature_layer", "vision_feature_select_strategy"},
        LLAVA,
    ),
    (
        "transformers",
        "LlavaOnevisionModel.get_placeholder_mask",
        {"input_ids", "inputs_embeds", "video_features"},
        LLAVA,
    ),
    *[
        entry
        for model in ("Qwen2VLModel", "Qwen2_5_VLModel", "Qwen3VLModel")
        for entry in [
            ("transformers", f"{model}.forward", QWEN_FORWARD, QWEN),
            ("transformers", f"{model}.compute_3d_position_ids", QWEN_POSITIONS, QWEN),
            ("transformers", f"{model}.get_video_features", {"pixel_values_videos", "video_grid_thw"}, QWEN),
            (
                "transformers",
                f"{model}.get_placeholder_mask",
                {"input_ids", "inputs_embeds", "video_features"},
                QWEN,
            ),
        ]
    ],
]


def moved(what: str, where: str, detail: str) -> str:
    return f"transformers {VERSION} moved {what} ({detail}); PruneVid relies on it in {where}"


def resolve(module: str, path: str):
    try:
        obj = importlib.import_module(module)
        for name in path.split("."):
            obj = getattr(obj, name)
    except (ImportError, AttributeError) as error:
        pytest.fail(f"transformers {VERSION} has no {module}.{path} ({error})")
    return obj


@pytest.mark.parametrize(("module", "path", "needed", "where"), SIGNATURES, ids=[s[1] for s in SIGNATURES])
def test_signature(module: str, path: str, needed: set[str], where: str):
    accepted = set(inspect.signature(resolve(module, path)).parameters)
    missing = sorted(needed - accepted)
    assert not missing, moved(f"{module}.{path}", where, f"no parameter {', '.join(missing)}")


def test_dynamic_cache_layers_hold_keys_and_values_per_position():
    """Stage 2 crops `cache.layers[i].keys / .values` (B, heads, positions, head_dim) in place."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    text = tiny_model().config.text_config
    cache = DynamicCache(config=text)
    keys, values = torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    cache.update(keys, values, 0)
    layer = cache.layers[0]
    where = "prunevid/models/decoder.py crop_cache, base.check_cache"
    assert type(layer) is DynamicLayer, moved("DynamicCache.layers", where, f"a {type(layer).__name__}")
    assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values), moved(
        "DynamicLayer.keys / .values", where, "not the stored tensors"
    )
    assert cache.get_seq_length() == 5, moved("Cache.get_seq_length", where, "not the stored length")


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("transformers.models.llava_onevision.modeling_llava_onevision", "LlavaOnevisionModelOutputWithPast"),
        ("transformers.modeling_outputs", "MultimodalBaseModelOutputWithPast"),
    ],
)
def test_prefill_output_fields(module: str, name: str):
    fields = {f.name for f in dataclasses.fields(resolve(module, name))}
    missing = sorted({"last_hidden_state", "cache", "video_outputs"} - fields)
    assert not missing, moved(f"{module}.{name}", "the patched forward's return value", f"no field {missing}")


def test_generate_drops_the_video_after_the_prefill():
    """Decode steps must not get the video again: the patched forward treats a call with a
    video and an empty cache as the prefill, and leaves later steps to the stock forward."""
    from transformers.generation import utils

    dropped = set(getattr(utils, "MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL", ()))
    missing = sorted({"pixel_values_videos", "mm_encoder_outputs"} - dropped)
    assert not missing, moved(
        "generation.utils.MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL", "the decode steps", f"{missing} kept"
    )


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_modules_the_patch_calls(family: str):
    """The language model's parts the prefill loop and stage 2 call, and the vision output it reads."""
    tokenizer = tiny_tokenizer()
    model = (
        tiny_model(tokenizer=tokenizer)
        if family == "llava_onevision"
        else tiny_qwen_vl(family, tokenizer=tokenizer)
    )
    lm = model.model.language_model
    for name in ("layers", "norm", "rotary_emb", "embed_tokens"):
        assert hasattr(lm, name), moved(f"{type(lm).__name__}.{name}", DECODER, "attribute gone")
    layer = lm.layers[0]
    needed = ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.head_dim"]
    needed += ["self_attn.q_norm", "self_attn.k_norm"] if family == "qwen3_vl" else []
    for path in needed:
        obj = layer
        for name in path.split("."):
            assert hasattr(obj, name), moved(
                f"{type(layer).__name__}.{path}", "decoder.select_tokens", "gone"
            )
            obj = getattr(obj, name)
    if family == "llava_onevision":
        out = model.model.get_video_features(torch.zeros(1, 2, 3, 112, 112), return_dict=True)
        assert out.pooler_output.shape == (1, 2 * 49 + 1, 64), moved(
            "LlavaOnevisionModel.get_video_features", LLAVA, "pooler_output is not (videos, T * N + 1, C)"
        )
        return
    size = 16 if family == "qwen3_vl" else 14
    grid = torch.tensor([[1, 4, 4]])
    out = model.model.get_video_features(torch.zeros(16, 3 * 2 * size * size), grid, return_dict=True)
    assert [tuple(f.shape) for f in out.pooler_output] == [(4, 64)], moved(
        f"{type(model.model).__name__}.get_video_features",
        QWEN,
        "pooler_output is not one (t * h * w / 4, C) per video",
    )
    if family == "qwen3_vl":
        assert len(out.deepstack_features) == 2, moved(
            "Qwen3VLModel deepstack_features", QWEN, "not one per layer"
        )
