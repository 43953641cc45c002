"""The pipeline (real loading code on a saved checkpoint) and the CLI, offline."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import budget_sets

from prunevid import PruneVidConfig
from prunevid.cli import main
from prunevid.pipeline import ModelLoadError, answer, encode_video, load_model, preset
from prunevid.testing import tiny_model, tiny_tokenizer
from prunevid.video import load_video

ASSETS = Path(__file__).parents[1] / "assets"
SHAPES = str(ASSETS / "shapes.mp4")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model saved like a Hub checkpoint: config, safetensors, tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-checkpoint")
    tiny_model(seed=3).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def test_loads_a_local_checkpoint_and_answers(checkpoint):
    loaded = load_model(checkpoint)
    assert loaded.processing.size == (112, 112), "frame size follows the vision config"
    config = preset(checkpoint, loaded.num_layers)
    assert config.selected_layer == 1, "the paper's layer 10 of 28 scaled to 4 layers"
    first = answer(loaded, SHAPES, "what colour is the moving object ?", config, max_new_tokens=4)
    second = answer(loaded, SHAPES, "what colour is the moving object ?", config, max_new_tokens=4)
    assert first.text == second.text and first.num_new_tokens > 0
    assert (first.trace.merged_index == second.trace.merged_index).all()
    trace = first.trace
    assert trace.num_visual_tokens == 16 * 49
    # Both stages ran at the preset's settings: stage 1 merged, and stage 2 kept exactly
    # max(1, int(alpha * size)) of each of stage 1's sets (ALGORITHM.md §5.4).
    assert trace.num_after_stage2 < trace.num_after_stage1 < trace.num_visual_tokens
    sets = budget_sets(
        torch.from_numpy(trace.merged_index.reshape(16, 49)),
        torch.from_numpy(trace.static.reshape(16, 49)),
        torch.from_numpy(trace.segment),
    )
    assert trace.num_after_stage2 == sum(max(1, int(config.alpha * int(n))) for n in sets.bincount())
    # The timings are the parts of one sequential run: decode, vision tower, generate (whose
    # first token comes after the decoder prefill) within the total.
    timings = first.timings
    assert 0 < timings["llm_prefill_s"] < timings["ttft_s"] <= timings["generate_s"]
    assert timings["video_s"] + timings["vision_s"] + timings["generate_s"] <= timings["total_s"]


def test_precomputed_features_give_the_same_answer_and_reuse_stage1(checkpoint):
    loaded = load_model(checkpoint)
    config = preset(checkpoint, loaded.num_layers)
    frames = load_video(SHAPES, 16).frames
    question = "is the object moving left or right ?"
    direct = answer(loaded, frames, question, config, max_new_tokens=5)
    features = encode_video(loaded, frames)
    first = answer(loaded, frames, question, config, 5, features=features)
    again = answer(loaded, frames, "what colour is it ?", config, 5, features=features)
    assert first.text == direct.text and first.timings["vision_s"] == 0.0
    assert not direct.trace.stage1_reused and not first.trace.stage1_reused
    assert again.trace.stage1_reused, "a follow-up question on the same features skips stage 1"
    assert (again.trace.merged_index == first.trace.merged_index).all()
    other = answer(loaded, frames, question, config.replace(tau=0.99), 5, features=features)
    assert not other.trace.stage1_reused, "new stage-1 settings recompute it"
    # A feature buffer refilled in place with another video must not reuse the old merge.
    fresh = answer(loaded, frames, question, config, 5, features=features)
    assert fresh.trace.stage1_reused
    features.pooler_output.copy_(encode_video(loaded, frames[::-1].copy()).pooler_output)
    refilled = answer(loaded, frames[::-1].copy(), question, config, 5, features=features)
    assert not refilled.trace.stage1_reused, "an in-place write invalidates the cached stage 1"


def test_inference_mode_tensors_are_merged_afresh(checkpoint):
    loaded = load_model(checkpoint)
    config = preset(checkpoint, loaded.num_layers)
    frames = load_video(SHAPES, 16).frames
    with torch.inference_mode():  # its tensors keep no version counter, so stage 1 is never reused
        features = encode_video(loaded, frames)
        runs = [answer(loaded, frames, "what colour is it ?", config, 3, features=features) for _ in range(2)]
    assert not any(run.trace.stage1_reused for run in runs)
    assert runs[0].text == runs[1].text


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen", "tiny-trained"])
def test_each_family_answers_through_the_pipeline(name):
    loaded = load_model(name)
    result = answer(loaded, SHAPES, "what colour is the object ?", max_new_tokens=3)
    trace = result.trace
    assert 1 <= result.num_new_tokens <= 3
    assert trace.num_after_stage2 < trace.num_after_stage1 <= trace.num_visual_tokens
    assert trace.config == preset(name).to_dict()


def test_missing_model_is_one_sentence():
    with pytest.raises(ModelLoadError) as error:
        load_model("/nonexistent/prunevid-model")
    message = str(error.value)
    assert error.value.kind == "missing"
    assert message.startswith(
        "The model `/nonexistent/prunevid-model` is neither cached nor downloadable here"
    )
    assert "\n" not in message and message.count(". ") == 0 and message.endswith(".")


def test_bad_questions_and_frames(checkpoint):
    loaded = load_model(checkpoint)
    with pytest.raises(ValueError, match="question is empty"):
        answer(loaded, SHAPES, "   ")
    with pytest.raises(ValueError, match="question is too long"):
        answer(loaded, SHAPES, "why " * 1000)
    with pytest.raises(ValueError, match="unpaired surrogate"):
        answer(loaded, SHAPES, "what colour \ud83d ?")
    with pytest.raises(ValueError, match=r"frames must be a non-empty \(T, H, W, 3\) uint8 array"):
        answer(loaded, np.zeros((0, 8, 8, 3), np.uint8), "what ?")


def test_cli_answer_prints_answer_counts_and_timings(capsys, tmp_path):
    trace_path = tmp_path / "trace.json"
    code = main(
        [
            "answer",
            SHAPES,
            "what colour ?",
            "--model",
            "tiny",
            "--max-new-tokens",
            "3",
            "--trace",
            str(trace_path),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "visual tokens: 784 -> " in out and "llm_prefill_s" in out
    assert json.loads(trace_path.read_text())["num_visual_tokens"] == 784


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["answer", "missing.mp4", "q", "--model", "tiny"], "error: video file not found: missing.mp4"),
        (["answer", SHAPES, "", "--model", "tiny"], "error: The question is empty"),
        (
            ["answer", SHAPES, "q", "--model", "tiny", "--alpha", "3"],
            "error: alpha must be in (0, 1], got 3.0",
        ),
        (
            ["answer", SHAPES, "q", "--model", "tiny", "--selected-layer", "9"],
            "error: selected_layer must be in [0, 3] for this model (4 decoder layers), got 9",
        ),
        (
            ["answer", SHAPES, "q", "--model", "/nonexistent/m"],
            "error: The model `/nonexistent/m` is neither cached nor downloadable here",
        ),
    ],
)
def test_cli_errors_are_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["missing.mp4", "q"], "error: video file not found: missing.mp4"),
        ([SHAPES, " "], "error: The question is empty"),
        ([SHAPES, "q", "--retention", "0"], "error: retention must be in (0, 1], got 0.0"),
    ],
)
def test_cli_checks_what_it_can_before_loading_the_model(capsys, argv, message):
    # The model cannot load: its error would come first if these were checked after loading.
    assert main(["answer", *argv, "--model", "/nonexistent/m"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_cli_stage_switches(capsys):
    assert (
        main(
            ["answer", SHAPES, "q", "--model", "tiny", "--no-stage1", "--no-stage2", "--max-new-tokens", "1"]
        )
        == 0
    )
    assert "visual tokens: 784 -> 784 (stage 1) -> 784 (stage 2), 100.0% kept" in capsys.readouterr().out


def test_config_roundtrip_through_trace(checkpoint):
    loaded = load_model(checkpoint)
    config = PruneVidConfig(selected_layer=2, alpha=0.25, tau=0.9)
    result = answer(loaded, SHAPES, "how many objects ?", config, max_new_tokens=1)
    assert PruneVidConfig.from_dict(result.trace.config) == config
