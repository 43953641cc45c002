"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (3-D M-RoPE; Qwen3-VL with per-frame timestamp runs and
deepstack features) against the stock models and a slow masked reference."""

import numpy as np
import pytest
import torch
from helpers import greedy

import prunevid
from prunevid import PruneVidConfig, merge_tokens
from prunevid.models.qwen2_vl import VideoPatchify, build_inputs
from prunevid.testing import tiny_qwen_vl, tiny_tokenizer

# Frames sized to 8 x 8 patches, 4 x 4 tokens per time step: 112 px for 14 px patches, 128 for 16.
SMALL = VideoPatchify(min_pixels=112 * 112, max_pixels=112 * 112)
SMALL_QWEN3 = VideoPatchify(
    min_pixels=16 * 128 * 128,
    max_pixels=16 * 128 * 128,
    patch=16,
    mean=(0.5,) * 3,
    std=(0.5,) * 3,
    video_budget=True,
)


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


def stock_positions(model, inputs):
    """get_rope_index on the unpruned prompt: (3, L)."""
    timing = {"second_per_grid_ts": inputs["second_per_grid_ts"]} if "second_per_grid_ts" in inputs else {}
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], video_grid_thw=inputs["video_grid_thw"], **timing
    )
    return positions[:, 0]


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


def slow_reference(model, inputs, config, new_tokens):
    """Full recomputation without a cache: the stage-1 prompt with every token, 3-D positions
    from get_rope_index on the unpruned prompt (merged tokens: their first member's), pruned
    tokens masked out as keys after `selected_layer` and for every generated token. Qwen3-VL:
    each merged token sits in the frame run of its first member, and the deepstack features,
    averaged over each merged token's members, are added after their layers."""
    inner, lm = model.model, model.model.language_model
    ids = inputs["input_ids"][0]
    positions = stock_positions(model, inputs)
    is_video = ids == model.config.video_token_id
    t, h, w = (int(v) for v in inputs["video_grid_thw"][0])
    grid = (h // 2, w // 2)
    per_frame = grid[0] * grid[1]
    with torch.no_grad():
        encoded = inner.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        features = encoded.pooler_output[0]
        merge = merge_tokens(features.view(t, per_frame, -1), config, grid)
        assignment = merge.assignment.flatten()
        first_member = [int((assignment == m).nonzero()[0]) for m in range(merge.num_tokens)]
        members = torch.nn.functional.one_hot(assignment, merge.num_tokens).T.float()  # (M, T * N)
        deepstack = [layer[0] for layer in getattr(encoded, "deepstack_features", None) or []]
        deepstack = [members @ x / members.sum(1, keepdim=True) for x in deepstack]
        trace = prunevid.last_trace(model)
        kept = torch.zeros(merge.num_tokens, dtype=torch.bool)
        kept[torch.from_numpy(trace.merged_index[trace.kept])] = True

        # Walk the prompt: text stays, each run of video placeholders takes its merged tokens.
        runs = torch.diff(torch.nn.functional.pad(is_video.long(), (1, 1))).nonzero().squeeze(1).view(-1, 2)
        run_of = [0 if len(runs) == 1 else first_member[m] // per_frame for m in range(merge.num_tokens)]
        video_positions = positions[:, is_video]
        embed = lm.embed_tokens
        pieces, piece_positions, keep, visual_slots, visual_order, cursor = [], [], [], [], [], 0
        for r, (start, end) in enumerate(runs.tolist()):
            mine = [m for m in range(merge.num_tokens) if run_of[m] == r]
            pieces += [embed(ids[cursor:start]), merge.tokens[mine]]
            piece_positions += [
                positions[:, cursor:start],
                video_positions[:, [first_member[m] for m in mine]],
            ]
            keep += [True] * (start - cursor) + [bool(kept[m]) for m in mine]
            offset = sum(len(p) for p in pieces) - len(mine)
            visual_slots += list(range(offset, offset + len(mine)))
            visual_order += mine
            cursor = end
        pieces.append(embed(ids[cursor:]))
        piece_positions.append(positions[:, cursor:])
        keep = torch.tensor(keep + [True] * (len(ids) - cursor))
        prompt, prompt_positions = torch.cat(pieces), torch.cat(piece_positions, dim=1)

        logits = []
        for step in range(len(new_tokens)):
            hidden = torch.cat([prompt, embed(new_tokens[:step])])[None]
            n, n_prompt = hidden.shape[1], len(prompt)
            generated = positions[:, -1:] + 1 + torch.arange(step)
            pos = torch.cat([prompt_positions, generated], dim=1)[:, None]  # (3, 1, n)
            causal = torch.ones(n, n, dtype=torch.bool).tril()
            key_kept = torch.cat([keep, torch.ones(step, dtype=torch.bool)])
            late, early = causal & key_kept, causal.clone()
            early[n_prompt:] &= key_kept
            rotary = lm.rotary_emb(hidden, pos)
            for i, layer in enumerate(lm.layers):
                mask = (early if i <= config.selected_layer else late)[None, None]
                hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary)
                if i < len(deepstack):
                    hidden[0, visual_slots] += deepstack[i][visual_order]
            logits.append(model.lm_head(lm.norm(hidden))[0, -1])
    return logits


@pytest.mark.parametrize("stage1", [False, True])
@pytest.mark.parametrize("selected_layer", [0, 3])
def test_fast_path_equals_slow_masked_path(model, tokenizer, stage1, selected_layer):
    inputs = inputs_for(model, tokenizer)
    config = PruneVidConfig(stage1=stage1, selected_layer=selected_layer)
    prunevid.patch(model, config)
    fast = greedy(model, inputs, steps=5)
    assert prunevid.last_trace(model).num_after_stage2 < prunevid.last_trace(model).num_after_stage1
    slow = slow_reference(model, inputs, config, fast.sequences[0, inputs["input_ids"].shape[1] :])
    for step, (f, s) in enumerate(zip(fast.logits, slow)):
        torch.testing.assert_close(f[0], s, atol=1e-4, rtol=0, msg=f"step {step}")


def rotary_positions(model, inputs, steps=3):
    """The position ids the rotary embedding receives during generate: one entry per call."""
    seen = []
    hook = model.model.language_model.rotary_emb.register_forward_hook(
        lambda module, args, out: seen.append(args[1][:, 0].clone())
    )
    greedy(model, inputs, steps=steps)
    hook.remove()
    return seen


def test_kept_tokens_keep_their_stock_3d_positions(model, tokenizer):
    inputs = inputs_for(model, tokenizer)
    stock = rotary_positions(model, inputs)  # prefill, then one per generated token
    prunevid.patch(model, PruneVidConfig(stage1=False, selected_layer=1))
    seen = rotary_positions(model, inputs)  # prefill, kept prompt after the cut, then generated
    trace = prunevid.last_trace(model)
    positions = stock_positions(model, inputs)
    ids = inputs["input_ids"][0]
    is_video = ids == model.config.video_token_id
    keep = ~is_video
    keep[is_video.nonzero().squeeze(1)[torch.from_numpy(trace.kept.reshape(-1))]] = True
    assert torch.equal(stock[0], positions) and torch.equal(seen[0], positions)
    assert torch.equal(seen[1], positions[:, keep]), "kept tokens keep their (t, h, w)"
    # Decoding continues exactly where the stock generate() does (the unpruned rope delta).
    assert torch.equal(seen[2], stock[1]) and torch.equal(seen[3], stock[2])
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
