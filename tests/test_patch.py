"""The LLaVA-OneVision patch against the stock model and a slow masked reference (tiny random models)."""

import numpy as np
import pytest
import torch
from helpers import greedy
from reference import patched_kept, slow_logits, stage2_reference

import prunevid
from prunevid import PruneVidConfig
from prunevid.models.llava_onevision import build_batch, build_inputs
from prunevid.testing import tiny_model, tiny_tokenizer

LAYERS = 4
OFF = PruneVidConfig(stage1=False, stage2=False, selected_layer=1)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def model(tokenizer):
    # Larger-than-default random weights give sharp, position-sensitive attention, so that a
    # wrong position or mask shows in the logits well above the tolerances.
    return tiny_model(seed=0, tokenizer=tokenizer, initializer_range=0.1)


def scene(seed: int, frames: int = 16) -> np.ndarray:
    """A textured still background with a bright square moving right: (T, 112, 112, 3) uint8."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
    video = np.repeat(background[None], frames, axis=0)
    for t in range(frames):
        x = 4 + 6 * t
        video[t, 40:64, x : x + 24] = (255, 40 * (seed % 5), 0)
    return video


@pytest.fixture(scope="module")
def inputs(tokenizer):
    return build_inputs(
        tokenizer, tiny_model(tokenizer=tokenizer).config, scene(0), "what colour is the object ?"
    )


# ---------------------------------------------------------------- exactness with both stages off


def test_stages_off_equal_stock_logits_and_tokens(model, inputs):
    with torch.no_grad():
        stock_logits = model(**inputs).logits
    stock = greedy(model, inputs, steps=8)
    prunevid.patch(model, OFF)
    with torch.no_grad():
        logits = model(**inputs).logits
    patched = greedy(model, inputs, steps=8)
    torch.testing.assert_close(logits, stock_logits, atol=1e-5, rtol=0)
    assert torch.equal(patched.sequences, stock.sequences)
    trace = prunevid.last_trace(model)
    assert trace.num_visual_tokens == trace.num_after_stage1 == trace.num_after_stage2 == 16 * 49


def test_inputs_embeds_without_ids_equal_stock(model, inputs):
    """Without input_ids the video placeholders are found by their embedding, as stock finds them."""
    embedded = {k: v for k, v in inputs.items() if k != "input_ids"}
    with torch.no_grad():
        embedded["inputs_embeds"] = model.get_input_embeddings()(inputs["input_ids"])
        stock = model(**embedded).logits
        prunevid.patch(model, OFF)
        torch.testing.assert_close(model(**embedded).logits, stock, atol=1e-5, rtol=0)


def test_placeholders_that_do_not_match_the_video_fail_as_stock(model, inputs):
    """One text token too many turned into a video placeholder: the patched model refuses the
    prompt with stock's error (and its count), checked in one read instead of stock's two."""
    ids = inputs["input_ids"].clone()
    ids[0, -1] = model.config.video_token_id
    wrong = {**inputs, "input_ids": ids}
    placeholders = int((ids == model.config.video_token_id).sum())
    with pytest.raises(ValueError, match="Video features and video tokens do not match"):
        model(**wrong)
    prunevid.patch(model, PruneVidConfig(selected_layer=1))
    with pytest.raises(
        ValueError, match=f"do not match, tokens: {placeholders}, features: {placeholders - 1}"
    ):
        model(**wrong)


def test_unpatch_restores_stock(model, inputs):
    stock = greedy(model, inputs, steps=6)
    stock_class, stock_inner = type(model), type(model.model)
    prunevid.patch(model, PruneVidConfig(selected_layer=1))
    assert type(model).__name__ == stock_class.__name__, "a saved config keeps its architecture name"
    pruned = greedy(model, inputs, steps=6)
    prunevid.unpatch(model)
    assert type(model) is stock_class and type(model.model) is stock_inner
    assert not hasattr(model.model, "_prunevid") and not hasattr(model, "_prunevid_stock_class")
    restored = greedy(model, inputs, steps=6)
    assert torch.equal(restored.sequences, stock.sequences)
    assert not all(torch.equal(a, b) for a, b in zip(pruned.logits, stock.logits)), "pruning changed nothing"


def test_sampling_with_stages_off_matches_stock_sampling(model, inputs):
    def sample():
        torch.manual_seed(123)
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=8, do_sample=True, temperature=1.5, top_k=0)

    stock = sample()
    prunevid.patch(model, OFF)
    assert torch.equal(sample(), stock)
    prunevid.patch(model, PruneVidConfig(selected_layer=1))
    first, second = sample(), sample()
    assert torch.equal(first, second), "same seed, same settings -> same sample"


# ---------------------------------------------------------------- fast path == slow masked path


@pytest.mark.parametrize("stage1", [False, True])
@pytest.mark.parametrize("selected_layer", [0, 1, LAYERS - 1])
def test_fast_path_equals_slow_masked_path(model, inputs, stage1, selected_layer):
    """Stage 2 keeps exactly the tokens the independent reference (tests/reference.py, from the
    stock model) keeps, with the same scores; and the pruned fast path's logits equal the slow
    masked recomputation with that independent kept set, for 5 generated steps."""
    config = PruneVidConfig(stage1=stage1, selected_layer=selected_layer)
    scores, kept, prompt = stage2_reference(model, inputs, config)
    prunevid.patch(model, config)
    fast = greedy(model, inputs, steps=5)
    patched, patched_scores = patched_kept(prunevid.last_trace(model))
    assert 0 < int(kept.sum()) < len(kept)
    assert torch.equal(patched, kept), "stage 2 keeps what the reference from the stock model keeps"
    torch.testing.assert_close(patched_scores, scores, atol=1e-6, rtol=1e-5)
    new_tokens = fast.sequences[0, inputs["input_ids"].shape[1] :]
    slow = slow_logits(model, prompt, config, kept, new_tokens)
    for step, (f, s) in enumerate(zip(fast.logits, slow)):
        torch.testing.assert_close(f[0], s, atol=1e-4, rtol=0, msg=f"step {step}")


def test_positions_and_cache_after_pruning(model, inputs):
    config = PruneVidConfig(stage1=False, selected_layer=1)
    prunevid.patch(model, config)
    seen = []
    hook = model.model.language_model.layers[2].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"].clone()), with_kwargs=True
    )
    result = greedy(model, inputs, steps=3)
    hook.remove()
    trace = prunevid.last_trace(model)
    n_prompt = inputs["input_ids"].shape[1]  # stage 1 off: the logical prompt is the stock one
    video_start = int((inputs["input_ids"][0] == model.config.video_token_id).nonzero()[0])
    kept_visual = video_start + np.flatnonzero(trace.kept.reshape(-1))
    expected = sorted([*range(video_start), *kept_visual.tolist(), *range(video_start + 16 * 49, n_prompt)])
    assert seen[0][0].tolist() == expected, "kept tokens keep their original positions"
    assert [int(p) for p in seen[1:]] == [n_prompt, n_prompt + 1], (
        "decoding continues from the unpruned length"
    )
    cache = result.past_key_values if hasattr(result, "past_key_values") else result.cache
    lengths = {layer.keys.shape[2] for layer in cache.layers}
    assert lengths == {len(expected) + 2}, "every layer's cache holds the kept prompt + generated tokens"


# ---------------------------------------------------------------- stage-2 scores


def test_stage2_scores_equal_explicit_eager_computation(model, inputs):
    """Recompute the relevance of every visual token by hand: softmax(q k^T / sqrt(d)) of the
    question rows over all prompt keys, per head with grouped-query key sharing, max over heads
    and rows. The tiny model has 4 query heads and 2 key heads."""
    config = PruneVidConfig(stage1=False, selected_layer=2)
    prunevid.patch(model, config)
    layer = model.model.language_model.layers[2]
    captured = {}
    hook = layer.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0].clone()))
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    trace = prunevid.last_trace(model)

    x = layer.input_layernorm(captured["x"][0])
    attn = layer.self_attn
    heads, kv_heads, dim = 4, 2, attn.head_dim
    ids = inputs["input_ids"][0]
    video = (ids == model.config.video_token_id).nonzero().squeeze(1)
    first_question = int(video[-1]) + 1
    expected = torch.full((len(video) - 1,), -1.0)
    with torch.no_grad():
        q = attn.q_proj(x).view(len(ids), heads, dim)
        k = attn.k_proj(x).view(len(ids), kv_heads, dim)
        for h in range(heads):
            kh = k[:, h // (heads // kv_heads)]
            for row in range(first_question, len(ids)):
                weights = torch.softmax(q[row, h] @ kh.T / dim**0.5, dim=0)
                expected = torch.maximum(expected, weights[video[:-1]])
    torch.testing.assert_close(torch.from_numpy(trace.score.reshape(-1)), expected, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- generate() features


def test_batch_with_padding_equals_each_prompt_alone(model, tokenizer):
    videos = [scene(1), scene(2)]
    questions = ["what colour is the object ?", "is the object moving left or right or up or down ?"]
    prunevid.patch(model, PruneVidConfig(selected_layer=1))
    batch = build_batch(tokenizer, model.config, videos, questions)
    assert (batch["attention_mask"] == 0).any(), "the test needs padding"
    together = greedy(model, batch, steps=6)
    traces = prunevid.last_traces(model)
    for row, (video, question) in enumerate(zip(videos, questions)):
        alone = greedy(model, build_inputs(tokenizer, model.config, video, question), steps=6)
        n = batch["input_ids"].shape[1]
        assert together.sequences[row, n:].tolist() == alone.sequences[0, -6:].tolist()
        for a, b in zip(together.logits, alone.logits):
            torch.testing.assert_close(a[row], b[0], atol=1e-4, rtol=0)
        assert traces[row].num_after_stage2 == prunevid.last_trace(model).num_after_stage2


def test_defaults_keep_at_most_a_fifth_of_visual_tokens(model, inputs):
    prunevid.patch(model, PruneVidConfig(selected_layer=1))  # the paper's defaults, layer scaled to 4
    seen = []
    hook = model.model.language_model.layers[0].register_forward_pre_hook(
        lambda m, args: seen.append(args[0])
    )
    with torch.no_grad():
        out = model(**inputs)
    hook.remove()
    trace = prunevid.last_trace(model)
    assert trace.num_visual_tokens == 16 * 49
    assert trace.num_after_stage2 / trace.num_visual_tokens <= 0.20
    # The trace's counts are what the language model really ran on: layer 0 saw the text, the
    # stage-1 tokens and the newline; the cache of every layer holds only the stage-2 survivors.
    text = inputs["input_ids"].shape[1] - (16 * 49 + 1)
    assert seen[0].shape[1] == text + trace.num_after_stage1 + 1
    assert {layer.keys.shape[2] for layer in out.cache.layers} == {text + trace.num_after_stage2 + 1}
    assert prunevid.PruningTrace.from_json(trace.to_json()).summary() == trace.summary()


def test_patch_errors(model):
    with pytest.raises(
        ValueError, match=r"selected_layer must be in \[0, 3\] for this model \(4 decoder layers\), got 10"
    ):
        prunevid.patch(model, PruneVidConfig())
    with pytest.raises(TypeError, match="PruneVid has no adapter for Linear"):
        prunevid.patch(torch.nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="not patched"):
        prunevid.last_trace(model)
    prunevid.patch(model, PruneVidConfig(selected_layer=1))
    with pytest.raises(RuntimeError, match="no video has gone through"):
        prunevid.last_trace(model)


def test_patch_refuses_a_transformers_older_than_the_adapters_api(monkeypatch):
    import transformers

    from prunevid.api import TransformersVersionError
    from prunevid.testing import tiny_model

    model = tiny_model(0)
    monkeypatch.setattr(transformers, "__version__", "5.19.0")  # what vLLM 0.32 pins
    with pytest.raises(TransformersVersionError, match=r"needs transformers>=5\.24,<6, found 5\.19\.0"):
        prunevid.patch(model)
    assert not hasattr(model.model, "_prunevid"), "nothing patched"
