"""generate() on a patched model, the ways users call it: the cache step by step (batch with
padding), beam search and sampling against the independent masked reference (tests/reference.py),
and the modes PruneVid cannot serve (no cache, a static cache), which fail with one sentence."""

import threading

import pytest
import torch
from helpers import FAMILIES, QUESTIONS, greedy, num_placeholders, tiny, video_batch
from reference import slow_logits, stage2_reference
from transformers import TextIteratorStreamer

import prunevid
from prunevid import PruneVidConfig
from prunevid.testing import tiny_tokenizer

CONFIG = PruneVidConfig(selected_layer=1)  # both stages on, the paper's settings


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(params=FAMILIES)
def model(request, tokenizer):
    return tiny(request.param, tokenizer)


def test_cache_length_of_every_layer_after_prefill_and_each_step(model, tokenizer):
    """Two prompts of different lengths (left padding), stage 1 on: after the prefill every
    layer's cache holds the longest row's kept tokens (text + stage-2 survivors + LLaVA's
    newline), and each decode step adds exactly one position to every layer."""
    inputs = video_batch(model, tokenizer, [1, 2], QUESTIONS)
    assert (inputs["attention_mask"] == 0).any(), "the test needs padding"
    prunevid.patch(model, CONFIG)
    lengths = []
    hook = model.model.register_forward_hook(
        lambda module, args, out: lengths.append([layer.keys.shape[2] for layer in out.cache.layers])
    )
    steps = 4
    greedy(model, inputs, steps=steps)
    hook.remove()

    traces = prunevid.last_traces(model)
    suffix = 1 if model.config.model_type == "llava_onevision" else 0  # the video's trailing newline
    text = inputs["attention_mask"].sum(1) - num_placeholders(model, inputs)
    kept = [int(t) + trace.num_after_stage2 + suffix for t, trace in zip(text, traces)]
    assert kept[0] != kept[1], "rows of different lengths: the shorter one is left-padded in the cache"
    assert all(trace.num_after_stage2 < trace.num_after_stage1 < trace.num_visual_tokens for trace in traces)
    layers = model.config.text_config.num_hidden_layers
    expected = [[max(kept) + step] * layers for step in range(steps)]
    assert lengths == expected, "prefill, then one position per decode step, in every layer"


def test_beam_search_scores_equal_the_masked_reference(model, tokenizer):
    """Each returned beam's score (length_penalty 0: the sum of its tokens' log-probabilities)
    equals the log-probability the slow masked reference gives that sequence."""
    inputs = video_batch(model, tokenizer, [3], QUESTIONS[:1])
    _, kept, prompt = stage2_reference(model, inputs, CONFIG)
    prunevid.patch(model, CONFIG)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=4,
            num_beams=3,
            num_return_sequences=2,
            do_sample=False,
            length_penalty=0.0,
            return_dict_in_generate=True,
            output_scores=True,
        )
    length = inputs["input_ids"].shape[1]
    assert not torch.equal(out.sequences[0], out.sequences[1])
    for sequence, score in zip(out.sequences, out.sequences_scores):
        new = sequence[length:]
        ends = (new == model.generation_config.eos_token_id).nonzero()
        new = new[: int(ends[0]) + 1] if len(ends) else new
        logits = slow_logits(model, prompt, CONFIG, kept, new)
        logprob = sum(float(step.log_softmax(-1)[token]) for step, token in zip(logits, new))
        assert float(score) == pytest.approx(logprob, abs=1e-4)


def test_sampling_follows_the_masked_reference(model, tokenizer):
    inputs = video_batch(model, tokenizer, [4], QUESTIONS[:1])
    _, kept, prompt = stage2_reference(model, inputs, CONFIG)
    prunevid.patch(model, CONFIG)
    torch.manual_seed(7)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=5,
            min_new_tokens=5,
            do_sample=True,
            top_k=0,
            temperature=1.0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    new = out.sequences[0, inputs["input_ids"].shape[1] :]
    for step, (fast, slow) in enumerate(zip(out.logits, slow_logits(model, prompt, CONFIG, kept, new))):
        torch.testing.assert_close(fast[0], slow, atol=1e-4, rtol=0, msg=f"step {step}")


def test_streaming_and_max_new_tokens(model, tokenizer):
    inputs = video_batch(model, tokenizer, [6], QUESTIONS[:1])
    prunevid.patch(model, CONFIG)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = {}

    def run():
        with torch.no_grad():
            out["ids"] = model.generate(
                **inputs, max_new_tokens=7, min_new_tokens=7, do_sample=False, streamer=streamer
            )

    thread = threading.Thread(target=run)
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    new = out["ids"][0, inputs["input_ids"].shape[1] :]
    assert len(new) == 7
    assert streamed.split() == tokenizer.decode(new, skip_special_tokens=True).split()
    assert torch.equal(new, greedy(model, inputs, steps=7).sequences[0, -7:]), "streaming changes nothing"


def test_generate_without_a_cache_is_one_clear_error(model, tokenizer):
    inputs = video_batch(model, tokenizer, [5], QUESTIONS[:1])
    prunevid.patch(model, CONFIG)
    with pytest.raises(ValueError, match=r"^PruneVid needs generate\(\) with use_cache=True: .*\.$"):
        greedy(model, inputs, steps=2, use_cache=False)
    # A single forward without a cache is one prefill and stays allowed: its next-token logits
    # are the cached prefill's.
    with torch.no_grad():
        uncached = model(**inputs, use_cache=False).logits[0, -1]
        cached = model(**inputs).logits[0, -1]
    torch.testing.assert_close(uncached, cached, atol=1e-5, rtol=0)
    prunevid.unpatch(model)  # the stock model decodes without a cache as with one
    stock = greedy(model, inputs, steps=2).sequences
    assert torch.equal(greedy(model, inputs, steps=2, use_cache=False).sequences, stock)


def test_static_cache_is_one_clear_error(model, tokenizer):
    inputs = video_batch(model, tokenizer, [5], QUESTIONS[:1])
    prunevid.patch(model, CONFIG)
    with pytest.raises(
        ValueError, match=r"^PruneVid needs a DynamicCache of full-attention layers, not a StaticCache"
    ):
        greedy(model, inputs, steps=2, cache_implementation="static")
