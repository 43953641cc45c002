"""Our torchvision-free preprocessing against golden outputs of transformers' own video processors.

tests/data/processor_fixtures.npz holds, for a dozen small clips, what LlavaOnevisionVideoProcessor,
Qwen2VLVideoProcessor (Qwen2-VL and Qwen2.5-VL) and Qwen3VLVideoProcessor returned, bit for bit,
with the processor's own settings file, and the prompt text the full processors wrote for our
built-in prompt. They were made once where torchvision works (scripts/make_processor_fixtures.py
says how), so these checks run everywhere and never skip. `from_json` reads each processor's
settings, as `prunevid.pipeline` reads a checkpoint's.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

from prunevid.models import llava_onevision, qwen2_vl
from prunevid.testing import tiny_tokenizer

FIXTURES = Path(__file__).parent / "data" / "processor_fixtures.npz"
QUESTION = "what is the colour"  # the question the fixtures' prompts were made with
DATA = np.load(FIXTURES)
CASES = sorted({key.split("/")[0] for key in DATA.files if "/" in key})


def case(name: str) -> dict:
    return {key.split("/", 1)[1]: DATA[key] for key in DATA.files if key.startswith(f"{name}/")}


def their_pixels(data: dict) -> torch.Tensor:
    """The processor's float32 pixel_values_videos, rebuilt exactly from its stored code table."""
    return torch.from_numpy(data["values"][data["codes"].astype(np.int64)].reshape(data["shape"]))


def settings_file(data: dict, tmp_path: Path) -> str:
    path = tmp_path / "video_preprocessor_config.json"
    path.write_text(str(data["settings"]))
    return str(path)


def qwen_config(family: str, tokenizer) -> SimpleNamespace:
    """What `video_prompt` reads of a Qwen-VL config."""
    return SimpleNamespace(
        model_type=family,
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_config=SimpleNamespace(spatial_merge_size=2),
    )


def test_fixtures_cover_every_family_and_stay_small():
    families = {str(case(name)["family"]) for name in CASES}
    assert families == {"llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"}
    assert len(CASES) >= 10 and FIXTURES.stat().st_size < 2_100_000
    assert json.loads(str(DATA["versions"]))["transformers"].startswith("5.")


@pytest.mark.parametrize("name", [c for c in CASES if c.startswith("llava")])
def test_frame_processing_equals_llava_onevision_video_processor(name: str, tmp_path: Path):
    data = case(name)
    processing = llava_onevision.FrameProcessing.from_json(settings_file(data, tmp_path))
    ours, theirs = processing(data["clip"]), their_pixels(data)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours, theirs), f"max abs difference {float((ours - theirs).abs().max()):.3e}"


@pytest.mark.parametrize("name", [c for c in CASES if c.startswith("qwen")])
def test_video_patchify_equals_qwen_video_processor(name: str, tmp_path: Path):
    data = case(name)
    patchify = qwen2_vl.VideoPatchify.from_json(settings_file(data, tmp_path))
    assert patchify.video_budget == (str(data["family"]) == "qwen3_vl"), "Qwen3-VL budgets the whole clip"
    ours, thw = patchify(data["clip"])
    theirs = their_pixels(data)
    assert thw.tolist() == data["grid"].tolist()
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours, theirs), f"max abs difference {float((ours - theirs).abs().max()):.3e}"


def test_llava_onevision_prompt_equals_the_processors():
    tokenizer = tiny_tokenizer()
    # The llava-hf checkpoints' geometry: 384 px frames, 14 px patches (729 image tokens).
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(image_size=384, patch_size=14).to_dict(),
        text_config=Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=1).to_dict(),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
    )
    for name in (c for c in CASES if c.startswith("llava")):
        data = case(name)
        ours = llava_onevision.video_prompt(tokenizer, config, len(data["clip"]), QUESTION)
        assert ours == str(data["text"]), name


@pytest.mark.parametrize("name", [c for c in CASES if c.startswith("qwen")])
def test_qwen_prompt_equals_the_processors(name: str, tmp_path: Path):
    data = case(name)
    family, tokenizer = str(data["family"]), tiny_tokenizer()
    config = qwen_config(family, tokenizer)
    seconds = 1 / float(data["fps"])  # the clips are consecutive frames of a video at this fps
    patchify = qwen2_vl.VideoPatchify.from_json(settings_file(data, tmp_path))
    inputs = qwen2_vl.build_inputs(tokenizer, config, data["clip"], QUESTION, patchify, seconds)
    ours = qwen2_vl.video_prompt(tokenizer, config, inputs["video_grid_thw"][0], QUESTION, seconds)
    theirs = str(data["text"])
    assert torch.equal(inputs["input_ids"], tokenizer([ours], return_tensors="pt")["input_ids"])
    if family == "qwen2_5_vl":
        assert inputs["second_per_grid_ts"].tolist() == data["second_per_grid_ts"].tolist()
    if family != "qwen3_vl":
        assert ours == theirs
        return
    # Qwen3-VL: the same timestamps and per-frame runs, but transformers 5 keeps the chat
    # template's outer <|vision_start|> ... <|vision_end|> around them, where Qwen's own processor
    # (transformers 4.57) replaced the whole slot, as we do (docs/processing_check.md).
    assert theirs.count("<|vision_start|>") == ours.count("<|vision_start|>") + 1
    unwrapped = theirs.replace("\n<|vision_start|><", "\n<", 1).replace(
        "<|vision_end|><|vision_end|>", "<|vision_end|>", 1
    )
    assert ours == unwrapped
