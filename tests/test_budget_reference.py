"""The retention budget end to end, against the independent reference (tests/reference.py with
tests/stage1_reference.py: its own stage 1, its own largest-remainder counts, the stock model).

Right count, wrong tokens fails here: for methods prunevid, stage1 and stage2 at 25 / 10 / 3%,
the patched model must merge exactly as the reference does (trace: assignment, static,
segments), keep exactly the reference's tokens, and give the logits of the slow masked
recomputation with that kept set.
"""

import pytest
import torch
from helpers import QWEN_PATCHIFY, greedy, moving_square, tiny
from reference import logical_prompt, patched_kept, slow_logits, stage2_reference
from stage1_reference import final_count, stage1_target, stage2_counts

import prunevid
from prunevid import PruneVidConfig
from prunevid.models import llava_onevision, qwen2_vl
from prunevid.select import keep_counts
from prunevid.testing import tiny_tokenizer

# What each method runs (docs/budgets.md): stage 1 alone reduces to the final count, stage 2
# alone treats every frame as its own budget set.
STAGES = {"prunevid": (True, True), "stage1": (True, False), "stage2": (False, True)}


@pytest.mark.parametrize(
    "sizes",
    [[50, 30, 20], [7] * 16, [49, 12, 12, 12, 12, 30, 11, 11], [3, 1, 1, 1], [100, 1, 1, 1, 1, 1], [5, 0, 5]],
)
def test_stage2_counts_equal_the_reference(sizes):
    """Stage 2's per-set counts, paper mode and every final count from 1 to all tokens (fewer
    tokens than sets, exactly as many, more), against the reference's own largest remainder."""
    groups = torch.cat([torch.full((size,), g) for g, size in enumerate(sizes)])
    num_visual = 4 * len(groups)  # stage 1 kept a quarter
    assert keep_counts(groups, PruneVidConfig(), num_visual).tolist() == stage2_counts(
        groups, PruneVidConfig(), num_visual
    )
    for final in range(1, len(groups) + 1):
        config = PruneVidConfig(retention=final / num_visual)
        assert final_count(num_visual, config.retention) == final
        expected = stage2_counts(groups, config, num_visual)
        assert keep_counts(groups, config, num_visual).tolist() == expected, (final, expected)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def case(family: str, tokenizer):
    model = tiny(family, tokenizer)
    if family == "llava_onevision":
        return model, llava_onevision.build_inputs(
            tokenizer, model.config, moving_square(0), "what colour is the object ?"
        )
    patchify = qwen2_vl.VideoPatchify(min_pixels=112 * 112, max_pixels=112 * 112)
    return model, qwen2_vl.build_inputs(
        tokenizer, model.config, moving_square(0), "what colour is the object ?", patchify
    )


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl"])
@pytest.mark.parametrize("method", list(STAGES))
def test_budget_keeps_the_reference_tokens_and_logits(family, method, tokenizer):
    model, inputs = case(family, tokenizer)
    stage1, stage2 = STAGES[method]
    for retention in (0.25, 0.1, 0.03):
        config = PruneVidConfig(selected_layer=1, retention=retention, stage1=stage1, stage2=stage2)
        if stage2:
            scores, kept, prompt = stage2_reference(model, inputs, config)
        else:
            prompt = logical_prompt(model, inputs, config)
            kept = torch.ones(len(prompt.visual), dtype=torch.bool)
        prunevid.patch(model, PruneVidConfig(selected_layer=1), method=method, retention=retention)
        fast = greedy(model, inputs, steps=3)
        trace = prunevid.last_trace(model)
        prunevid.unpatch(model)
        where = (method, retention)

        reference = prompt.stage1
        assert (
            trace.merged_index.reshape(reference.assignment.shape).tolist() == reference.assignment.tolist()
        ), where
        assert trace.static.reshape(reference.static.shape).tolist() == reference.static.tolist(), where
        assert trace.segment.tolist() == reference.segments.tolist(), where
        assert int(kept.sum()) == final_count(prompt.num_visual, retention), where
        patched, patched_scores = patched_kept(trace)
        assert torch.equal(patched, kept), f"kept tokens differ from the reference: {where}"
        if stage2:
            torch.testing.assert_close(patched_scores, scores, atol=1e-6, rtol=1e-5)
        slow = slow_logits(model, prompt, config, kept, fast.sequences[0, inputs["input_ids"].shape[1] :])
        for step, (f, s) in enumerate(zip(fast.logits, slow)):
            torch.testing.assert_close(f[0], s, atol=1e-4, rtol=0, msg=f"{where} step {step}")


@pytest.mark.parametrize("method", ["prunevid", "stage1"])
def test_a_per_step_budget_fills_each_qwen3_vl_time_step_with_its_share(method, tokenizer):
    """Qwen3-VL writes one placeholder run per time step (after its timestamp); under
    `per_step_budget` each run holds its equal share of stage 1's count, and the patched model
    equals the reference: same merge, same kept tokens, same logits."""
    model = tiny("qwen3_vl", tokenizer)
    inputs = qwen2_vl.build_inputs(
        tokenizer,
        model.config,
        moving_square(0, size=128),
        "what colour is the object ?",
        QWEN_PATCHIFY["qwen3_vl"],
    )
    steps = int(inputs["video_grid_thw"][0, 0])
    stage2 = STAGES[method][1]
    # Budgets whose shares leave room for every static position: the tiny tower's static tokens
    # are near-identical (similarities tied within float32 rounding), and which of two tied ones
    # turns dynamic is for tests/test_stage1_reference.py to check, on tokens that never tie.
    for retention in (0.1, 0.0625):  # stage 1 alone at 0.0625: a token per time step
        config = PruneVidConfig(selected_layer=1, retention=retention, per_step_budget=True, stage2=stage2)
        if stage2:
            scores, kept, prompt = stage2_reference(model, inputs, config)
        else:
            prompt = logical_prompt(model, inputs, config)
            kept = torch.ones(len(prompt.visual), dtype=torch.bool)
        # The reference's own count, split equally: what a server reserves for each run.
        share = stage1_target(prompt.num_visual, config)
        per_step = prompt.num_visual // steps
        runs = torch.bincount(
            torch.stack(
                [(prompt.stage1.assignment.flatten() == m).nonzero()[0, 0] for m in range(len(prompt.visual))]
            )
            // per_step,
            minlength=steps,
        )
        assert runs.tolist() == [share // steps + (t < share % steps) for t in range(steps)], retention
        prunevid.patch(model, config, method=method)
        fast = greedy(model, inputs, steps=3)
        trace = prunevid.last_trace(model)
        prunevid.unpatch(model)
        reference = prompt.stage1
        assert (
            trace.merged_index.reshape(reference.assignment.shape).tolist() == reference.assignment.tolist()
        )
        assert trace.segment.tolist() == reference.segments.tolist()
        patched, patched_scores = patched_kept(trace)
        assert torch.equal(patched, kept)
        if stage2:
            torch.testing.assert_close(patched_scores, scores, atol=1e-6, rtol=1e-5)
        slow = slow_logits(model, prompt, config, kept, fast.sequences[0, inputs["input_ids"].shape[1] :])
        for step, (f, s) in enumerate(zip(fast.logits, slow)):
            torch.testing.assert_close(f[0], s, atol=1e-4, rtol=0, msg=f"{method} {retention} step {step}")
