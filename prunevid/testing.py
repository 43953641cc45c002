"""Tiny models of the real classes, built offline from configs, and a locally built tokenizer.

Used by the tests, the offline demo and the quick benchmark: the same code paths as the real
checkpoints (LlavaOnevisionForConditionalGeneration = SigLIP tower + projector + Qwen2), just small.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<video>", "<image>", "<unk>"]
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
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + sorted(set(WORDS)))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=SPECIAL_TOKENS[1:5],
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
    text.update(text_overrides)
    return LlavaOnevisionConfig(
        vision_config=vision.to_dict(),
        text_config=Qwen2Config(**text).to_dict(),
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
    model = LlavaOnevisionForConditionalGeneration(tiny_config(tokenizer, **text_overrides)).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
