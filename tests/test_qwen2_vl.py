"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (3-D M-RoPE; Qwen3-VL with per-frame timestamp runs and
deepstack features) against the stock models and a slow masked reference."""

import numpy as np
import pytest
import torch
from helpers import QWEN_PATCHIFY, greedy
from reference import patched_kept, slow_logits, stage2_reference, stock_positions

import prunevid
from prunevid import PruneVidConfig
from prunevid.models.qwen2_vl import VideoPatchify, build_batch, build_inputs
from prunevid.testing import tiny_qwen_vl, tiny_tokenizer

# Frames sized to 8 x 8 patches, 4 x 4 tokens per time step: 112 px for 14 px patches, 128 for 16.
SMALL, SMALL_QWEN3 = QWEN_PATCHIFY["qwen2_5_vl"], QWEN_PATCHIFY["qwen3_vl"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(params=["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def model(request, tokenizer):
    return tiny_qwen_vl(request.param, seed=0, tokenizer=tokenizer, initializer_range=0.1)


def scene(seed: int, frames: int = 16, size: int = 112) -> np.ndarray:
    rng = np.random.default_rng(seed)
    video = np.repeat(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)[None], frames, axis=0)
    for t in range(frames):
        video[t, 30:58, 4 + 5 * t : 32 + 5 * t] = (255, 0, 0)
    return video


def inputs_for(model, tokenizer, seed=0):
    qwen3 = model.config.model_type == "qwen3_vl"
    frames = scene(seed, size=128 if qwen3 else 112)
    return build_inputs(
        tokenizer, model.config, frames, "what colour is the object ?", SMALL_QWEN3 if qwen3 else SMALL
    )


def test_stages_off_equal_stock_and_unpatch_restores(model, tokenizer):
    inputs = inputs_for(model, tokenizer)
    with torch.no_grad():
        stock_logits = model(**inputs).logits
    stock = greedy(model, inputs, steps=8)
    prunevid.patch(model, PruneVidConfig(stage1=False, stage2=False, selected_layer=1))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, stock_logits, atol=1e-5, rtol=0)
    assert torch.equal(greedy(model, inputs, steps=8).sequences, stock.sequences)
    prunevid.patch(model, PruneVidConfig(selected_layer=1))
    greedy(model, inputs, steps=8)
    prunevid.unpatch(model)
    assert torch.equal(greedy(model, inputs, steps=8).sequences, stock.sequences)


@pytest.mark.parametrize("stage1", [False, True])
@pytest.mark.parametrize("selected_layer", [0, 3])
def test_fast_path_equals_slow_masked_path(model, tokenizer, stage1, selected_layer):
    """Stage 2 keeps what the independent reference from the stock model keeps (Qwen3-VL: with
    its q_norm / k_norm and deepstack features), and the fast path's logits equal the slow
    masked recomputation with that kept set (tests/reference.py)."""
    inputs = inputs_for(model, tokenizer)
    config = PruneVidConfig(stage1=stage1, selected_layer=selected_layer)
    scores, kept, prompt = stage2_reference(model, inputs, config)
    prunevid.patch(model, config)
    fast = greedy(model, inputs, steps=5)
    patched, patched_scores = patched_kept(prunevid.last_trace(model))
    assert 0 < int(kept.sum()) < len(kept)
    assert torch.equal(patched, kept), "stage 2 keeps what the reference from the stock model keeps"
    torch.testing.assert_close(patched_scores, scores, atol=1e-6, rtol=1e-5)
    slow = slow_logits(model, prompt, config, kept, fast.sequences[0, inputs["input_ids"].shape[1] :])
    for step, (f, s) in enumerate(zip(fast.logits, slow)):
        torch.testing.assert_close(f[0], s, atol=1e-4, rtol=0, msg=f"step {step}")


def test_batch_with_padding_equals_each_prompt_alone(model, tokenizer):
    """Two videos of different lengths and sizes and two questions of different lengths, in one
    left-padded batch, both stages on: each row's logits and greedy tokens equal the prompt alone."""
    qwen3 = model.config.model_type == "qwen3_vl"
    patchify = (
        VideoPatchify(min_pixels=4 * 64 * 64, max_pixels=8 * 128 * 128, patch=16, video_budget=True)
        if qwen3
        else VideoPatchify(min_pixels=56 * 56, max_pixels=112 * 140)
    )
    videos = [scene(1, frames=16, size=112), scene(2, frames=8, size=140)]
    questions = ["what colour is the object ?", "is the object moving left or right or up or down ?"]
    prunevid.patch(model, PruneVidConfig(selected_layer=1))
    batch = build_batch(tokenizer, model.config, videos, questions, patchify, seconds_per_frame=0.5)
    assert (batch["attention_mask"] == 0).any(), "the test needs padding"
    assert batch["video_grid_thw"][0].tolist() != batch["video_grid_thw"][1].tolist()
    together = greedy(model, batch, steps=6)
    traces = prunevid.last_traces(model)
    n = batch["input_ids"].shape[1]
    for row, (video, question) in enumerate(zip(videos, questions)):
        alone = greedy(model, build_inputs(tokenizer, model.config, video, question, patchify, 0.5), steps=6)
        assert together.sequences[row, n:].tolist() == alone.sequences[0, -6:].tolist()
        for a, b in zip(together.logits, alone.logits):
            torch.testing.assert_close(a[row], b[0], atol=1e-4, rtol=0)
        assert traces[row].num_after_stage2 < traces[row].num_after_stage1
        assert np.array_equal(traces[row].kept, prunevid.last_trace(model).kept)


def rotary_positions(model, inputs, steps=3):
    """The position ids the rotary embedding receives during generate: one entry per call, and
    the rotary embeddings the layer after the cut (selected_layer 1) receives at the prefill."""
    lm = model.model.language_model
    seen, after_cut = [], []
    hooks = [
        lm.rotary_emb.register_forward_hook(lambda module, args, out: seen.append(args[1][:, 0].clone())),
        lm.layers[2].register_forward_pre_hook(
            lambda module, args, kwargs: after_cut.append(kwargs["position_embeddings"]), with_kwargs=True
        ),
    ]
    greedy(model, inputs, steps=steps)
    for hook in hooks:
        hook.remove()
    return seen, after_cut[0]


def test_kept_tokens_keep_their_stock_3d_positions(model, tokenizer):
    inputs = inputs_for(model, tokenizer)
    stock, _ = rotary_positions(model, inputs)  # prefill, then one per generated token
    prunevid.patch(model, PruneVidConfig(stage1=False, selected_layer=1))
    seen, after_cut = rotary_positions(model, inputs)  # prefill, then generated
    trace = prunevid.last_trace(model)
    positions = stock_positions(model, inputs)
    ids = inputs["input_ids"][0]
    is_video = ids == model.config.video_token_id
    keep = ~is_video
    keep[is_video.nonzero().squeeze(1)[torch.from_numpy(trace.kept.reshape(-1))]] = True
    assert torch.equal(stock[0], positions) and torch.equal(seen[0], positions)
    # The layers after the cut get the rotary embeddings of the kept tokens' stock (t, h, w).
    embeds = model.get_input_embeddings()(ids[None, keep])
    expected = model.model.language_model.rotary_emb(embeds, positions[:, None, keep])
    for got, want in zip(after_cut, expected, strict=True):
        assert torch.equal(got, want), "kept tokens keep their (t, h, w)"
    # Decoding continues exactly where the stock generate() does (the unpruned rope delta).
    assert torch.equal(seen[1], stock[1]) and torch.equal(seen[2], stock[2])
    assert len(set(positions[1, is_video].tolist())) > 1, "the video really has 3-D positions"


def test_defaults_keep_at_most_a_fifth(model, tokenizer):
    inputs = inputs_for(model, tokenizer)
    prunevid.patch(model, PruneVidConfig(selected_layer=1))
    greedy(model, inputs, steps=1)
    trace = prunevid.last_trace(model)
    assert trace.num_frames == 8 and trace.grid == (4, 4), (
        "16 frames / temporal patch 2, 8 x 8 patches / merge 2"
    )
    assert trace.num_after_stage2 / trace.num_visual_tokens <= 0.20


def test_placeholders_that_do_not_match_the_video_fail_as_stock(model, tokenizer):
    """A text token turned into a video placeholder: the patched model refuses the prompt with
    stock's error and count, read with the grids in one transfer."""
    inputs = inputs_for(model, tokenizer)
    ids = inputs["input_ids"].clone()
    ids[0, -1] = model.config.video_token_id
    wrong = {**inputs, "input_ids": ids}
    placeholders = int((ids == model.config.video_token_id).sum())
    with torch.no_grad(), pytest.raises(ValueError, match="Video features and video tokens do not match"):
        model(**wrong)
    prunevid.patch(model, PruneVidConfig(selected_layer=1))
    with (
        torch.no_grad(),
        pytest.raises(ValueError, match=f"tokens: {placeholders}, features: {placeholders - 1}"),
    ):
        model(**wrong)


def test_missing_token_types_is_a_clear_error(model, tokenizer):
    inputs = inputs_for(model, tokenizer)
    del inputs["mm_token_type_ids"]
    prunevid.patch(model, PruneVidConfig(selected_layer=1))
    with pytest.raises(ValueError, match="needs mm_token_type_ids"), torch.no_grad():
        model(**inputs)


def test_patchify_layout_and_sizes():
    patchify = VideoPatchify()
    # 240 x 320 rounds to 252 x 308 = 77,616 px < 128 * 28 * 28 = 100,352: scale by
    # sqrt(100352 / 76800) = 1.1431 and round up: ceil(9.80) * 28 = 280, ceil(13.06) * 28 = 392.
    assert patchify.target_size(240, 320) == (280, 392)
    # 2000 x 2000 is above 768 * 28 * 28 = 602,112 px: beta = 2.5775, floor(27.71) * 28 = 756.
    assert patchify.target_size(2000, 2000) == (756, 756)
    assert patchify.target_size(560, 840) == (560, 840), "multiples of 28 inside the range stay"
    assert patchify.target_size(28, 28) == (336, 336), "raised to at least 128 * 28 * 28 pixels"
    with pytest.raises(ValueError, match="aspect ratio"):
        patchify.target_size(10, 3000)
    # Qwen3-VL budgets the whole clip: 16 frames of 240 x 320 round to 16 x 256 x 320 = 1,310,720 px
    # > 768 * 32 * 32 = 786,432: beta = sqrt(16 * 240 * 320 / 786432) = 1.25 -> 192 x 256.
    qwen3 = VideoPatchify(min_pixels=128 * 32 * 32, max_pixels=768 * 32 * 32, patch=16, video_budget=True)
    assert qwen3.target_size(240, 320, 16) == (192, 256)
    assert qwen3.target_size(240, 320, 4) == (256, 320), "4 frames fit the budget: nearest multiples of 32"

    # A frame whose pixel value encodes its 14 x 14 patch (row, col): after patchify, patch i of
    # time step 0 must come from patch (row, col) in merge-block order.
    frames = np.zeros((3, 56, 56, 3), np.uint8)
    for row in range(4):
        for col in range(4):
            frames[:, 14 * row : 14 * row + 14, 14 * col : 14 * col + 14] = 10 * row + col
    exact = VideoPatchify(min_pixels=56 * 56, max_pixels=56 * 56, mean=(0, 0, 0), std=(1 / 255,) * 3)
    pixels, thw = exact(frames)
    assert thw.tolist() == [2, 4, 4], "3 frames padded to 4, then temporal patches of 2"
    assert pixels.shape == (32, 3 * 2 * 14 * 14)
    values = pixels[:16, 0].round().int().tolist()
    expected = [
        10 * (2 * br + r) + (2 * bc + c)
        for br in range(2)
        for bc in range(2)
        for r in range(2)
        for c in range(2)
    ]
    assert values == expected
    by_time = pixels.view(32, 3, 2, 14 * 14)
    assert torch.equal(by_time[16:, :, 0], by_time[16:, :, 1]), "the padded frame repeats the last one"


def test_frame_timing_spaces_temporal_positions(tokenizer):
    model = tiny_qwen_vl("qwen2_5_vl", tokenizer=tokenizer, initializer_range=0.1)
    inputs = build_inputs(tokenizer, model.config, scene(0), "what colour ?", SMALL, seconds_per_frame=2.0)
    assert inputs["second_per_grid_ts"].tolist() == [4.0], "temporal patch of 2 frames, 2 s apart"
    default = build_inputs(tokenizer, model.config, scene(0), "what colour ?", SMALL)
    spaced, plain = stock_positions(model, inputs), stock_positions(model, default)
    assert spaced[0].max() > plain[0].max(), "slower sampling spreads the temporal positions"
    stock = greedy(model, inputs, steps=4)
    prunevid.patch(model, PruneVidConfig(stage1=False, stage2=False, selected_layer=1))
    assert torch.equal(greedy(model, inputs, steps=4).sequences, stock.sequences)
