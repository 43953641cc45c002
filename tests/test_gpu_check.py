"""scripts/gpu_check.sh without a GPU (one line, exit 0) and its driver, scripts/gpu_bench.py, run
on the CPU with the tiny model: the benchmark runs through the device placement and its table is
appended to the results file under a heading naming the device and settings."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would measure")
def test_gpu_check_without_a_gpu_says_so_and_exits_cleanly():
    before = (ROOT / "docs" / "bench_speed.md").read_text()
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout
        == "gpu_check: no CUDA GPU on this machine; nothing measured, docs/bench_speed.md unchanged.\n"
    )
    assert (ROOT / "docs" / "bench_speed.md").read_text() == before


def test_the_driver_runs_the_benchmark_and_appends_its_table(tmp_path, monkeypatch):
    from prunevid.models import llava_onevision, qwen2_vl

    for family in (llava_onevision, qwen2_vl):  # the driver rewires these: restore them afterwards
        monkeypatch.setattr(family, "build_inputs", family.build_inputs)
        monkeypatch.setattr(family, "video_features", family.video_features)
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "scripts" / "gpu_bench.py")
    gpu_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_bench)

    results = tmp_path / "results.md"
    results.write_text("# earlier results\n")
    args = ["--arch", "tiny", "--frames", "4", "--repeats", "1", "--new-tokens", "2", "--warmup-frames", "0"]
    assert gpu_bench.main(["--device", "cpu", "--append", str(results), "--", *args]) == 0
    text = results.read_text()
    assert text.startswith("# earlier results\n\n## On cpu: tiny, float32, SDPA\n")
    assert "prunevid bench speed --arch tiny --frames 4" in text
    assert "| stock | 196 (100.0%) |" in text and "| prunevid |" in text
