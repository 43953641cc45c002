"""Prompts in the checkpoint's own chat template when its tokenizer (or processor) carries one;
our built-in format only as the fallback. The templates are written here, in Jinja, in the
styles of the llava-hf LLaVA-OneVision and the Qwen-VL checkpoints, with turns of their own
(a system line, no system line) so that they differ from the built-in format."""

import json
import shutil

import pytest
import torch
from helpers import QWEN_PATCHIFY, moving_square

from prunevid.models import llava_onevision, qwen2_vl
from prunevid.pipeline import load_model, model_inputs
from prunevid.testing import tiny_model, tiny_qwen_vl, tiny_tokenizer

LLAVA_TEMPLATE = (
    "{{ '<|im_start|>system you are a video assistant .<|im_end|>' }}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for item in message['content'] if item['type'] == 'video' %}{{ '<video>' }}{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ '\\n' + item['text'] }}{% endfor %}"
    "{{ '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QWEN_TEMPLATE = (  # like Qwen3-VL's: no default system turn
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEXT_ONLY_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : {{ message['content'] }}\n{% endfor %}"
)
FAILING_TEMPLATE = "{% for message in messages %}{{ message['content'] + ' !' }}{% endfor %}"
QUESTION = "what colour is the object ?"


def with_template(template: str | None):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def test_llava_onevision_prompt_uses_the_template():
    tokenizer = with_template(LLAVA_TEMPLATE)
    config = tiny_model(tokenizer=tokenizer).config
    inputs = llava_onevision.build_inputs(tokenizer, config, moving_square(0), QUESTION)
    video = "<video>" * (16 * 49 + 1)
    expected = (
        f"<|im_start|>system you are a video assistant .<|im_end|><|im_start|>user {video}\n"
        f"{QUESTION}<|im_end|><|im_start|>assistant\n"
    )
    assert inputs["input_ids"][0].tolist() == ids(tokenizer, expected)
    builtin = llava_onevision.build_inputs(with_template(None), config, moving_square(0), QUESTION)
    assert builtin["input_ids"][0].tolist() == ids(
        tokenizer, llava_onevision.PROMPT.format(question=QUESTION).replace("<video>", video)
    )
    assert builtin["input_ids"].shape[1] < inputs["input_ids"].shape[1], "the template's system turn is there"


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen_prompt_uses_the_template(family: str):
    tokenizer = with_template(QWEN_TEMPLATE)
    config = tiny_qwen_vl(family, tokenizer=tokenizer).config
    frames = moving_square(0, size=128 if family == "qwen3_vl" else 112)
    inputs = qwen2_vl.build_inputs(tokenizer, config, frames, QUESTION, QWEN_PATCHIFY[family], 0.5)
    assert inputs["video_grid_thw"].tolist() == [[8, 8, 8]]  # 8 time steps of 4 x 4 tokens
    if family == "qwen3_vl":  # a timestamp (the mean time of its two frames, 0.5 s apart) per step
        video = "".join(
            f"<{(2 * t + 0.5) * 0.5:.1f} seconds><|vision_start|>{'<|video_pad|>' * 16}<|vision_end|>"
            for t in range(8)
        )
    else:
        video = f"<|vision_start|>{'<|video_pad|>' * 128}<|vision_end|>"
    expected = f"<|im_start|>user\n{video}{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    assert qwen2_vl.video_prompt(tokenizer, config, inputs["video_grid_thw"][0], QUESTION, 0.5) == expected
    assert inputs["input_ids"][0].tolist() == ids(tokenizer, expected)
    assert "You are a helpful assistant" in qwen2_vl.video_prompt(
        with_template(None), config, inputs["video_grid_thw"][0], QUESTION, 0.5
    ), "without a template: the built-in format"


@pytest.mark.parametrize("template", [None, TEXT_ONLY_TEMPLATE, FAILING_TEMPLATE])
def test_templates_without_a_video_item_fall_back_to_the_builtin_format(template):
    """No template, a text-only one (the language model's, rendering no video placeholder), or
    one that cannot render a list of content items: the built-in format."""
    tokenizer = with_template(template)
    config = tiny_model(tokenizer=tokenizer).config
    text = llava_onevision.video_prompt(tokenizer, config, 2, QUESTION)
    assert text == llava_onevision.PROMPT.format(question=QUESTION).replace(
        "<video>", "<video>" * (2 * 49 + 1)
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("templated")
    tiny_model(seed=3).save_pretrained(folder)
    return folder


def test_pipeline_prompts_in_the_checkpoints_template(checkpoint, tmp_path):
    """A tokenizer saved with the template (chat_template.jinja, transformers 5's file), and a
    legacy processor file chat_template.json next to a text-only tokenizer template: both reach
    the prompt."""
    frames = moving_square(1)
    for layout in ("jinja", "legacy json"):
        folder = tmp_path / layout.replace(" ", "_")
        shutil.copytree(checkpoint, folder)
        if layout == "jinja":
            with_template(LLAVA_TEMPLATE).save_pretrained(folder)
        else:
            with_template(TEXT_ONLY_TEMPLATE).save_pretrained(folder)
            (folder / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA_TEMPLATE}))
        loaded = load_model(str(folder), device="cpu")
        assert loaded.tokenizer.chat_template == LLAVA_TEMPLATE, layout
        inputs = model_inputs(loaded, frames, QUESTION)
        direct = llava_onevision.build_inputs(
            with_template(LLAVA_TEMPLATE), loaded.model.config, frames, QUESTION
        )
        assert torch.equal(inputs["input_ids"], direct["input_ids"]), layout
        assert inputs["input_ids"][0, :3].tolist() == ids(loaded.tokenizer, "<|im_start|>system you"), layout
