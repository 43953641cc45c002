"""What a patched model asks of the host, against the stock model (DESIGN.md "On a GPU").

`HostProbe` counts aten ops (about one kernel launch each on a GPU) and host reads (each a
device sync on a GPU) of a whole `generate()` call on the CPU. A patched prefill of a video of
196 tokens a frame (LLaVA-OneVision's 14 x 14 pooled grid, a 14 x 14 Qwen2.5-VL merger grid)
must add a bounded number of ops over stock, independent of the frame count, and read back
nothing beyond what a shape needs; a decode step must cost what a stock one costs.

Stage 1 and stage 2's rule (merge.py, cluster.py, budget.py, select.py) are counted apart from
the rest (the model side: splicing, stage-2 gathering, cache, positions, masks, traces), so that
each side's bound is checked on its own; `TOTAL_*` bound the whole prefill.

Measured (over stock, 8 / 32 frames, selected_layer 1; paper mode | retention 0.25):
                        before (6a7421b)               batched (9b14bb8)          now
LLaVA-OV prefill ops    +503/+1187 | +733/+1496        +559/+573 | +690/+704      +369/+369 | +465/+465
  launching (not views)                                                           +271 | +352
  model side ops        +139 | +139                    +170 | +170                +124 | +124
  prefill reads         +46/+66 | +55/+79              2/2 | 1/1                  1/1 | 0/0
  model side reads      +28 | +28                      0 | 0                      -1 | -1
  decode step           +9 ops, +1 read                +1 op, 0 reads             +1 op, 0 reads
Qwen2.5-VL prefill ops  +589/+1233 | +764/+1508        +588/+602 | +719/+733      +383/+383 | +479/+479
  launching (not views)                                                           +283 | +364
  model side ops        +185 | +185                    +199 | +199                +138 | +138
  prefill reads         (not measured)                 3/3 | 2/2                  1/1 | 0/0
  model side reads      +36 | +36                      +1 | +1                    -1 | -1
  decode step           +9 ops, +1 read                0 ops, 0 reads             0 ops, 0 reads
Qwen3-VL (2 deepstack levels): +422 | +516 ops (+310 | +387 launching), model side +168, reads
-3 | -4 (its stock prefill reads more), decode step 0 ops, 0 reads.
Stage 1 reads the T temporal labels once (its contiguity walk runs on the host) and, in the
paper's mode, its output count with the budget sets' sizes once; the adapters read the
placeholder count once (with Qwen-VL's grid sizes, which generate() consumed with
video_grid_thw), where stock's check reads it twice. The issue's ops target (+400) is met in the
paper's mode, and under a retention for the ops that launch a kernel; counting views too, the
exact budgets cost ~100 ops more (two allocations, stage 1's and stage 2's, ~35 each, and stage
1's static fit ~22). Stage 1 alone is ~207 | ~269 of the ops (its two DPC-KNN clusterings ~70,
the batch merge ~51).
"""

from collections import Counter

import numpy as np
import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

import prunevid
from prunevid import PruneVidConfig
from prunevid.bench.probe import HostProbe, _caller
from prunevid.merge import merge_tokens
from prunevid.models import llava_onevision, qwen2_vl
from prunevid.testing import tiny_config, tiny_qwen_vl, tiny_tokenizer
from prunevid.trace import PendingTrace, PruningTrace, materialize

STAGES = ("merge.py", "cluster.py", "budget.py", "select.py")  # stage 1 and stage 2's rule
QUESTION = "what colour is the object ?"
SIDE = 14  # tokens per frame: SIDE x SIDE = 196
# The model side's ops over stock (Qwen3-VL also merges and lays out its deepstack features),
# and how much more 32 frames may cost than 8.
MODEL_SIDE_OPS = {"llava": 160, "qwen": 160, "qwen3": 190}
GROWTH = 1.25
# The model side reads no more than stock: the adapters read once, the placeholder count (with
# Qwen-VL's grid sizes, which generate() has consumed from video_grid_thw), where stock's check
# reads it twice; the kept count is host-known (`select.kept_total`).
MODEL_SIDE_READS = 0
ADAPTER_READS = 1
# The stages' reads: stage 1's temporal labels, and in the paper's mode its counts.
STAGE_READS = {None: 2, 0.25: 1}
# The whole prefill over stock, stages included: ops at most these in the paper's mode (the
# issue's target, 400; measured 369-383, Qwen3-VL 422) | under a retention (measured 465-479,
# Qwen3-VL 516-518), and reads at most the targets (measured 1 | 0).
TOTAL_OPS = {"llava": {None: 400, 0.25: 500}, "qwen": {None: 400, 0.25: 500}, "qwen3": {None: 440, 0.25: 540}}
TOTAL_READS = {None: 2, 0.25: 1}
# Of those ops, the ones that launch a kernel on a GPU (views launch none): at most the issue's
# 400 in either mode, for every family.
TOTAL_LAUNCHES = 400
DECODE_STEPS = 4


class _Probe(HostProbe):
    """HostProbe that also counts ops by the file of prunevid's innermost frame that issued them."""

    def __init__(self) -> None:
        super().__init__()
        self.ops_by_file: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops_by_file[_caller().split(":")[0]] += 1
        return super().__torch_dispatch__(func, types, args, kwargs)

    def model_side(self) -> tuple[int, int]:
        """(ops, reads) outside the stages' files."""
        ops = sum(n for f, n in self.ops_by_file.items() if f not in STAGES)
        return ops, self.reads - self.stage_reads()

    def stage_reads(self) -> int:
        return sum(n for op, n in self.reads_by_op.items() if op.split(" at ")[1].startswith(STAGES))

    def adapter_reads(self) -> int:
        """Reads in the adapters' code (what stock code runs below generate() counts there)."""
        return (
            self.reads
            - self.stage_reads()
            - sum(n for op, n in self.reads_by_op.items() if op.endswith("(generate)"))
        )


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llava(tokenizer):
    config = tiny_config(tokenizer)
    config.vision_config.image_size = 2 * SIDE * config.vision_config.patch_size  # pooled SIDE x SIDE
    torch.manual_seed(0)
    model = llava_onevision.LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


@pytest.fixture(scope="module")
def qwen(tokenizer):
    return tiny_qwen_vl("qwen2_5_vl", seed=0, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def qwen3(tokenizer):
    return tiny_qwen_vl("qwen3_vl", seed=0, tokenizer=tokenizer)


def _features(frames: int, width: int, extra: int = 0) -> torch.Tensor:
    """(frames * 196 + extra, width): a still background with noise and a moving square, so that
    stage 1 finds static and dynamic tokens."""
    generator = torch.Generator().manual_seed(frames)
    background = torch.randn(SIDE * SIDE, width, generator=generator)
    video = background.expand(frames, -1, -1).clone() + 0.05 * torch.randn(frames, SIDE * SIDE, width)
    grid = video.view(frames, SIDE, SIDE, width)
    for t in range(frames):
        x = t % (SIDE - 4)
        grid[t, 4:8, x : x + 4] = 3.0
    return torch.cat([video.flatten(0, 1), torch.randn(extra, width, generator=generator)])


def _llava_inputs(model, tokenizer, frames: int) -> dict:
    prompt = llava_onevision.video_prompt(tokenizer, model.config, frames, QUESTION)
    inputs = dict(tokenizer([prompt], return_tensors="pt"))
    width = model.config.text_config.hidden_size
    features = _features(frames, width, extra=1)[None]  # the video's newline token last
    return {**inputs, "mm_encoder_outputs": {"video": BaseModelOutputWithPooling(pooler_output=features)}}


def _qwen_inputs(model, tokenizer, frames: int) -> dict:
    merge = model.config.vision_config.spatial_merge_size
    thw = torch.tensor([frames, SIDE * merge, SIDE * merge])
    prompt = qwen2_vl.video_prompt(tokenizer, model.config, thw, QUESTION)
    inputs = dict(tokenizer([prompt], return_tensors="pt"))
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == model.config.video_token_id).long() * 2
    inputs["video_grid_thw"] = thw[None]
    features = _features(frames, model.config.text_config.hidden_size)
    if model.config.model_type != "qwen3_vl":
        return {
            **inputs,
            "mm_encoder_outputs": {"video": BaseModelOutputWithPooling(pooler_output=[features])},
        }
    levels = len(model.config.vision_config.deepstack_visual_indexes)  # per level, per video
    encoded = BaseModelOutputWithDeepstackFeatures(
        pooler_output=[features], deepstack_features=[[features.flip(0)] for _ in range(levels)]
    )
    return {**inputs, "mm_encoder_outputs": {"video": encoded}}


def _generate(model, inputs: dict, new_tokens: int) -> _Probe:
    # Fresh features every call: a patched model would reuse stage 1 on the same tensor.
    video = inputs["mm_encoder_outputs"]["video"]
    fresh = type(video)(**{name: _clone(value) for name, value in video.items()})
    inputs = {**inputs, "mm_encoder_outputs": {"video": fresh}}
    with torch.no_grad(), _Probe() as probe:
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return probe


def _clone(features):
    return [_clone(f) for f in features] if isinstance(features, list) else features.clone()


def _counts(model, inputs: dict) -> dict:
    """Prefill (a one-token generate) and one decode step (the difference per extra token)."""
    prefill = _generate(model, inputs, 1)
    longer = _generate(model, inputs, 1 + DECODE_STEPS)
    return {
        "prefill": prefill,
        "step_ops": (longer.ops - prefill.ops) / DECODE_STEPS,
        "step_reads": (longer.reads - prefill.reads) / DECODE_STEPS,
    }


def _launches(probe: HostProbe) -> int:
    return probe.ops - probe.views


def measure(model, make_inputs, tokenizer, frames: int, retention: float | None) -> dict:
    """Stock and patched counts of one prompt of `frames` frames."""
    inputs = make_inputs(model, tokenizer, frames)
    stock = _counts(model, inputs)
    prunevid.patch(model, PruneVidConfig(selected_layer=1), retention=retention)
    try:
        patched = _counts(model, inputs)
    finally:
        prunevid.unpatch(model)
    stock_side, patched_side = stock["prefill"].model_side(), patched["prefill"].model_side()
    return {
        "ops": patched["prefill"].ops - stock["prefill"].ops,
        "launches": _launches(patched["prefill"]) - _launches(stock["prefill"]),
        "reads": patched["prefill"].reads - stock["prefill"].reads,
        "side_ops": patched_side[0] - stock_side[0],
        "side_reads": patched_side[1] - stock_side[1],
        "stage_reads": patched["prefill"].stage_reads(),
        "adapter_reads": patched["prefill"].adapter_reads(),
        "step_ops": patched["step_ops"] - stock["step_ops"],
        "step_reads": patched["step_reads"] - stock["step_reads"],
        "probe": patched["prefill"],
    }


CASES = [
    pytest.param(family, retention, id=f"{family}-{mode}")
    for family in ("llava", "qwen", "qwen3")
    for retention, mode in ((None, "paper"), (0.25, "budget"))
]


@pytest.mark.parametrize("family,retention", CASES)
def test_patched_prefill_and_decode_cost_what_stock_costs(request, tokenizer, family, retention):
    model = request.getfixturevalue(family)
    make_inputs = _llava_inputs if family == "llava" else _qwen_inputs
    few = measure(model, make_inputs, tokenizer, 8, retention)
    many = measure(model, make_inputs, tokenizer, 32, retention)
    reads = dict(many["probe"].reads_by_op)
    report = {k: (few[k], many[k]) for k in few if k != "probe"}
    print(family, retention, report)
    # The model side: bounded, independent of the frame count, and no host read beyond stock's.
    assert many["side_ops"] <= MODEL_SIDE_OPS[family], report
    assert many["side_ops"] <= GROWTH * max(few["side_ops"], 1), report
    assert many["side_reads"] <= MODEL_SIDE_READS, reads
    assert many["adapter_reads"] <= ADAPTER_READS, reads
    # The stages read only what shapes need, whatever the frame count.
    assert many["stage_reads"] <= STAGE_READS[retention], reads
    # The whole prefill, stage 1 included.
    assert many["ops"] <= TOTAL_OPS[family][retention], report
    assert many["ops"] <= GROWTH * few["ops"], report
    assert many["launches"] <= TOTAL_LAUNCHES, report
    assert many["reads"] <= TOTAL_READS[retention], reads
    # A decode step: no host read, at most 2 ops over stock.
    assert many["step_reads"] <= 0, report
    assert many["step_ops"] <= 2, report


def test_traces_stay_on_the_device_until_read_then_one_transfer(llava, tokenizer):
    inputs = _llava_inputs(llava, tokenizer, 8)
    prunevid.patch(llava, PruneVidConfig(selected_layer=1))
    try:
        probe = _generate(llava, inputs, 2)
        pending = llava.model._prunevid.traces
        with _Probe() as read:
            traces = prunevid.last_traces(llava)
        again = prunevid.last_traces(llava)
    finally:
        prunevid.unpatch(llava)
    assert not any("trace.py" in op for op in probe.reads_by_op), dict(probe.reads_by_op)
    assert isinstance(pending[0], PendingTrace), "generate() leaves the trace on the device"
    # One device-to-host copy; from_stages then works on host tensors (its .cpu() copies nothing).
    copies = [op for op in read.reads_by_op if op.startswith("Tensor.cpu") and "(materialize)" in op]
    assert [read.reads_by_op[op] for op in copies] == [1], dict(read.reads_by_op)
    assert again[0] is traces[0], "read once, then kept as numpy"
    assert traces[0].num_after_stage2 < traces[0].num_after_stage1 < traces[0].num_visual_tokens


def test_a_materialized_trace_equals_the_one_built_from_host_arrays():
    """Packing every field into one float64 transfer loses nothing (indices, flags, NaN scores)."""
    features = _features(4, 16).view(4, SIDE * SIDE, 16)
    merge = merge_tokens(features, PruneVidConfig(), (SIDE, SIDE))
    kept = torch.rand(merge.num_tokens) > 0.5
    scores = torch.rand(merge.num_tokens)
    scores[::7] = float("nan")
    details = {"timings": {"stage1_s": 0.5}, "config": {"alpha": 0.4}, "method": "prunevid", "num_layers": 4}
    expected = PruningTrace.from_stages(merge, kept=kept.numpy(), scores=scores.numpy(), **details)
    both = materialize([PendingTrace.of(merge, kept, scores, **details), None])
    got = both[0]
    assert both[1] is None
    for name in ("segment", "static", "merged_index", "kept"):
        assert np.array_equal(getattr(got, name), getattr(expected, name)), name
        assert getattr(got, name).dtype == getattr(expected, name).dtype, name
    assert np.array_equal(got.score, expected.score, equal_nan=True)
    assert got.summary() == expected.summary()
