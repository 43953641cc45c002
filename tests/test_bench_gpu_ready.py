"""What makes `prunevid bench speed` right on a GPU, checked on the CPU: fenced clocks (and stage
clocks fenced only when asked), warm vision and preprocessing timings, `--profile`'s counting,
frames preprocessed on the device within a stated tolerance of the processors' pixels, and
`load_model` honouring `dtype` for the offline models."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from prunevid import cli, pipeline
from prunevid.bench import measure
from prunevid.bench.measure import TokenClock, time_vision
from prunevid.bench.profile import Cost, Event, cpu_busy_ms, device_counts
from prunevid.bench.report import profile_table
from prunevid.bench.speed import METHOD_NAMES
from prunevid.models import base, llava_onevision, qwen2_vl, timing
from prunevid.models.base import for_device

FIXTURES = np.load(Path(__file__).parent / "data" / "processor_fixtures.npz")
CASES = sorted({key.split("/")[0] for key in FIXTURES.files if "/" in key})
CUDA = torch.device("cuda")


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every torch.cuda.synchronize call (replaced: this machine may have no GPU)."""
    calls: list = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    return calls


# ---- clocks ------------------------------------------------------------------------------------


def test_stage_timings_queue_events_and_never_wait_for_a_gpu(
    syncs: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server's prefill records two CUDA events per stage and waits for neither; reading the
    trace waits for the end event only."""
    recorded, waited = [], []

    class FakeEvent:
        def __init__(self, enable_timing: bool) -> None:
            assert enable_timing

        def record(self, stream) -> None:
            recorded.append(self)

        def synchronize(self) -> None:
            waited.append(self)

        def elapsed_time(self, end) -> float:
            return 12.5  # ms

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    interval = timing.Interval(CUDA).stop()
    assert len(recorded) == 2 and waited == [] and syncs == []
    assert interval.seconds() == 0.0125
    assert waited == [recorded[1]] and syncs == []
    timing.clock(CUDA)
    assert syncs == [CUDA], "the benchmark's clock waits for the device"
    timing.clock(torch.device("cpu"))
    assert syncs == [CUDA]


def test_token_clock_fences_every_new_token_on_a_gpu(syncs: list) -> None:
    tokens = TokenClock(CUDA)
    for _ in range(4):  # the prompt, then three new tokens
        tokens.put(torch.zeros(1))
    assert len(syncs) == 3 and len(tokens.times) == 3
    cpu = TokenClock(torch.device("cpu"))
    for _ in range(4):
        cpu.put(torch.zeros(1))
    assert len(syncs) == 3


def test_vision_is_timed_on_its_second_call(monkeypatch: pytest.MonkeyPatch) -> None:
    seconds = iter([0.9, 0.05])  # a cold call, then a warm one
    calls = []
    monkeypatch.setattr(measure, "model_inputs", lambda *args: ({}, 0.0))
    monkeypatch.setattr(measure, "vision_features", lambda model, inputs: (calls.append(1), next(seconds)))
    frames = np.zeros((16, 8, 8, 3), np.uint8)
    assert time_vision(None, None, frames, 2) == pytest.approx(0.05 * 16 / 2)
    assert len(calls) == 2


# ---- --profile ---------------------------------------------------------------------------------


def test_device_counts_of_a_known_trace() -> None:
    events = [
        Event("cudaLaunchKernel", False, 0, 2),
        Event("gemm_kernel", True, 10, 20),
        Event("softmax_kernel", True, 15, 25),  # overlaps the gemm: busy 10-25
        Event("cudaMemcpyAsync", False, 30, 31),
        Event("Memcpy DtoH (Device -> Pageable)", True, 30, 32),
        Event("cudaStreamSynchronize", False, 31, 33),
        Event("Memset (Device)", True, 40, 41),
        Event("Memcpy HtoD (Pageable -> Device)", True, 50, 54),
        Event("Memcpy DtoD (Device -> Device)", True, 60, 61),
        Event("cudaDeviceSynchronize", False, 70, 71),
        Event("aten::mm", False, 0, 5, self_us=3000),
    ]
    counts = device_counts(events)
    assert counts == {
        "kernels": 2,
        "syncs": 2,
        "copies": 2,
        "busy_ms": pytest.approx((15 + 2 + 1 + 4 + 1) / 1000),
    }
    assert cpu_busy_ms(events) == pytest.approx(3.0)


def test_a_cuda_call_is_profiled_for_kernels_syncs_and_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    """`call_cost`'s GPU branch on a made-up CUDA trace: the GPU's counts replace the CPU's busy
    time, the profile's own closing fence is not counted, annotations are no kernels."""
    from torch.autograd import DeviceType

    from prunevid.bench import profile

    def event(name: str, on_gpu: bool, start: float, end: float, annotation: bool = False) -> SimpleNamespace:
        return SimpleNamespace(
            name=name,
            device_type=DeviceType.CUDA if on_gpu else DeviceType.CPU,
            time_range=SimpleNamespace(start=start, end=end),
            self_cpu_time_total=0 if on_gpu else end - start,
            is_user_annotation=annotation,
        )

    trace = [
        event("aten::mm", False, 0, 4),
        event("cudaLaunchKernel", False, 1, 2),
        event("## forward ##", True, 0, 100, annotation=True),
        event("gemm_kernel", True, 5, 9),
        event("Memcpy DtoH (Device -> Pageable)", True, 9, 10),
        event("cudaStreamSynchronize", False, 10, 11),
        event("cudaDeviceSynchronize", False, 20, 21),  # the profile's closing fence
    ]
    asked = []

    class Profiler:
        def __init__(self, activities: list) -> None:
            asked.append(activities)

        def __enter__(self) -> Profiler:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def events(self) -> list:
            return trace

    ticks = iter(range(100))
    monkeypatch.setattr(profile, "generate", lambda *args: None)
    monkeypatch.setattr(profile, "clock", lambda device, fence=None: next(ticks) / 1000)
    monkeypatch.setattr(torch.profiler, "profile", Profiler)
    cost = profile.call_cost(SimpleNamespace(device=CUDA), None, 1)
    assert torch.profiler.ProfilerActivity.CUDA in asked[0]
    assert (cost.kernels, cost.syncs, cost.copies) == (1, 1, 1)
    assert cost.busy_ms == pytest.approx(0.005) and cost.wall_ms == pytest.approx(1.0)


def test_a_decode_step_is_the_difference_over_the_steps() -> None:
    prefill = Cost(wall_ms=80, busy_ms=70, ops=1000, reads=4, uploads=2, kernels=1200, syncs=10, copies=20)
    longer = Cost(wall_ms=320, busy_ms=230, ops=9000, reads=12, uploads=2, kernels=9200, syncs=18, copies=36)
    step = prefill.per_step(longer, 8)
    assert step == Cost(wall_ms=30, busy_ms=20, ops=1000, reads=1, uploads=0, kernels=1000, syncs=1, copies=2)
    assert step.host_ms == 10
    on_cpu = Cost(10, 6, 100, 0, 1).per_step(Cost(26, 14, 500, 0, 1), 4)
    assert on_cpu.kernels is None and on_cpu.ops == 100 and on_cpu.host_ms == 2


def test_profile_table_shows_gpu_counts_only_from_a_gpu() -> None:
    cpu = {
        "name": "stock",
        "prefill": Cost(10, 6, 338, 0, 10).record(),
        "decode_step": Cost(2, 1, 282.5, 0, 0).record(),
    }
    gpu = {
        "name": "prunevid",
        "prefill": Cost(46.7, 20.1, 900, 26, 3, 1818, 84, 150).record(),
        "decode_step": Cost(31, 27, 291, 0, 0, 1349, 1, 2).record(),
    }
    table = profile_table([cpu])
    assert "kernels" not in table and "| stock | prefill | 10.00 | 6.00 | 4.00 | 338 | 0 | 10 |" in table
    assert "| stock | decode step | 2.00 | 1.00 | 1.00 | 282.5 | 0 | 0 |" in table
    both = profile_table([cpu, gpu]).splitlines()
    assert both[0].endswith("| kernels | syncs | device-host copies |")
    assert "| prunevid | prefill | 46.70 | 20.10 | 26.60 | 900 | 26 | 3 | 1818 | 84 | 150 |" in both
    assert "| stock | prefill | 10.00 | 6.00 | 4.00 | 338 | 0 | 10 | - | - | - |" in both


@pytest.fixture(scope="module")
def profiled(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("profile")
    markdown = folder / "speed.md"
    args = ["bench", "speed", "--quick", "--profile", "--json", str(folder / "speed.json")]
    assert cli.main([*args, "--markdown", str(markdown)]) == 0
    return {"result": json.loads((folder / "speed.json").read_text()), "markdown": markdown.read_text()}


def test_profile_covers_every_method_with_its_own_settings(profiled: dict) -> None:
    rows = {r["name"]: r for r in profiled["result"]["profile"]}
    assert list(rows) == list(METHOD_NAMES)
    for row in rows.values():
        for call in ("prefill", "decode_step"):
            cost = row[call]
            assert cost["kernels"] is None and cost["syncs"] is None, "no GPU counts from a CPU run"
            assert cost["ops"] > 0 and cost["host_ms"] == pytest.approx(cost["wall_ms"] - cost["busy_ms"])
    # Each method is profiled patched with its own settings, not the stock model every time.
    assert rows["stage1"]["prefill"]["ops"] > rows["stock"]["prefill"]["ops"]
    assert rows["prunevid"]["prefill"]["ops"] > rows["stage2"]["prefill"]["ops"]
    assert rows["stock"]["prefill"]["reads"] < rows["prunevid"]["prefill"]["reads"]
    assert profiled["result"]["command"].endswith(" --profile")
    assert "| prunevid | decode step |" in profiled["markdown"]


def test_table_splits_preprocessing_vision_stage1_and_prefill(profiled: dict) -> None:
    result = profiled["result"]
    vision = result["vision"]
    head, _, *rows = result["table"].splitlines()
    columns = [c.strip() for c in head.strip("|").split("|")]
    assert columns[2:6] == ["preprocess s", "vision s", "stage 1 s", "LM prefill s, median [min-max]"]
    for method, row in zip(result["methods"], rows):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2] == f"{vision['preprocess_s']:.3f}" and cells[3] == f"{vision['vision_s']:.3f}"
        assert method["ttft_s"] == pytest.approx(
            vision["preprocess_s"] + vision["vision_s"] + method["llm_prefill_s"]
        )
        intervals = method["decode_steps_ms"]  # one list per repeat: every fenced interval
        assert len(intervals) == result["repeats"] and all(
            len(i) == result["new_tokens"] - 1 for i in intervals
        )
        assert method["decode_median_step_ms"] == pytest.approx(float(np.median(intervals[0])))


SHIM = """#!/usr/bin/env bash
# A stand-in python: says CUDA is there, records each benchmark command, writes its report.
if [[ "$1" == -c ]]; then exit 0; fi
echo "$*" >> "$(dirname "$0")/calls"
while [[ $# -gt 0 ]]; do if [[ "$1" == --markdown ]]; then echo report > "$2"; fi; shift; done
"""


@pytest.mark.parametrize(("device", "profiled"), [("cuda", True), ("cpu", False)])
def test_gpu_check_profiles_on_a_gpu(device: str, profiled: bool, tmp_path: Path) -> None:
    """The script's GPU run, with a stand-in python: every arch's command carries --profile on
    CUDA (one run gets everything); the CPU runs the tests make skip it."""
    import os
    import subprocess

    shim = tmp_path / "python"
    shim.write_text(SHIM)
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "PYTHON": str(shim)}
    env |= {"GPU_CHECK_DEVICE": device, "GPU_CHECK_OUT": str(tmp_path / "out.md")}
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [c.split(" --arch ")[1].split()[0] for c in calls] == ["qwen2-7b", "qwen2.5-vl-7b"]
    assert all(f"--device {device} " in c and ("--profile" in c.split()) == profiled for c in calls)


# ---- preprocessing on the device ----------------------------------------------------------------


def _case(name: str) -> dict:
    return {key.split("/", 1)[1]: FIXTURES[key] for key in FIXTURES.files if key.startswith(f"{name}/")}


@pytest.mark.parametrize("name", CASES)
def test_device_preprocessing_is_within_two_levels_of_the_processors(name: str, tmp_path: Path) -> None:
    """The torch path (run here on the CPU, as it runs on a GPU) against the processors' pixels:
    measured at most 2 levels on 0.2-0.9% of the values (the uint8 kernel's fixed-point weights)."""
    data = _case(name)
    settings = tmp_path / "video_preprocessor_config.json"
    settings.write_text(str(data["settings"]))
    family = llava_onevision.FrameProcessing if str(data["family"]) == "llava" else qwen2_vl.VideoPatchify
    exact = family.from_json(str(settings))
    ours, theirs = dataclasses.replace(exact, device="cpu")(data["clip"]), exact(data["clip"])
    if isinstance(ours, tuple):  # Qwen-VL: (patches, grid)
        assert torch.equal(ours[1], theirs[1])
        ours, theirs = ours[0], theirs[0]
    level = exact.rescale / min(exact.std)  # one uint8 step in normalised units
    difference = (ours - theirs).abs()
    assert ours.shape == theirs.shape and ours.dtype == torch.float32
    assert float(difference.max()) <= 2 * level + 1e-5
    assert float((difference > 1e-6).float().mean()) < 0.015


@pytest.mark.parametrize("family", [llava_onevision.FrameProcessing, qwen2_vl.VideoPatchify])
def test_a_device_selects_the_torch_path(family: type, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = []
    for name in ("resize_uint8", "resize_float"):
        original = getattr(base, name)
        monkeypatch.setattr(
            base, name, lambda *args, name=name, original=original: (paths.append(name), original(*args))[1]
        )
    frames = np.zeros((2, 56, 56, 3), np.uint8)
    family()(frames)
    family(device="cpu")(frames)
    assert paths == ["resize_uint8", "resize_float"]


def test_preprocessing_moves_to_a_gpu_only() -> None:
    processing = llava_onevision.FrameProcessing()
    assert for_device(processing, "cpu") is processing
    assert for_device(processing, CUDA).device == "cuda"
    assert for_device(qwen2_vl.VideoPatchify(), "cuda:1").device == "cuda:1"


# ---- load_model(dtype=...) ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen", "tiny-trained"])
def test_offline_models_load_in_the_dtype_asked(name: str) -> None:
    loaded = pipeline.load_model(name, dtype="bfloat16", device="cpu")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert {
        p.dtype for p in pipeline.load_model(name, dtype=torch.float16, device="cpu").model.parameters()
    } == {torch.float16}
    assert {p.dtype for p in pipeline.load_model(name, device="cpu").model.parameters()} == {torch.float32}


def test_offline_model_answers_in_bf16() -> None:
    loaded = pipeline.load_model("tiny-trained", dtype="bfloat16", device="cpu")
    frames = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    result = pipeline.answer(loaded, frames, "what colour is the object ?", max_new_tokens=3)
    assert result.num_new_tokens >= 1 and result.trace.num_after_stage2 < result.trace.num_visual_tokens


def test_auto_dtype_on_a_gpu_is_bf16_for_offline_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """ZeroGPU's "bf16 on the GPU": `load_model` picks CUDA there, and the tiny models follow."""
    from prunevid import testing

    def tiny_without_a_gpu(tokenizer):
        model = testing.tiny_model(tokenizer=tokenizer)
        to = model.to
        model.to = lambda device=None, dtype=None: to(dtype=dtype)  # this machine has no CUDA
        return model

    monkeypatch.setattr(pipeline, "_tiny_models", lambda: {"tiny": tiny_without_a_gpu})
    loaded = pipeline.load_model("tiny", device="cuda")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_unknown_dtype_is_one_sentence() -> None:
    with pytest.raises(ValueError, match=r"^unknown dtype 'bf17': use e\.g\. bfloat16, float16 or float32$"):
        pipeline.load_model("tiny", dtype="bf17", device="cpu")
