"""Tiny models of the real classes, built offline from configs, and a locally built tokenizer.

Used by the tests, the offline demo and the quick benchmark: the same code paths as the real
checkpoints (LlavaOnevisionForConditionalGeneration = SigLIP tower + projector + Qwen2), just small.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<video>", "<image>", "<unk>"]
# Qwen-VL's vision tokens, appended after the words so that earlier token ids stay put.
QWEN_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|image_pad|>"]
WORDS = [
    "user",
    "assistant",
    "system",
    "you",
    "are",
    "a",
    "an",
    "the",
    "is",
    "was",
    "what",
    "which",
    "who",
    "where",
    "when",
    "how",
    "many",
    "much",
    "does",
    "did",
    "do",
    "of",
    "in",
    "on",
    "at",
    "to",
    "from",
    "by",
    "with",
    "and",
    "or",
    "not",
    "no",
    "yes",
    "it",
    "this",
    "that",
    "there",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "zero",
    "colour",
    "color",
    "shape",
    "object",
    "objects",
    "moving",
    "move",
    "moves",
    "moved",
    "move",
    "static",
    "small",
    "large",
    "big",
    "left",
    "right",
    "up",
    "down",
    "top",
    "bottom",
    "first",
    "last",
    "appear",
    "appears",
    "appeared",
    "disappear",
    "scene",
    "change",
    "changes",
    "changed",
    "cut",
    "video",
    "frame",
    "frames",
    "red",
    "green",
    "blue",
    "yellow",
    "white",
    "black",
    "orange",
    "purple",
    "pink",
    "cyan",
    "gray",
    "brown",
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "diamond",
    "ring",
    "bar",
    "direction",
    "animal",
    "rabbit",
    "describe",
    "happening",
    "background",
    "?",
    ".",
    ",",
    "!",
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with the chat special tokens, built in memory (no download)."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + sorted(set(WORDS)) + QWEN_TOKENS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()  # "What colour?" reads as "what colour ?"
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=SPECIAL_TOKENS[1:5] + QWEN_TOKENS,
    )
    fast.padding_side = "left"
    return fast


def tiny_config(tokenizer: PreTrainedTokenizerFast | None = None, **text_overrides) -> LlavaOnevisionConfig:
    """LLaVA-OneVision with a 2-layer SigLIP (112 px, 8 px patches -> 7 x 7 pooled tokens per
    frame) and a 4-layer grouped-query Qwen2 (4 query heads, 2 key heads)."""
    tokenizer = tokenizer or tiny_tokenizer()
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=112,
        patch_size=8,
    )
    return LlavaOnevisionConfig(
        vision_config=vision.to_dict(),
        text_config=Qwen2Config(**_tiny_text(tokenizer, **text_overrides)).to_dict(),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=False,
    )


def tiny_model(seed: int = 0, tokenizer: PreTrainedTokenizerFast | None = None, **text_overrides):
    """A randomly initialised tiny LlavaOnevisionForConditionalGeneration in eval mode (fp32)."""
    tokenizer = tokenizer or tiny_tokenizer()
    torch.manual_seed(seed)
    return _ready(LlavaOnevisionForConditionalGeneration(tiny_config(tokenizer, **text_overrides)), tokenizer)


def tiny_qwen_vl(
    family: str = "qwen2_5_vl",
    seed: int = 0,
    tokenizer: PreTrainedTokenizerFast | None = None,
    **text_overrides,
):
    """A randomly initialised tiny Qwen2.5-VL (or family "qwen2_vl" / "qwen3_vl") in eval mode:
    a 2-block vision tower (14 px patches, 16 for Qwen3-VL with deepstack features from both
    blocks, 2 x 2 merge, temporal patch 2) and a 4-layer grouped-query text model with M-RoPE
    (sections 2 + 3 + 3 of the 8 rotary pairs; in that ratio for a wider `hidden_size` override)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    tokenizer = tokenizer or tiny_tokenizer()
    width = text_overrides.get("hidden_size", 64)
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    if family == "qwen3_vl":
        vision.update(
            patch_size=16, out_hidden_size=width, num_position_embeddings=64, deepstack_visual_indexes=[0, 1]
        )
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        config_class, model_class = Qwen3VLConfig, Qwen3VLForConditionalGeneration
    elif family == "qwen2_5_vl":
        vision.update(out_hidden_size=width, window_size=56, fullatt_block_indexes=[1], tokens_per_second=2)
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    elif family == "qwen2_vl":
        vision.update(embed_dim=32, mlp_ratio=2, hidden_size=width)
        config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    else:
        raise ValueError(f"family must be qwen2_vl, qwen2_5_vl or qwen3_vl, got {family!r}")
    pairs = width // text_overrides.get("num_attention_heads", 4) // 2  # rotary pairs per head
    rope = {
        "rope_type": "default",
        "mrope_section": [pairs // 4, 3 * pairs // 8, 3 * pairs // 8],
        "rope_theta": 10000.0,
    }
    text = _tiny_text(tokenizer, rope_parameters=rope, bos_token_id=tokenizer.pad_token_id, **text_overrides)
    ids = tokenizer.convert_tokens_to_ids
    config = config_class(
        vision_config=vision,
        text_config=text,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return _ready(model_class(config), tokenizer)


def _tiny_text(tokenizer: PreTrainedTokenizerFast, **overrides) -> dict:
    """The tiny language model's settings: 4 layers, width 64, 4 query heads and 2 key heads."""
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return {**text, **overrides}


def _ready(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast) -> torch.nn.Module:
    """Eval mode, and generate() told the tokenizer's pad and end tokens."""
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


# Qwen's chat format, for string or list-of-parts messages (what chat servers such as vLLM render).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' or 'video' in part %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tiny_qwen_vl(
    folder: str, seed: int = 0, min_pixels: int = 56 * 56, max_pixels: int = 224 * 224
) -> str:
    """Write a tiny random Qwen2.5-VL checkpoint a server can load offline: weights, config,
    the local tokenizer with Qwen's chat template, and image and video processor configs
    (Qwen-VL's defaults but frames of `min_pixels` to `max_pixels`, so that videos stay a few
    hundred tokens). Returns the folder."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    # Width 128 (head size 32): vLLM's CPU attention has no kernel for the default head size 16.
    model = tiny_qwen_vl("qwen2_5_vl", seed=seed, tokenizer=tokenizer, hidden_size=128, intermediate_size=256)
    processing = {
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
    }
    return _save_qwen(folder, model, tokenizer, "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor", processing)


def save_tiny_qwen3_vl(
    folder: str, seed: int = 0, min_pixels: int = 32 * 32, max_pixels: int = 16 * 256 * 256
) -> str:
    """Write a tiny random Qwen3-VL checkpoint a server can load offline, as `save_tiny_qwen_vl`
    (16 px patches, deepstack features from both vision blocks, interleaved M-RoPE as the real
    checkpoints). Qwen3-VL's video processor bounds the pixels of the whole clip: the defaults
    keep 8 frames of 256 px (4 time steps of 8 x 8 tokens) whole."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    # Width 128 and head size 32 (Qwen3's default is 128): vLLM's CPU attention has no kernel for
    # head size 16, and vLLM's M-RoPE needs the sections to fill the head. Text weights of std 0.1
    # (not 0.02; the tower keeps 0.02), as tests/helpers.py's tiny models: sharp, position-sensitive
    # attention, so that a wrong position or embedding shows in the greedy tokens.
    model = tiny_qwen_vl(
        "qwen3_vl",
        seed=seed,
        tokenizer=tokenizer,
        hidden_size=128,
        intermediate_size=256,
        head_dim=32,
        initializer_range=0.1,
    )
    # vLLM reads the flag; transformers' Qwen3-VL always interleaves.
    model.config.text_config.rope_parameters["mrope_interleaved"] = True
    processing = {
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
    }
    return _save_qwen(folder, model, tokenizer, "Qwen3VLProcessor", "Qwen3VLVideoProcessor", processing)


def _save_qwen(folder: str, model, tokenizer, processor: str, video_processor: str, processing: dict) -> str:
    """Save a Qwen-VL model, its tokenizer, chat template and image and video processor configs."""
    import json
    from pathlib import Path

    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    vision = model.config.vision_config
    processing = {
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "patch_size": vision.patch_size,
        "temporal_patch_size": vision.temporal_patch_size,
        "merge_size": vision.spatial_merge_size,
        "processor_class": processor,
        **processing,
    }
    files = {
        "preprocessor_config.json": {"image_processor_type": "Qwen2VLImageProcessor", **processing},
        "video_preprocessor_config.json": {
            "video_processor_type": video_processor,
            "do_sample_frames": False,
            **processing,
        },
        "processor_config.json": {"processor_class": processor},
    }
    for name, content in files.items():
        (Path(folder) / name).write_text(json.dumps(content, indent=2))
    (Path(folder) / "chat_template.jinja").write_text(QWEN_CHAT_TEMPLATE)
    return folder


# A LLaVA-OneVision chat format for list-of-parts messages (the llava-hf checkpoints' layout).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' or 'video' in part %}<video>\n"
    "{% elif part['type'] == 'image' or 'image' in part %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tiny_llava_onevision(folder: str, seed: int = 0) -> str:
    """Write a tiny random LLaVA-OneVision checkpoint a server can load offline: weights, config,
    the local tokenizer with a chat template, and image and video processor configs (112 px
    frames, 8 px patches: 7 x 7 pooled tokens per frame; images tiled on a grid of at most
    2 x 2 tiles of 112 px). Returns the folder."""
    import json
    from pathlib import Path

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    # Width 128 (head size 32): vLLM's CPU attention has no kernel for the default head size 16.
    model = tiny_model(seed=seed, tokenizer=tokenizer, hidden_size=128, intermediate_size=256)
    vision = model.config.vision_config
    side = vision.image_size
    pinpoints = [[side, side], [side, 2 * side], [2 * side, side], [2 * side, 2 * side]]
    model.config.image_grid_pinpoints = pinpoints
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _llava_hf_names(Path(folder) / "model.safetensors")
    processing = {
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "resample": 3,
        "size": {"height": side, "width": side},
        "processor_class": "LlavaOnevisionProcessor",
    }
    files = {
        "preprocessor_config.json": {
            "image_processor_type": "LlavaOnevisionImageProcessor",
            "image_grid_pinpoints": pinpoints,
            "do_pad": True,
            **processing,
        },
        "video_preprocessor_config.json": {
            "video_processor_type": "LlavaOnevisionVideoProcessor",
            "do_sample_frames": False,
            **processing,
        },
        "processor_config.json": {
            "processor_class": "LlavaOnevisionProcessor",
            "num_image_tokens": (side // vision.patch_size) ** 2,
            "vision_feature_select_strategy": "full",
            "vision_aspect_ratio": "anyres_max_9",
        },
    }
    for name, content in files.items():
        (Path(folder) / name).write_text(json.dumps(content, indent=2))
    (Path(folder) / "chat_template.jinja").write_text(LLAVA_CHAT_TEMPLATE)
    return folder


def _llava_hf_names(path) -> None:
    """Name the vision tower's weights as the llava-hf checkpoints do (`vision_tower.vision_model.`,
    which vLLM's loader expects and transformers reads too); transformers 5 writes them without
    `vision_model.`."""
    from safetensors.torch import load_file, save_file

    weights = load_file(path)
    renamed = {
        k.replace("vision_tower.", "vision_tower.vision_model.", 1)
        if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.")
        else k: v
        for k, v in weights.items()
    }
    save_file(renamed, path, metadata={"format": "pt"})
