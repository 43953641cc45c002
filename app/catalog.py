"""The models the page offers: their names, labels, and what the banner says about the offline ones."""

from __future__ import annotations

from prunevid.pipeline import MODELS, TINY_MODEL, TRAINED_TINY_MODEL

LARGE_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
MODEL_CHOICES = [*MODELS, TRAINED_TINY_MODEL, TINY_MODEL]
MODEL_LABELS = {
    "llava-hf/llava-onevision-qwen2-0.5b-ov-hf": "LLaVA-OneVision 0.5B (llava-hf/llava-onevision-qwen2-0.5b-ov-hf)",
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": "LLaVA-OneVision 7B (llava-hf/llava-onevision-qwen2-7b-ov-hf)",
    "Qwen/Qwen2.5-VL-3B-Instruct": "Qwen2.5-VL 3B (Qwen/Qwen2.5-VL-3B-Instruct)",
    "Qwen/Qwen2.5-VL-7B-Instruct": "Qwen2.5-VL 7B (Qwen/Qwen2.5-VL-7B-Instruct)",
    TRAINED_TINY_MODEL: "tiny-trained: offline, trained on synthetic shape videos (8 frames)",
    TINY_MODEL: "tiny: offline demo model (random weights)",
}
OFFLINE_MODEL = TRAINED_TINY_MODEL  # what the page uses when the startup model cannot be loaded
TINY_MODELS = (TRAINED_TINY_MODEL, TINY_MODEL, "tiny-qwen")  # kilobytes: never evicted, never slow
# What the banner says about the offline models, whose answers only hold in a narrow world.
MODEL_NOTES = {
    TRAINED_TINY_MODEL: (
        "The offline demo model is tiny (0.8M parameters) and was trained only on synthetic shape "
        "videos: it answers the synthetic examples' questions (colour, shape, direction, count, first "
        "newcomer, scene change, small object) and nothing else; pick a real model in Advanced settings."
    ),
    TINY_MODEL: (
        "The tiny demo model has untrained random weights: its answers are meaningless, it only "
        "demonstrates the pipeline (merging, pruning, timings)."
    ),
}
