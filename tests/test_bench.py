"""`prunevid bench speed --quick`: run in-process on the tiny model; invariants only, never timings."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from prunevid import cli
from prunevid.baselines import METHODS
from prunevid.bench.archs import ARCHS, BENCH_VOCAB, build_model, randomize
from prunevid.bench.speed import METHOD_NAMES, calibrate_tau
from prunevid.config import PruneVidConfig
from prunevid.merge import merge_tokens

REQUIRED = ("visual_tokens", "llm_prefill_s", "ttft_s", "decode_ms_per_token", "kv_bytes", "flops", "speedup")


# Per quick arch: (time steps, tokens per step) of the 16-frame 320 x 180 clip. LLaVA-OneVision:
# 16 frames of a 7 x 7 pooled grid. Qwen2.5-VL: two frames per step; the video processor scales
# 320 x 180 up to its 128 x 28 x 28 minimum, 252 x 448 pixels, i.e. 9 x 16 merged tokens.
GRIDS = {"tiny": (16, 7 * 7), "tiny-qwen": (8, 9 * 16)}


@pytest.fixture(scope="module", params=sorted(GRIDS))
def quick(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("bench")
    args = [
        "bench",
        "speed",
        "--quick",
        "--arch",
        request.param,
        "--sweep",
        "--retentions",
        "0.1",
        "--json",
        str(folder / "speed.json"),
    ]
    args += ["--sweep-csv", str(folder / "sweep.csv"), "--sweep-png", str(folder / "sweep.png")]
    assert cli.main(args) == 0
    return {
        "arch": request.param,
        "result": json.loads((folder / "speed.json").read_text()),
        "csv": list(csv.DictReader((folder / "sweep.csv").open())),
        "png": folder / "sweep.png",
    }


def _methods(quick: dict) -> dict[str, dict]:
    return {m["name"]: m for m in quick["result"]["methods"]}


def test_json_schema(quick: dict) -> None:
    result = quick["result"]
    assert isinstance(result["machine"], dict) and result["machine"]["cpu"]
    assert [m["name"] for m in result["methods"]] == list(METHOD_NAMES)
    for method in result["methods"]:
        for key in REQUIRED:
            assert isinstance(method[key], int | float), (method["name"], key)


def test_token_counts_are_consistent(quick: dict) -> None:
    result, by = quick["result"], _methods(quick)
    total = by["stock"]["total_visual_tokens"]
    steps, per_step = GRIDS[quick["arch"]]
    assert total == steps * per_step
    assert by["stock"]["visual_tokens"] == by["stock"]["stage1_tokens"] == total
    assert by["prunevid"]["visual_tokens"] <= by["stage1"]["visual_tokens"] <= by["stock"]["visual_tokens"]
    assert by["stage1"]["visual_tokens"] == result["calibration"]["tokens"]
    assert by["prunevid"]["stage1_tokens"] == result["calibration"]["tokens"]
    # The budget the bench predicts for FastV/random is what the trace reports for PruneVid.
    assert by["prunevid"]["visual_tokens"] == result["predicted_kept"]
    assert by["fastv"]["visual_tokens"] == by["random"]["visual_tokens"] == by["prunevid"]["visual_tokens"]
    # Stage 2 alone keeps int(alpha * N) tokens of each time step.
    assert by["stage2"]["visual_tokens"] == steps * int(0.4 * per_step)


def test_every_method_runs_at_exactly_each_budget(quick: dict) -> None:
    budgets = quick["result"]["budgets"]
    steps, per_step = GRIDS[quick["arch"]]
    total, layers, selected = steps * per_step, 4, 1  # the tiny models: 4 decoder layers, stage 2 at 1
    assert budgets[0]["name"] == "stock"
    assert [(r["name"], r["retention_target"]) for r in budgets[1:]] == [(name, 0.1) for name in METHODS]
    for record in budgets[1:]:
        final = round(record["retention_target"] * total)
        assert record["visual_tokens"] == final, record["label"]
        before = total if record["name"] in ("stage2", "fastv", "random") else record["stage1_tokens"]
        if record["name"] in ("prunevid", "stage2", "fastv", "random"):  # pruned after layer 1 of 4
            averaged = ((selected + 1) * before + (layers - selected - 1) * final) / (layers * total)
        else:  # before the language model: every layer sees the final count
            averaged = final / total
        assert record["retention_layer_averaged"] == pytest.approx(averaged), record["label"]
    # Every method leaves the same cache: the text and the kept tokens.
    assert (
        len({r["kv_tokens"] for r in budgets[1:]}) == 1 and budgets[1]["kv_tokens"] < budgets[0]["kv_tokens"]
    )


def test_cache_matches_the_sequence(quick: dict) -> None:
    by = _methods(quick)
    per_token = by["stock"]["kv_bytes"] / by["stock"]["kv_tokens"]
    for method in by.values():
        assert method["kv_tokens"] == method["sequence_tokens"][1], method["name"]
        assert method["kv_bytes"] == per_token * method["kv_tokens"], method["name"]
    assert by["prunevid"]["kv_bytes"] < by["stage1"]["kv_bytes"] < by["stock"]["kv_bytes"]


def test_flops_ordering(quick: dict) -> None:
    by = _methods(quick)
    flops = {name: m["flops"] for name, m in by.items()}
    assert flops["stock"] > flops["stage1"] > flops["prunevid"]
    assert flops["stock"] > flops["stage2"] > flops["fastv"] == flops["random"]
    assert flops["prunevid"] < flops["fastv"]  # same final tokens, shorter early layers
    for method in by.values():
        assert method["flops_speedup"] == pytest.approx(flops["stock"] / method["flops"])


def test_times_are_non_negative(quick: dict) -> None:
    result = quick["result"]
    for method in result["methods"]:
        for key in ("llm_prefill_s", "llm_prefill_min_s", "ttft_s", "stage1_s", "decode_ms_per_token"):
            assert method[key] >= 0, (method["name"], key)
        assert method["ttft_s"] >= method["llm_prefill_s"]
        assert method["llm_prefill_min_s"] <= method["llm_prefill_s"] <= method["llm_prefill_max_s"]
    stock = _methods(quick)["stock"]
    for method in result["methods"]:  # every speedup is against the stock row's median prefill
        assert method["speedup"] == pytest.approx(stock["llm_prefill_s"] / method["llm_prefill_s"]), method[
            "name"
        ]
    for name in ("stage1", "prunevid"):  # stage 1 runs (and is timed) in every call
        assert _methods(quick)[name]["stage1_s"] > 0
    assert result["vision"]["vision_s"] >= 0 and result["vision"]["preprocess_s"] >= 0


def test_sweep_outputs(quick: dict) -> None:
    rows = quick["csv"]
    assert [r["name"] for r in rows] == ["stock", "cr=0.5 alpha=0.4", "cr=0.5 alpha=1"]
    assert float(rows[1]["retention"]) < float(rows[2]["retention"]) <= 1
    assert float(rows[1]["flops_speedup"]) > float(rows[2]["flops_speedup"]) > 1
    pytest.importorskip("matplotlib")
    assert quick["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_targets_are_reported(quick: dict) -> None:
    """Each target's verdict and figure follow from the measured rows (whatever the timings are):
    the test asserts the arithmetic, never a speed."""
    result, by = quick["result"], _methods(quick)
    stock, ours, fastv = by["stock"], by["prunevid"], by["fastv"]
    kv_percent = 100 * ours["kv_bytes"] / stock["kv_bytes"]
    efficiency = ours["speedup"] / ours["flops_speedup"]
    points = [r for r in result["sweep"] if r["name"] != "stock"]
    assert len(points) == 2
    worst = min(points, key=lambda r: r["speedup"] / r["flops_speedup"])
    worst_efficiency = worst["speedup"] / worst["flops_speedup"]
    expected = [
        ("LM prefill >= 3x faster than stock", ours["speedup"] >= 3, f"{ours['speedup']:.2f}x"),
        (
            "stage 1 < 5% of stock prefill",
            ours["stage1_s"] < 0.05 * stock["llm_prefill_s"],
            f"{ours['stage1_s']:.3f} s = {100 * ours['stage1_s'] / stock['llm_prefill_s']:.2f}% "
            f"of {stock['llm_prefill_s']:.2f} s",
        ),
        ("KV cache <= 25% of stock", kv_percent <= 25, f"{kv_percent:.1f}%"),
        (
            "PruneVid at least as fast as FastV at equal retention",
            ours["llm_prefill_s"] <= fastv["llm_prefill_s"],
            f"{ours['llm_prefill_s']:.3f} s vs {fastv['llm_prefill_s']:.3f} s "
            f"({ours['visual_tokens']} vs {fastv['visual_tokens']} tokens)",
        ),
        (
            "PruneVid within 15% of its FLOPs-predicted speedup",
            efficiency >= 0.85,
            f"{ours['speedup']:.2f}x of {ours['flops_speedup']:.2f}x ({100 * efficiency:.0f}%)",
        ),
        (
            "every sweep point within 15% of its FLOPs-predicted speedup",
            worst_efficiency >= 0.85,
            f"worst {worst['name']}: {worst['speedup']:.2f}x of {worst['flops_speedup']:.2f}x "
            f"({100 * worst_efficiency:.0f}%); "
            f"{sum(r['speedup'] / r['flops_speedup'] >= 0.85 for r in points)}/2 points within",
        ),
    ]
    assert [(t["name"], t["met"], t["detail"]) for t in result["targets"]] == expected
    # FastV is compared at PruneVid's retention: the same number of tokens.
    assert ours["visual_tokens"] == fastv["visual_tokens"]


@pytest.mark.parametrize(
    ("name", "billions"),
    # Hub sizes of llava-hf/llava-onevision-qwen2-0.5b-ov-hf and Qwen/Qwen2.5-VL-3B-Instruct,
    # both with Qwen2's 151,936-row vocabulary (tied LM heads).
    [("qwen2-0.5b", 0.894), ("qwen2.5-vl-3b", 3.755)],
)
def test_arch_sizes_match_the_published_models(name: str, billions: float) -> None:
    arch = ARCHS[name]
    with torch.device("meta"):  # shapes only: no memory, no weights
        model, _ = build_model(arch)
    hidden = arch.text["hidden_size"]
    full_vocab = sum(p.numel() for p in model.parameters()) + (151_936 - BENCH_VOCAB) * hidden
    assert full_vocab / 1e9 == pytest.approx(billions, rel=0.01)


def test_calibration_hits_the_target() -> None:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(1, 36, 16, generator=generator)
    frames = base + 0.3 * torch.randn(8, 36, 16, generator=generator)  # 8 frames, 6 x 6 grid
    config = PruneVidConfig(num_frames=8)
    calibration = calibrate_tau(frames, config, retention=0.3)
    assert calibration.target == round(0.3 * 8 * 36)
    assert merge_tokens(frames, config.replace(tau=calibration.tau)).num_tokens == calibration.tokens
    assert abs(calibration.tokens - calibration.target) <= 0.05 * calibration.total


def test_randomize_is_deterministic() -> None:
    def make() -> torch.nn.Module:
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        randomize(model, seed=3)
        return model

    a, b = make(), make()
    assert torch.equal(a[0].weight, b[0].weight) and a[0].weight.std() > 0
    assert torch.equal(a[0].bias, torch.zeros(4)) and torch.equal(a[1].weight, torch.ones(4))


def test_bad_arguments_are_one_sentence(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert cli.main(["bench", "speed", "--quick", "--video", str(tmp_path / "missing.mp4")]) == 2
    assert "video not found" in capsys.readouterr().err
