"""bf16, the default dtype on CUDA, run on the CPU: the patched path against the same model in fp32.

Tolerances (tiny models with initializer_range 0.1, last-position logits of magnitude ~2):
* both stages off, bf16: identical to the stock bf16 model (the patch only reorders nothing);
* pruned, bf16 vs fp32: logits within 0.1 absolute (bf16 keeps 8 bits of mantissa, ~0.4% per
  rounding; measured 0.018-0.066 over the families and stages on x86-64 AVX-512, with stage 1 fed
  as below), stage-2 scores within 10%;
* stage 2's decision: every token whose fp32 score is more than 10% away from its set's cut-off
  (the mean of the last kept and the first dropped score) is kept in bf16 exactly when in fp32.
With stage 1 on, both models get the fp32 model's stage-1 result (the bf16 model its tokens in
bf16): a bf16 vision tower may merge a few tokens differently (LLaVA-OneVision's does here), and
stage 2 would then rank other tokens; the same merge keeps stage 2 compared for every family.
"""

import copy
import dataclasses

import pytest
import torch
from helpers import FAMILIES, QUESTIONS, tiny, video_batch
from reference import budget_sets, patched_kept

import prunevid
from prunevid import PruneVidConfig
from prunevid.merge import MergeResult
from prunevid.testing import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def in_bf16(inputs: dict) -> dict:
    return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}


def next_logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits[0, -1].float()


@pytest.mark.parametrize("family", FAMILIES)
def test_stages_off_in_bf16_equal_the_stock_bf16_model(family, tokenizer):
    model = tiny(family, tokenizer).to(torch.bfloat16)
    inputs = in_bf16(video_batch(model, tokenizer, [0], QUESTIONS[:1]))
    stock = next_logits(model, inputs)
    prunevid.patch(model, PruneVidConfig(stage1=False, stage2=False, selected_layer=1))
    assert torch.equal(next_logits(model, inputs), stock)


def feed_stage1(model, merge: MergeResult) -> None:
    """Make the patched `model` take `merge` as its stage-1 result (tokens in the model's dtype)."""
    runtime = model.model._prunevid

    def given(tokens: torch.Tensor, grid: tuple[int, int]) -> tuple[MergeResult, bool]:
        return dataclasses.replace(merge, tokens=merge.tokens.to(tokens.dtype)), False

    runtime.merge = given


def recorded_stage1(model) -> list[MergeResult]:
    """The stage-1 results the patched `model` computes from now on, in call order."""
    runtime, seen = model.model._prunevid, []
    merge = runtime.merge

    def recording(tokens: torch.Tensor, grid: tuple[int, int]) -> tuple[MergeResult, bool]:
        result, reused = merge(tokens, grid)
        seen.append(result)
        return result, reused

    runtime.merge = recording
    return seen


@pytest.mark.parametrize("stage1", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_bf16_agrees_with_fp32(family, stage1, tokenizer):
    fp32 = tiny(family, tokenizer)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    inputs = video_batch(fp32, tokenizer, [0], QUESTIONS[:1])
    config = PruneVidConfig(stage1=stage1, selected_layer=1)
    prunevid.patch(fp32, config)
    prunevid.patch(bf16, config)
    merges = recorded_stage1(fp32)
    exact = next_logits(fp32, inputs)
    if stage1:
        (merge,) = merges
        assert merge.num_tokens < merge.assignment.numel(), "stage 1 merged"
        feed_stage1(bf16, merge)
    approximate = next_logits(bf16, in_bf16(inputs))
    torch.testing.assert_close(approximate, exact, atol=0.1, rtol=0)
    assert float((approximate - exact).abs().max()) > 0, "the bf16 model really ran in bf16"

    trace, trace_bf16 = prunevid.last_trace(fp32), prunevid.last_trace(bf16)
    assert trace_bf16.num_after_stage2 < trace_bf16.num_after_stage1
    assert (trace.merged_index == trace_bf16.merged_index).all()
    kept, scores = patched_kept(trace)
    kept_bf16, scores_bf16 = patched_kept(trace_bf16)
    torch.testing.assert_close(scores_bf16, scores, rtol=0.1, atol=0)
    frames = trace.num_frames
    groups = budget_sets(
        torch.from_numpy(trace.merged_index.reshape(frames, -1)),
        torch.from_numpy(trace.static.reshape(frames, -1)),
        torch.from_numpy(trace.segment),
    )
    clear = torch.zeros_like(kept)
    for group in groups.unique():
        members = groups == group
        if kept[members].all():
            continue
        cut = (scores[members & kept].min() + scores[members & ~kept].max()) / 2
        clear |= members & ((scores - cut).abs() > 0.1 * cut)
    assert int(clear.sum()) >= len(kept) // 2, "most tokens are well separated from their set's cut-off"
    assert torch.equal(kept_bf16[clear], kept[clear])
